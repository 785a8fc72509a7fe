"""A new user's day (issue 28): data paths that travel, class names folders can hold, signs of life, eval."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES
from PIL import Image
from typer.testing import CliRunner

from beta_diag import checkpoint, data, report
from beta_diag.cli import app
from beta_diag.session import DataChoice, open_session

runner = CliRunner()
SGD = SAMPLES / "fmnist_resnet18w16_sgd_beta.safetensors"


def test_a_copied_checkpoint_names_the_option_that_replaces_its_missing_data(tmp_path: Path) -> None:
    copy = tmp_path / "sgd.safetensors"
    shutil.copy(SGD, copy)
    for args, option in (
        (["rank", copy], "--data"),
        (["repair", copy, "--data", SAMPLES / "fmnist_test_3k.safetensors", "--layers", "fc", "--dry-run"], "--train-data"),
    ):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 1 and "(was the checkpoint copied without it?)" in result.stderr, result.output
        assert result.stderr.strip().endswith(f"pass {option} with the data") and str(tmp_path) in result.stderr
    # with the bundles beside it, the same relative names resolve from the checkpoint's own folder, wherever it is run from
    shutil.copy(SAMPLES / "fmnist_test_3k.safetensors", tmp_path)
    result = runner.invoke(app, ["drift", str(copy), "--limit", "200", "--quiet"])
    assert result.exit_code in (0, 4) and "fmnist_test_3k.safetensors" in "".join(result.stdout.split()), result.output


def test_a_long_command_shows_signs_of_life_when_stderr_is_no_terminal(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "PLAIN_EVERY", 0.0)  # every update: the real interval is 10 s
    result = runner.invoke(app, ["rank", str(tiny["ckpt"]), "--data", str(tiny["test"]), "--bootstrap", "20"])
    assert result.exit_code == 0
    lines = [line for line in result.stderr.splitlines() if " s elapsed" in line]
    assert lines and all(re.fullmatch(r"[^:]+: [\d,]+/[\d,]+, \d+ s elapsed(, about \d+ s left)?", line) for line in lines), result.stderr
    quiet = runner.invoke(app, ["rank", str(tiny["ckpt"]), "--data", str(tiny["test"]), "--bootstrap", "20", "--quiet"])
    assert " s elapsed" not in quiet.stderr


def test_eval_reports_each_checkpoint_on_each_data_set_in_one_table(tiny: dict[str, Path]) -> None:
    args = ["eval", str(tiny["ckpt"]), str(tiny["damaged"]), "--data", str(tiny["test"]), "--data", str(tiny["train"]), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["evaluations"]
    assert [(Path(r["checkpoint"]).name, Path(r["data"]).name) for r in rows] == [
        (c, d) for c in ("tiny.safetensors", "damaged.safetensors") for d in ("test.safetensors", "train.safetensors")
    ]
    # an independent reference: the model's own predictions over the same data
    session = open_session(tiny["damaged"], device="cpu")
    ds = session.load_data(DataChoice(str(tiny["test"])))
    logits = session.evaluate(ds).logits
    r = rows[2]
    assert r["examples"] == len(ds) and r["accuracy"] == pytest.approx(float((logits.argmax(1) == ds.labels).float().mean()))
    assert r["mean_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, ds.labels)), rel=1e-5)
    for c, name in enumerate(ds.class_names):
        mask = ds.labels == c
        assert r["per_class"][name]["accuracy"] == pytest.approx(float((logits.argmax(1)[mask] == c).float().mean()))
    pairs = Counter((int(t), int(p)) for t, p in zip(ds.labels, logits.argmax(1)) if t != p)
    assert r["confusions"][0]["count"] == max(pairs.values()) and sum(c["count"] for c in r["confusions"]) <= sum(pairs.values())
    assert rows[0]["accuracy"] > rows[2]["accuracy"]  # the damaged classifier is worse
    table = runner.invoke(app, args[:-1])
    assert table.exit_code == 0 and "per-class accuracy" in table.stdout and "c0 -> " in table.stdout


def test_the_sample_on_png_folders_named_as_folders_can_be(tmp_path: Path) -> None:
    """Exported as PNG folders, one per class, named as a folder can be ("T-shirt_top"): no converter needed."""
    ds = data.load(str(SAMPLES / "fmnist_test_3k.safetensors"), "test", limit=200)
    for i, (image, label) in enumerate(zip(ds.images, ds.labels)):
        folder = tmp_path / "png" / data.folder_for(ds.class_names[int(label)])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
    assert (tmp_path / "png" / "T-shirt_top").is_dir()
    result = runner.invoke(app, ["eval", str(SGD), "--data", f"imagefolder:{tmp_path / 'png'}", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["evaluations"][0]
    assert row["examples"] == 200 and row["accuracy"] > 0.85 and "T-shirt/top" in row["per_class"]


def test_repair_can_be_held_to_the_data_size_the_model_saw() -> None:
    result = runner.invoke(app, ["repair", str(SGD), "--layers", "fc", "--dry-run", "--train-limit", "500", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["train_data"]["examples"] + plan["val_data"]["examples"] == 500 and plan["val_data"]["examples"] == 100


def test_resize_says_how_images_of_another_size_fit_the_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    import torchvision.transforms.functional as TF

    x = torch.rand(2, 1, 12, 20)
    assert torch.allclose(data.fitted(x, (8, 8), "resize"), TF.resize(x, [8, 8], antialias=True), atol=1e-6)
    assert torch.equal(data.fitted(x, (16, 16), "pad")[:, :, 2:14, :], TF.center_crop(x, [12, 16]))  # padded rows, cropped columns
    assert torch.allclose(data.fitted(x, (6, 6), "crop"), TF.center_crop(TF.resize(x, [6, 10], antialias=True), [6, 6]), atol=1e-6)
    assert torch.equal(data.fitted(x[:, :, :, :12], (13, 13), None), torch.nn.functional.pad(x[:, :, :, :12], (0, 1, 0, 1)))  # the default
    out = tmp_path / "fp.safetensors"
    args = ["fingerprint", str(tiny["ckpt"]), "--data", str(tiny["train"]), "--input-size", "10", "--resize", "crop", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert info["metadata"]["resize"] == "crop" and info["metadata"]["input_shape"] == [1, 10, 10]  # recorded: later commands fit alike
    ranked = runner.invoke(app, ["rank", str(out), "--data", str(tiny["test"]), "--bootstrap", "0", "--no-control", "--json"])
    assert ranked.exit_code == 0, ranked.output
    said = "8x8 images are centre-cropped to the model's 10x10 (after scaling the shorter side to fit, bilinear, --resize crop)"
    assert said in json.loads(ranked.stdout)["notes"] and said in ranked.stderr
    bad = runner.invoke(app, ["rank", str(tiny["ckpt"]), "--resize", "stretch"])
    assert bad.exit_code == 2


def test_eval_table_numbers_its_rows_for_the_per_class_columns(tiny: dict[str, Path]) -> None:
    result = runner.invoke(app, ["eval", str(tiny["ckpt"]), str(tiny["damaged"]), "--data", str(tiny["test"])])
    rows = [line for line in result.stdout.splitlines() if line.startswith("│ [")]
    assert [r.split("│")[1].strip() for r in rows] == ["[1]", "[2]"]


def test_a_class_map_names_folders_no_rule_can_match(tmp_path: Path) -> None:
    """Folders named in another language: --class-map (JSON or two columns) says which class each holds."""
    ds = data.load(str(SAMPLES / "fmnist_test_3k.safetensors"), "test", limit=100)
    german = ["Hemd-oben", "Hose", "Pulli", "Kleid", "Mantel", "Sandale", "Hemd", "Turnschuh", "Tasche", "Stiefel"]
    for i, (image, label) in enumerate(zip(ds.images, ds.labels)):
        folder = tmp_path / "bilder" / german[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
    spec = f"imagefolder:{tmp_path / 'bilder'}"
    refused = runner.invoke(app, ["eval", str(SGD), "--data", spec])
    assert refused.exit_code == 1 and "or pass --class-map FILE: 'T-shirt_top' or 0" in refused.stderr
    (tmp_path / "map.json").write_text(json.dumps({g: ds.class_names[i] for i, g in enumerate(german)}))
    (tmp_path / "map.txt").write_text("# folder, class\n" + "\n".join(f"{g},{i}" for i, g in enumerate(german)))
    rows = []
    for mapping in ("map.json", "map.txt"):
        result = runner.invoke(app, ["eval", str(SGD), "--data", spec, "--class-map", str(tmp_path / mapping), "--json"])
        assert result.exit_code == 0, result.output
        rows.append(json.loads(result.stdout)["evaluations"][0])
    assert rows[0] == rows[1] and rows[0]["accuracy"] > 0.85 and set(rows[0]["per_class"]) <= set(ds.class_names)
    (tmp_path / "bad.json").write_text(json.dumps({"Hose": "Jeans"}))
    bad = runner.invoke(app, ["eval", str(SGD), "--data", spec, "--class-map", str(tmp_path / "bad.json")])
    assert bad.exit_code == 1 and "maps folder 'Hose' to 'Jeans', which is no class of the model" in bad.stderr


GN_MODEL = """
import torch.nn as nn


class GroupNormNet(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))
"""


def test_a_groupnorm_cnn_from_a_plain_script_gets_drift_from_a_fingerprint(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A GroupNorm CNN trained in plain PyTorch, saved as a plain state dict: no BatchNorm, so drift needs the fingerprint
    that `fingerprint` records; then rank measures drift from it, and a damaged head is named."""
    (tmp_path / "gn.py").write_text(GN_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        import gn  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = gn.GroupNormNet()
    train = data.load(str(tiny["train"]), "train")
    x, y = (train.images.float() / 255 - 0.5) / 0.5, train.labels
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "gn.pt")
    own = ["--arch", f"{tmp_path / 'gn.py'}:GroupNormNet", "--input-size", "8", "--mean", "0.5", "--std", "0.5"]
    plain_rank = runner.invoke(app, ["rank", str(tmp_path / "gn.pt"), *own, "--data", str(tiny["test"]), "--bootstrap", "0", "--json"])
    assert plain_rank.exit_code == 0 and not json.loads(plain_rank.stdout)["drift"]["available"]
    fp = tmp_path / "gn_fp.safetensors"
    done = runner.invoke(app, ["fingerprint", str(tmp_path / "gn.pt"), *own, "--data", str(tiny["train"]), "-o", str(fp)])
    assert done.exit_code == 0, done.output
    ranked = runner.invoke(app, ["rank", str(fp), "--arch", own[1], "--data", str(tiny["test"]), "--bootstrap", "0", "--json"])
    assert ranked.exit_code == 0, ranked.output
    drift = json.loads(ranked.stdout)["drift"]
    assert drift["available"] and drift["source"] == "fingerprint" and drift["suspect"] is None
    ckpt = checkpoint.load(fp)
    state = {k: v * 3 if k == "head.2.weight" else v for k, v in ckpt.state_dict.items()}
    damaged = tmp_path / "gn_damaged.safetensors"
    checkpoint.save(damaged, state, ckpt.metadata, fingerprint=ckpt.fingerprint)
    hurt = runner.invoke(app, ["rank", str(damaged), "--arch", own[1], "--data", str(tiny["test"]), "--bootstrap", "0", "--json"])
    assert json.loads(hurt.stdout)["drift"]["suspect"] == "head"


def test_a_mobilenet_saved_from_data_parallel_with_its_own_normalisation(tiny: dict[str, Path], tmp_path: Path) -> None:
    """torchvision's MobileNet v3, saved from nn.DataParallel (every key 'module.'-prefixed), its own mean and std given:
    it loads, says what it converted, and ranks."""
    import torchvision

    net = torch.nn.DataParallel(torchvision.models.mobilenet_v3_small(num_classes=4))
    torch.save(net.state_dict(), tmp_path / "mobile.pt")
    args = ["rank", str(tmp_path / "mobile.pt"), "--arch", "mobilenet_v3_small", "--data", str(tiny["test"])]
    result = runner.invoke(
        app, [*args, "--input-size", "32", "--mean", "0.4", "--std", "0.2", "--bootstrap", "0", "--no-control", "--json"]
    )
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert "stripped the 'module.' prefix from every key (DataParallel/DDP)" in notes
    assert not any(n.startswith("assumed") for n in notes)  # the normalisation and size were given, nothing assumed
