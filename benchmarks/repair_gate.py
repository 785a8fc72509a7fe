"""The repair gate: does `repair` leave healthy models alone, and still win on real shifts?

    python benchmarks/repair_gate.py [--quick] [--part healthy,shifts] [--seeds 0,1,2,3,4] [--shift-seeds 0,1,2] [--out results.json]

healthy: `repair --layers auto` with every default (validation: 20% of the bundled 5,000 unseen
training images; gate: exact McNemar p <= 0.05) on the SGD and the Adam sample, one run per seed
(the seed draws the validation split, the training order and the ranking's bootstrap). Counts the
runs that end in "original kept", and among the shipped ones those whose held-out net (bundled
3,000 test images) is below zero beyond its 95% interval (goal: none; most runs kept).
shifts: each shift of benchmarks/shifts.py applied to 1,000 training images (a seeded subset of the
bundled 5,000) and to the 3,000 held-out test images; `--layers auto`, the full fine-tune and every
single group (the oracle: the best of them), each gated as shipped; Auto-RGN's top group beside
them. Accuracy is what ships: the repaired model when the gate accepts it, else the original.
Goal: auto at least the full fine-tune's accuracy, over the seeds. --quick: the SGD sample, one
seed, one epoch, 1,000 training and verification images, one shift (invert) without the per-group oracle.
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
from planted_faults import SGD, auto_rgn
from shifts import SHIFTS

from beta_diag import data
from beta_diag.configs import REPAIR_TRAINING, RepairConfig, repair_training
from beta_diag.groups import layer_groups
from beta_diag.repairing import repair
from beta_diag.session import DataChoice, open_session
from beta_diag.verdicts import RepairReport

ADAM = SGD.with_name("fmnist_resnet18w16_adam_beta.safetensors")


def shipped(r: RepairReport) -> dict:
    """What the user gets: the accepted repair's held-out figures, or the original's (net 0)."""
    v, ok = r.surgical.verify, r.accepted
    lo, hi = v.net_interval
    return {
        "accepted": ok,
        "best_epoch": r.surgical.gate.best_epoch,
        "gate_p": r.surgical.gate.p_value,
        "groups": list(r.surgical.groups),
        "accuracy": v.accuracy_after if ok else v.accuracy_before,
        "net": v.net if ok else 0,
        "candidate_net": v.net,
        "candidate_interval": [lo, hi],
        "candidate_p": v.p_value,
        "val_net": r.surgical.gate.kept["val_net"],
    }


def healthy(seeds: list[int], quick: bool, tmp: Path) -> list[dict]:
    rows = []
    for name, path in (("sgd", SGD), ("adam", ADAM))[: 1 if quick else 2]:
        session = open_session(path, device="cpu")
        for seed in seeds:
            config = RepairConfig(training=repair_training(seed=seed, epochs=1 if quick else REPAIR_TRAINING.epochs))
            r = repair(
                session,
                layers="auto",
                output=tmp / "h.safetensors",
                train=DataChoice(limit=1000 if quick else None),
                verify=DataChoice(limit=1000 if quick else None, seed=seed),
                config=config,
                device="cpu",
                force=True,
            )
            row = {"sample": name, "seed": seed, **shipped(r)}
            rows.append(row)
            lo, hi = row["candidate_interval"]
            print(
                f"{name:4s} seed {seed}: {'SHIPPED' if row['accepted'] else 'kept   '} "
                f"{'+'.join(row['groups'])}, epoch {row['best_epoch']}, "
                f"validation net {row['val_net']:+d} (gate p {row['gate_p']:.3g}); held-out net of that epoch {row['candidate_net']:+d} "
                f"(95% {lo:+.0f} to {hi:+.0f}, p {row['candidate_p']:.2g})",
                flush=True,
            )
    kept = sum(not r["accepted"] for r in rows)
    harmful = [r for r in rows if r["accepted"] and r["candidate_interval"][1] < 0]
    print(
        f"healthy: {kept} of {len(rows)} runs kept the original; {len(rows) - kept} shipped, "
        f"{len(harmful)} of them with a held-out net below zero beyond its 95% interval (goal: 0); "
        f"shipped nets {[r['net'] for r in rows if r['accepted']]}",
        flush=True,
    )
    return rows


def shifts(seeds: list[int], shift_names: list[str], quick: bool, tmp: Path) -> list[dict]:
    session = open_session(SGD, device="cpu")
    clean_test = session.load_data(DataChoice(limit=1000 if quick else None))
    clean_acc = session.evaluate(clean_test).accuracy
    groups = layer_groups(session.model)
    names = [g.name for g in groups]
    rows = []
    for shift in shift_names:
        test_file = tmp / f"{shift}_test.safetensors"
        data.save_bundle(test_file, replace(SHIFTS[shift](clean_test, 1), split="test"))
        verify = DataChoice(str(test_file), "test")
        verify_ds = session.load_data(verify)
        shifted = session.evaluate(verify_ds).accuracy
        rgn_top = names[int(np.argmax(auto_rgn(session, verify_ds, groups)))]
        for seed in seeds:
            train_file = tmp / f"{shift}_train{seed}.safetensors"
            clean_train = session.load_data(DataChoice(limit=1000, seed=seed), default_split="train")
            data.save_bundle(train_file, replace(SHIFTS[shift](clean_train, 2 + seed), split="train"))
            train = DataChoice(str(train_file), "train")
            config = RepairConfig(training=repair_training(seed=seed, epochs=1 if quick else REPAIR_TRAINING.epochs))

            def run(layers: list[str] | str) -> dict:
                r = repair(
                    session,
                    layers=layers,
                    output=tmp / "s.safetensors",
                    train=train,
                    verify=verify,
                    config=config,
                    device="cpu",
                    force=True,
                )
                out = shipped(r)
                return {**out, "recovered": (out["accuracy"] - shifted) / (clean_acc - shifted)}

            per_group = {} if quick else {g: run([g]) for g in names}
            row = {
                "shift": shift,
                "seed": seed,
                "clean_accuracy": clean_acc,
                "shifted_accuracy": shifted,
                "auto": run("auto"),
                "full": run(names),
                "per_group": per_group,
                "auto_rgn_top": rgn_top,
            }
            row["oracle"] = max(per_group, key=lambda g: per_group[g]["accuracy"]) if per_group else None
            rows.append(row)
            oracle = f"; oracle {row['oracle']} {100 * per_group[row['oracle']]['accuracy']:.2f}%" if per_group else ""
            rgn = f", Auto-RGN's {rgn_top} {100 * per_group[rgn_top]['accuracy']:.2f}%" if per_group else f", Auto-RGN top {rgn_top}"
            print(
                f"{shift:9s} seed {seed}: {100 * clean_acc:.1f}% -> {100 * shifted:.1f}% "
                f"shifted; shipped: auto ({'+'.join(row['auto']['groups'])}"
                f"{'' if row['auto']['accepted'] else ', kept'}) {100 * row['auto']['accuracy']:.2f}%, full"
                f"{'' if row['full']['accepted'] else ' (kept)'} {100 * row['full']['accuracy']:.2f}%{oracle}{rgn}",
                flush=True,
            )
    wins = sum(r["auto"]["accuracy"] >= r["full"]["accuracy"] for r in rows)
    print(
        f"shifts: auto at least the full fine-tune's held-out accuracy in {wins} of {len(rows)} runs; mean auto "
        f"{100 * statistics.mean(r['auto']['accuracy'] for r in rows):.2f}%, "
        f"full {100 * statistics.mean(r['full']['accuracy'] for r in rows):.2f}%"
        + (f", oracle {100 * statistics.mean(r['per_group'][r['oracle']]['accuracy'] for r in rows):.2f}%" if rows[0]["per_group"] else ""),
        flush=True,
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", default="healthy,shifts")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--shift-seeds", default="0,1,2")
    parser.add_argument("--shifts", default=",".join(SHIFTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(
        "command: python benchmarks/repair_gate.py"
        + (
            " --quick"
            if args.quick
            else f" --part {args.part} --seeds {args.seeds} --shift-seeds {args.shift_seeds} --shifts {args.shifts}"
        ),
        flush=True,
    )
    start = time.perf_counter()
    parts = args.part.split(",")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "healthy" in parts:
            result["healthy"] = healthy([0] if args.quick else [int(s) for s in args.seeds.split(",")], args.quick, Path(tmp))
        if "shifts" in parts:
            result["shifts"] = shifts(
                [0] if args.quick else [int(s) for s in args.shift_seeds.split(",")],
                ["invert"] if args.quick else args.shifts.split(","),
                args.quick,
                Path(tmp),
            )
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
