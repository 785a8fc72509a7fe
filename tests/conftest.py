"""Tiny real inputs: data bundles and a trained checkpoint, built in the test session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from beta_diag import checkpoint, data
from beta_diag.configs import DataChoice, TrainConfig
from beta_diag.training import train

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_checkpoints"


def make_images(
    n: int,
    classes: int = 4,
    size: int = 8,
    channels: int = 1,
    seed: int = 0,
    label_noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic images: class c lights up quadrant c (plus noise). uint8 (N, C, H, W).

    ``label_noise``: this fraction of the labels is shifted by one class, so any model makes errors.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 60, (n, channels, size, size), generator=gen)
    half = size // 2
    for c in range(classes):
        r, q = divmod(c % 4, 2)
        images[labels == c, :, r * half : (r + 1) * half, q * half : (q + 1) * half] += 150 + 20 * (c // 4)
    flip = torch.rand(n, generator=gen) < label_noise
    labels = torch.where(flip, (labels + 1) % classes, labels)
    return images.clamp(0, 255).to(torch.uint8), labels


def write_bundle(path: Path, n: int, classes: int = 4, seed: int = 0, channels: int = 1, size: int = 8, label_noise: float = 0.0) -> Path:
    images, labels = make_images(n, classes, size, channels, seed, label_noise)
    data.save_bundle(path, data.Dataset(images, labels, tuple(f"c{i}" for i in range(classes)), "synthetic", "train"))
    return path


def train_args(tiny: dict[str, Path], out: Path, *extra: object) -> list[object]:
    """``beta-diag train`` on the tiny data (a width-2 network, 1 epoch unless ``extra`` says otherwise)."""
    return ["train", "--data", tiny["train"], "--test-data", tiny["test"], "--arch-arg", "width=2", "--epochs", "1", "-o", out, *extra]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles of 8x8 grey images in 4 classes, a width-4 resnet18_cifar trained on them, and the same model
    with its classifier damaged (noise 3x its weights' spread: test accuracy about 84% -> 51%), which repair can fix."""
    root = tmp_path_factory.mktemp("tiny")
    train_file = write_bundle(root / "train.safetensors", 256, seed=1, label_noise=0.1)
    test_file = write_bundle(root / "test.safetensors", 128, seed=2, label_noise=0.15)
    result = train(
        "resnet18_cifar",
        data=DataChoice(str(train_file)),
        test=DataChoice(str(test_file)),
        arch_kwargs={"width": 4},
        config=TrainConfig(epochs=4, batch_size=32, lr=0.05, device="cpu"),
    )
    ckpt = root / "tiny.safetensors"
    checkpoint.save(ckpt, result.model.state_dict(), result.metadata)
    state = {k: v.clone() for k, v in result.model.state_dict().items()}
    state["fc.weight"] += 3 * state["fc.weight"].std() * torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(0))
    damaged = root / "damaged.safetensors"
    checkpoint.save(damaged, state, result.metadata)
    return {"root": root, "train": train_file, "test": test_file, "ckpt": ckpt, "damaged": damaged}


@pytest.fixture(autouse=True)
def _no_plain_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain progress lines come every 10 s when stderr is no terminal; a slow test on a loaded machine must not see one
    among the lines it checks (the test of those lines sets its own interval)."""
    from beta_diag import report

    monkeypatch.setattr(report, "PLAIN_EVERY", float("inf"))
