"""Label-free repair: recalibrating BatchNorm statistics, alone, on shifts and on the statistics scenarios.

    python benchmarks/label_free.py [--quick] [--seeds 0,1,2] [--samples sgd,adam] [--out results.json]

(a) On the BatchNorm-statistics scenarios of ``causes.py`` (statistics overwritten by train-mode passes
over inverted, noisy or one class's training images; never converged), each sample and seed:
``repair --layers auto`` with the defaults (training data: the bundled 5,000 images, verification: the
bundled 3,000 test images), and what it ends at against the undamaged sample's accuracy on the same
images. Goal: within 1 point. (b) Recalibration alone (``recalibration.recalibrated``: no labels, no
gradients) on every corruption of ``causes.py`` and inversion, with 100 and with 1,000 shifted
training images, scored on the shifted test images. --quick: the SGD sample, seed 0, one scenario and
two corruptions.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from causes import _pixels, corruptions, overwritten, sample_parser
from planted_faults import ADAM, SGD

from beta_diag import data
from beta_diag.configs import RepairConfig
from beta_diag.recalibration import recalibrated
from beta_diag.repairing import repair
from beta_diag.session import DataChoice, open_session


def main() -> None:
    args = sample_parser(__doc__).parse_args()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    samples = ["sgd"] if args.quick else args.samples.split(",")
    print(f"command: python benchmarks/label_free.py --seeds {args.seeds} --samples {args.samples}" + (" --quick" if args.quick else ""))
    start = time.perf_counter()
    rows: dict[str, list] = {"statistics": [], "shifts": []}
    for sample in samples:
        session = open_session(SGD if sample == "sgd" else ADAM, device="cpu")
        test = session.load_data(DataChoice())
        train = session.load_data(DataChoice(), default_split="train")
        clean = session.evaluate(test).accuracy
        print(f"\n{sample}: undamaged accuracy {100 * clean:.2f}% on {len(test)} test images")
        for seed in seeds:
            invert, gen = _pixels(train, lambda x: 255 - x), torch.Generator().manual_seed(seed)
            scenarios = {
                "overwritten:inverted": (invert, 0.1, 30, False),
                "overwritten:noisy": (_pixels(train, lambda x: x + torch.randn(x.shape, generator=gen) * 0.3 * 255), 0.1, 30, False),
                "overwritten:one-class": (train.subset((train.labels == seed % 10).nonzero().flatten()), 0.1, 30, False),
                "never-converged": (train, 0.01, 20 + 20 * seed, True),
            }
            for name, (ds, momentum, batches, reset) in list(scenarios.items())[: 1 if args.quick else None]:
                damaged = dataclasses.replace(session, model=overwritten(session.model, session.preprocess, ds, momentum, batches, reset))
                with tempfile.TemporaryDirectory() as tmp:
                    r = repair(damaged, layers="auto", output=Path(tmp) / "r.safetensors", config=RepairConfig(), device="cpu")
                after = r.surgical.verify.accuracy_after if r.accepted else r.surgical.verify.accuracy_before
                row = {
                    "sample": sample,
                    "seed": seed,
                    "scenario": name,
                    "damaged": r.surgical.verify.accuracy_before,
                    "repaired": after,
                    "undamaged": clean,
                    "method": (r.search or {}).get("winner") or r.plan["config"]["method"],  # the search's winner, when it searched
                    "groups": r.plan["groups"],
                    "accepted": r.accepted,
                }
                rows["statistics"].append(row)
                print(
                    f"  seed {seed} {name:22s} {100 * row['damaged']:6.2f}% -> {100 * after:6.2f}% ({row['method']}, "
                    f"{'written' if r.accepted else 'original kept'}); {100 * (after - clean):+.2f} points from undamaged",
                    flush=True,
                )
        shifts = {**corruptions(0), "invert": lambda ds: _pixels(ds, lambda x: 255 - x)}
        for name, f in list(shifts.items())[: 2 if args.quick else None]:
            shifted_test, shifted_train = f(test), f(train)
            before = session.evaluate(shifted_test).accuracy
            line = {"sample": sample, "shift": name, "before": before}
            for n in (100, 1000):
                few = shifted_train.subset(data.subset_index(len(shifted_train), n, 0))
                model = recalibrated(session.model, few, session.preprocess, session.device)
                line[f"recalibrated_{n}"] = dataclasses.replace(session, model=model).evaluate(shifted_test).accuracy
            rows["shifts"].append(line)
            print(
                f"  {name:14s} {100 * before:6.2f}% -> {100 * line['recalibrated_100']:6.2f}% (100 images), "
                f"{100 * line['recalibrated_1000']:6.2f}% (1,000 images)",
                flush=True,
            )
    stats = rows["statistics"]
    if stats:
        within = sum(r["repaired"] >= r["undamaged"] - 0.01 for r in stats)
        print(f"\nstatistics scenarios: {within} of {len(stats)} end within 1 point of the undamaged sample (goal: all)")
        print(f"chose recalibrate: {sum(r['method'] == 'recalibrate' for r in stats)} of {len(stats)}")
    print(f"{time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
