"""Label-free monitoring: `drift`'s shift test on batches of clean and corrupted images, against a fingerprint.

    python benchmarks/monitoring.py [--quick] [--samples sgd,adam,convnext] [--batches 40] [--out results.json]

Per sample: for the two BatchNorm samples, a fingerprint recorded on the bundled 5,000 training images (which
they never trained on); the sample without BatchNorm (convnext) uses its own, the one `train` recorded on the
30,000 images it was fitted to (so a fitted model's own train/test gap counts against it); then, per batch size
(100 and 500), --batches seeded batches of Fashion-MNIST's 10,000 test images (the bundled 3,000 without Debian's
dataset-fashion-mnist), each scored clean and under every corruption
of benchmarks/causes.py at both severities (the same images). Score: the shift test's largest |z|
(``monitor.check``). Reported per corruption and batch size: AUROC clean vs corrupted; the detection rate
at a 5% false-alarm rate (threshold: the clean batches' 95th percentile) and at the test's own alpha 0.05;
and the test's false-alarm rate on clean batches (goal: at most 0.05). Goal (issue 26): AUROC >= 0.95 at
500 images on every corruption but the mildest. --quick: the SGD sample, 4 batches, one corruption (contrast-2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from causes import corruptions
from drift_cost import test_images
from planted_faults import ADAM, SGD

from beta_diag import data, fingerprint, monitor
from beta_diag.session import DataChoice, open_session

TRAIN = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "fmnist_train_5k.safetensors"
CONVNEXT = TRAIN.parent / "fmnist_convnext24_adam_beta.safetensors"


def auroc(clean: list[float], shifted: list[float]) -> float:
    """P(a shifted batch scores above a clean one), ties counted half."""
    wins = sum((s > c) + 0.5 * (s == c) for s in shifted for c in clean)
    return wins / (len(clean) * len(shifted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", default="sgd,adam,convnext")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    batches = 4 if args.quick else args.batches
    samples = ["sgd"] if args.quick else args.samples.split(",")
    print(f"command: python benchmarks/monitoring.py {'--quick' if args.quick else f'--samples {args.samples} --batches {batches}'}")
    start = time.perf_counter()
    kinds = corruptions(0)
    if args.quick:
        kinds = {k: kinds[k] for k in ("contrast-2",)}
    results: dict[str, dict] = {}
    for name in samples:
        session = open_session({"sgd": SGD, "adam": ADAM, "convnext": CONVNEXT}[name], device="cpu")
        if session.ckpt.fingerprint is None:
            found = fingerprint.record(session, session.load_data(DataChoice(str(TRAIN), "train"), default_split="train"))
            session = replace(session, ckpt=replace(session.ckpt, fingerprint=found))
        pool = test_images(session, args.quick)
        rows: dict[str, dict] = {}
        for size in (100, 500):
            scores: dict[str, list[float]] = {"clean": [], **{k: [] for k in kinds}}
            alarms: dict[str, int] = {k: 0 for k in scores}
            for b in range(batches):
                batch = pool.subset(data.subset_index(len(pool), size, 1000 * size + b))
                for kind, f in (("clean", lambda ds: ds), *kinds.items()):
                    check = monitor.check(session, f(batch))
                    scores[kind].append(check.worst_z)
                    alarms[kind] += check.shifted
            threshold = sorted(scores["clean"])[int(0.95 * len(scores["clean"])) - (1 if batches >= 20 else 0)]
            row = {"false_alarms": alarms["clean"] / batches, "threshold_z": threshold}
            for kind in kinds:
                row[kind] = {
                    "auroc": auroc(scores["clean"], scores[kind]),
                    "detect_at_5pct": sum(s > threshold for s in scores[kind]) / batches,
                    "detect_at_alpha": alarms[kind] / batches,
                }
            rows[str(size)] = row
            print(
                f"{name} {size:4d} images: test's false alarms {alarms['clean']}/{batches} (goal <= 5%); AUROC / detection at 5% FA: "
                + ", ".join(f"{k} {row[k]['auroc']:.3f}/{row[k]['detect_at_5pct']:.2f}" for k in kinds),
                flush=True,
            )
        results[name] = rows
    for name, rows in results.items():
        weak = {k: v["auroc"] for k, v in rows["500"].items() if isinstance(v, dict) and not k.endswith("-1")}
        met = all(a >= 0.95 for a in weak.values())
        print(
            f"{name}: AUROC at 500 images, severity 2: min {min(weak.values()):.3f}, mean {statistics.mean(weak.values()):.3f} "
            f"(goal >= 0.95 on every corruption but the mildest: {'met' if met else 'missed'})"
        )
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
