"""The cause of a model's errors: the recalibration probe, the decision rules, and rank's cause on real damage and shifts."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import SAMPLES
from typer.testing import CliRunner

from beta_diag import control, data, ranking
from beta_diag.causes import CauseRule, Evidence, decide
from beta_diag.cli import app
from beta_diag.configs import RankConfig
from beta_diag.data import Dataset
from beta_diag.recalibration import agreement, recalibrated
from beta_diag.session import DataChoice, open_session

SGD = SAMPLES / "fmnist_resnet18w16_sgd_beta.safetensors"
runner = CliRunner()
FAST = RankConfig(bootstrap=0, control=300)


@pytest.fixture(scope="module")
def session():
    return open_session(SGD, device="cpu")


@pytest.fixture(scope="module")
def train_sample(session):
    return session.load_data(DataChoice(limit=300), default_split="train")


def overwritten(session, images_from: Dataset) -> torch.nn.Module:
    """Every BatchNorm's statistics overwritten with those of other images (weights untouched): a recalibration on the wrong data."""
    return recalibrated(session.model, images_from, session.preprocess, session.device)


def test_recalibration_works_on_a_copy_and_undoes_overwritten_statistics(session, train_sample) -> None:
    test = session.load_data(DataChoice(limit=500))
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    healthy = session.evaluate(test).accuracy
    fresh = recalibrated(session.model, train_sample, session.preprocess, session.device)
    assert all(torch.equal(before[k], v) for k, v in session.model.state_dict().items())  # the original is untouched
    assert max(a.kl for a in agreement(session.model, fresh)) < 1e-3  # a healthy model's statistics agree with fresh ones
    broken = overwritten(session, dataclasses.replace(train_sample, images=255 - train_sample.images))
    damaged = dataclasses.replace(session, model=broken).evaluate(test).accuracy
    restored = dataclasses.replace(session, model=recalibrated(broken, train_sample, session.preprocess, session.device)).evaluate(test)
    assert damaged < healthy - 0.1 and restored.accuracy > healthy - 0.02
    assert all(a.kl > 1e-3 for a in agreement(broken, recalibrated(broken, train_sample, session.preprocess, session.device)))


def rank_cause(session, test_ds, model=None, pre=None):
    s = dataclasses.replace(session, model=model or session.model, preprocess=pre or session.preprocess)
    return ranking.rank(s, data=DataChoice(limit=len(test_ds)), config=FAST, dataset=test_ds).cause


def test_rank_names_each_everyday_cause(session) -> None:
    test = session.load_data(DataChoice(limit=600))
    assert rank_cause(session, test).kind == "none"
    rotated = rank_cause(session, dataclasses.replace(test, images=TF.rotate(test.images, 25.0)))
    assert rotated.kind == "input_shift" and "adapt" in rotated.suggested
    train = session.load_data(DataChoice(limit=300), default_split="train")
    stats = rank_cause(session, test, model=overwritten(session, dataclasses.replace(train, images=255 - train.images)))
    assert stats.kind == "statistics" and "recalibrat" in stats.suggested
    assert stats.evidence["control"]["recalibrated_data_accuracy"] > stats.evidence["control"]["data_sample_accuracy"] + 0.1
    damaged = copy.deepcopy(session.model)
    with torch.no_grad():
        for p in damaged.layer3.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * p.std() * 0.6)
    weights = rank_cause(session, test, model=damaged)
    assert weights.kind == "weights" and weights.place == "layer3" and f"--layers {weights.place}" in weights.suggested
    pre = dataclasses.replace(session.preprocess, mean=(0.5,), std=(0.5,))
    wrong = rank_cause(session, test, pre=pre)
    assert (
        wrong.kind == "input_shift" and "--mean 0.29" in wrong.suggested and "--std 0.35" in wrong.suggested
    )  # the sample's: 0.2856, 0.3529
    swapped = test.labels.clone()
    swapped[test.labels == 0], swapped[test.labels == 6] = 6, 0
    label = rank_cause(session, dataclasses.replace(test, labels=swapped))
    assert label.kind == "label_shift" and ("T-shirt/top -> Shirt" in label.summary or "Shirt -> T-shirt/top" in label.summary)


def evidence(**changes) -> Evidence:
    layers = [
        {"name": f"bn{i}", "group": f"g{i // 2}", "feeder_group": f"g{i // 2}", "data_kl": 1e-4, "train_kl": 1e-4, "train_noise": 1e-5,
         "shift": 1.0, "agreement_kl": 1e-5}
        for i in range(8)
    ]  # fmt: skip
    control = {
        "spec": "train.safetensors", "split": "train", "examples": 1000, "accuracy": 0.92, "suspect": None, "suspect_layer": None,
        "data_sample": 1000, "data_sample_accuracy": 0.9, "recalibrated_data_accuracy": None, "adapted_data_accuracy": None,
        "layers": layers, "normalisations": {}, "input_difference": 0.5, "data_input": {"input_mean": [0.0], "input_std": [1.0]},
        "train_input": {"input_mean": [0.0], "input_std": [1.0]}, "pairs": [],
    }  # fmt: skip
    base = Evidence(
        examples=1000,
        classes=10,
        accuracy=0.9,
        top_class="a",
        top_class_share=0.11,
        top2_share=0.21,
        drift_available=True,
        first_layer="bn0",
        first_group="g0",
        suspect=None,
        downstream=("fc",),
        recorded_accuracy=0.91,
        control=control,
    )
    return dataclasses.replace(base, **changes)


def with_layers(e: Evidence, **per_layer) -> Evidence:
    assert e.control is not None
    layers = [dict(layer) for layer in e.control["layers"]]
    for key, values in per_layer.items():
        for layer, v in zip(layers, values):
            layer[key] = v
    return dataclasses.replace(e, control={**e.control, "layers": layers})


def test_decide_follows_the_evidence() -> None:
    assert decide(evidence()).kind == "none"
    everywhere = with_layers(evidence(), agreement_kl=[0.05] * 8)
    assert decide(everywhere).kind == "statistics"
    from_g2 = with_layers(evidence(), agreement_kl=[1e-5] * 4 + [0.05] * 4)
    assert (decide(from_g2).kind, decide(from_g2).place) == ("weights", "g2")
    early = with_layers(evidence(), shift=[9.0] * 8)
    assert early.control is not None and decide(early).kind == "feature_shift"  # the inputs match: the features moved
    at_input = dataclasses.replace(early, control={**early.control, "input_difference": 40.0})
    assert (decide(at_input).kind, decide(at_input).place) == ("input_shift", "g0")
    deep = with_layers(evidence(), shift=[1.0] * 6 + [9.0] * 2)
    assert (decide(deep).kind, decide(deep).place) == ("feature_shift", "g3")
    weak = decide(dataclasses.replace(evidence(), recorded_accuracy=0.93, accuracy=0.8))  # the training data still as recorded
    assert weak.kind == "none" and "uniformly weaker" in weak.summary
    lost = evidence()
    assert lost.control is not None
    lost = dataclasses.replace(lost, control={**lost.control, "accuracy": 0.8}, accuracy=0.79)
    assert (decide(lost).kind, decide(lost).place) == ("weights", "fc")  # by elimination: after the last BatchNorm
    collapsed = decide(dataclasses.replace(evidence(), top_class_share=0.95, accuracy=0.1))
    assert (
        collapsed.kind == "degenerate"
        and collapsed.degenerate
        and collapsed.summary.startswith("the model is degenerate: it predicts a for 95.0%")
    )
    stats_collapsed = decide(dataclasses.replace(everywhere, top_class_share=0.95, accuracy=0.1))
    assert stats_collapsed.kind == "statistics" and stats_collapsed.degenerate
    assert decide(everywhere, CauseRule(spread=1.01)).kind == "weights"  # the rule's constants decide


def test_without_training_data_the_cause_says_what_it_could_not_decide() -> None:
    moved = decide(dataclasses.replace(evidence(), control=None, suspect="g1", why_no_control="no training data"))
    assert moved.kind == "undetermined" and set(moved.undecided) >= {"input_shift", "statistics", "weights"}
    assert "--train-data" in moved.suggested and "no training data" in moved.summary
    quiet = decide(dataclasses.replace(evidence(), control=None))
    assert quiet.kind == "undetermined" and "label_shift" in quiet.undecided


def test_cli_cause_in_json_and_table_and_a_copied_checkpoint_says_what_is_missing(tmp_path: Path) -> None:
    out = runner.invoke(app, ["rank", str(SGD), "--limit", "400", "--bootstrap", "0", "--control", "200", "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert d["cause"]["kind"] == "none" and d["cause"]["evidence"]["control"]["examples"] == 200 and d["cause"]["suggested"]
    assert d["config"]["control"] == 200 and d["verdict"].startswith("none: ")
    table = runner.invoke(app, ["rank", str(SGD), "--limit", "400", "--bootstrap", "0", "--control", "200", "--quiet"])
    assert table.exit_code == 0 and "cause: none: nothing found: a healthy model" in table.stdout and "suggested: " in table.stdout
    alone = tmp_path / "copy.safetensors"
    shutil.copy(SGD, alone)  # its training bundle is not beside it
    test_bundle = str(SAMPLES / "fmnist_test_3k.safetensors")
    res = runner.invoke(app, ["rank", str(alone), "--data", test_bundle, "--limit", "300", "--bootstrap", "0", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    cause = json.loads(res.stdout)["cause"]
    assert cause["kind"] == "undetermined" and "--train-data" in cause["suggested"] and "no training data" in cause["summary"]
    given = ["--train-data", str(SAMPLES / "fmnist_train_5k.safetensors"), "--control", "200"]
    res = runner.invoke(app, ["rank", str(alone), "--data", test_bundle, "--limit", "300", "--bootstrap", "0", *given, "--json", "--quiet"])
    assert res.exit_code == 0 and json.loads(res.stdout)["cause"]["kind"] == "none"
    off = runner.invoke(app, ["rank", str(SGD), "--limit", "300", "--bootstrap", "0", "--no-control", "--json", "--quiet"])
    assert json.loads(off.stdout)["cause"]["evidence"]["why_no_control"] == "the control pass was turned off (--no-control)"
    assert runner.invoke(app, ["rank", str(SGD), "--control", "-1"]).exit_code == 2
    adam = str(SAMPLES / "fmnist_resnet18w16_adam_beta.safetensors")
    both = runner.invoke(app, ["compare", str(SGD), adam, "--limit", "300", "--bootstrap", "0", "--control", "200", "--json", "--quiet"])
    assert both.exit_code == 0 and [i["cause"]["kind"] for i in json.loads(both.stdout)["inputs"]] == ["none", "none"]


def test_a_saved_ranking_keeps_its_cause(session, tmp_path: Path) -> None:
    r = ranking.rank(session, data=DataChoice(limit=300), config=FAST)
    r.save(tmp_path / "r.json")
    loaded = ranking.load(tmp_path / "r.json")
    assert loaded.cause == r.cause and loaded.verdict == r.verdict


def test_recorded_accuracy_takes_only_a_plausible_number() -> None:
    assert control.recorded_accuracy([{"test_acc": 0.9}]) == 0.9
    assert control.recorded_accuracy([{"test_acc": "0.9"}]) is None and control.recorded_accuracy([{"test_acc": 7}]) is None
    assert control.recorded_accuracy([]) is None and control.recorded_accuracy([{"test_acc": True}]) is None


def test_probe_on_a_shifted_bundle_reports_input_statistics(session, tmp_path: Path) -> None:
    test = session.load_data(DataChoice(limit=300))
    bright = dataclasses.replace(test, images=(test.images.int() + 90).clamp(0, 255).to(torch.uint8), split="test")
    data.save_bundle(tmp_path / "bright.safetensors", bright)
    cause = ranking.rank(session, data=DataChoice(str(tmp_path / "bright.safetensors")), config=FAST).cause
    assert cause is not None and cause.kind == "input_shift"
    c = cause.evidence["control"]
    assert c["data_input"]["input_mean"][0] > c["train_input"]["input_mean"][0] + 0.5


def test_the_recorded_scenario_figures_follow_from_the_library_rule() -> None:
    """BENCHMARKS.md's held-out figure (benchmarks/causes.py) is what today's CauseRule() decides on the recorded evidence."""
    rows = json.loads((SAMPLES.parent / "benchmarks" / "causes_results.json").read_text())["rows"]
    held = [r for r in rows if r["seed"] not in (0, 1)]
    named = [decide(Evidence(**r["evidence"])) for r in held]
    right = sum(c.kind == r["expected"] or (r["expected"] == "degenerate" and c.degenerate) for c, r in zip(named, held))
    placed = sum(c.place == r["place"] for c, r in zip(named, held) if r["expected"] == "weights")
    assert (right, len(held), placed) == (119, 122, 64)
    assert all(c.kind == "none" for c, r in zip(named, held) if r["name"] == "healthy")


def test_class_sorted_data_and_data_naming_fewer_classes(session) -> None:
    test = session.load_data(DataChoice(limit=1500))
    order = torch.argsort(test.labels, stable=True)  # as an image folder reads them: one class after another
    by_class = dataclasses.replace(test, images=test.images[order], labels=test.labels[order])
    assert rank_cause(session, by_class).kind == "none"
    few = test.subset(torch.nonzero(test.labels < 4).flatten())
    few = dataclasses.replace(few, class_names=few.class_names[:4])  # a bundle whose labels stop at 3
    assert rank_cause(session, few) is not None  # confusions with classes the data does not name: no crash
