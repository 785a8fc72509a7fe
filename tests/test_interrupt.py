"""Ctrl-C exits 130 with one line and writes nothing; SIGKILL leaves nothing the next run trips on."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SAMPLES


def start_training(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "beta_diag", "train", "--data", str(SAMPLES / "fmnist_train_5k.safetensors"), "--test-data",
         str(SAMPLES / "fmnist_test_3k.safetensors"), "--arch-arg", "width=16", "--epochs", "20", "--device", "cpu", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_until_training(proc: subprocess.Popen) -> None:
    time.sleep(6)  # imports, data and the first steps
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_interrupted_training_writes_nothing(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    out = tmp_path / "m.safetensors"
    proc = start_training(out)
    wait_until_training(proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code
    if sig == signal.SIGINT:
        assert stderr.strip() == "Error: interrupted; no output was written" and stdout == ""
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file
