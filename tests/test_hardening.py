"""Hardening II, by rule: outputs never replace what is not ours; untrusted sizes are checked before
anything is allocated; non-finite values are refused; every failure names its fix. Each refusal
exits 1 with one `Error:` line, no traceback, and leaves every file and special file as it was."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from beta_diag.cli import app
from tests.conftest import sha

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
    refused(["repair", tiny["ckpt"], "--layers", "fc", "-o", tmp_path / "x.safetensors", "--plot", dev, "--force"], "is a character device", [dev])


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
    refused(["repair", tiny["ckpt"], "--layers", "fc", "--train-data", train, "-o", train, "--force"], "output would overwrite an input", [train])
    refused(["repair", tiny["ckpt"], "--layers", "fc", "--data", data, "-o", data, "--force"], "output would overwrite an input", [data])
    refused(["train", "--data", train, "--test-data", data, "-o", data, "--force"], "output would overwrite an input", [data])


def test_two_outputs_of_one_command_may_not_share_a_path(tiny: dict[str, Path], tmp_path: Path) -> None:
    both = tmp_path / "r.png"
    refused(["rank", tiny["ckpt"], "--out", both, "--plot", both], "named by both --out and --plot", [])
    refused(["repair", tiny["ckpt"], "--layers", "fc", "-o", tmp_path / "r.safetensors", "--plot", tmp_path / "r.safetensors"],
            "named by both --output and --plot", [])
    assert list(tmp_path.iterdir()) == []
