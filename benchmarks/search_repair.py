"""The candidate search: does `repair --layers auto` ship at least the full fine-tune's accuracy on shifts, and forget less?

    python benchmarks/search_repair.py [--quick] [--seeds 0,1,2] [--shifts noise,...] [--out results.json]

On the SGD sample, for each shift (benchmarks/shifts.py's five plus rotate, brighten, pixelate and elastic):
1,000 shifted training images (a seeded subset of the bundled 5,000 unseen ones) to repair on, the
bundled 3,000 test images shifted to verify on, and the same 3,000 unshifted as the keep data (the
checkpoint's own held-out data: what the model was built for). Arms, each through the validation gate:
- auto: `--layers auto` with every default (the search; the keep data guard on), and again with --allow-forgetting;
- full: `--layers all` with --allow-forgetting (a plain full fine-tune: what a user gets without the guard), and
  what it ships with the guard on (its default: not shipped when significantly worse on the keep data);
- first block: Lee et al.'s conv1 + bn1 + layer1, with --allow-forgetting;
- Auto-RGN: the group with the largest relative gradient norm on the shifted training images, with --allow-forgetting.
Accuracy is what ships (the original when the gate keeps it). Keep loss: the clean accuracy lost by what ships.
Speed: the search's wall time over the full arm's fine-tune seconds (goal <= 2; same epochs).
--quick: one shift (invert), one seed, one epoch, 1,000 verification images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from planted_faults import SGD, auto_rgn
from shifts import SHIFTS, _pixels
from torchvision.transforms.functional import InterpolationMode, elastic_transform, rotate

from beta_diag import data
from beta_diag.configs import REPAIR_TRAINING, RepairConfig, repair_training
from beta_diag.groups import layer_groups
from beta_diag.repairing import repair
from beta_diag.session import DataChoice, open_session
from beta_diag.verdicts import RepairReport


def _elastic(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    disp = (torch.rand((n, h, w, 2), generator=g) * 2 - 1) * 4.0 / h  # smoothed below: a coarse random field
    disp = torch.nn.functional.avg_pool2d(disp.permute(0, 3, 1, 2), 7, 1, 3).permute(0, 2, 3, 1) * 6
    return torch.stack([elastic_transform(x[i], disp[i : i + 1]) for i in range(n)])


def _pixelate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = torch.nn.functional.interpolate(x, size=(h // 3, w // 3), mode="area")
    return torch.nn.functional.interpolate(small, size=(h, w), mode="nearest")


MORE = {
    "rotate": _pixels(lambda x, g: rotate(x, 25.0, InterpolationMode.BILINEAR)),
    "brighten": _pixels(lambda x, g: x * 0.6 + 0.4 * 255),
    "pixelate": _pixels(_pixelate),
    "elastic": _pixels(_elastic),
}
ALL_SHIFTS = {**SHIFTS, **MORE}


def shipped(r: RepairReport, keep_before: float) -> dict:
    """What the user gets on the target (shifted test) and the keep data (clean test)."""
    a, ok = r.surgical, r.accepted
    keep_after = a.keep.accuracy_after if ok and a.keep is not None else keep_before
    return {
        "accepted": ok,
        "groups": list(a.groups),
        "winner": (r.search or {}).get("winner"),
        "accuracy": a.verify.accuracy_after if ok else a.verify.accuracy_before,
        "candidate_accuracy": a.verify.accuracy_after,
        "keep_accuracy": keep_after,
        "keep_loss": keep_before - keep_after,
        "candidate_keep_loss": keep_before - (a.keep.accuracy_after if a.keep is not None else keep_before),
        "forgets": a.forgets,
        "guarded_accuracy": a.verify.accuracy_after if ok and not a.forgets else a.verify.accuracy_before,
        "guarded_keep_loss": keep_before - keep_after if ok and not a.forgets else 0.0,
        "seconds": a.seconds,
        "search_seconds": (r.search or {}).get("seconds") or a.seconds,  # no search: the cause was statistics (recalibration)
        "passed_over": ((r.search or {}).get("passed_over") or {}).get("candidate"),
        "tried": len((r.search or {}).get("tried", [])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shifts", default=",".join(ALL_SHIFTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    names = ["invert"] if args.quick else args.shifts.split(",")
    print(
        f"command: python benchmarks/search_repair.py {'--quick' if args.quick else f'--seeds {args.seeds} --shifts {args.shifts}'}",
        flush=True,
    )
    start = time.perf_counter()
    session = open_session(SGD, device="cpu")
    clean = session.load_data(DataChoice(limit=1000 if args.quick else None))
    keep_before = session.evaluate(clean).accuracy
    groups = layer_groups(session.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for shift in names:
            test_file = tmp / f"{shift}_test.safetensors"
            data.save_bundle(test_file, replace(ALL_SHIFTS[shift](clean, 1), split="test"))
            verify = DataChoice(str(test_file), "test")
            shifted = session.evaluate(session.load_data(verify)).accuracy
            for seed in seeds:
                train_file = tmp / f"{shift}_train{seed}.safetensors"
                clean_train = session.load_data(DataChoice(limit=1000, seed=seed), default_split="train")
                data.save_bundle(train_file, replace(ALL_SHIFTS[shift](clean_train, 2 + seed), split="train"))
                train = DataChoice(str(train_file), "train")
                rgn = groups[int(np.argmax(auto_rgn(session, session.load_data(train, default_split="train"), groups)))].name
                epochs = 1 if args.quick else REPAIR_TRAINING.epochs
                guarded = RepairConfig(training=repair_training(seed=seed, epochs=epochs))
                plain = replace(guarded, allow_forgetting=True)
                keep = DataChoice(limit=1000 if args.quick else None)

                def run(layers: list[str] | str, config: RepairConfig) -> dict:
                    out = tmp / "s.safetensors"
                    r = repair(
                        session,
                        layers=layers,
                        output=out,
                        train=train,
                        verify=verify,
                        config=config,
                        device="cpu",
                        force=True,
                        keep_data=keep,
                    )
                    return shipped(r, keep_before)

                row = {
                    "shift": shift,
                    "seed": seed,
                    "clean_accuracy": keep_before,
                    "shifted_accuracy": shifted,
                    "auto": run("auto", guarded),
                    "auto_unguarded": run("auto", plain),
                    "full": run("all", plain),
                    "first_block": run(["conv1", "bn1", "layer1"], plain),
                    "auto_rgn": {"group": rgn, **run([rgn], plain)},
                }
                row["search_cost"] = row["auto"]["search_seconds"] / row["full"]["seconds"]
                rows.append(row)
                if args.out:  # after every run: a long benchmark that stops keeps what it measured
                    args.out.write_text(json.dumps({"rows": rows}, indent=2))
                print(
                    f"{shift:9s} seed {seed}: clean {100 * keep_before:.1f}%, shifted {100 * shifted:.1f}%; shipped (target / keep loss): "
                    + ", ".join(
                        f"{k} {100 * row[k]['accuracy']:.1f}% / {100 * row[k]['keep_loss']:+.1f}"
                        for k in ("auto", "auto_unguarded", "full", "first_block", "auto_rgn")
                    )
                    + f"; auto won by {row['auto']['winner']}"
                    + (f", passed over {row['auto']['passed_over']}" if row["auto"]["passed_over"] else "")
                    + f" ({row['auto']['tried']} arms, cost {row['search_cost']:.2f}x full); Auto-RGN {rgn}",
                    flush=True,
                )
    mean = {k: statistics.mean(r[k]["accuracy"] for r in rows) for k in ("auto", "auto_unguarded", "full", "first_block", "auto_rgn")}
    loss = {k: statistics.mean(r[k]["keep_loss"] for r in rows) for k in mean}
    mean["full_guarded"] = statistics.mean(r["full"]["guarded_accuracy"] for r in rows)
    loss["full_guarded"] = statistics.mean(r["full"]["guarded_keep_loss"] for r in rows)
    cost = [r["search_cost"] for r in rows]
    print(
        "mean target accuracy shipped: "
        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in mean.items())
        + f" (goal: auto >= full, guard off for both: {'met' if mean['auto_unguarded'] >= mean['full'] else 'MISSED'}; "
        f"guard on for both: {'met' if mean['auto'] >= mean['full_guarded'] else 'MISSED'})",
        flush=True,
    )
    print(
        "mean keep-data loss of what ships: "
        + ", ".join(f"{k} {100 * v:.2f} points" for k, v in loss.items())
        + f" (goal: auto < full: {'met' if loss['auto'] < loss['full'] else 'MISSED'})",
        flush=True,
    )
    print(f"search cost / full fine-tune: median {statistics.median(cost):.2f}, max {max(cost):.2f} (goal <= 2)", flush=True)
    print(f"wall time {time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "mean": mean, "keep_loss": loss, "cost": cost}, indent=2))


if __name__ == "__main__":
    main()
