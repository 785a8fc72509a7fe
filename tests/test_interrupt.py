"""Ctrl-C exits 130 with one line and writes nothing; SIGKILL leaves nothing the next run trips on."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beta_diag import data
from tests.conftest import SAMPLES

SGD = SAMPLES / "fmnist_resnet18w16_sgd_beta.safetensors"
TRAIN5K = SAMPLES / "fmnist_train_5k.safetensors"


def shifted_bundle(folder: Path) -> Path:
    """The 5k training bundle with every label moved to the next class: the model gets nearly all of
    them wrong, so rank's evaluation is short and its attribution over ~5,000 errors is long (far more
    than the 6 s before the signal, on any machine): the signal lands while attribution runs."""
    small = data.load(str(TRAIN5K), "train")
    path = folder / "shifted.safetensors"
    labels = (small.labels + 1) % len(small.class_names)
    data.save_bundle(path, data.Dataset(small.images, labels, small.class_names, small.spec, "train"))
    return path


COMMANDS = {
    "train": lambda out, scratch: [
        "train",
        "--data",
        TRAIN5K,
        "--test-data",
        SAMPLES / "fmnist_test_3k.safetensors",
        "--arch-arg",
        "width=16",
        "--epochs",
        "20",
        "-o",
        out,
    ],
    "rank": lambda out, scratch: ["rank", SGD, "--data", shifted_bundle(scratch), "--granularity", "module", "--out", out],
    "repair": lambda out, scratch: ["repair", SGD, "--layers", "layer2,layer3,layer4,fc", "--epochs", "20", "-o", out],
}


def start(command: str, out: Path, scratch: Path) -> subprocess.Popen:
    """Start ``command`` writing ``out``; its inputs, if it makes any, go to ``scratch``, not beside ``out``."""
    args = [str(a) for a in COMMANDS[command](out, scratch)]
    return subprocess.Popen(
        [sys.executable, "-m", "beta_diag", *args, "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_until_training(proc: subprocess.Popen) -> None:
    time.sleep(6)  # imports, data and the first steps
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""


@pytest.mark.parametrize(
    ("command", "sig", "code"),
    [
        ("train", signal.SIGINT, 130),
        ("train", signal.SIGKILL, -9),
        ("rank", signal.SIGINT, 130),
        ("repair", signal.SIGINT, 130),
    ],
)
def test_interrupted_command_writes_nothing(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    command: str,
    sig: signal.Signals,
    code: int,
) -> None:
    out = tmp_path / ("r.json" if command == "rank" else "m.safetensors")
    proc = start(command, out, tmp_path_factory.mktemp("inputs"))
    wait_until_training(proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code
    if sig == signal.SIGINT:
        assert stderr.strip() == "Error: interrupted; no output was written" and stdout == ""
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("typer", "Error: interrupted while starting; nothing was written\n"),  # the command line itself loading: the entry's handler
        ("torch", "Error: interrupted; no output was written\n"),  # torch loads inside the command: the command's handler
    ],
)
def test_ctrl_c_while_starting_exits_130_without_a_traceback(module: str, message: str) -> None:
    """The package imports nothing heavy; the console script's entry imports the command line inside a
    handler, and the command imports torch inside its own. The child sends itself SIGINT the moment
    ``module`` starts to load, so the signal lands during the imports on any machine, however fast."""
    child = (
        "import builtins, os, signal, sys\n"
        "real = builtins.__import__\n"
        "def hook(name, *args, **kwargs):\n"
        f"    if name == {module!r}:\n"
        "        builtins.__import__ = real\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = hook\n"
        "sys.argv = ['beta-diag', 'archs']\n"
        "from beta_diag.entry import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == message
