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

from beta_diag import checkpoint

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
    inputs = [tiny["ckpt"]] if command == "rank" else [tiny["ckpt"], tiny["ckpt"]]
    args = [command, *inputs, "--device", "cpu", "--json", "--bootstrap", "50"]
    one, two = run(args, tmp_path), run(args, tmp_path, processes=2)
    assert two.stdout == one.stdout  # byte for byte: the per-example matrix and every score
    json.loads(two.stdout)  # one JSON document: the second process printed nothing


def test_train_equals_one_process_with_the_same_global_batch(tiny: dict[str, Path], tmp_path: Path) -> None:
    args = ["train", "--arch", "tests.nets:convnet", "--data", tiny["train"], "--test-data", tiny["test"], "--epochs", "2",
            "--batch-size", "32", "--device", "cpu", "--json"]
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
    out = tmp_path / "r.safetensors"
    two = run(["repair", tiny["ckpt"], "--layers", "layer4,fc", "-o", out, "--epochs", "1", "--device", "cpu", "--json"], tmp_path, processes=2)
    report = json.loads(two.stdout)
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]
    assert report["sha256"] == checkpoint.file_sha256(out)
    assert report["surgical"]["verify"]["net"] == report["surgical"]["verify"]["fixed"] - report["surgical"]["verify"]["broken"]
