"""Hardening III, rules 2-7: limits hold before allocation wherever a value comes from; every input's file type is
checked before it is opened; values are finite in the dtype the model runs in; metadata is validated once; what we
write, we accept. Each refusal exits 1 with one `Error:` line naming the fix, no traceback, inputs unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_hardening import refused

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
