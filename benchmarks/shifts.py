"""Distribution shift: which group should a repair train, and do rank's findings name it?

    python benchmarks/shifts.py [--quick] [--shifts noise,blur,contrast,invert,swap] [--out results.json]

Surgical fine-tuning (Lee et al., ICLR 2023) found input-level shifts best repaired in the first
layers and output-level shifts in the last. Here, on the SGD sample: each shift is applied to the
bundled 5,000 training images (what the repair trains on) and to the bundled 3,000 test images (the
held-out data every figure is measured on):
- ``noise``: Gaussian pixel noise (std 0.25 of the range);
- ``blur``: Gaussian blur (kernel 5, sigma 1.5);
- ``contrast``: contrast cut to 30% around each image's mean;
- ``invert``: 255 - pixel;
- ``swap``: a label shift, classes 0 and 6 (T-shirt/top, shirt) exchanged.
For each shift: the oracle is the group whose `repair --layers G` with the default budget
recovers most on the held-out shifted images (recovery = share of the accuracy lost to the shift
won back); reported beside rank's drift suspect, coherence's top group and Auto-RGN's top group on
the shifted held-out images, and the recovery of `--layers auto` (each `--auto-layers` policy) and
of the full fine-tune. --quick: one shift (invert), one epoch, two groups, 400 images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from planted_faults import SGD, auto_rgn
from torchvision.transforms.functional import gaussian_blur

from beta_diag import data
from beta_diag.configs import REPAIR_TRAINING, AutoLayers, RankConfig, RepairConfig, repair_training
from beta_diag.data import Dataset
from beta_diag.groups import layer_groups
from beta_diag.planning import auto_groups
from beta_diag.ranking import rank
from beta_diag.repairing import repair
from beta_diag.session import DataChoice, open_session

QUICK_IMAGES = 400  # --quick: enough for every figure to be computed, small enough for the test suite


def _pixels(f: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> Callable[[Dataset, int], Dataset]:
    def shift(ds: Dataset, seed: int) -> Dataset:
        x = f(ds.images.float(), torch.Generator().manual_seed(seed)).round().clamp(0, 255).to(torch.uint8)
        return replace(ds, images=x)

    return shift


def _swap(ds: Dataset, seed: int) -> Dataset:
    y = ds.labels.clone()
    y[ds.labels == 0], y[ds.labels == 6] = 6, 0
    return replace(ds, labels=y)


SHIFTS: dict[str, Callable[[Dataset, int], Dataset]] = {
    "noise": _pixels(lambda x, g: x + torch.randn(x.shape, generator=g) * 0.25 * 255),
    "blur": _pixels(lambda x, g: gaussian_blur(x, [5, 5], [1.5, 1.5])),
    "contrast": _pixels(lambda x, g: x.mean((1, 2, 3), keepdim=True) + 0.3 * (x - x.mean((1, 2, 3), keepdim=True))),
    "invert": _pixels(lambda x, g: 255 - x),
    "swap": _swap,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shifts", default=",".join(SHIFTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print("command: python benchmarks/shifts.py" + (" --quick" if args.quick else f" --shifts {args.shifts}"), flush=True)
    start = time.perf_counter()
    session = open_session(SGD, device="cpu")
    limit = QUICK_IMAGES if args.quick else None
    clean_test = session.load_data(DataChoice(limit=limit))
    clean_train = session.load_data(DataChoice(limit=limit), default_split="train")
    clean_acc = session.evaluate(clean_test).accuracy
    groups = layer_groups(session.model)
    names = [g.name for g in groups]
    config = RepairConfig(training=repair_training(epochs=1) if args.quick else REPAIR_TRAINING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shift in ["invert"] if args.quick else args.shifts.split(","):
            test_ds, train_ds = SHIFTS[shift](clean_test, 1), SHIFTS[shift](clean_train, 2)
            test_file, train_file = Path(tmp) / f"{shift}_test.safetensors", Path(tmp) / f"{shift}_train.safetensors"
            data.save_bundle(test_file, replace(test_ds, split="test"))
            data.save_bundle(train_file, replace(train_ds, split="train"))
            verify, train = DataChoice(str(test_file), "test"), DataChoice(str(train_file), "train")
            verify_ds = session.load_data(verify)
            r = rank(session, data=verify, config=RankConfig(bootstrap=0, control=0), dataset=verify_ds)
            shifted = r.accuracy
            rgn = auto_rgn(session, verify_ds, groups)

            def recovery(layers: list[str]) -> dict:
                out = repair(
                    session,
                    layers=layers,
                    output=Path(tmp) / "x.safetensors",
                    train=train,
                    verify=verify,
                    config=config,
                    device="cpu",
                    force=True,
                )
                v = out.surgical.verify
                return {
                    "groups": layers,
                    "accuracy": v.accuracy_after,
                    "recovered": (v.accuracy_after - shifted) / (clean_acc - shifted),
                    "net": v.net,
                    "trainable": out.surgical.trainable,
                }

            per_group = {g: recovery([g]) for g in (names[:1] + names[-1:] if args.quick else names)}
            oracle = max(per_group, key=lambda g: per_group[g]["recovered"])
            policies = {p.value: auto_groups(r, p) for p in AutoLayers}
            done: dict[tuple[str, ...], dict] = {(g,): v for g, v in per_group.items()}
            auto = {}
            for p, chosen in policies.items():
                if tuple(chosen) not in done:
                    done[tuple(chosen)] = recovery(chosen)
                auto[p] = done[tuple(chosen)]
            full = recovery(names)
            row = {
                "shift": shift,
                "clean_accuracy": clean_acc,
                "shifted_accuracy": shifted,
                "oracle": oracle,
                "drift_suspect": r.drift.suspect if r.drift else None,
                "drift_margin": r.drift.margin if r.drift else None,
                "coherence_top": r.groups[0].name,
                "flagged": list(r.flagged),
                "auto_rgn_top": names[int(np.argmax(rgn))],
                "per_group": per_group,
                "auto": auto,
                "full": full,
            }
            rows.append(row)
            print(
                f"{shift:9s} accuracy {100 * clean_acc:.1f}% -> {100 * shifted:.1f}%; oracle {oracle} "
                f"({100 * per_group[oracle]['recovered']:.0f}%); drift suspect {row['drift_suspect']} "
                f"(x{row['drift_margin'] or 0:,.0f}), coherence top {row['coherence_top']}, Auto-RGN top {row['auto_rgn_top']}; "
                + ", ".join(f"{g} {100 * v['recovered']:.0f}%" for g, v in per_group.items())
                + "; "
                + ", ".join(f"auto/{p} ({'+'.join(v['groups'])}) {100 * v['recovered']:.0f}%" for p, v in auto.items())
                + f"; full {100 * full['recovered']:.0f}%",
                flush=True,
            )
    print(
        f"\n{'shift':9s} {'drop':>6s} {'oracle':>7s} {'drift':>7s} {'coherence':>9s} {'Auto-RGN':>8s} "
        + " ".join(f"{'auto/' + p.value:>13s}" for p in AutoLayers)
        + f" {'oracle rec.':>11s} {'full rec.':>9s}"
    )
    for row in rows:
        print(
            f"{row['shift']:9s} {100 * (row['clean_accuracy'] - row['shifted_accuracy']):6.1f} "
            f"{row['oracle']:>7s} {row['drift_suspect']!s:>7s} "
            f"{row['coherence_top']:>9s} {row['auto_rgn_top']:>8s} "
            + " ".join(f"{100 * row['auto'][p.value]['recovered']:12.0f}%" for p in AutoLayers)
            + f" {100 * row['per_group'][row['oracle']]['recovered']:10.0f}% {100 * row['full']['recovered']:8.0f}%"
        )
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"groups": names, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
