"""Activation drift against BatchNorm running statistics: exact sums, the localisation rule, the samples, and models without statistics."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from beta_diag import checkpoint, drift, ranking
from beta_diag.cli import app
from beta_diag.configs import Granularity, RankConfig, TrainConfig
from beta_diag.data import Dataset, Preprocess
from beta_diag.drift import LayerDrift, Recorder, localise
from beta_diag.groups import layer_groups
from beta_diag.runtime import Predictions, evaluate
from beta_diag.session import DataChoice, open_session
from beta_diag.training import train
from tests.conftest import SAMPLES, make_images

SGD = SAMPLES / "fmnist_resnet18w16_sgd_beta.safetensors"
runner = CliRunner()


def small_net(bn: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    norm = bn if bn is not None else nn.BatchNorm2d(3)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 3, 3, padding=1))
    net.add_module("norm", norm)
    net.add_module("act", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(3, 4))
    return net.eval()


PRE = Preprocess((1, 6, 6), (0.5,), (0.5,))


def record(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[drift.Drift, Predictions]:
    """One evaluation pass of ``net`` with the drift hooks (batches of 16: a partial last batch when N is not a multiple)."""
    rec = Recorder(net)
    preds = evaluate(
        net,
        Dataset(images, labels, ("a", "b", "c", "d"), "synthetic", "test"),
        PRE,
        torch.device("cpu"),
        batch_size=16,
        on_batch=rec.commit,
    )
    rec.remove()
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed
    return rec.result(layer_groups(net)), preds


def test_recorder_sums_equal_the_statistics_of_the_batchnorm_input() -> None:
    net = small_net()
    with torch.no_grad():  # running statistics that the data does not match
        net.norm.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        net.norm.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    images, labels = make_images(50, size=6)
    result, preds = record(net, images, labels)  # 4 batches, the last partial
    x = net.conv(PRE(images)).detach().double()  # (N, 3, 6, 6): the BatchNorm's input
    wrong = ~preds.correct

    def parts(x: torch.Tensor) -> tuple[float, float]:
        mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        ref = net.norm.running_var.double() + net.norm.eps
        r = (var + net.norm.eps) / ref
        return float((0.5 * (mu - net.norm.running_mean.double()) ** 2 / ref).mean()), float((0.5 * (r - 1 - torch.log(r))).mean())

    # sampling noise, examples as draws: the variance of the per-example means' mean, and of the variance estimate
    # s2 = mean(m2) - mean(m1)^2 by the delta method (checked here against a direct bootstrap-free formula)
    xc = x - net.norm.running_mean.double().view(1, -1, 1, 1)
    m1, m2 = xc.mean((2, 3)), xc.square().mean((2, 3))  # (N, C)
    ref, n = net.norm.running_var.double() + net.norm.eps, len(x)
    mu = m1.mean(0)
    var_s2 = ((m2 - 2 * mu * m1) - (m2 - 2 * mu * m1).mean(0)).square().mean(0) / n  # Var of the linearised s2
    mean_noise, var_noise = 0.5 * m1.var(0, unbiased=False) / n / ref, 0.25 * var_s2 / ref**2

    (layer,) = result.layers
    assert (layer.name, layer.group, layer.feeder, layer.feeder_group, layer.channels) == ("norm", "norm", "conv", "conv", 3)
    assert layer.mean_part == pytest.approx(parts(x)[0], rel=1e-5)
    assert layer.var_part == pytest.approx(parts(x)[1], rel=1e-5)
    assert layer.mean_noise == pytest.approx(float(mean_noise.mean()), rel=1e-5)
    assert layer.var_noise == pytest.approx(float(var_noise.mean()), rel=1e-4)  # per-example means are float32
    assert wrong.any()
    assert layer.errors_mean_part == pytest.approx(parts(x[wrong])[0], rel=1e-5)
    assert layer.errors_var_part == pytest.approx(parts(x[wrong])[1], rel=1e-5)
    assert result.downstream == ("fc",)


def profile(*rows: tuple[str, str | None, str | None, float, float]) -> list[LayerDrift]:
    return [
        LayerDrift(name, group, f"{name}.feeder", feeder, 8, mean, var, 0.0, 0.0, None, None) for name, group, feeder, mean, var in rows
    ]


def test_localise_first_jump_charges_mean_to_own_group_and_variance_to_the_feeder() -> None:
    healthy = profile(
        ("bn1", "bn1", "conv1", 1e-5, 1e-5), ("l1.bn", "layer1", "layer1", 1e-4, 1e-4), ("l2.bn", "layer2", "layer2", 3e-4, 2e-4)
    )
    assert localise(healthy)[0] is None  # every drift below the floor 1e-3
    # conv1 damaged: bn1's input spread changes (variance part) -> charged to conv1, which feeds bn1
    conv1 = profile(("bn1", "bn1", "conv1", 1e-3, 0.5), ("l1.bn", "layer1", "layer1", 0.2, 0.9))
    suspect, margin, layer, groups = localise(conv1)
    assert (suspect, layer) == ("conv1", "bn1")
    assert margin == pytest.approx(0.501 / 1e-3)
    assert groups["conv1"] == pytest.approx(500.0) and groups["bn1"] == pytest.approx(1.0)
    # bn1's running variance scaled: the variance moved but the mean stayed within sampling noise -> bn1, not its feeder
    assert localise([LayerDrift("bn1", "bn1", "conv1", "conv1", 8, 1.5e-5, 0.5, 1e-5, 1e-3, None, None)])[0] == "bn1"
    assert localise([LayerDrift("bn1", "bn1", "conv1", "conv1", 8, 1e-3, 0.5, 1e-5, 1e-3, None, None)])[0] == "conv1"
    assert (
        localise([LayerDrift("bn1", "bn1", "conv1", "conv1", 8, 1.5e-5, 0.5, 1e-5, 1e-3, None, None)], drift.Rule(unmoved=0.0))[0]
        == "conv1"
    )
    # bn1's running mean shifted: its own input is fine, its mean part is not -> bn1
    assert localise(profile(("bn1", "bn1", "conv1", 0.3, 0.01), ("l1.bn", "layer1", "layer1", 0.5, 0.5)))[0] == "bn1"
    # the first jump wins, even when a later one is larger: later layers inherit the damage
    later = profile(("bn1", "bn1", "conv1", 1e-5, 1e-5), ("l2.bn", "layer2", "layer2", 0.01, 0.02), ("l3.bn", "layer3", "layer3", 5.0, 5.0))
    assert localise(later)[0] == "layer2"
    # a jump of 4x or less names nobody
    assert localise(profile(("a", "g1", "g1", 1e-3, 1e-3), ("b", "g2", "g2", 4e-3, 3.9e-3)))[0] is None
    layers = profile(*[(n, n, n, kl, 0.0) for n, kl in zip("abcd", [1e-4, 2e-3, 1e-3, 8e-3])])
    assert drift.jumps(layers) == pytest.approx([0.1, 2.0, 0.5, 4.0])
    # a jump must stand above the layer's own sampling noise too: 0.05 against noise 0.02 is no finding
    assert localise([LayerDrift("bn", "g", "conv", "g", 8, 0.03, 0.02, 0.01, 0.01, None, None)])[0] is None
    assert localise([LayerDrift("bn", "g", "conv", "g", 8, 0.03, 0.02, 0.0, 0.0, None, None)])[0] == "g"
    # NaN in a BatchNorm's input: broken from there on, whatever the earlier profile; the table says so too
    broken = localise(profile(("bn1", "bn1", "conv1", 1e-5, 1e-5), ("l1.bn", "layer1", "layer1", math.nan, math.nan)))
    assert broken[0] == "layer1" and broken[1] == math.inf and broken[3]["layer1"] == math.inf


@pytest.mark.parametrize(
    ("norm", "reason"),
    [
        (nn.BatchNorm2d(3, track_running_stats=False), "track_running_stats=False"),
        (nn.GroupNorm(1, 3), "LayerNorm, GroupNorm or InstanceNorm"),
        (nn.Identity(), "no BatchNorm layer"),
    ],
)
def test_models_without_running_statistics_report_why(norm: nn.Module, reason: str) -> None:
    result, _ = record(small_net(norm), *make_images(8, size=6))
    assert not result.available and reason in (result.reason or "")
    assert result.finding.startswith("drift unavailable: ")


@pytest.fixture(scope="module")
def sample_session():
    return open_session(SGD, device="cpu")


def test_healthy_sample_has_no_suspect_and_json_carries_the_profile(sample_session, tmp_path: Path) -> None:
    r = ranking.rank(sample_session, data=DataChoice(limit=1000), config=RankConfig(bootstrap=0))
    assert r.drift is not None and r.drift.available and r.drift.suspect is None
    assert r.drift.downstream == ("fc",)
    assert len(r.drift.layers) == 20 and all(layer.kl < drift.Rule.floor for layer in r.drift.layers)
    assert r.verdict.endswith(
        "no activation drift found: any fault lies after the last BatchNorm (in fc) or does not show in activation statistics"
    )
    d = r.to_dict()["drift"]
    assert d["available"] is True and d["suspect"] is None and set(d["groups"]) == {"bn1", "layer1", "layer2", "layer3", "layer4"}
    assert d["layers"][0]["name"] == "bn1" and d["layers"][0]["feeder"] == "conv1" and "jump" in d["layers"][0]
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps(r.to_dict()))
    assert ranking.load(saved).drift == r.drift


@pytest.mark.parametrize(
    ("granularity", "expected"), [(Granularity.group, "layer2"), (Granularity.block, "layer2.0"), (Granularity.module, "layer2.0.bn1")]
)
def test_a_shifted_running_mean_is_found_at_every_granularity(sample_session, granularity: Granularity, expected: str) -> None:
    model = copy.deepcopy(sample_session.model)
    bn = model.layer2[0].bn1
    with torch.no_grad():
        bn.running_mean.add_(bn.running_var.sqrt() * 1.5)
    damaged = dataclasses.replace(sample_session, model=model)
    r = ranking.rank(damaged, data=DataChoice(limit=500), config=RankConfig(bootstrap=0, granularity=granularity))
    assert r.drift is not None and r.drift.suspect == expected and r.drift.suspect_layer == "layer2.0.bn1"
    assert r.drift.margin is not None and r.drift.margin > 100  # 0.5 * 1.5^2 = 1.1 against a profile under 1e-3
    assert r.place_finding.startswith(f"activations leave their training statistics at {expected} (x")
    assert "the damage is likely there, or the data differ from the training data; " in r.place_finding


def test_rank_without_running_statistics_reports_drift_unavailable_and_ranks_as_before(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = train(
        "tests.nets:convnet",
        data=DataChoice(str(tiny["train"])),
        test=DataChoice(str(tiny["test"])),
        config=TrainConfig(epochs=1, batch_size=64, device="cpu"),
    )
    ckpt = tmp_path / "convnet.safetensors"
    checkpoint.save(ckpt, result.model.state_dict(), result.metadata)
    out = runner.invoke(app, ["rank", str(ckpt), "--arch", "tests.nets:convnet", "--bootstrap", "0", "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert d["drift"] == {
        **d["drift"],
        "available": False,
        "suspect": None,
        "groups": None,
        "layers": [],
        "reason": "it has no BatchNorm layer (none, or folded into the convolutions)",
    }
    assert d["verdict"].endswith("; drift unavailable: it has no BatchNorm layer (none, or folded into the convolutions)")
    assert len(d["groups"]) == 3 and d["flagged"]
    cause = d["cause"]  # without drift the control has nothing to compare: it reads no training data
    assert cause["kind"] in ("undetermined", "degenerate") and cause["evidence"]["control"] is None
    assert "drift is unavailable" in cause["summary"]
    table = runner.invoke(app, ["rank", str(ckpt), "--arch", "tests.nets:convnet", "--bootstrap", "0", "--quiet"])
    assert table.exit_code == 0 and "drift unavailable" in table.stdout and "│ drift" not in table.stdout


def test_batchnorm1d_on_features_is_measured_too() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4)).eval()
    with torch.no_grad():
        net[2].running_mean.fill_(0.2)
    images, labels = make_images(40, size=6)
    (layer,) = record(net, images, labels)[0].layers
    x = net[1](net[0](PRE(images))).detach().double()  # (N, 5)
    ref = net[2].running_var.double() + net[2].eps
    r = (x.var(0, unbiased=False) + net[2].eps) / ref
    assert (layer.name, layer.feeder) == ("2", "1")
    assert layer.mean_part == pytest.approx(float((0.5 * (x.mean(0) - 0.2) ** 2 / ref).mean()), rel=1e-5)
    assert layer.var_part == pytest.approx(float((0.5 * (r - 1 - torch.log(r))).mean()), rel=1e-5)
    assert layer.mean_noise == pytest.approx(float((0.5 * x.var(0, unbiased=False) / len(x) / ref).mean()), rel=1e-5)


def test_a_batchnorm_called_twice_per_pass_is_left_out() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.norm(self.conv(x))).mean((2, 3)))

    result, _ = record(Twice().eval(), *make_images(8, size=6))
    assert not result.available and result.reason == "every BatchNorm is called more than once per pass on the data"
