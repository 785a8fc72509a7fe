"""Momentum from critical damping, and the learning-rate schedules it rides on.

Heavy-ball SGD as a damped oscillator (Qian 1999, unit curvature): critical damping at
mu_c = 1 - 2*sqrt(lr). The beta schedule sets mu = clamp(mu_c, 0.5, 0.99) every optimizer step;
damping ratio zeta = (1 - mu) / (2*sqrt(lr)); regime per PAPER.md with a 0.05 band on mu.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from beta_diag.configs import PLANNED, PLANNED_EPOCHS, PLANNED_LR, PLANNED_STEPS_PER_EPOCH, MomentumSchedule, check_lr
from beta_diag.errors import ConfigError

CLAMP = (0.5, 0.99)
CONSTANT = 0.9
BAND = 0.05


class Regime(str, Enum):
    underdamped = "underdamped"
    critical = "critical"
    overdamped = "overdamped"


def critical_momentum(lr: float, clamp: tuple[float, float] | None = CLAMP) -> float:
    """mu_c = 1 - 2*sqrt(lr), clamped to ``clamp`` unless it is None. lr 0.01 -> 0.8."""
    if lr < 0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")
    mu = 1.0 - 2.0 * math.sqrt(lr)
    return mu if clamp is None else min(max(mu, clamp[0]), clamp[1])


def damping_ratio(mu: float, lr: float) -> float:
    """zeta = (1 - mu) / (2*sqrt(lr)); 1 is critical, < 1 underdamped, > 1 overdamped."""
    return (1.0 - mu) / (2.0 * math.sqrt(lr)) if lr > 0 else math.inf


def regime(mu: float, lr: float, band: float = BAND) -> Regime:
    """Classify ``mu`` against the unclamped critical curve with a +-``band`` on mu."""
    mu_c = critical_momentum(lr, clamp=None)
    if mu > mu_c + band:
        return Regime.underdamped
    if mu < mu_c - band:
        return Regime.overdamped
    return Regime.critical


def momentum_for(schedule: MomentumSchedule, lr: float, constant: float = CONSTANT) -> float:
    """The momentum a (non-onecycle) schedule sets at learning rate ``lr``.

    hybrid = min(beta, constant): physics momentum while the critical curve lies below 0.9
    (lr > 0.0025), constant 0.9 for the small-LR refinement after it crosses. No extra parameter.
    """
    schedule = MomentumSchedule(schedule)
    if schedule is MomentumSchedule.constant:
        return constant
    if schedule is MomentumSchedule.beta:
        return critical_momentum(lr)
    if schedule is MomentumSchedule.hybrid:
        return min(critical_momentum(lr), constant)
    raise ValueError("onecycle momentum is set by OneCycleLR, not by momentum_for")


def get_momentum(optimizer: Optimizer) -> float:
    group = optimizer.param_groups[0]
    return float(group["betas"][0] if "betas" in group else group["momentum"])


def set_momentum(optimizer: Optimizer, mu: float) -> None:
    """Set SGD ``momentum`` or Adam/AdamW ``betas[0]`` on every parameter group."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (mu, group["betas"][1])
        else:
            group["momentum"] = mu


class MomentumScheduler:
    """Call ``step()`` before every ``optimizer.step()``: sets momentum from the current LR."""

    def __init__(self, optimizer: Optimizer, schedule: MomentumSchedule, constant: float = CONSTANT) -> None:
        self.optimizer = optimizer
        self.schedule = MomentumSchedule(schedule)
        self.constant = constant

    def step(self) -> float:
        if self.schedule is not MomentumSchedule.onecycle:  # OneCycleLR already set it
            set_momentum(self.optimizer, momentum_for(self.schedule, self.optimizer.param_groups[0]["lr"], self.constant))
        return get_momentum(self.optimizer)


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine from 1 to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def lr_scheduler(optimizer: Optimizer, schedule: MomentumSchedule, total_steps: int, warmup_steps: int = 0) -> LRScheduler:
    """Cosine with warm-up, or OneCycleLR (peak = the optimizer's LR) for the onecycle schedule."""
    if MomentumSchedule(schedule) is MomentumSchedule.onecycle:
        peak = optimizer.param_groups[0]["lr"]
        return OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps, cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)
    return LambdaLR(optimizer, lambda s: cosine_factor(s, total_steps, warmup_steps))


def epoch_record(lrs: list[float], mus: list[float]) -> dict[str, float | str]:
    """Per-epoch schedule figures from the per-step values: means, mu_c, zeta, regime."""
    lr, mu = sum(lrs) / len(lrs), sum(mus) / len(mus)
    return {
        "lr": lr,
        "momentum": mu,
        "mu_c": critical_momentum(lr, clamp=None),
        "zeta": damping_ratio(mu, lr),
        "regime": regime(mu, lr).value,
    }


def plan(
    schedule: MomentumSchedule,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    optimizer: str = "sgd",
    constant: float = CONSTANT,
) -> list[dict[str, float | str]]:
    """The per-epoch LR/momentum/zeta/regime a training run would follow, without training.

    Runs the very schedulers training uses on a one-element dummy parameter.
    """
    param = torch.zeros(1, requires_grad=True)
    opt: Optimizer = (
        torch.optim.SGD([param], lr=lr, momentum=constant)
        if optimizer == "sgd"
        else torch.optim.Adam([param], lr=lr, betas=(constant, 0.999))
    )
    total = epochs * steps_per_epoch
    sched = lr_scheduler(opt, schedule, total, round(warmup_epochs * steps_per_epoch))
    mom = MomentumScheduler(opt, schedule, constant)
    records = []
    for epoch in range(epochs):
        lrs, mus = [], []
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            mus.append(mom.step())
            opt.step()
            sched.step()
        records.append({"epoch": epoch + 1, **epoch_record(lrs, mus)})
    return records


HISTORY_NUMBERS = ("lr", "momentum", "mu_c", "zeta")  # every recorded epoch has them (``epoch_record``)
HISTORY_OPTIONAL = ("train_loss", "train_acc", "test_acc", "seconds", "anchor_loss")
HISTORY_SHARES = ("train_acc", "test_acc")  # accuracies: 0 to 1


def history_problem(history: Iterable[Any]) -> str | None:
    """What is wrong with a training history read from a file, or None: each entry an object with a positive integer
    ``epoch``, finite numbers where ``epoch_record`` and ``fit`` put them, and a known ``regime``."""
    known = {r.value for r in Regime}
    for i, h in enumerate(history):
        where = f"entry {i + 1}"
        if not isinstance(h, dict):
            return f"{where} is not a JSON object"
        if not (isinstance(h.get("epoch"), int) and not isinstance(h.get("epoch"), bool) and h["epoch"] >= 1):
            return f"{where} has no positive integer 'epoch'"
        for key in HISTORY_NUMBERS + tuple(k for k in HISTORY_OPTIONAL if h.get(k) is not None):
            value = h.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{where} '{key}' must be a finite number, got {value!r}"
            if key in HISTORY_SHARES and not 0 <= value <= 1:
                return f"{where} '{key}' must be an accuracy from 0 to 1, got {value!r}"
        if h.get("regime") not in known:
            return f"{where} 'regime' must be one of {', '.join(sorted(known))}, got {h.get('regime')!r}"
    return None


def regime_fractions(history: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Fraction of epochs in each damping regime."""
    regimes = [h["regime"] for h in history]
    n = max(1, len(regimes))
    return {r.value: regimes.count(r.value) / n for r in Regime}


def history_summary(history: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """A training history in a few figures: epochs, final and best test accuracy, seconds, regime shares."""
    if not history:
        return {}
    accs = [h["test_acc"] for h in history if h.get("test_acc") is not None]
    return {
        "epochs": len(history),
        "final_test_acc": accs[-1] if accs else None,
        "best_test_acc": max(accs) if accs else None,
        "seconds": sum(h["seconds"] for h in history) if all("seconds" in h for h in history) else None,
        "regimes": regime_fractions(history),
    }


MAX_PLANNED_STEPS = 1_000_000  # a 200-epoch ImageNet run; planning one takes about half a minute


def planned_runs(
    momenta: Iterable[MomentumSchedule] = PLANNED,
    lr: float | None = PLANNED_LR,
    epochs: int = PLANNED_EPOCHS,
    steps_per_epoch: int = PLANNED_STEPS_PER_EPOCH,
    warmup: float = 0.0,
    optimizer: str = "sgd",
) -> list[dict[str, Any]]:
    """``schedule`` without a checkpoint: per momentum schedule, the planned epochs and their regime shares
    (``lr`` None: the planned default)."""
    lr = PLANNED_LR if lr is None else lr
    check_lr(lr)
    if not (math.isfinite(warmup) and warmup >= 0):
        raise ConfigError(f"--warmup {warmup}: pass a finite number of epochs, 0 or more")
    if epochs * steps_per_epoch > MAX_PLANNED_STEPS:
        raise ConfigError(f"--epochs {epochs} x --steps-per-epoch {steps_per_epoch}: plan at most {MAX_PLANNED_STEPS:,} steps")
    runs = []
    for m in momenta:
        planned = plan(m, lr, epochs, steps_per_epoch, warmup, optimizer)
        runs.append({"name": MomentumSchedule(m).value, "epochs": planned, "regimes": regime_fractions(planned)})
    return runs


def recorded_run(name: str, history: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``schedule CKPT``: the recorded epochs and their regime shares."""
    epochs = list(history)
    if not epochs:
        raise ConfigError(f"{name}: no training history in its metadata: plan one instead, e.g. beta-diag schedule --lr 0.05 --epochs 30")
    return {"name": name, "epochs": epochs, "regimes": regime_fractions(epochs)}
