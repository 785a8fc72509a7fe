"""The paper's claims at our scale: five training methods x seeds, then rank, compare and repair.

    python benchmarks/reproduce.py [--quick] [--seeds 0,1,2] [--out results.json] [--figures DIR]

Fashion-MNIST, ResNet-18-CIFAR width 16 (the samples' model). Every run trains on the same fixed
8,000 training images (a seeded subset disjoint from the 5,000 images repair trains on) for 10
epochs and tests each epoch on the bundled 3,000 test images; the seed varies the initialisation
and the batch order. Methods: SGD with constant 0.9, beta, hybrid and 1cycle momentum (LR 0.05,
cosine except 1cycle, wd 5e-4) and Adam (LR 0.002, beta1 0.9 constant, wd 0). Per seed, the
SGD-beta and Adam models are ranked and compared (the paper's SGD/Adam overlap), and the SGD-beta
model gets the default repair. Thresholds were fixed before the first full run: 85% and 88%.
Checkpoints are kept in --work, so an interrupted run resumes where it stopped.
--quick: 600 images, 2 epochs tested on 500 of the test bundle's images, one seed (run by a test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from beta_diag import checkpoint, data
from beta_diag.comparison import compare
from beta_diag.configs import REPAIR_TRAINING, MomentumSchedule, OptimizerName, RankConfig, RepairConfig, TrainConfig, repair_training
from beta_diag.repairing import repair
from beta_diag.schedules import regime_fractions
from beta_diag.session import DataChoice, open_session
from beta_diag.training import train

REPO = Path(__file__).resolve().parents[1]

SAMPLES = REPO / "sample_checkpoints"
TEST_BUNDLE, REPAIR_BUNDLE = SAMPLES / "fmnist_test_3k.safetensors", SAMPLES / "fmnist_train_5k.safetensors"
THRESHOLDS = (0.85, 0.88)  # fixed before the first full run
SGD = {"lr": 0.05, "optimizer": OptimizerName.sgd, "weight_decay": 5e-4}
METHODS = {
    "constant": TrainConfig(momentum=MomentumSchedule.constant, **SGD),
    "beta": TrainConfig(momentum=MomentumSchedule.beta, **SGD),
    "hybrid": TrainConfig(momentum=MomentumSchedule.hybrid, **SGD),
    "onecycle": TrainConfig(momentum=MomentumSchedule.onecycle, **SGD),
    "adam": TrainConfig(momentum=MomentumSchedule.constant, lr=0.002, optimizer=OptimizerName.adam, weight_decay=0.0),
}


def train_bundle(work: Path, images: int) -> Path:
    """The fixed training subset: the first ``images`` of the seed-0 permutation (repair's 5k start at 30,000)."""
    path = work / f"fmnist_train_{images}.safetensors"
    if not path.exists():
        full = data.load("fashion-mnist", "train")
        data.save_bundle(path, replace(full.subset(data.subset_index(len(full), images, 0)), split="train"))
    return path


def run(work: Path, bundle: Path, method: str, seed: int, epochs: int, test_limit: int | None) -> Path:
    """Train one (method, seed) unless its checkpoint is already in ``work``."""
    path = work / f"{method}_s{seed}.safetensors"
    if not path.exists():
        start = time.perf_counter()
        config = replace(METHODS[method], epochs=epochs, seed=seed, device="cpu")
        result = train(
            "resnet18_cifar",
            data=DataChoice(str(bundle)),
            test=DataChoice(str(TEST_BUNDLE), limit=test_limit),
            arch_kwargs={"width": 16},
            config=config,
        )
        checkpoint.save(path, result.model.state_dict(), result.metadata)
        print(
            f"trained {method} seed {seed}: {100 * result.metadata.history[-1]['test_acc']:.2f}% in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return path


def epochs_to(history: list[dict], threshold: float) -> int | None:
    return next((h["epoch"] for h in history if h["test_acc"] >= threshold), None)


def summarise(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    spread = f" +- {statistics.stdev(got):.2f}" if len(got) > 1 else ""
    missing = f" ({len(values) - len(got)} of {len(values)} never)" if len(got) < len(values) else ""
    return f"{statistics.mean(got):.2f}{spread}{missing}"


def figures(results: dict, out: Path) -> None:
    """Our Figures 1-3: schedules and regimes (seed 0), and test accuracy per epoch (mean over seeds)."""
    from beta_diag import plots

    out.mkdir(parents=True, exist_ok=True)
    seed0 = {m: runs[0]["history"] for m, runs in results["runs"].items()}
    schedules = [{"name": m, "epochs": h} for m, h in seed0.items() if m != "adam"]
    plots.schedule(schedules, out / "reproduce_schedules.png", force=True)
    curves = {m: [r["history"] for r in runs] for m, runs in results["runs"].items()}
    plots.curves(curves, list(THRESHOLDS), out / "reproduce_accuracy.png", force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figures", type=Path)
    parser.add_argument(
        "--repair-lr",
        type=float,
        default=REPAIR_TRAINING.lr,
        help="LR of the default repair (the recorded run used 0.01, the default then)",
    )
    args = parser.parse_args()
    print(
        "command: python benchmarks/reproduce.py"
        + (" --quick" if args.quick else f" --seeds {args.seeds}")
        + (f" --repair-lr {args.repair_lr:g}" if args.repair_lr != REPAIR_TRAINING.lr else ""),
        flush=True,
    )
    start = time.perf_counter()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    images, epochs = (600, 2) if args.quick else (8000, 10)
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    bundle = train_bundle(work, images)
    verify = DataChoice(limit=500 if args.quick else None)
    results: dict = {"thresholds": THRESHOLDS, "train_images": images, "epochs": epochs, "seeds": seeds, "runs": {}, "per_seed": []}
    for seed in seeds:
        paths = {m: run(work, bundle, m, seed, epochs, 500 if args.quick else None) for m in METHODS}
        for m, path in paths.items():
            ckpt = checkpoint.load(path)
            history = list(ckpt.metadata.history)
            session = open_session(ckpt, device="cpu")
            full = session.evaluate(data.load("fashion-mnist", "test", limit=1000 if args.quick else None)).accuracy
            results["runs"].setdefault(m, []).append(
                {
                    "seed": seed,
                    "history": history,
                    "final_3k": history[-1]["test_acc"],
                    "final_full_test": full,
                    "regimes": regime_fractions(history),
                }
            )
        c = compare(
            [paths["beta"], paths["adam"]], data=verify, config=RankConfig(bootstrap=0 if args.quick else 200, control=0), device="cpu"
        )
        pair, (sgd_r, adam_r) = c.pairs[0], c.rankings
        r = repair(
            paths["beta"],
            layers="auto",
            output=work / f"beta_s{seed}.repaired.safetensors",
            train=DataChoice(spec=str(REPAIR_BUNDLE)),
            verify=verify,
            config=RepairConfig(training=repair_training(epochs=1 if args.quick else REPAIR_TRAINING.epochs, lr=args.repair_lr, seed=seed)),
            device="cpu",
            force=True,
        )
        v = r.surgical.verify
        results["per_seed"].append(
            {
                "seed": seed,
                "sgd_flagged": list(sgd_r.flagged),
                "adam_flagged": list(adam_r.flagged),
                "jaccard": pair.jaccard,
                "spearman": pair.spearman,
                "overlap": {str(k): x for k, x in pair.overlap.items()},
                "repair": {
                    "groups": list(r.plan["groups"]),
                    "fraction": r.plan["fraction"],
                    "accepted": r.accepted,
                    "fixed": v.fixed,
                    "broken": v.broken,
                    "net": v.net,
                    "seconds": r.surgical.seconds,
                },
            }
        )
        print(
            f"seed {seed}: SGD flags {', '.join(sgd_r.flagged)}; Adam flags {', '.join(adam_r.flagged)}; Jaccard {pair.jaccard:.2f}; "
            f"repair {', '.join(r.plan['groups'])} ({100 * r.plan['fraction']:.1f}%): fixed {v.fixed}, broken {v.broken}, net {v.net:+d}"
            + ("" if r.accepted else " (not written: the gate kept the original)"),
            flush=True,
        )
    print(
        f"\n{len(seeds)} seed(s), {images} training images, {epochs} epochs; test accuracy per epoch on the 3k test bundle"
        + (" (--quick: 500 of it)" if args.quick else "")
    )
    t1, t2 = (f"ep>={100 * t:.0f}%" for t in THRESHOLDS)
    print(f"{'method':9s} {t1:>16s} {t2:>16s} {'final (3k)':>16s} {'final (10k)':>16s}  regimes (under/critical/over)")
    for m, runs in results["runs"].items():
        regimes = {k: statistics.mean(r["regimes"][k] for r in runs) for k in ("underdamped", "critical", "overdamped")}
        print(
            f"{m:9s} {summarise([epochs_to(r['history'], THRESHOLDS[0]) for r in runs]):>16s} "
            f"{summarise([epochs_to(r['history'], THRESHOLDS[1]) for r in runs]):>16s} "
            f"{summarise([100 * r['final_3k'] for r in runs]):>16s} {summarise([100 * r['final_full_test'] for r in runs]):>16s}  "
            + " / ".join(f"{100 * regimes[k]:.0f}%" for k in ("underdamped", "critical", "overdamped"))
        )
    nets = [s["repair"]["net"] for s in results["per_seed"]]
    print(
        f"SGD/Adam flagged-set Jaccard per seed: {[round(s['jaccard'], 2) for s in results['per_seed']]}; "
        f"default repair net per seed: {nets} (mean {statistics.mean(nets):+.1f})"
    )
    results["wall_seconds"] = time.perf_counter() - start
    print(f"wall time {results['wall_seconds']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    if args.figures:
        figures(results, args.figures)


if __name__ == "__main__":
    main()
