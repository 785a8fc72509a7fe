"""repair --method recalibrate: BatchNorm statistics re-estimated on the training data, gated and verified like any repair."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from conftest import SAMPLES, sha
from typer.testing import CliRunner

from beta_diag import checkpoint
from beta_diag.cli import app
from beta_diag.recalibration import recalibrated
from beta_diag.session import DataChoice, open_session

SGD = SAMPLES / "fmnist_resnet18w16_sgd_beta.safetensors"
TRAIN, TEST = str(SAMPLES / "fmnist_train_5k.safetensors"), str(SAMPLES / "fmnist_test_3k.safetensors")
runner = CliRunner()


def overwritten_checkpoint(path: Path) -> Path:
    """The SGD sample with every BatchNorm's statistics overwritten with those of inverted training images."""
    session = open_session(SGD, device="cpu")
    train = session.load_data(DataChoice(limit=500), default_split="train")
    model = recalibrated(session.model, dataclasses.replace(train, images=255 - train.images), session.preprocess, session.device)
    checkpoint.save(path, model.state_dict(), session.ckpt.metadata)
    return path


def test_recalibration_repairs_overwritten_statistics_and_records_it(tmp_path: Path) -> None:
    damaged = overwritten_checkpoint(tmp_path / "damaged.safetensors")
    before = sha(damaged)
    out = tmp_path / "fixed.safetensors"
    args = ["repair", str(damaged), "--method", "recalibrate", "--train-data", TRAIN, "--data", TEST, "--limit", "1000", "-o", str(out)]
    res = runner.invoke(app, [*args, "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    v = d["surgical"]["verify"]
    assert d["accepted"] and v["accuracy_after"] > v["accuracy_before"] + 0.1 and v["accuracy_after"] > 0.88
    assert d["surgical"]["groups"] == ["BatchNorm statistics"] and d["surgical"]["trainable"] == 0
    assert d["plan"]["config"]["method"] == "recalibrate" and d["verdict"].startswith(
        "recalibrated the BatchNorm statistics on 4000 images"
    )
    assert sha(damaged) == before and out.is_file()
    assert checkpoint.load(out).metadata.repair["config"]["method"] == "recalibrate"  # type: ignore[index]
    printed = checkpoint.load(out).fingerprint  # recorded on the data the repair trained on: the 4,000 left after validation
    assert printed is not None and printed.images == 4000 and printed.data == {"spec": TRAIN, "split": "train"}
    weights = {k: v for k, v in checkpoint.load(out).state_dict.items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, checkpoint.load(damaged).state_dict[k]) for k, v in weights.items())  # no weight moved


def test_recalibrating_a_healthy_sample_keeps_the_original(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    res = runner.invoke(app, ["repair", str(SGD), "--method", "recalibrate", "--limit", "600", "-o", str(out), "--quiet"])
    assert res.exit_code == 3, res.output  # nothing beyond chance to gain: the original is kept
    assert "nothing to repair: the original is kept" in " ".join(res.stdout.split()) and not out.exists()


def test_recalibrate_refusals() -> None:
    named = runner.invoke(app, ["repair", str(SGD), "--method", "recalibrate", "--layers", "fc", "--dry-run"])
    assert named.exit_code == 1 and "drop --layers" in named.output
    bad = runner.invoke(app, ["repair", str(SGD), "--method", "sideways"])
    assert bad.exit_code == 2


def test_layers_auto_recalibrates_when_the_cause_is_statistics(tmp_path: Path) -> None:
    damaged = overwritten_checkpoint(tmp_path / "damaged.safetensors")
    args = ["repair", str(damaged), "--train-data", TRAIN, "--data", TEST, "--limit", "1000", "--dry-run", "--json", "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    planned = json.loads(res.stdout)
    assert planned["candidates"][0]["name"] == "recalibrate" and planned["trainable"] == 0
    assert planned["because"].startswith("the cause is statistics") and "recalibration first" in planned["because"]
    out = tmp_path / "fixed.safetensors"
    ran = runner.invoke(app, [*[a for a in args if a != "--dry-run"], "-o", str(out)])
    assert ran.exit_code == 0, ran.output
    d = json.loads(ran.stdout)  # recalibration alone passed the gate: the search ended there, one validation point
    assert d["search"]["winner"] == "recalibrate" and [t["candidate"] for t in d["search"]["tried"]] == ["recalibrate"]
    assert d["surgical"]["gate"]["tries"] == 1 and d["verdict"].startswith("recalibrated the BatchNorm statistics") and out.is_file()
    healthy = runner.invoke(app, ["repair", str(SGD), "--limit", "600", "--dry-run", "--json", "--quiet"])
    assert healthy.exit_code == 0, healthy.output
    h = json.loads(healthy.stdout)
    assert h["config"]["method"] == "finetune" and h["because"].startswith("the cause is none: the best on validation of")


def test_a_repair_that_forgets_the_keep_data_is_not_shipped_unless_allowed(tmp_path: Path) -> None:
    from beta_diag import data

    session = open_session(SGD, device="cpu")
    for split, n in (("train", 600), ("test", 400)):
        ds = session.load_data(DataChoice(limit=n), default_split=split)
        data.save_bundle(tmp_path / f"inv_{split}.safetensors", dataclasses.replace(ds, images=255 - ds.images))
    out = tmp_path / "r.safetensors"
    args = ["repair", str(SGD), "--layers", "all", "--epochs", "2", "--lr", "0.02", "-o", str(out), "--json", "--quiet"]
    args += ["--train-data", str(tmp_path / "inv_train.safetensors"), "--data", str(tmp_path / "inv_test.safetensors")]
    held = runner.invoke(app, args)
    assert held.exit_code == 3, held.output
    d = json.loads(held.stdout)
    assert d["plan"]["keep_data"]["spec"].endswith("fmnist_test_3k.safetensors") and d["surgical"]["gate"]["accepted"]
    keep = d["surgical"]["keep"]
    assert d["surgical"]["forgets"] and keep["broken"] > keep["fixed"] and keep["p_value"] <= 0.05 and not out.exists()
    assert d["verdict"].startswith("not shipped: the repair gains on validation") and "--allow-forgetting" in d["verdict"]
    shipped = runner.invoke(app, [*args, "--allow-forgetting"])
    assert shipped.exit_code == 0 and json.loads(shipped.stdout)["accepted"] and out.is_file()
    same = runner.invoke(app, ["repair", str(SGD), "--layers", "fc", "--limit", "300", "--dry-run", "--json", "--quiet"])
    assert json.loads(same.stdout)["keep_data"] is None  # verified on its own held-out data: nothing more to keep


def test_recalibration_on_unlabelled_images(tmp_path: Path) -> None:
    """images:DIR holds no labels: recalibration trains on it (the gate's labels come from --val-data); nothing else accepts it."""
    from PIL import Image

    damaged = overwritten_checkpoint(tmp_path / "damaged.safetensors")
    session = open_session(SGD, device="cpu")
    train = session.load_data(DataChoice(limit=300, seed=1), default_split="train")
    folder = tmp_path / "unlabelled" / "nested"  # every image file under the folder, at any depth
    folder.mkdir(parents=True)
    for i, img in enumerate(train.images[:, 0]):
        Image.fromarray(img.numpy()).save(folder / f"{i:03d}.png")
    val = tmp_path / "val.safetensors"
    from beta_diag import data

    data.save_bundle(val, session.load_data(DataChoice(TRAIN, "train", 400, seed=2)))
    spec = f"images:{tmp_path / 'unlabelled'}"
    args = ["repair", str(damaged), "--method", "recalibrate", "--train-data", spec, "--data", TEST, "--limit", "1000"]
    res = runner.invoke(app, [*args, "--val-data", str(val), "-o", str(tmp_path / "fixed.safetensors"), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    v = d["surgical"]["verify"]
    assert d["accepted"] and v["accuracy_after"] > v["accuracy_before"] + 0.1 and d["surgical"]["train"] is None
    assert d["plan"]["train_data"]["examples"] == 300 and d["plan"]["val_data"]["examples"] == 400
    no_val = runner.invoke(app, [*args, "--dry-run"])
    assert no_val.exit_code == 1 and "pass --val-data with labelled images" in no_val.output
    tuned = runner.invoke(app, ["repair", str(damaged), "--layers", "fc", "--train-data", spec, "--data", TEST, "--dry-run"])
    assert tuned.exit_code == 1 and "unlabelled images" in tuned.output and "--method recalibrate" in tuned.output
    ranked = runner.invoke(app, ["rank", str(damaged), "--data", spec])
    assert ranked.exit_code == 1 and "unlabelled images" in ranked.output
