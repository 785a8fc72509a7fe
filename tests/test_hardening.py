"""Hardening II, by rule: outputs never replace what is not ours; untrusted sizes are checked before
anything is allocated; non-finite values are refused; every failure names its fix. Each refusal
exits 1 with one `Error:` line, no traceback, and leaves every file and special file as it was."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from beta_diag import checkpoint, data
from beta_diag.cli import app
from tests.conftest import sha, train_args

runner = CliRunner()
ROOT = os.geteuid() == 0


def refused(args: list, message: str, watch: list[Path]) -> None:
    """Run, and check the refusal: exit 1, one Error line holding ``message``, every watched path unchanged."""

    def state(p: Path) -> tuple:
        st = os.lstat(p)
        return (stat.S_IFMT(st.st_mode), sha(p) if stat.S_ISREG(st.st_mode) else os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)

    before = {p: state(p) for p in watch}
    result = runner.invoke(app, [str(a) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert {p: state(p) for p in watch} == before


# --- 1. one output rule ---------------------------------------------------------------------


def test_a_named_pipe_is_never_replaced(tiny: dict[str, Path], tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for option in ("--out", "--plot"):
        refused(["rank", tiny["ckpt"], option, fifo, "--force"], "is a named pipe (FIFO): beta-diag replaces only regular files", [fifo])


@pytest.mark.skipif(not ROOT, reason="mknod needs root")
def test_a_device_and_a_link_to_it_are_never_replaced(tiny: dict[str, Path], tmp_path: Path) -> None:
    dev = tmp_path / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own, in the test's folder
    link = tmp_path / "stdout"
    link.symlink_to(dev)
    refused(["rank", tiny["ckpt"], "--out", dev, "--force"], "is a character device", [dev, link])
    refused(["rank", tiny["ckpt"], "--plot", link, "--force"], f"is a symbolic link (to {dev})", [dev, link])
    refused(
        ["repair", tiny["ckpt"], "--layers", "fc", "-o", tmp_path / "x.safetensors", "--plot", dev, "--force"],
        "is a character device",
        [dev],
    )


def test_a_link_to_a_regular_file_is_refused_too(tiny: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "mine.json"
    target.write_text("{}")
    link = tmp_path / "r.json"
    link.symlink_to(target)
    refused(["rank", tiny["ckpt"], "--out", link, "--force"], "is a symbolic link", [target, link])


def test_no_input_is_ever_an_output(tiny: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "d.safetensors"
    data.write_bytes(tiny["test"].read_bytes())
    train = tmp_path / "t.safetensors"
    train.write_bytes(tiny["train"].read_bytes())
    refused(["rank", tiny["ckpt"], "--data", data, "--out", data, "--force"], "output would overwrite an input", [data])
    refused(["rank", tiny["ckpt"], "--data", data, "--plot", data, "--force"], "output would overwrite an input", [data])
    refused(
        ["repair", tiny["ckpt"], "--layers", "fc", "--train-data", train, "-o", train, "--force"],
        "output would overwrite an input",
        [train],
    )
    refused(["repair", tiny["ckpt"], "--layers", "fc", "--data", data, "-o", data, "--force"], "output would overwrite an input", [data])
    refused(["train", "--data", train, "--test-data", data, "-o", data, "--force"], "output would overwrite an input", [data])


def test_two_outputs_of_one_command_may_not_share_a_path(tiny: dict[str, Path], tmp_path: Path) -> None:
    both = tmp_path / "r.png"
    refused(["rank", tiny["ckpt"], "--out", both, "--plot", both], "named by both --out and --plot", [])
    refused(
        ["repair", tiny["ckpt"], "--layers", "fc", "-o", tmp_path / "r.safetensors", "--plot", tmp_path / "r.safetensors"],
        "named by both --output and --plot",
        [],
    )
    assert list(tmp_path.iterdir()) == []


# --- 2. limits before allocation ----------------------------------------------------------------


def with_meta(t: dict[str, Path], tmp: Path, name: str, **changes: object) -> Path:
    """The tiny checkpoint with metadata keys replaced (JSON-encoded, as a crafted file would hold them)."""
    ck = checkpoint.load(t["ckpt"])
    meta = ck.metadata.to_strings()
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()})
    save_file(ck.state_dict, str(tmp / name), metadata=meta)
    return tmp / name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"arch_kwargs": {"width": 20000, "in_channels": 1}},
            "pass --arch-arg width=4 (every weight's shape fits it)",
        ),  # 1e12 parameters, never built
        ({"num_classes": 4_000_000_000}, "must be a positive integer up to 1,000,000"),
        ({"input_shape": [1, 60000, 60000]}, "sides up to 4096"),
        ({"class_names": [f"c{i}" for i in range(1_000_001)]}, "a list of up to 1,000,000 distinct strings"),
        ({"class_names": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
        ({"class_names": {"a": 1}}, "metadata 'class_names' must be a list"),
        ({"history": [1, 2, 3]}, "metadata 'history' must be a list of up to 100,000 JSON objects"),
        ({"class_names": ["a", "b", "c"]}, "metadata names 3 classes but the model has 4 outputs: fix or remove 'class_names'"),
        ({"input_shape": [3, 8, 8]}, "the model does not accept 3x8x8 inputs"),
    ],
)
def test_untrusted_metadata_is_checked_before_anything_is_built(tiny: dict[str, Path], tmp_path: Path, changes: dict, message: str) -> None:
    crafted = with_meta(tiny, tmp_path, "crafted.safetensors", **changes)
    refused(["rank", crafted, "--data", tiny["test"], "--bootstrap", "0"], message, [crafted])


def test_untrusted_data_sizes_are_checked(tiny: dict[str, Path], tmp_path: Path) -> None:
    huge = tmp_path / "huge_label.safetensors"
    save_file({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "labels": torch.tensor([0, 1, 2, 2**62])}, str(huge))
    refused(
        ["rank", tiny["ckpt"], "--data", huge], "label 4611686018427387904: labels must be class indices 0..C-1, C up to 1,000,000", [huge]
    )
    empty = tmp_path / "zero_pixels.safetensors"
    save_file({"images": torch.zeros(4, 1, 0, 0, dtype=torch.uint8), "labels": torch.tensor([0, 1, 2, 3])}, str(empty))
    refused(["rank", tiny["ckpt"], "--data", empty], "at least one pixel per side", [empty])
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name, payload in (
        ("test_batch", {"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}),
        ("batches.meta", {"label_names": ["a", "b"]}),
    ):
        (batches / name).write_bytes(pickle.dumps(payload))
    refused(["rank", tiny["ckpt"], "--data", f"cifar10:{tmp_path}"], "'data' must be uint8 rows of 3,072 pixels", [batches / "test_batch"])


def test_directory_walks_stay_in_the_tree_and_skip_what_is_not_a_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    refused(["rank", tiny["ckpt"], "--data", "imagefolder:/proc/self"], "is a pseudo-filesystem", [])
    root = tmp_path / "imgs"
    for cls in ("c0", "c1"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "c0" / "loop").symlink_to(root / "c0")  # a loop: never followed
    (root / "c1" / "out").symlink_to(tiny["root"])  # out of the tree: never followed
    (root / "c1" / "elsewhere.png").symlink_to(tmp_path / "outside.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "outside.png")
    os.mkfifo(root / "c1" / "pipe.png")  # would block a reader: skipped
    (root / "c1" / "a.png").symlink_to(root / "c1" / "b.png")  # a loop of file links: skipped
    (root / "c1" / "b.png").symlink_to(root / "c1" / "a.png")
    ds = data.load(f"imagefolder:{root}", "test", image_size=(8, 8))
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (root / "c2").symlink_to(tmp_path)  # a class folder that is a link: refused, not silently dropped (labels would shift)
    refused(["rank", tiny["ckpt"], "--data", f"imagefolder:{root}"], "class folder(s) c2 are links", [])


# --- 3. non-finite values ------------------------------------------------------------------------


def test_non_finite_and_relabelled_values_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    nan_mean = with_meta(tiny, tmp_path, "nan_mean.safetensors", mean="[NaN]")
    refused(["rank", nan_mean], "metadata 'mean' must be a list of finite numbers", [nan_mean])
    inf_std = with_meta(tiny, tmp_path, "inf_std.safetensors", std="[Infinity]")
    refused(["rank", inf_std], "metadata 'std' must be a list of finite positive numbers", [inf_std])
    ck = checkpoint.load(tiny["ckpt"])
    relabelled = tmp_path / "i32.safetensors"
    save_file(
        {**ck.state_dict, "fc.weight": ck.state_dict["fc.weight"].view(torch.int32)}, str(relabelled), metadata=ck.metadata.to_strings()
    )
    refused(["rank", relabelled], "1 tensor(s) hold integers where the model holds floats: fc.weight (int32)", [relabelled])
    out = tmp_path / "t.safetensors"
    for lr in ("nan", "inf"):
        refused(train_args(tiny, out, "--lr", lr), f"--lr {lr}: pass a finite positive learning rate", [])
    for lr in ("inf", "0", "-1"):  # one LR check for train, repair and schedule
        refused(["schedule", "--lr", lr], f"--lr {float(lr)}: pass a finite positive learning rate", [])
    refused(["schedule", "--warmup", "inf"], "--warmup inf: pass a finite number of epochs", [])
    refused(["schedule", "--epochs", "100000", "--steps-per-epoch", "1000"], "plan at most 1,000,000 steps", [])
    assert not out.exists()


# --- 4 and 5. every failure names its fix; the smaller items -------------------------------------


def test_wrong_channel_counts_name_the_fix(tiny: dict[str, Path], tmp_path: Path) -> None:
    two = tmp_path / "two_channels.safetensors"
    save_file({"images": torch.zeros(8, 2, 8, 8, dtype=torch.uint8), "labels": torch.arange(8) % 4}, str(two))
    refused(["rank", tiny["ckpt"], "--data", two], "images have 2 channels but the model takes 1: pass data with 1 channels", [two])


def test_smaller_items(tiny: dict[str, Path]) -> None:
    refused(["rank", tiny["ckpt"], "--groups", ","], "--groups ',' names no pattern", [])
    assert runner.invoke(app, ["rank", str(tiny["ckpt"]), "--seed", "-1"]).exit_code == 2
    assert runner.invoke(app, ["rank", str(tiny["ckpt"]), "--seed", str(2**64)]).exit_code == 2
    table = runner.invoke(app, ["rank", str(tiny["ckpt"]), "--bootstrap", "0"])
    assert table.exit_code == 0 and "not computed" in table.stdout and "1.00" not in table.stdout.split("P(flagged)")[1].split("\n")[3]


def test_a_closed_pipe_and_an_ascii_terminal_are_not_errors(tiny: dict[str, Path]) -> None:
    exe = Path(sys.executable).parent / "beta-diag"
    piped = subprocess.run(
        f"'{exe}' schedule --epochs 100 --steps-per-epoch 10 | head -n 2", shell=True, capture_output=True, text=True, timeout=120
    )
    assert piped.returncode == 0 and piped.stderr == "" and len(piped.stdout.splitlines()) == 2
    ascii_out = subprocess.run(
        [str(exe), "rank", str(tiny["ckpt"]), "--bootstrap", "5"],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C"},
    )
    assert ascii_out.returncode == 0 and b"Traceback" not in ascii_out.stderr, ascii_out.stderr
