"""Planted faults: damage one layer group of a trained model, rank, and see which score finds it.

    python benchmarks/planted_faults.py [--quick] [--seeds 0,1,2] [--kinds noise,bn_shift] [--samples sgd] [--out results.json]

For each layer group of a sample and each fault kind, the damage scale is found by bisection (on a
seeded 1,000 of the held-out images) so that held-out accuracy falls by about 10 points (5 to 15);
the damaged model is then ranked on all 3,000 (all metrics and activation drift in one run).
Fault kinds (each seeded, so that seeds give different damage):
- ``noise``: Gaussian noise scaled to each parameter's own spread;
- ``bn_shift``: a BatchNorm running-mean shift scaled to the running std;
- ``bn_var``: each BatchNorm channel's running variance times exp(scale * N(0, 1));
- ``quant``: weights rounded to a grid of step scale * std (a seeded grid offset): a few bits;
- ``prune``: magnitude pruning of a fraction ``scale`` of each weight (|w| jittered by a seeded
  log-normal factor, so that seeds differ);
- ``dead``: a seeded fraction ``scale`` of each layer's output channels set to zero (weights, bias).
Reports, per score, hits@1 (damaged group ranked first) and the mean rank of the damaged group,
overall and per group; random choice is the floor (hits@1 = 1/G, mean rank (G+1)/2). Baseline
auto_rgn: Auto-RGN of surgical fine-tuning (Lee et al. 2023), the norm of the gradient summed over
all examples (right and wrong) relative to the group's weight norm. ``drift``: rank's drift suspect
first (a miss when there is none), the other groups by their charged jump. Each row keeps the
drift profile, so that ``benchmarks/drift_rule.py`` can choose the rule's thresholds on some seeds
and report the others. --figure writes the coherence confusion matrix (damaged group vs group
ranked first). --quick: one seed, noise only, the SGD sample, 400 images.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from beta_diag import data as data_mod
from beta_diag.configs import Metric, RankConfig
from beta_diag.groups import Group, layer_groups
from beta_diag.ranking import Ranking, flags, rank, ranks
from beta_diag.session import DataChoice, Session, open_session

QUICK_IMAGES = 400  # --quick: enough for every figure to be computed, small enough for the test suite

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
SGD = SAMPLES / "fmnist_resnet18w16_sgd_beta.safetensors"
ADAM = SAMPLES / "fmnist_resnet18w16_adam_beta.safetensors"
KINDS = ("noise", "bn_shift", "bn_var", "quant", "prune", "dead")
TARGET, LOW, HIGH = 0.10, 0.05, 0.15


def _damage_module(module: nn.Module, kind: str, scale: float, gen: torch.Generator) -> bool:
    """Damage one module's own parameters or statistics in place; False when the kind does not apply to it."""
    own = [p for p in module.parameters(recurse=False) if p.numel() > 1]
    is_bn = isinstance(module, nn.BatchNorm2d)
    if kind in ("bn_shift", "bn_var"):
        if not is_bn:
            return False
        if kind == "bn_shift":
            module.running_mean.add_(torch.randn(module.running_mean.shape, generator=gen) * module.running_var.sqrt() * scale)
        else:
            module.running_var.mul_(torch.exp(torch.randn(module.running_var.shape, generator=gen) * scale))
        return True
    if kind == "noise":
        for p in own:
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
        return bool(own)
    if kind == "quant":
        for p in own:
            step = float(p.std()) * scale
            offset = float(torch.rand((), generator=gen)) * step
            p.copy_(torch.round((p - offset) / step) * step + offset)
        return bool(own)
    weights = [p for p in own if p.dim() >= 2]
    if kind == "prune":
        for p in weights:
            key = (p.abs() * torch.exp(0.5 * torch.randn(p.shape, generator=gen))).flatten()
            cut = int(min(scale, 1.0) * key.numel())
            if cut:
                p.view(-1)[key.argsort()[:cut]] = 0.0
        return bool(weights)
    if kind == "dead":
        if not (weights or is_bn):
            return False
        channels = own[0].shape[0]
        dead = torch.randperm(channels, generator=gen)[: max(1, round(min(scale, 1.0) * channels))]
        for p in module.parameters(recurse=False):
            p[dead] = 0.0
        return True
    raise ValueError(f"unknown fault kind {kind}")


def damage(model: nn.Module, group: str, kind: str, scale: float, seed: int) -> nn.Module | None:
    """A copy of ``model`` with ``group`` damaged; None when the fault kind does not apply."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    touched = False
    with torch.no_grad():
        for name, module in out.named_modules():
            if name == group or name.startswith(group + "."):
                touched = _damage_module(module, kind, scale, gen) or touched
    return out if touched else None


def auto_rgn(session: Session, ds: object, groups: list[Group]) -> np.ndarray:
    """||sum of gradients over every example||_g / ||theta_g|| per group."""
    session.model.eval()
    grad = {n: torch.zeros_like(p) for n, p in session.model.named_parameters()}
    for _, x, y, _ in data_mod.numbered_batches(ds, 128, session.device):  # type: ignore[arg-type]
        loss = F.cross_entropy(session.model(session.preprocess(x)).float(), y, reduction="sum")
        for (n, _), g in zip(session.model.named_parameters(), torch.autograd.grad(loss, list(session.model.parameters()))):
            grad[n] += g
    params = dict(session.model.named_parameters())
    sq = [
        (
            sum(float(grad[p].double().pow(2).sum()) for p in g.param_names),
            sum(float(params[p].detach().double().pow(2).sum()) for p in g.param_names),
        )
        for g in groups
    ]
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


def planted(session: Session, calib: object, names: list[str], kinds: list[str], seeds: list[int], base: float) -> Iterator[tuple]:
    """Every fault that applies, per kind, group and seed, at the scale that costs about TARGET accuracy:
    (kind, group, seed, scale, damaged model, calibration drop)."""
    for kind in kinds:
        for group in names:
            for seed in seeds:
                scale, model, drop = calibrate(session, calib, group, kind, seed, base)
                if model is not None:
                    yield kind, group, seed, scale, model, drop


def ranks_of(values: np.ndarray, names: list[str], group: str) -> tuple[int, str]:
    """(rank of ``group`` by descending value, the group ranked first)."""
    rk = ranks(values)  # 1 = largest, ties in model order
    return int(rk[names.index(group)]), names[int(np.argmin(rk))]


def drift_values(r: Ranking, names: list[str]) -> np.ndarray:
    """The drift suspect first, the others by their charged jump. No drift found names the groups after the
    last BatchNorm (a fault must lie there or not show), first among them the one that runs first."""
    d = r.drift
    assert d is not None and d.groups is not None
    values = np.array([d.groups.get(n, 0.0) for n in names])
    named = [d.suspect] if d.suspect is not None else list(d.downstream)
    for i, n in enumerate(named):
        values[names.index(n)] = np.inf if i == 0 else 1e300
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--kinds", default="noise,bn_shift", help=f"fault kinds, from {','.join(KINDS)}")
    parser.add_argument("--samples", default="sgd", help="sgd, adam or sgd,adam")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figure", type=Path, help="write the coherence confusion matrix here (PNG)")
    parser.add_argument("--matrices", type=Path, help="save each damaged model's per-example matrices here (.npz)")
    args = parser.parse_args()
    print(
        "command: python benchmarks/planted_faults.py"
        + (" --quick" if args.quick else f" --seeds {args.seeds} --kinds {args.kinds} --samples {args.samples}"),
        flush=True,
    )
    start = time.perf_counter()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    kinds = ["noise"] if args.quick else args.kinds.split(",")
    samples = ["sgd"] if args.quick else args.samples.split(",")
    metrics = [m.value for m in Metric] + ["auto_rgn", "drift"]
    rows: list[dict] = []
    healthy: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    for sample in samples:
        session = open_session({"sgd": SGD, "adam": ADAM}[sample], device="cpu")
        ds = session.load_data(DataChoice(limit=QUICK_IMAGES if args.quick else None))
        calib = ds if args.quick else session.load_data(DataChoice(limit=1000))
        base = session.evaluate(calib).accuracy
        groups = layer_groups(session.model)
        names = [g.name for g in groups]
        whole = rank(
            session, data=DataChoice(), config=RankConfig(metric=Metric.coherence, bootstrap=0, contrast=True, control=0), dataset=ds
        )
        healthy[sample] = {"accuracy": whole.accuracy, "drift": whole.drift.to_dict() if whole.drift else None}
        print(f"{sample} undamaged: accuracy {100 * whole.accuracy:.1f}%; {whole.drift.finding if whole.drift else ''}", flush=True)
        for kind, group, seed, scale, model, drop in planted(session, calib, names, kinds, seeds, base):
            damaged = replace(session, model=model)
            r = rank(
                damaged, data=DataChoice(), config=RankConfig(metric=Metric.coherence, bootstrap=0, contrast=True, control=0), dataset=ds
            )
            baseline = auto_rgn(damaged, ds, groups)
            ranks, firsts, hit_flagged = {}, {}, {}
            for m in metrics:
                if m == "auto_rgn":
                    values = baseline
                elif m == "drift":
                    values = drift_values(r, names)
                else:
                    values = np.array([r.group(n).scores[m] for n in names])
                ranks[m], firsts[m] = ranks_of(values, names, group)
                hit_flagged[m] = bool(flags(values, None)[names.index(group)])
            rows.append(
                {
                    "sample": sample,
                    "kind": kind,
                    "group": group,
                    "seed": seed,
                    "scale": scale,
                    "drop": whole.accuracy - r.accuracy,
                    "errors": len(r.error_index),
                    "ranks": ranks,
                    "first": firsts,
                    "in_flagged": hit_flagged,
                    "auto_rgn": baseline.tolist(),
                    "drift": r.drift.to_dict() if r.drift else None,
                }
            )
            if args.matrices:  # the per-example matrices, to study other scores without re-running
                mat = r.matrices
                assert mat is not None
                arrays.update(
                    {f"{len(rows) - 1}/{k}": getattr(mat, k) for k in ("errors", "correct", "summed_norm", "numel", "weight_norm")}
                )
            print(
                f"{sample} {kind:8s} {group:7s} seed {seed}: scale {scale:.3g}, drop {100 * rows[-1]['drop']:.1f} pts "
                f"(calibration {100 * drop:.1f}), rank of damaged group " + " ".join(f"{m}={ranks[m]}" for m in metrics),
                flush=True,
            )
    g = len(names)
    print(f"\n{len(rows)} damaged models; random choice: hits@1 {1 / g:.2f}, mean rank {(g + 1) / 2:.1f}")
    print(f"{'metric':12s} {'hits@1':>7s} {'in flagged':>10s} {'mean rank':>10s}   " + " ".join(f"{n:>7s}" for n in names))
    for m in metrics:
        rk = [row["ranks"][m] for row in rows]
        per = [np.mean([row["ranks"][m] for row in rows if row["group"] == n] or [np.nan]) for n in names]
        in_flagged = np.mean([row["in_flagged"][m] for row in rows])
        print(
            f"{m:12s} {np.mean([x == 1 for x in rk]):7.2f} {in_flagged:10.2f} {np.mean(rk):10.2f}   " + " ".join(f"{x:7.1f}" for x in per)
        )
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"groups": names, "healthy": healthy, "rows": rows}, indent=2))
    if args.matrices:
        np.savez_compressed(args.matrices, **arrays)
    if args.figure:
        from beta_diag import plots

        matrix = [
            [np.mean([row["first"]["coherence"] == col for row in rows if row["group"] == g] or [0.0]) for col in names] for g in names
        ]
        plots.confusion(matrix, names, f"planted faults: coherence ranks first ({len(rows)} damaged models)", args.figure, force=True)


if __name__ == "__main__":
    main()
