import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from beta_diag import checkpoint, prefix, ranking, schedules, stats
from beta_diag.cli import app
from beta_diag.configs import AutoLayers, RepairConfig, TrainConfig, repair_training
from beta_diag.data import Dataset
from beta_diag.drift import Drift
from beta_diag.errors import ConfigError
from beta_diag.planning import auto_groups, plan
from beta_diag.repairing import repair
from beta_diag.runtime import Predictions
from beta_diag.session import DataChoice, open_session
from beta_diag.training import Anchor, fit, seeded
from beta_diag.verdicts import choose, verdict
from tests.conftest import make_images, sha

runner = CliRunner()
FAST = RepairConfig(training=repair_training(epochs=2, batch_size=64, lr=0.02))


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
        report = repair(
            tiny["damaged"],
            layers=["layer4", "fc"],
            output=out,
            config=RepairConfig(training=repair_training(epochs=2, batch_size=64, lr=0.02), cache_features=cache),
            device="cpu",
        )
    finally:
        handle.remove()
    assert report.plan["cached_prefix"] == ("conv1..layer3" if cache else None)
    assert seen and all(mu == pytest.approx(schedules.critical_momentum(lr)) for lr, mu in seen)
    assert report.accepted and report.surgical.gate.best_epoch >= 1
    before, after = checkpoint.load(tiny["damaged"]).state_dict, checkpoint.load(out).state_dict
    for key in before:
        if key.startswith(("layer4.", "fc.")) and not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        if key.startswith("layer4.") and key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # the chosen groups' BatchNorm re-estimates its statistics
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])
    # re-evaluating the written file reproduces the reported accuracy exactly
    session = open_session(out, device="cpu")
    ds = session.load_data(DataChoice())
    assert session.evaluate(ds).accuracy == report.surgical.verify.accuracy_after
    meta = checkpoint.load(out).metadata
    assert meta.repair["parent_sha256"] == sha(tiny["damaged"]) and meta.repair["groups"] == ["layer4", "fc"]
    assert meta.repair["gate"]["accepted"] and meta.repair["val_data"]["examples"] == 51  # 20% of 256


def test_cached_and_uncached_repairs_agree(tiny: dict[str, Path], tmp_path: Path) -> None:
    repair(tiny["damaged"], layers=["layer3", "layer4", "fc"], output=tmp_path / "a.safetensors", config=FAST, device="cpu")
    repair(
        tiny["damaged"],
        layers=["layer3", "layer4", "fc"],
        output=tmp_path / "b.safetensors",
        config=RepairConfig(training=repair_training(epochs=2, batch_size=64, lr=0.02), cache_features=False),
        device="cpu",
    )
    wa, wb = checkpoint.load(tmp_path / "a.safetensors").state_dict, checkpoint.load(tmp_path / "b.safetensors").state_dict
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


def test_one_prefix_pass_gives_the_models_outputs(tiny: dict[str, Path]) -> None:
    """The repair evaluates the original on its training data through the cut (prefix once, then
    suffix): the same logits, bit for bit, as evaluating the whole model."""
    session = open_session(tiny["ckpt"], device="cpu")
    ds = session.load_data(DataChoice(), default_split="train")
    chosen = {n for n, _ in session.model.named_parameters() if n.startswith(("layer4.", "fc."))}
    split = prefix.split(session.model, chosen)
    assert split is not None
    cached = prefix.cache(split, ds, session.preprocess, session.device)
    assert torch.equal(prefix.outputs(split, cached, session.device), session.evaluate(ds).logits)


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
    before = sha(tiny["damaged"])
    out, plot = tmp_path / "r.safetensors", tmp_path / "r.png"
    r = runner.invoke(
        app,
        [
            "repair",
            str(tiny["damaged"]),
            "--layers",
            "auto",
            "-o",
            str(out),
            "--epochs",
            "2",
            "--json",
            "--plot",
            str(plot),
            "--baseline",
            "full",
            "--accept-p",
            "1",
        ],
    )  # any validation gain: the search ships its best arm
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    v = report["surgical"]["verify"]
    assert v["net"] == v["fixed"] - v["broken"] and report["baseline"]["groups"] == ["all"]
    assert report["sha256"] == sha(out) and sha(tiny["damaged"]) == before
    assert v["p_value"] == stats.mcnemar_two_sided(v["fixed"], v["broken"]) and v["net_interval"][0] <= v["net"] <= v["net_interval"][1]
    ranked = ranking.rank(tiny["damaged"], config=ranking.RankConfig(bootstrap=0), device="cpu")
    found, plan_d = report["search"], report["plan"]
    names = [c["name"] for c in plan_d["candidates"]]
    assert plan_d["config"]["auto_layers"] == "search"
    suspect_and_flags = next(c for c in plan_d["candidates"] if c["name"] == "suspect and flags")
    assert suspect_and_flags["groups"] == auto_groups(ranked, "both")
    assert {"first block", "back half", "all groups"} <= set(names)
    first = next(c for c in plan_d["candidates"] if c["name"] == "first block")
    assert first["groups"] == ["conv1", "bn1", "layer1"]  # the stem plus the first stage
    tried = found["tried"]
    assert found["tries"] == sum(t["epochs"] for t in tried) == report["surgical"]["gate"]["tries"]
    assert all(t["epochs"] == 2 or t["stopped_early"] or t["lr"] is None for t in tried)
    best = min(tried, key=lambda t: (-t["val_net"], t["val_loss"]))
    assert found["winner"].startswith(best["candidate"])
    assert report["surgical"]["gate"]["curve"][best["best_epoch"]]["val_net"] == best["val_net"]
    lrs = sorted(t["lr"] for t in tried if t["candidate"] == best["candidate"] and t["lr"] is not None)
    assert lrs == pytest.approx([0.001, 0.003, 0.009])  # the learning-rate grid around --lr, on the winner
    assert report["accepted"] and "the best of" in report["verdict"] and plan_d["groups"] == report["surgical"]["groups"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert runner.invoke(app, ["info", str(out)]).exit_code == 0
    assert runner.invoke(app, ["rank", str(out), "--bootstrap", "5"]).exit_code == 0
    dry = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", "layer3,fc", "--dry-run", "--json"])
    assert dry.exit_code == 0 and json.loads(dry.stdout)["groups"] == ["layer3", "fc"]


def test_every_group_is_allowed(tiny: dict[str, Path], tmp_path: Path) -> None:
    every = "conv1,bn1,layer1,layer2,layer3,layer4,fc"
    r = runner.invoke(
        app,
        [
            "repair",
            str(tiny["damaged"]),
            "--layers",
            every,
            "-o",
            str(tmp_path / "r.safetensors"),
            "--epochs",
            "2",
            "--lr",
            "0.02",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["plan"]["fraction"] == 1.0 and d["full_fine_tune"] is True
    assert d["verdict"].startswith("fine-tuned the whole model (epoch ") if d["accepted"] else "original is kept" in d["verdict"]
    named_all = runner.invoke(app, ["repair", str(tiny["damaged"]), "--layers", "all", "--dry-run", "--json"])
    assert named_all.exit_code == 0, named_all.stderr
    assert json.loads(named_all.stdout)["groups"] == every.split(",")  # --layers all names every group


def test_one_name_is_one_group(tiny: dict[str, Path]) -> None:
    assert plan(str(tiny["damaged"]), layers="fc", device="cpu").groups == ("fc",)  # not 'f', 'c'


def test_repair_refusals(tiny: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    other.write_bytes(tiny["ckpt"].read_bytes())
    meta = checkpoint.load(other)
    checkpoint.save(
        other, {k: v + 0 if not v.is_floating_point() else v * 1.01 for k, v in meta.state_dict.items()}, meta.metadata, force=True
    )
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
        repair(tiny["ckpt"], layers=[], device="cpu")


def test_repair_is_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Same command twice: byte-identical --json and output file (the path aside)."""
    stdouts, files = [], []
    for name in ("a", "b"):
        out = tmp_path / name / "r.safetensors"
        out.parent.mkdir()
        r = runner.invoke(
            app,
            [
                "repair",
                str(tiny["damaged"]),
                "--layers",
                "layer3,fc",
                "-o",
                str(out),
                "--epochs",
                "2",
                "--lr",
                "0.02",
                "--json",
                "--device",
                "cpu",
            ],
        )
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
        repair(
            tiny["damaged"],
            layers=["layer4", "fc"],
            output=out,
            config=RepairConfig(training=repair_training(epochs=1, batch_size=64, lr=0.02), distill=weight),
            device="cpu",
        )
        weights[weight] = checkpoint.load(out).state_dict["fc.weight"]
        assert checkpoint.load(out).metadata.repair["config"]["distill"] == weight
    assert not torch.equal(weights[0.0], weights[1.0])
    for bad in (float("nan"), float("inf"), -1.0, 1e308):
        with pytest.raises(ConfigError, match="--distill"):
            repair(tiny["ckpt"], layers=["fc"], output=tmp_path / "x.safetensors", config=RepairConfig(distill=bad), device="cpu")
    for bad in ("-1", "inf", "1e308"):
        r = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", "fc", "--distill", bad])
        assert r.exit_code == 1 and r.stderr.startswith(f"Error: --distill {float(bad)}: pass a weight from 0"), (bad, r.stderr)
        assert not (tiny["root"] / "tiny.repaired.safetensors").exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_repair_training_is_repairs_own_and_refuses_what_repair_cannot_do(tiny: dict[str, Path], tmp_path: Path) -> None:
    assert RepairConfig().training == repair_training() and repair_training(epochs=1).lr == 0.003
    for training in (repair_training(augment=True), repair_training(warmup_epochs=1.0)):
        with pytest.raises(ConfigError, match="without warm-up or augmentation"):
            repair(tiny["ckpt"], layers=["fc"], output=tmp_path / "x.safetensors", config=RepairConfig(training=training), device="cpu")
    assert not (tmp_path / "x.safetensors").exists()


def test_diverged_repair_writes_nothing(tiny: dict[str, Path], tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["repair", str(tiny["ckpt"]), "--layers", "layer4,fc", "--lr", "1e30", "--epochs", "1", "-o", str(tmp_path / "x.safetensors")]
    )
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


def test_a_healthy_model_is_kept_and_nothing_is_written(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The tiny model's remaining errors are label noise: no epoch beats it on validation, so the gate keeps it (exit 3)."""
    out = tmp_path / "r.safetensors"
    r = runner.invoke(
        app, ["repair", str(tiny["ckpt"]), "--layers", "layer4,fc", "-o", str(out), "--epochs", "2", "--lr", "0.02", "--json"]
    )
    assert r.exit_code == 3, r.stderr
    d = json.loads(r.stdout)
    assert (d["accepted"], d["output"], d["sha256"]) == (False, None, None) and not out.exists()
    gate = d["surgical"]["gate"]
    assert [c["epoch"] for c in gate["curve"]] == [0, 1, 2] and gate["curve"][0]["val_net"] == 0 and gate["examples"] == 51
    assert d["verdict"] == f"nothing to repair: the original is kept ({gate['reason']})" and not gate["accepted"]
    assert d["plan"]["val_data"] == {
        "spec": str(tiny["train"]),
        "split": "train",
        "examples": 51,
        "from": "0.2 of the training data (seed 0)",
    }
    text = runner.invoke(app, ["repair", str(tiny["ckpt"]), "--layers", "layer4,fc", "-o", str(out), "--epochs", "2", "--lr", "0.02"])
    assert text.exit_code == 3 and "nothing to repair: the original is kept" in text.stdout and "(kept)" in text.stdout and not out.exists()


def test_the_gate_keeps_the_best_epoch_and_corrects_for_choosing_it() -> None:
    def point(epoch: int, fixed: int, broken: int, loss: float) -> dict:
        return {
            "epoch": epoch,
            "val_loss": loss,
            "val_acc": 0.5,
            "val_fixed": fixed,
            "val_broken": broken,
            "val_net": fixed - broken,
            "examples": 100,
        }

    gate = choose([point(0, 0, 0, 1.0), point(1, 12, 2, 0.8), point(2, 12, 2, 0.7), point(3, 9, 4, 0.5)], accept_p=0.05)
    assert gate.best_epoch == 2  # net +10 twice: the lower validation loss
    assert gate.p_value == pytest.approx(3 * stats.mcnemar_one_sided(12, 2)) and gate.accepted  # 3 epochs to choose from
    assert not choose([point(0, 0, 0, 1.0), point(1, 3, 3, 0.5)], 0.05).accepted  # net 0: the original (epoch 0) is kept
    assert choose([point(0, 0, 0, 1.0), point(1, 3, 3, 0.5)], 1.0).best_epoch == 0  # a lower loss alone never displaces the original
    assert choose([point(0, 0, 0, 1.0), point(1, 4, 1, float("nan")), point(2, 4, 1, 0.9)], 1.0).best_epoch == 2  # NaN loss last
    assert not choose([point(0, 0, 0, 1.0), point(1, 900, 0, 0.5)], 0.0).accepted  # --accept-p 0: never, even at p ~ 0
    assert choose([point(0, 0, 0, 1.0), point(1, 2, 5, 0.5)], 1.0).best_epoch == 0
    assert (
        not choose([point(0, 0, 0, 1.0), point(1, 3, 1, 0.9)], 0.05).accepted
        and choose([point(0, 0, 0, 1.0), point(1, 3, 1, 0.9)], 1.0).accepted
    )


def test_exact_mcnemar_and_net_interval_against_hand_counts() -> None:
    assert stats.mcnemar_one_sided(10, 2) == pytest.approx((66 + 12 + 1) / 4096)  # P(X >= 10), X ~ Bin(12, 1/2)
    assert stats.mcnemar_two_sided(10, 2) == pytest.approx(2 * 79 / 4096) and stats.mcnemar_two_sided(2, 10) == stats.mcnemar_two_sided(
        10, 2
    )
    assert stats.mcnemar_two_sided(0, 0) == 1.0 and stats.mcnemar_one_sided(0, 0) == 1.0
    lo, hi = stats.net_interval(10, 2)
    # Clopper-Pearson: at the bounds the tails are exactly 2.5%
    assert stats.binomial_tail(10, 12, (lo / 12 + 1) / 2) == pytest.approx(0.025, abs=1e-9)
    assert 1 - stats.binomial_tail(11, 12, (hi / 12 + 1) / 2) == pytest.approx(0.025, abs=1e-9)
    assert stats.net_interval(0, 0) == (0.0, 0.0) and stats.net_interval(5, 0)[1] == 5.0 and stats.net_interval(300, 250)[0] > 0


def test_validation_data_are_split_off_or_given_and_never_the_other_sets(tiny: dict[str, Path], tmp_path: Path) -> None:
    p = plan(tiny["damaged"], layers=["fc"], config=FAST, device="cpu")
    assert (len(p.train), len(p.val)) == (205, 51) and not p.val_given
    rows = {tuple(x.flatten().tolist()) for x in p.train.images}
    assert len(rows & {tuple(x.flatten().tolist()) for x in p.val.images}) == 0  # disjoint (the synthetic images are distinct)
    val_file = tmp_path / "val.safetensors"
    val_file.write_bytes(tiny["test"].read_bytes())
    with pytest.raises(ConfigError, match="is the verification data"):
        plan(tiny["damaged"], layers=["fc"], config=FAST, device="cpu", val=DataChoice(str(val_file)), verify=DataChoice(str(val_file)))
    with pytest.raises(ConfigError, match="is the training data"):
        plan(tiny["damaged"], layers=["fc"], config=FAST, device="cpu", val=DataChoice(str(tiny["train"])))
    own = plan(tiny["damaged"], layers=["fc"], config=FAST, device="cpu", val=DataChoice(str(val_file)))
    assert (len(own.train), len(own.val), own.val_given, own.to_dict()["val_data"]["from"]) == (256, 128, True, "given (--val-data)")
    for bad, option in ((0.0, "--val-fraction"), (0.9, "--val-fraction"), (-0.1, "--accept-p"), (2.0, "--accept-p")):
        field = "val_fraction" if option == "--val-fraction" else "accept_p"
        with pytest.raises(ConfigError, match=option):
            plan(tiny["damaged"], layers=["fc"], config=dataclasses.replace(FAST, **{field: bad}), device="cpu")


def test_the_cut_is_traced_once(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    traced = []
    original = torch.fx.symbolic_trace
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda *a, **k: traced.append(1) or original(*a, **k))
    report = repair(tiny["damaged"], layers=["layer4", "fc"], output=tmp_path / "r.safetensors", config=FAST, device="cpu")
    assert report.plan["cached_prefix"] == "conv1..layer3" and len(traced) == 1
