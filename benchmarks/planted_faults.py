"""Planted faults: damage one layer group of a trained model, rank, and see which score finds it.

    python benchmarks/planted_faults.py [--quick] [--seeds 0,1,2] [--out results.json]

For each layer group of the SGD sample and each fault kind (Gaussian noise scaled to each
parameter's own spread; a BatchNorm running-mean shift scaled to the running std), the damage scale
is found by bisection so that held-out accuracy falls by about 10 points (5 to 15), then the model
is ranked (all metrics in one pass). Reports, per metric, hits@1 (damaged group ranked first) and
the mean rank of the damaged group, overall and per group; random choice is the floor
(hits@1 = 1/G, mean rank (G+1)/2). Baseline auto_rgn: Auto-RGN of surgical fine-tuning (Lee et al.
2023), the norm of the gradient summed over all examples (right and wrong) relative to the group's
weight norm. --figure writes the coherence confusion matrix (damaged group vs group ranked first).
--quick: one seed, noise only, 1,000 images.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from beta_diag.attribution import summed_gradient
from beta_diag.groups import Group, layer_groups
from beta_diag.ranking import Metric, RankConfig, flags, rank
from beta_diag.session import DataChoice, Session, open_session

SGD = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "fmnist_resnet18w16_sgd_beta.safetensors"
TARGET, LOW, HIGH = 0.10, 0.05, 0.15


def damage(model: nn.Module, group: str, kind: str, scale: float, seed: int) -> nn.Module | None:
    """A copy of ``model`` with ``group`` damaged; None when the fault kind does not apply."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    touched = False
    with torch.no_grad():
        for name, module in out.named_modules():
            if not (name == group or name.startswith(group + ".")):
                continue
            if kind == "noise":
                for p in module.parameters(recurse=False):
                    if p.numel() > 1:
                        p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
                        touched = True
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.add_(torch.randn(module.running_mean.shape, generator=gen) * module.running_var.sqrt() * scale)
                touched = True
    return out if touched else None


def auto_rgn(session: Session, ds: object, groups: list[Group]) -> np.ndarray:
    """||sum of gradients over every example||_g / ||theta_g|| per group."""
    grad = summed_gradient(session.model, ds, torch.arange(len(ds)), session.preprocess, session.device)  # type: ignore[arg-type]
    params = dict(session.model.named_parameters())
    sq = [(sum(float(grad[p].double().pow(2).sum()) for p in g.param_names), sum(float(params[p].double().pow(2).sum()) for p in g.param_names))
          for g in groups]
    return np.array([(gs / ws) ** 0.5 if ws > 0 else 0.0 for gs, ws in sq])


def accuracy(session: Session, model: nn.Module, ds: object) -> float:
    return replace(session, model=model).evaluate(ds).accuracy  # type: ignore[arg-type]


def calibrate(session: Session, ds: object, group: str, kind: str, seed: int, base: float) -> tuple[float, nn.Module | None, float]:
    """Scale whose damage costs about TARGET accuracy (bisection on a log scale)."""
    lo, hi = 0.0, 0.05
    model = damage(session.model, group, kind, hi, seed)
    if model is None:
        return 0.0, None, 0.0
    for _ in range(10):  # grow until the drop reaches the target
        drop = base - accuracy(session, model, ds)
        if drop >= TARGET:
            break
        lo, hi = hi, hi * 3
        model = damage(session.model, group, kind, hi, seed)
    best = (hi, model, drop)
    for _ in range(6):
        if LOW <= best[2] <= HIGH:
            break
        mid = (lo + hi) / 2
        model = damage(session.model, group, kind, mid, seed)
        drop = base - accuracy(session, model, ds)
        best = (mid, model, drop) if abs(drop - TARGET) < abs(best[2] - TARGET) else best
        lo, hi = (mid, hi) if drop < TARGET else (lo, mid)
    return best[0], best[1], best[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figure", type=Path, help="write the coherence confusion matrix here (PNG)")
    parser.add_argument("--matrices", type=Path, help="save each damaged model's per-example matrices here (.npz)")
    args = parser.parse_args()
    print("command: python benchmarks/planted_faults.py" + (" --quick" if args.quick else f" --seeds {args.seeds}"))
    start = time.perf_counter()
    session = open_session(SGD, "cpu")
    ds = session.load_data(DataChoice(limit=1000 if args.quick else None))
    base = session.evaluate(ds).accuracy
    groups = layer_groups(session.model)
    names = [g.name for g in groups]
    metrics = [m.value for m in Metric] + ["auto_rgn"]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    kinds = ["noise"] if args.quick else ["noise", "bn_shift"]
    rows: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    for kind in kinds:
        for group in names:
            for seed in seeds:
                scale, model, drop = calibrate(session, ds, group, kind, seed, base)
                if model is None:
                    continue
                damaged = replace(session, model=model)
                r = rank(damaged, DataChoice(), RankConfig(metric=Metric.coherence, bootstrap=0), dataset=ds)
                baseline = auto_rgn(damaged, ds, groups)
                ranks, firsts, hit_flagged = {}, {}, {}
                for m in metrics:
                    values = baseline if m == "auto_rgn" else np.array([r.group(n).scores[m] for n in names])
                    firsts[m] = names[int(np.argmax(values))]
                    hit_flagged[m] = bool(flags(values, None)[names.index(group)])
                    ranks[m] = int(np.argsort(-values, kind="stable").tolist().index(names.index(group)) + 1)
                rows.append({"kind": kind, "group": group, "seed": seed, "scale": scale, "drop": drop, "errors": len(r.error_index), "ranks": ranks,
                             "first": firsts, "in_flagged": hit_flagged, "auto_rgn": baseline.tolist()})
                if args.matrices:  # the per-example matrices, to study other scores without re-running
                    m = r.matrices
                    assert m is not None
                    arrays.update({f"{len(rows) - 1}/{k}": getattr(m, k) for k in ("errors", "correct", "dots", "numel", "weight_norm")})
                print(f"{kind:8s} {group:7s} seed {seed}: scale {scale:.3g}, drop {100 * drop:.1f} pts, rank of damaged group "
                      + " ".join(f"{m}={ranks[m]}" for m in metrics), flush=True)
    g = len(names)
    print(f"\n{len(rows)} damaged models; random choice: hits@1 {1 / g:.2f}, mean rank {(g + 1) / 2:.1f}")
    print(f"{'metric':12s} {'hits@1':>7s} {'in flagged':>10s} {'mean rank':>10s}   " + " ".join(f"{n:>7s}" for n in names))
    for m in metrics:
        rk = [row["ranks"][m] for row in rows]
        per = [np.mean([row["ranks"][m] for row in rows if row["group"] == n] or [np.nan]) for n in names]
        in_flagged = np.mean([row["in_flagged"][m] for row in rows])
        print(f"{m:12s} {np.mean([x == 1 for x in rk]):7.2f} {in_flagged:10.2f} {np.mean(rk):10.2f}   " + " ".join(f"{x:7.1f}" for x in per))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"base_accuracy": base, "groups": names, "rows": rows}, indent=2))
    if args.matrices:
        np.savez_compressed(args.matrices, **arrays)
    if args.figure:
        from beta_diag import plots

        matrix = [[np.mean([row["first"]["coherence"] == col for row in rows if row["group"] == g] or [0.0]) for col in names] for g in names]
        plots.confusion(matrix, names, f"planted faults: coherence ranks first ({len(rows)} damaged models)", args.figure, force=True)


if __name__ == "__main__":
    main()
