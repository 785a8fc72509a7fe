"""Running a model: device choice, evaluation and its predictions, progress callbacks, and the timing filter.

``rank``, ``compare`` and ``repair`` evaluate models here; only ``repair`` and the ``train`` command
import ``training``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from beta_diag import data as data_mod
from beta_diag import distributed
from beta_diag.data import Dataset, ToInput
from beta_diag.errors import ConfigError

Progress = Callable[[str, int, int], None]  # (task description, completed, total)


@dataclass(frozen=True)
class Predictions:
    """Eval-mode outputs over a dataset, in dataset order (CPU)."""

    logits: torch.Tensor  # (N, classes), float32
    labels: torch.Tensor  # (N,)

    @property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def correct(self) -> torch.Tensor:
        return self.preds == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without CUDA is an error. Under torchrun, this
    process joins the process group and gets its own GPU."""
    if name == "auto":
        return distributed.join(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}': use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available: use --device auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device '{name}': use auto, cpu or cuda")
    return distributed.join(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 (or fp16) autocast on CUDA; nothing on CPU, where results must be exact."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: Dataset,
    preprocess: ToInput,
    device: torch.device,
    batch_size: int = 128,
    progress: Progress | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> Predictions:
    """Eval-mode logits for every example, streamed in batches; float32 even on CUDA, so that the
    errors rank diagnoses and the fixed/broken counts of repair do not depend on autocast.
    ``on_batch(logits, labels)`` sees each batch as it is evaluated (rank's drift hooks commit there).
    Under torchrun each process evaluates its share of the batches; every process gets all logits."""
    model.eval()
    world = distributed.current()
    out = []
    for start, x, y, _ in data_mod.numbered_batches(ds, batch_size, device, owns=world.owns):
        logits = model(preprocess(x)).float()
        if on_batch is not None:
            on_batch(logits, y)
        out.append((start, logits.cpu()))
        if progress:
            progress("evaluate", min(start + batch_size, len(ds)), len(ds))
    logits = world.gather_rows(out, len(ds))
    if logits is None:
        raise ConfigError(f"{ds.spec} ({ds.split}) holds no examples to evaluate: pass data with at least one image")
    return Predictions(logits, ds.labels.clone())
