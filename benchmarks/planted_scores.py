"""Other scores on the planted-fault matrices, without re-running: choose on some seeds, confirm on the rest.

    python benchmarks/planted_scores.py RESULTS.json MATRICES.npz [--choose 0,1]

RESULTS.json and MATRICES.npz come from ``benchmarks/planted_faults.py --out ... --matrices ...``.
Every candidate is a function of the per-example matrices `rank` keeps (squared norms on errors E
and on correct examples C, dot products D with the errors' summed gradient, parameter counts n,
weight norms w). Reports hits@1 and mean rank of the damaged group on the seeds used to choose and,
separately, on the held-out seeds, so that a score picked for its fit is not also judged by it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from beta_diag.scores import Matrices, scores

Score = Callable[[Matrices], np.ndarray]


def summed_norm(m: Matrices) -> np.ndarray:
    return m.summed_norm  # ||S_g||, S = sum of the errors' gradients


def load(arrays: np.lib.npyio.NpzFile, i: int) -> Matrices:
    """One damaged model's matrices; files written before rank's one pass hold the exact dots instead of ||S_g||."""
    get = {k: arrays[f"{i}/{k}"] for k in ("errors", "correct", "numel", "weight_norm")}
    if f"{i}/summed_norm" in arrays:
        return Matrices(get["errors"], get["correct"], arrays[f"{i}/summed_norm"], get["numel"], get["weight_norm"])
    dots = arrays[f"{i}/dots"]
    return Matrices(get["errors"], get["correct"], np.sqrt(np.maximum(dots.sum(0), 0)), get["numel"], get["weight_norm"], dots)


CANDIDATES: dict[str, Score] = {
    "coherence (default)": lambda m: scores(m)["coherence"],
    "||S|| / ||theta|| (Auto-RGN on errors)": lambda m: summed_norm(m) / np.maximum(m.weight_norm, 1e-12),
    "||S|| / sqrt(n)": lambda m: summed_norm(m) / np.sqrt(m.numel),
    "||S||": summed_norm,
    "coherence x contrast": lambda m: scores(m)["coherence"] * scores(m)["contrast"],
    "rms error-gradient / rms correct-gradient": lambda m: np.sqrt(m.errors.mean(0) / np.maximum(m.correct.mean(0), 1e-300)),
    "specific": lambda m: scores(m)["specific"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("matrices", type=Path)
    parser.add_argument("--choose", default="0,1", help="seeds used to choose; the others are held out")
    args = parser.parse_args()
    print(f"command: python benchmarks/planted_scores.py {args.results} {args.matrices} --choose {args.choose}")
    rows = json.loads(args.results.read_text())["rows"]
    names = json.loads(args.results.read_text())["groups"]
    arrays = np.load(args.matrices)
    chosen = {int(s) for s in args.choose.split(",")}
    mats = [load(arrays, i) for i in range(len(rows))]
    print(f"{'score':44s} {'choose: hits@1':>15s} {'mean rank':>10s} {'held out: hits@1':>17s} {'mean rank':>10s}")
    for label, fn in CANDIDATES.items():
        out = []
        for part in (True, False):
            ranks = [
                int(np.argsort(-fn(m), kind="stable").tolist().index(names.index(r["group"])) + 1)
                for r, m in zip(rows, mats)
                if (r["seed"] in chosen) == part
            ]
            out += [np.mean([x == 1 for x in ranks]) if ranks else np.nan, np.mean(ranks) if ranks else np.nan]
        print(f"{label:44s} {out[0]:15.2f} {out[1]:10.2f} {out[2]:17.2f} {out[3]:10.2f}")


if __name__ == "__main__":
    main()
