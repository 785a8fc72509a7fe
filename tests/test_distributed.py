"""Under torchrun with 2 CPU processes (gloo): rank and compare equal one process exactly, training
equals one process with the same global batch, and only process 0 writes and prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beta_diag import checkpoint, data
from beta_diag.session import open_session
from tests.conftest import write_bundle

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run(args: list, cwd: Path, processes: int = 1) -> subprocess.CompletedProcess:
    """beta-diag in one process, or under torchrun; one thread per process either way (float results
    of CPU kernels depend on the thread count, not on the number of processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    head = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes), "-m"] if processes > 1 else [sys.executable, "-m"]
    result = subprocess.run([*head, "beta_diag", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("command", ["rank", "compare"])
def test_rank_and_compare_equal_one_process(tiny: dict[str, Path], tmp_path: Path, command: str) -> None:
    """700 images with 30% shifted labels: 6 evaluation batches, over 128 errors, so each process
    owns several batches of evaluation, of attribution and of the summed gradient, and a short last one."""
    noisy = write_bundle(tmp_path / "noisy.safetensors", 700, seed=3, label_noise=0.3)
    inputs = [tiny["ckpt"]] if command == "rank" else [tiny["ckpt"], tiny["ckpt"]]
    args = [command, *inputs, "--data", noisy, "--device", "cpu", "--json", "--bootstrap", "50"]
    one, two = run(args, tmp_path), run(args, tmp_path, processes=2)
    assert two.stdout == one.stdout  # byte for byte: the per-example matrix and every score
    result = json.loads(two.stdout)  # one JSON document: the second process printed nothing
    if command == "rank":
        assert result["errors"] > 128


def test_train_equals_one_process_with_the_same_global_batch(tiny: dict[str, Path], tmp_path: Path) -> None:
    """251 images in global batches of 32: the last batch (27) splits unevenly, 14 and 13."""
    uneven = write_bundle(tmp_path / "uneven.safetensors", 251, seed=4, label_noise=0.1)
    args = [
        "train",
        "--arch",
        "tests.nets:convnet",
        "--data",
        uneven,
        "--test-data",
        tiny["test"],
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--json",
    ]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run([*args, "-o", "m.safetensors"], tmp_path / "one")
    two = run([*args, "-o", "m.safetensors"], tmp_path / "two", processes=2)
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["m.safetensors"]  # one file, no leftovers
    summary = json.loads(two.stdout)
    a, b = (checkpoint.load(tmp_path / d / "m.safetensors") for d in ("one", "two"))
    for key, value in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[key], value, rtol=1e-4, atol=1e-5)
    assert [h["momentum"] for h in a.metadata.history] == [h["momentum"] for h in b.metadata.history]  # one schedule everywhere
    assert summary["history"][-1]["train_loss"] == pytest.approx(a.metadata.history[-1]["train_loss"], rel=1e-4)


def test_repair_writes_once(tiny: dict[str, Path], tmp_path: Path) -> None:
    """layer4's BatchNorm trains per process on CPU; its statistics are process 0's at the end, so the
    reported after-accuracy is that of the saved file."""
    out = tmp_path / "r.safetensors"
    two = run(
        ["repair", tiny["damaged"], "--layers", "layer4,fc", "-o", out, "--epochs", "2", "--lr", "0.02", "--device", "cpu", "--json"],
        tmp_path,
        processes=2,
    )
    report = json.loads(two.stdout)
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]
    assert report["sha256"] == checkpoint.file_sha256(out)
    verify = report["surgical"]["verify"]
    assert verify["net"] == verify["fixed"] - verify["broken"]
    saved = open_session(out, device="cpu")
    assert saved.evaluate(data.load(str(tiny["test"]), "test")).accuracy == verify["accuracy_after"]
