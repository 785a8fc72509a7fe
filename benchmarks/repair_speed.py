"""Surgical repair vs full fine-tune with the same budget, in one run; and the repair's net over seeds.

    python benchmarks/repair_speed.py [--quick] [--seeds 0,1,2] [--repeats N]

On the SGD sample: (1) repair of the back-half groups layer4 + fc against `--baseline full`
(same epochs, data, LR): wall-clock ratio of the fine-tunes (goal <= 0.25x) and fraction of
parameters trained; and end to end, the whole `repair` call (evaluations before and after
included) for layer4 + fc against the same call naming every group;
(2) the default repair (`--layers auto`) per seed: held-out fixed / broken / net, mean and spread.
--interpolate: also the weights (1 - a) * original + a * repaired for a in 0.25, 0.5, 0.75 (as in
WiSE-FT), to see whether a smaller step towards the repair helps on held-out data.
--distill W: the per-seed repairs use `--distill W` (a pull towards the original's predictions on
the training examples it gets right); the layer4 + fc timing does too. --lr: repair's LR (default
RepairConfig's; the figures before 2026-11-24 used 0.01).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from beta_diag.configs import REPAIR_TRAINING, RepairConfig, repair_training
from beta_diag.groups import layer_groups
from beta_diag.repairing import RepairReport, repair
from beta_diag.session import DataChoice, open_session

SGD = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "fmnist_resnet18w16_sgd_beta.safetensors"


def interpolated_nets(r: RepairReport, alphas: tuple[float, ...], verify: DataChoice) -> dict[float, int]:
    """Held-out net of (1 - a) * original + a * repaired, against the original, for each a."""
    parent, child = open_session(SGD, device="cpu"), open_session(r.output, device="cpu")  # type: ignore[arg-type]
    data = parent.load_data(verify)
    before = parent.evaluate(data).correct
    ours, theirs = {k: v.clone() for k, v in parent.model.state_dict().items()}, child.model.state_dict()
    nets = {}
    for a in alphas:
        parent.model.load_state_dict({k: v + (theirs[k] - v) * a if v.is_floating_point() else theirs[k] for k, v in ours.items()})
        after = parent.evaluate(data).correct
        nets[a] = int((~before & after).sum()) - int((before & ~after).sum())
    return nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1,000 verification images, one seed")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--interpolate", action="store_true")
    parser.add_argument("--distill", type=float, default=RepairConfig.distill)
    parser.add_argument("--lr", type=float, default=REPAIR_TRAINING.lr, help="repair --lr (the figures before 2026-11-24 used 0.01)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="time layer4 + fc vs the full fine-tune this often, interleaved; print the median"
    )
    args = parser.parse_args()
    print(
        "command: python benchmarks/repair_speed.py"
        + (" --quick" if args.quick else "")
        + f" --seeds {args.seeds}"
        + (" --interpolate" if args.interpolate else "")
        + (f" --distill {args.distill:g}" if args.distill != RepairConfig.distill else "")
        + (f" --repeats {args.repeats}" if args.repeats > 1 else "")
        + (f" --lr {args.lr:g}" if args.lr != REPAIR_TRAINING.lr else "")
    )
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    verify = DataChoice(limit=1000 if args.quick else None)
    epochs = 1 if args.quick else REPAIR_TRAINING.epochs
    with tempfile.TemporaryDirectory() as tmp:
        ratios = []
        for _ in range(args.repeats):
            config = RepairConfig(
                training=repair_training(epochs=epochs, lr=args.lr), baseline="full", distill=args.distill, accept_p=1.0
            )  # timing, not the gate
            r = repair(
                SGD, layers=["layer4", "fc"], output=Path(tmp) / "a.safetensors", verify=verify, config=config, device="cpu", force=True
            )
            s, f = r.surgical, r.baseline
            assert f is not None
            ratios.append(s.seconds / f.seconds)
            gate = sum(h["val_seconds"] for h in s.history)
            print(
                f"layer4+fc: the gate's per-epoch validation {gate:.2f} s of {s.seconds:.1f} "
                f"s: adds {100 * gate / (s.seconds - gate):.1f}% (goal <= 10%)"
            )
            print(
                f"layer4+fc: {100 * r.plan['fraction']:.1f}% of parameters, {s.seconds:.1f} s (net {s.verify.net:+d}); "
                f"full fine-tune {f.seconds:.1f} s (net {f.verify.net:+d}); wall-clock ratio {ratios[-1]:.3f}x (goal <= 0.25x)",
                flush=True,
            )
        if len(ratios) > 1:
            print(f"median ratio of {len(ratios)} runs: {statistics.median(ratios):.3f}x")
        every = [g.name for g in layer_groups(open_session(SGD, device="cpu").model)]
        calls = {}
        for name, layers in (("layer4+fc", ["layer4", "fc"]), ("every group", every)):
            start = time.perf_counter()
            repair(
                SGD,
                layers=layers,
                output=Path(tmp) / "e.safetensors",
                verify=verify,
                config=RepairConfig(training=repair_training(epochs=epochs, lr=args.lr), distill=args.distill),
                device="cpu",
                force=True,
            )
            calls[name] = time.perf_counter() - start
        print(
            f"end to end: repair --layers layer4,fc {calls['layer4+fc']:.1f} s; --layers {','.join(every)} {calls['every group']:.1f} s; "
            f"ratio {calls['layer4+fc'] / calls['every group']:.3f}x"
        )
        nets = []
        for seed in seeds:
            choice = DataChoice(limit=verify.limit, seed=seed)
            r = repair(
                SGD,
                layers="auto",
                output=Path(tmp) / f"s{seed}.safetensors",
                verify=choice,
                config=RepairConfig(training=repair_training(epochs=epochs, lr=args.lr, seed=seed), distill=args.distill),
                device="cpu",
            )
            v = r.surgical.verify
            nets.append(v.net)
            if args.interpolate and r.accepted:  # a refused repair writes nothing to interpolate to
                nets_at = interpolated_nets(r, (0.25, 0.5, 0.75), choice)
                print(f"seed {seed} interpolated: " + "; ".join(f"a={a}: net {net:+d}" for a, net in nets_at.items()))
            print(
                f"seed {seed}: layers {', '.join(r.plan['groups'])} "
                f"({100 * r.plan['fraction']:.1f}%), accuracy {100 * v.accuracy_before:.2f}% -> "
                f"{100 * v.accuracy_after:.2f}%, fixed {v.fixed}, broken {v.broken}, net {v.net:+d}, {r.surgical.seconds:.1f} s"
                + ("" if r.accepted else f" (refused by the gate: {r.surgical.gate.reason})")
            )
        spread = f" +- {statistics.stdev(nets):.1f}" if len(nets) > 1 else ""
        print(
            f"default repair net over {len(nets)} seed(s): mean "
            f"{statistics.mean(nets):+.1f}{spread}, min {min(nets):+d}, max {max(nets):+d}"
        )


if __name__ == "__main__":
    main()
