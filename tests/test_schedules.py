import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from beta_diag import data, models, schedules
from beta_diag.configs import MomentumSchedule, OptimizerName, TrainConfig
from beta_diag.data import Preprocess
from beta_diag.schedules import Regime, critical_momentum, damping_ratio, regime
from beta_diag.training import fit
from tests.conftest import make_images


def test_critical_momentum_boundaries() -> None:
    assert critical_momentum(0.25) == 0.5  # mu_c = 0 -> clamped up
    assert critical_momentum(1.0) == 0.5  # mu_c = -1 -> clamped up
    assert critical_momentum(1e-4) == pytest.approx(0.98)
    assert critical_momentum(0.0) == 0.99  # mu_c = 1 -> clamped down
    assert critical_momentum(0.01) == pytest.approx(0.8)
    assert critical_momentum(0.25, clamp=None) == 0.0
    assert critical_momentum(1.0, clamp=None) == -1.0


def test_damping_ratio() -> None:
    assert damping_ratio(0.8, 0.01) == pytest.approx(1.0)
    assert damping_ratio(0.9, 0.01) == pytest.approx(0.5)
    assert damping_ratio(0.9, 0.0) == math.inf


@pytest.mark.parametrize(
    ("mu", "lr", "expected"),
    [
        (0.9, 0.1, Regime.underdamped),  # mu_c = 0.368
        (0.8, 0.01, Regime.critical),  # exactly on the curve
        (0.85, 0.01, Regime.critical),  # on the band's edge counts as critical
        (0.8501, 0.01, Regime.underdamped),
        (0.7499, 0.01, Regime.overdamped),
        (0.5, 0.25, Regime.underdamped),  # clamped beta momentum at large lr is underdamped w.r.t. mu_c = 0
    ],
)
def test_regime(mu: float, lr: float, expected: Regime) -> None:
    assert regime(mu, lr) is expected


def test_hybrid_is_beta_then_constant() -> None:
    assert schedules.momentum_for(MomentumSchedule.hybrid, 0.05) == pytest.approx(critical_momentum(0.05))
    assert schedules.momentum_for(MomentumSchedule.hybrid, 0.0025) == pytest.approx(0.9)
    assert schedules.momentum_for(MomentumSchedule.hybrid, 1e-4) == 0.9
    assert schedules.momentum_for(MomentumSchedule.constant, 0.3) == 0.9


def test_plan_constant_is_mostly_underdamped_under_cosine() -> None:
    plan = schedules.plan(MomentumSchedule.constant, 0.1, 200, 10)
    fractions = schedules.regime_fractions(plan)
    assert fractions["underdamped"] > 0.5
    beta = schedules.regime_fractions(schedules.plan(MomentumSchedule.beta, 0.1, 200, 10))
    assert beta["critical"] > 0.5


def test_cosine_with_warmup() -> None:
    assert schedules.cosine_factor(0, 100, 10) == pytest.approx(0.1)
    assert schedules.cosine_factor(9, 100, 10) == pytest.approx(1.0)
    assert schedules.cosine_factor(10, 100, 10) == pytest.approx(1.0)
    assert schedules.cosine_factor(100, 100, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("optimizer", [OptimizerName.sgd, OptimizerName.adam, OptimizerName.adamw])
@pytest.mark.parametrize("momentum", [MomentumSchedule.beta, MomentumSchedule.hybrid, MomentumSchedule.constant])
def test_optimizer_momentum_follows_schedule_every_step(optimizer: OptimizerName, momentum: MomentumSchedule) -> None:
    images, labels = make_images(96)
    ds = data.Dataset(images, labels, ("a", "b", "c", "d"), "synthetic", "train")
    model = models.build("resnet18_cifar", {"width": 2, "in_channels": 1, "num_classes": 4})
    seen: list[tuple[float, float]] = []

    def hook(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        group = opt.param_groups[0]
        seen.append((group["lr"], group["betas"][0] if "betas" in group else group["momentum"]))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        config = TrainConfig(
            epochs=2,
            lr=0.2 if optimizer is OptimizerName.sgd else 0.01,
            batch_size=16,
            optimizer=optimizer,
            momentum=momentum,
            device="cpu",
        )
        history = fit(model, ds, None, Preprocess((1, 8, 8), (0.3,), (0.3,)), config)
    finally:
        handle.remove()
    assert len(seen) == 12
    for lr, mu in seen:
        assert mu == pytest.approx(schedules.momentum_for(momentum, lr), abs=1e-12)
    assert len({round(lr, 8) for lr, _ in seen}) > 1  # the cosine LR moved
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["regime"] in {r.value for r in Regime} for h in history)


def test_onecycle_momentum_is_cycled() -> None:
    plan = schedules.plan(MomentumSchedule.onecycle, 0.1, 10, 10)
    mus = [p["momentum"] for p in plan]
    assert min(mus) < 0.87 and max(mus) > 0.93
