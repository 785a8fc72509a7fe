import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from beta_diag import checkpoint, features, ranking, schedules
from beta_diag.cli import app
from beta_diag.errors import ConfigError
from beta_diag.drift import Drift
from beta_diag.repair import AutoLayers, RepairConfig, auto_groups, repair, verdict
from beta_diag.session import DataChoice, open_session
from beta_diag.data import Dataset
from beta_diag.training import Anchor, Predictions, TrainConfig, fit, seeded
from tests.conftest import make_images, sha

runner = CliRunner()
FAST = RepairConfig(epochs=2, batch_size=64, lr=0.02)


def test_verdict_equals_hand_count() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    right, wrong = 5.0, -5.0
    # example: 0 wrong->right (fixed), 1 right->wrong (broken), 2 right->right, 3 wrong->wrong, 4 wrong->right (fixed)
    before = Predictions(torch.tensor([[wrong, right, 0], [right, 0, 0], [0, right, 0], [right, 0, 0], [right, 0, 0]]), labels)
    after = Predictions(torch.tensor([[right, 0, 0], [0, right, 0], [0, right, 0], [right, 0, 0], [0, 0, right]]), labels)
    v = verdict(before, after, ("a", "b", "c"))
    assert (v.fixed, v.broken, v.net) == (2, 1, 1)
    assert v.accuracy_before == pytest.approx(2 / 5) and v.accuracy_after == pytest.approx(3 / 5)
    assert v.per_class == {
        "a": {"fixed": 1, "broken": 1, "errors_before": 1, "errors_after": 1},
        "b": {"fixed": 0, "broken": 0, "errors_before": 1, "errors_after": 1},
        "c": {"fixed": 1, "broken": 0, "errors_before": 1, "errors_after": 0},
    }


@pytest.mark.parametrize("cache", [True, False])
def test_repair_trains_only_chosen_and_follows_schedule(tiny: dict[str, Path], tmp_path: Path, cache: bool) -> None:
    out = tmp_path / "r.safetensors"
    seen: list[tuple[float, float]] = []
    handle = register_optimizer_step_pre_hook(lambda opt, a, k: seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"])))
    try:
        report = repair(tiny["ckpt"], ["layer4", "fc"], out, config=RepairConfig(epochs=2, batch_size=64, lr=0.02, cache_features=cache), device="cpu")
    finally:
        handle.remove()
    assert report.plan.cached_prefix == ("conv1..layer3" if cache else None)
    assert seen and all(mu == pytest.approx(schedules.critical_momentum(lr)) for lr, mu in seen)
    before, after = checkpoint.load(tiny["ckpt"]).state_dict, checkpoint.load(out).state_dict
    for key in before:
        if key.startswith(("layer4.", "fc.")) and not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        if key.startswith("layer4.") and key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # the chosen groups' BatchNorm re-estimates its statistics
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])
    # re-evaluating the written file reproduces the reported accuracy exactly
    session = open_session(out, "cpu")
    ds = session.load_data(__import__("beta_diag.session", fromlist=["DataChoice"]).DataChoice())
    assert session.evaluate(ds).accuracy == report.surgical.verify.accuracy_after
    meta = checkpoint.load(out).metadata
    assert meta.repair["parent_sha256"] == sha(tiny["ckpt"]) and meta.repair["groups"] == ["layer4", "fc"]


def test_cached_and_uncached_repairs_agree(tiny: dict[str, Path], tmp_path: Path) -> None:
    a = repair(tiny["ckpt"], ["layer3", "layer4", "fc"], tmp_path / "a.safetensors", config=FAST, device="cpu")
    b = repair(tiny["ckpt"], ["layer3", "layer4", "fc"], tmp_path / "b.safetensors",
               config=RepairConfig(epochs=2, batch_size=64, lr=0.02, cache_features=False), device="cpu")
    wa, wb = checkpoint.load(tmp_path / "a.safetensors").state_dict, checkpoint.load(tmp_path / "b.safetensors").state_dict
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


def test_one_prefix_pass_gives_the_models_outputs(tiny: dict[str, Path]) -> None:
    """The repair evaluates the original on its training data through the cut (prefix once, then
    suffix): the same logits, bit for bit, as evaluating the whole model."""
    session = open_session(tiny["ckpt"], "cpu")
    ds = session.load_data(DataChoice(), default_split="train")
    chosen = {n for n, _ in session.model.named_parameters() if n.startswith(("layer4.", "fc."))}
    split = features.split(session.model, chosen)
    assert split is not None
    cached = features.cache(split, ds, session.preprocess, session.device)
    assert torch.equal(features.outputs(split, cached, session.device), session.evaluate(ds).logits)


def test_interrupted_repair_leaves_no_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    steps = []

    def boom(opt: object, a: object, k: object) -> None:
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt

    handle = register_optimizer_step_pre_hook(boom)
    try:
        result = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", "fc", "-o", str(tmp_path / "r.safetensors"), "--epochs", "2"])
    finally:
        handle.remove()
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_repair_auto_json_plot_and_input_untouched(tiny: dict[str, Path], tmp_path: Path) -> None:
    before = sha(tiny["ckpt"])
    out, plot = tmp_path / "r.safetensors", tmp_path / "r.png"
    r = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", "auto", "-o", str(out), "--epochs", "2", "--json", "--plot", str(plot),
                            "--baseline", "full"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    v = report["surgical"]["verify"]
    assert v["net"] == v["fixed"] - v["broken"] and report["baseline"]["groups"] == ["all"]
    assert report["sha256"] == sha(out) and sha(tiny["ckpt"]) == before
    ranked = ranking.rank(tiny["ckpt"], config=ranking.RankConfig(bootstrap=0), device="cpu")  # auto: the drift suspect plus the flags
    assert report["plan"]["groups"] == auto_groups(ranked, "both") and report["plan"]["config"]["auto_layers"] == "both"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert runner.invoke(app, ["info", str(out)]).exit_code == 0
    assert runner.invoke(app, ["rank", str(out), "--bootstrap", "5"]).exit_code == 0
    dry = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", "layer3,fc", "--dry-run", "--json"])
    assert dry.exit_code == 0 and json.loads(dry.stdout)["groups"] == ["layer3", "fc"]


def test_every_group_is_allowed(tiny: dict[str, Path], tmp_path: Path) -> None:
    every = "conv1,bn1,layer1,layer2,layer3,layer4,fc"
    r = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", every, "-o", str(tmp_path / "r.safetensors"), "--epochs", "1", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["plan"]["fraction"] == 1.0


def test_repair_refusals(tiny: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    other.write_bytes(tiny["ckpt"].read_bytes())
    meta = checkpoint.load(other)
    checkpoint.save(other, {k: v + 0 if not v.is_floating_point() else v * 1.01 for k, v in meta.state_dict.items()}, meta.metadata, force=True)
    saved = tmp_path / "other.json"
    assert runner.invoke(app, ["rank", str(other), "--out", str(saved), "--bootstrap", "5"]).exit_code == 0
    cases = [
        (["--layers", "layer9,fc"], "--layers: unknown name(s) layer9: use groups (conv1, bn1, layer1"),
        (["--layers", ","], "--layers names nothing"),
        (["--ranking", str(saved)], "ranks another checkpoint"),
        (["--train-data", str(tiny["test"])], "refusing to train on the verification data"),
        (["-o", str(tiny["ckpt"])], "output would overwrite an input"),
    ]
    for args, message in cases:
        before = {p: sha(p) for p in tmp_path.iterdir()}
        r = runner.invoke(app, ["repair", str(tiny["ckpt"]), *args])
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and message in r.stderr, (args, r.stderr)
        assert {p: sha(p) for p in tmp_path.iterdir()} == before
    assert not (tiny["root"] / "tiny.repaired.safetensors").exists()
    with pytest.raises(ConfigError):
        repair(tiny["ckpt"], [], device="cpu")


def test_repair_is_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Same command twice: byte-identical --json and output file (the path aside)."""
    stdouts, files = [], []
    for name in ("a", "b"):
        out = tmp_path / name / "r.safetensors"
        out.parent.mkdir()
        r = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", "layer3,fc", "-o", str(out), "--epochs", "1", "--json", "--device", "cpu"])
        assert r.exit_code == 0, r.stderr
        stdouts.append(r.stdout.replace(str(out), "OUT"))
        files.append(out.read_bytes())
    assert stdouts[0] == stdouts[1] and "seconds" not in stdouts[0]
    assert files[0] == files[1]


def test_anchor_loss_is_weighted_tempered_kl() -> None:
    ref = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]])
    logits = torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]], requires_grad=True)  # the batch: examples 2 and 0
    weight, t = torch.tensor([1.0, 0.0, 2.5]), 2.0
    anchor = Anchor(ref, weight, t)
    idx = torch.tensor([2, 0])
    p, q = torch.softmax(ref[idx] / t, 1), torch.softmax(logits / t, 1)
    by_hand = (weight[idx] * (p * (p / q).log()).sum(1)).sum() * t * t
    assert float(anchor.loss(logits, idx)) == pytest.approx(float(by_hand), rel=1e-6)
    # at the reference the pull is zero and so is its gradient
    at_ref = ref[idx].clone().requires_grad_(True)
    loss = anchor.loss(at_ref, idx)
    loss.backward()
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(at_ref.grad.abs().max()) < 1e-6


def test_fit_follows_the_anchor_example_by_example() -> None:
    """A teacher that contradicts every label, weighted strongly, is what the model learns: the
    per-example reference logits stay matched to their examples through shuffling."""
    images, labels = make_images(256, seed=3)
    ds = Dataset(images, labels, ("a", "b", "c", "d"), "synthetic", "train")
    teacher = 8.0 * torch.nn.functional.one_hot((labels + 1) % 4, 4).float()
    agree = {}
    for weight in (0.0, 10.0):
        with seeded(0):
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        config = TrainConfig(epochs=8, lr=0.05, batch_size=32, weight_decay=0.0, device="cpu")
        fit(model, ds, None, lambda x: x.float() / 255, config, anchor=Anchor(teacher, torch.full((256,), weight)))
        preds = model(images.float() / 255).argmax(1)
        agree[weight] = float((preds == teacher.argmax(1)).float().mean())
    assert agree[10.0] > 0.9 and agree[0.0] < 0.2, agree


def test_distill_option(tiny: dict[str, Path], tmp_path: Path) -> None:
    """--distill trains with the anchor (other weights than without), records its weight; bad weights are refused."""
    weights = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"d{weight}.safetensors"
        repair(tiny["ckpt"], ["layer4", "fc"], out, config=RepairConfig(epochs=1, batch_size=64, lr=0.02, distill=weight), device="cpu")
        weights[weight] = checkpoint.load(out).state_dict["fc.weight"]
        assert checkpoint.load(out).metadata.repair["config"]["distill"] == weight
    assert not torch.equal(weights[0.0], weights[1.0])
    for bad in (float("nan"), float("inf"), -1.0, 1e308):
        with pytest.raises(ConfigError, match="--distill"):
            repair(tiny["ckpt"], ["fc"], tmp_path / "x.safetensors", config=RepairConfig(distill=bad), device="cpu")
    for bad in ("-1", "inf", "1e308"):
        r = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", "fc", "--distill", bad])
        assert r.exit_code == 2 and not (tiny["root"] / "tiny.repaired.safetensors").exists(), (bad, r.stderr)
    assert not (tmp_path / "x.safetensors").exists()


def test_diverged_repair_writes_nothing(tiny: dict[str, Path], tmp_path: Path) -> None:
    r = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", "layer4,fc", "--lr", "1e30", "--epochs", "1", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "the repair diverged" in r.stderr and "lower --lr" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_auto_layers_policies(tiny: dict[str, Path]) -> None:
    r = ranking.rank(tiny["ckpt"], config=ranking.RankConfig(bootstrap=0), device="cpu")
    flagged = list(r.flagged)
    outside = next(g for g in r.group_names if g not in flagged)
    with_suspect = dataclasses.replace(r, drift=Drift(True, suspect=outside, margin=50.0))
    assert auto_groups(with_suspect, "flags") == flagged
    assert auto_groups(with_suspect, AutoLayers.suspect) == [outside]
    assert auto_groups(with_suspect, "both") == [outside, *flagged]
    inside = dataclasses.replace(r, drift=Drift(True, suspect=flagged[-1], margin=50.0))
    assert auto_groups(inside, "both") == [flagged[-1], *flagged[:-1]]
    for nothing in (Drift(True), Drift(False, "no BatchNorm"), None):  # no suspect: every policy repairs the flags
        assert all(auto_groups(dataclasses.replace(r, drift=nothing), p) == flagged for p in AutoLayers)
