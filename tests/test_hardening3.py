"""Hardening III, rules 2-7: limits hold before allocation wherever a value comes from; every input's file type is
checked before it is opened; values are finite in the dtype the model runs in; metadata is validated once; what we
write, we accept. Each refusal exits 1 with one `Error:` line naming the fix, no traceback, inputs unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from beta_diag import checkpoint, data, infer
from beta_diag.cli import app
from beta_diag.configs import RankConfig, TrainConfig
from beta_diag.errors import CheckpointError, ConfigError
from tests.test_hardening import refused, with_meta

runner = CliRunner()

ROOT = os.geteuid() == 0


# --- 3. every input's file type before it is opened ------------------------------------------------


def test_a_pipe_or_device_given_as_an_input_is_refused_unopened(tiny: dict[str, Path], tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # opened for reading, it would block forever
    refused(["info", fifo], "the checkpoint is a named pipe (FIFO), not a file", [fifo])
    refused(["rank", tiny["ckpt"], "--data", fifo], "the data bundle is a named pipe (FIFO), not a file", [fifo])
    ranking = tmp_path / "rank.json"
    os.mkfifo(ranking)
    refused(["compare", tiny["ckpt"], ranking, "--data", tiny["test"]], "the ranking is a named pipe (FIFO), not a file", [ranking])
    refused(["info", "/dev/zero"], "the checkpoint is a character device, not a file", [])
    link = tmp_path / "zero.pt"
    link.symlink_to("/dev/zero")
    refused(["info", link], "the checkpoint is a character device, not a file", [link])


@pytest.mark.skipif(ROOT, reason="root reads every file")
def test_an_unreadable_input_names_the_permission(tiny: dict[str, Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked.safetensors"
    locked.write_bytes(tiny["ckpt"].read_bytes())
    locked.chmod(0)
    refused(["info", locked], "permission", [])


# --- 2. every limit before any allocation ----------------------------------------------------------


def test_a_class_count_inside_arch_kwargs_obeys_the_class_limit(tiny: dict[str, Path], tmp_path: Path) -> None:
    crafted = with_meta(tiny, tmp_path, "classes.safetensors", arch_kwargs={"width": 4, "in_channels": 1, "num_classes": 10**12})
    refused(["info", crafted], "metadata 'arch_kwargs' num_classes must be a positive integer up to 1,000,000", [crafted])


def test_a_model_that_cannot_be_built_on_the_meta_device_is_sketched_before_it_is_built(tmp_path: Path) -> None:
    """RegNet computes its widths with tensors; 1,000,000 classes on regnet_y_128gf would be 8 billion parameters (32 GB)."""
    bomb = tmp_path / "regnet.safetensors"
    save_file({"x": torch.zeros(1)}, str(bomb), metadata={"arch": "regnet_y_128gf", "arch_kwargs": json.dumps({"num_classes": 1_000_000})})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    refused(["info", bomb], "weights do not match architecture", [bomb])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024  # under 500 MB more, not 32 GB
    sketch = infer.skeleton("regnet_y_400mf", {"num_classes": 1000})  # large tensors on the meta device, small ones real
    assert sketch is not None and sketch.fc.weight.shape == (1000, 440) and sketch.fc.weight.is_meta and not sketch.fc.bias.is_meta


@pytest.mark.parametrize(
    ("command", "option", "value", "message"),
    [("rank", "--bootstrap", "1000000000", "lessthanorequalto100000"), ("train", "--batch-size", "10000000", "lessthanorequalto65536")],
)
def test_sizes_given_as_options_are_bounded(
    tiny: dict[str, Path], tmp_path: Path, command: str, option: str, value: str, message: str
) -> None:
    args = [command, str(tiny["ckpt"])] if command == "rank" else [command, "-o", str(tmp_path / "m.safetensors")]
    result = runner.invoke(app, [*args, "--data", str(tiny["test"]), option, value])
    assert result.exit_code == 2 and message in "".join(result.output.replace("\u2502", "").split())  # rich boxes usage errors
    assert list(tmp_path.iterdir()) == []


def test_the_library_bounds_them_too() -> None:
    with pytest.raises(ConfigError, match="pass 0 to 100,000 replicates"):
        RankConfig(bootstrap=200_000).check()
    with pytest.raises(ConfigError, match="epochs must be 1 to 100,000"):
        TrainConfig(epochs=10**9).check()


# --- 5. metadata validated as a schema when read ---------------------------------------------------

GOOD = {"epoch": 1, "lr": 0.05, "momentum": 0.55, "mu_c": 0.55, "zeta": 1.0, "regime": "critical", "test_acc": 0.5}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({k: v for k, v in GOOD.items() if k != "lr"}, "entry 1 'lr' must be a finite number, got None"),
        ({**GOOD, "momentum": "0.9"}, "entry 1 'momentum' must be a finite number, got '0.9'"),
        ({**GOOD, "regime": "chaotic"}, "entry 1 'regime' must be one of critical, overdamped, underdamped, got 'chaotic'"),
        ({**GOOD, "test_acc": float("nan")}, "entry 1 'test_acc' must be a finite number, got nan"),
        ({**GOOD, "test_acc": 3.0}, "entry 1 'test_acc' must be an accuracy from 0 to 1, got 3.0"),
        ({**GOOD, "epoch": "one"}, "entry 1 has no positive integer 'epoch'"),
    ],
)
def test_a_malformed_history_is_refused_when_read(tiny: dict[str, Path], tmp_path: Path, entry: dict, message: str) -> None:
    crafted = with_meta(tiny, tmp_path, "history.safetensors", history=[entry])
    for command in ("info", "schedule"):
        refused([command, crafted], f"metadata 'history' {message}: fix or remove it", [crafted])


def test_class_names_are_distinct_and_cover_the_labels(tiny: dict[str, Path], tmp_path: Path) -> None:
    ds = data.load(str(tiny["test"]), "test")
    few = tmp_path / "few_names.safetensors"
    data.save_bundle(few, dataclasses.replace(ds, class_names=("a", "b")))
    refused(["rank", tiny["ckpt"], "--data", few, "--by-class"], "label 3 but 2 class names: name every class the labels use", [few])
    twice = tmp_path / "twice.safetensors"
    data.save_bundle(twice, dataclasses.replace(ds, class_names=("a", "b", "a", "d")))
    refused(["rank", tiny["ckpt"], "--data", twice], "class names 'a' appear more than once: name each class once", [twice])
    crafted = with_meta(tiny, tmp_path, "dup.safetensors", class_names=["x", "y", "x", "z"])
    refused(["info", crafted], "metadata 'class_names' must be a list of up to 1,000,000 distinct strings", [crafted])


# --- 4. finite after the cast --------------------------------------------------------------------


def test_values_are_checked_in_the_dtype_the_model_runs_in(tiny: dict[str, Path], tmp_path: Path) -> None:
    ck = checkpoint.load(tiny["ckpt"])
    meta = ck.metadata.to_strings()

    def crafted(name: str, key: str, value: torch.Tensor) -> Path:
        save_file({**ck.state_dict, key: value}, str(tmp_path / name), metadata=meta)
        return tmp_path / name

    big = crafted("big.safetensors", "fc.weight", ck.state_dict["fc.weight"].double().fill_(1e300))  # finite in float64 only
    refused(["rank", big, "--data", tiny["test"]], "weights hold NaN/Inf values (fc: ", [big])
    var = ck.state_dict["bn1.running_var"].clone()
    var[0] = -1.0
    negative = crafted("negative.safetensors", "bn1.running_var", var)
    refused(["info", negative], "BatchNorm running variances below zero (bn1.running_var)", [negative])
    eight = crafted("float8.safetensors", "fc.weight", ck.state_dict["fc.weight"].to(torch.float8_e4m3fn))
    refused(["info", eight], "weights of dtype float8_e4m3fn, which beta-diag does not load: re-save them as float32", [eight])


# --- 6. what we write, we accept ---------------------------------------------------------------------


def test_train_and_save_refuse_what_a_reader_would_refuse(tiny: dict[str, Path], tmp_path: Path) -> None:
    tall = tmp_path / "tall.safetensors"
    save_file({"images": torch.zeros(8, 1, 5000, 1, dtype=torch.uint8), "labels": torch.arange(8) % 2}, str(tall))
    out = tmp_path / "model.safetensors"
    refused(["train", "--data", tall, "--test-data", tall, "--epochs", "1", "-o", out], "1 to 4096 pixels per side", [tall])
    ck = checkpoint.load(tiny["ckpt"])
    bad = dataclasses.replace(ck.metadata, input_shape=(1, 5000, 1))
    with pytest.raises(CheckpointError, match=r"model.safetensors \(not written\): metadata 'input_shape' must be"):
        checkpoint.save(out, ck.state_dict, bad)
    with pytest.raises(CheckpointError, match=r"\(not written\): 3 class names for 4 classes"):
        checkpoint.save(out, ck.state_dict, dataclasses.replace(ck.metadata, class_names=("a", "b", "c"), num_classes=4))
    assert list(tmp_path.iterdir()) == [tall]


# --- 7. smaller items ----------------------------------------------------------------------------------


def test_a_limit_decodes_only_the_images_it_keeps_and_16_bit_images_are_scaled(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(np.full((8, 8), 40000 if label == "a" else 1000, dtype=np.uint16)).save(
                tmp_path / "folder" / label / f"{i}.png"
            )
    ds = data.load(f"imagefolder:{tmp_path / 'folder'}", "test", limit=5, image_size=(8, 8))
    whole = data.load(f"imagefolder:{tmp_path / 'folder'}", "test", image_size=(8, 8))
    kept = data.subset_index(60, 5, 0)
    assert len(ds) == 5 and torch.equal(ds.images, whole.images[kept]) and torch.equal(ds.labels, whole.labels[kept])
    assert any("5 of 5 images of 16 bits or more scaled to 8 bits" in n for n in ds.notes)
    bright = whole.images[whole.labels == 0]
    assert int(bright.max()) == round(40000 * 255 / 65535) == 156  # scaled, not clipped at 255
    assert int(whole.images[whole.labels == 1].max()) == 4


def test_an_output_folder_that_cannot_take_a_file_is_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    if ROOT:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    refused(["fingerprint", tiny["ckpt"], "--data", tiny["train"], "-o", locked / "fp.safetensors"], "cannot create a file beside it", [])
