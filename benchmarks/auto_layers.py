"""What should `repair --layers auto` repair: the coherence flags, the drift suspect, or both?

    python benchmarks/auto_layers.py [--quick] [--seeds 0] [--kinds noise,bn_shift,prune] [--out results.json]

Damages each layer group of the SGD sample (as benchmarks/planted_faults.py does: about a 10-point
drop on the held-out images), ranks it once, and repairs it with each `--auto-layers` policy (flags,
suspect, both) under repair's default budget (3 epochs on the bundled 5,000 unseen training images,
SGD + beta momentum, cosine LR from 0.003), verified on the bundled 3,000 test images, which no arm
trains on. A policy that picks the same groups as another reuses its repair. Reports per policy: the
share of the drop won back, net fixed, the share of parameters trained, and how often each policy
picked the damaged group. --quick: one group (layer2), one epoch on 400 training images, 400 verification images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from planted_faults import SGD, calibrate
from planted_repair import arm_row

from beta_diag.configs import REPAIR_TRAINING, AutoLayers, RankConfig, RepairConfig, repair_training
from beta_diag.groups import layer_groups
from beta_diag.planning import auto_groups
from beta_diag.ranking import rank
from beta_diag.repairing import repair
from beta_diag.session import DataChoice, open_session

QUICK_IMAGES = 400  # --quick: enough for every figure to be computed, small enough for the test suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--kinds", default="noise,bn_shift,prune")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(
        "command: python benchmarks/auto_layers.py" + (" --quick" if args.quick else f" --seeds {args.seeds} --kinds {args.kinds}"),
        flush=True,
    )
    start = time.perf_counter()
    session = open_session(SGD, device="cpu")
    verify = DataChoice(limit=QUICK_IMAGES if args.quick else None)
    ds = session.load_data(verify)
    calib = ds if args.quick else session.load_data(DataChoice(limit=1000))
    base_calib, base = session.evaluate(calib).accuracy, session.evaluate(ds).accuracy
    names = [g.name for g in layer_groups(session.model)]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    kinds = ["noise"] if args.quick else args.kinds.split(",")
    config = RepairConfig(training=repair_training(epochs=1) if args.quick else REPAIR_TRAINING)
    train = DataChoice(limit=QUICK_IMAGES if args.quick else None)
    policies = [p.value for p in AutoLayers]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for group in ["layer2"] if args.quick else names:
                for seed in seeds:
                    _, model, _ = calibrate(session, calib, group, kind, seed, base_calib)
                    if model is None:
                        continue
                    damaged = replace(session, model=model)
                    r = rank(damaged, data=verify, config=RankConfig(bootstrap=0, control=0), dataset=ds)
                    after = r.accuracy
                    done: dict[tuple[str, ...], dict] = {}
                    row = {
                        "kind": kind,
                        "group": group,
                        "seed": seed,
                        "drop": base - after,
                        "drift_suspect": r.drift.suspect if r.drift else None,
                        "flagged": list(r.flagged),
                    }
                    for policy in policies:
                        chosen = tuple(auto_groups(r, policy))
                        if chosen not in done:
                            out = repair(
                                damaged,
                                layers=list(chosen),
                                output=Path(tmp) / "x.safetensors",
                                train=train,
                                verify=verify,
                                config=replace(config, training=replace(config.training, seed=seed)),
                                device="cpu",
                                force=True,
                            )
                            done[chosen] = arm_row(out.surgical, base, after)
                        row[policy] = {**done[chosen], "hit": group in chosen}
                    rows.append(row)
                    print(
                        f"{kind:8s} {group:7s} seed {seed}: drop {100 * row['drop']:.1f} pts, "
                        f"suspect {row['drift_suspect']}, flagged {', '.join(r.flagged)}; "
                        + "; ".join(
                            f"{p} ({', '.join(row[p]['groups'])}) recovers {100 * row[p]['recovered']:.0f}%, net {row[p]['net']:+d}"
                            for p in policies
                        ),
                        flush=True,
                    )
    total = sum(p.numel() for p in session.model.parameters())
    print(
        f"\n{len(rows)} damaged models ({', '.join(kinds)}), drop "
        f"{100 * min(r['drop'] for r in rows):.1f}-{100 * max(r['drop'] for r in rows):.1f} points"
    )
    print(f"{'policy':8s} {'recovered':>10s} {'median':>7s} {'net':>7s} {'params %':>9s} {'damaged group chosen':>21s}")
    for p in policies:
        rec = [r[p]["recovered"] for r in rows]
        print(
            f"{p:8s} {100 * statistics.mean(rec):9.0f}% {100 * statistics.median(rec):6.0f}% "
            f"{statistics.mean(r[p]['net'] for r in rows):+7.1f} "
            f"{100 * statistics.mean(r[p]['trainable'] for r in rows) / total:8.1f}% {statistics.mean(r[p]['hit'] for r in rows):21.2f}"
        )
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"base_accuracy": base, "groups": names, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
