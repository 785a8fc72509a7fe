"""A loaded checkpoint ready to run: model, preprocessing, and the data its metadata points to.

``rank``, ``compare`` and ``repair`` all start here, so a checkpoint means the same thing to each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beta_diag import checkpoint
from beta_diag import data as data_mod
from beta_diag.checkpoint import Checkpoint
from beta_diag.configs import DataChoice, ModelChoice
from beta_diag.data import Dataset, Preprocess
from beta_diag.errors import CheckpointError, DataError
from beta_diag.readers import DataSpec
from beta_diag.runtime import Predictions, evaluate, prepare, resolve_device


@dataclass(frozen=True)
class Session:
    ckpt: Checkpoint
    model: nn.Module  # eval mode, on ``device``
    preprocess: Preprocess
    device: torch.device
    num_classes: int  # the width of the model's output on one input of ``preprocess.input_shape``

    def resolve_data(self, choice: DataChoice, default_split: str = "test") -> tuple[DataSpec, str]:
        """(spec, split): explicit choice first, then the checkpoint's recorded data, then its data set name."""
        split = choice.split or default_split
        if choice.source is not None:
            return choice.source, split
        meta = self.ckpt.metadata
        recorded = meta.data.get(split)
        named = recorded["spec"] if isinstance(recorded, dict) and recorded.get("spec") else meta.dataset
        if named:
            spec = DataSpec.parse(named).resolved(self.ckpt.path.parent)  # a relative path: from the checkpoint's folder
            if spec.path is not None and not spec.path.exists():
                option = "--train-data" if split == "train" else "--data"
                raise DataError(
                    f"{self.ckpt.path}: its metadata names {split} data {spec.path}, which is not there "
                    f"(was the checkpoint copied without it?): pass {option} with the data"
                )
            return spec, split
        raise DataError(f"{self.ckpt.path}: metadata names no data: pass --data, e.g. --data fashion-mnist")

    def load_data(self, choice: DataChoice, default_split: str = "test", min_classes: int = 2, unlabelled: bool = False) -> Dataset:
        """The chosen data, checked against the model; unlabelled images (images:DIR) only where ``unlabelled`` allows them."""
        spec, split = self.resolve_data(choice, default_split)
        ds = data_mod.load(spec, split, limit=choice.limit, seed=choice.seed, image_size=self.preprocess.input_shape[1:])
        self.preprocess.check_channels(int(ds.images.shape[1]))  # before any pass over the data
        if not ds.labelled:
            if not unlabelled:
                raise DataError(
                    f"{spec} holds unlabelled images: only repair --method recalibrate (as --train-data) uses them; "
                    "pass labelled data (imagefolder:DIR with a folder per class, or a bundle)"
                )
            return ds
        ds = data_mod.match_classes(ds, self.ckpt.metadata.class_names, dict(choice.class_map))
        data_mod.check_fits(ds, self.num_classes, min_classes=min_classes)
        named = self.ckpt.metadata.class_names
        numbered = ds.class_names == tuple(str(i) for i in range(len(ds.class_names)))  # data that name no classes
        if named and len(named) == self.num_classes and numbered and len(ds.class_names) <= len(named):
            ds = replace(ds, class_names=tuple(named))  # per-class tables say the model's names
        return ds

    def evaluate(self, ds: Dataset, progress: Any = None, on_batch: Any = None) -> Predictions:
        return evaluate(self.model, ds, self.preprocess, self.device, progress=progress, on_batch=on_batch)


def preprocess_for(ckpt: Checkpoint) -> Preprocess:
    """Model input as the metadata names it (``Checkpoint.inferred`` fills in, and notes, what it does not)."""
    meta = ckpt.inferred().metadata
    assert meta.input_shape and meta.mean and meta.std
    return Preprocess(meta.input_shape, meta.mean, meta.std, meta.resize)


Openable = str | Path | Checkpoint  # what ``open_session`` opens: a checkpoint's path or a loaded checkpoint


def open_session(path: Openable, *, device: str = "auto", model: ModelChoice | None = None) -> Session:
    """Load a checkpoint (``model``: what its metadata does not say, as ``--arch``, ``--input-size`` and the
    other model options give it), build its model on the device, and derive its preprocessing.

    Example: ``open_session('sample_checkpoints/fmnist_resnet18w16_sgd_beta.safetensors')``.
    """
    choice = model or ModelChoice()
    ckpt = path.with_model(choice).inferred() if isinstance(path, Checkpoint) else checkpoint.load_as(path, choice)
    dev = resolve_device(device)
    net = prepare(ckpt.build_model(), dev).eval()
    pre = preprocess_for(ckpt)
    width = output_width(ckpt, net, pre.input_shape, dev)
    names = ckpt.metadata.class_names
    if names and len(names) != width:
        raise CheckpointError(
            f"{ckpt.path}: metadata names {len(names)} classes but the model has {width} outputs: fix or remove 'class_names'"
        )
    return Session(ckpt, net, pre, dev, width)


def output_width(ckpt: Checkpoint, model: nn.Module, shape: tuple[int, int, int], device: torch.device) -> int:
    """Run the model on one blank input: a model that cannot take ``shape`` is refused here, naming the
    option, rather than midway through a pass; the output's width is the number of classes."""
    shape_text = "x".join(map(str, shape))
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape, device=device))
    except Exception as exc:  # noqa: BLE001 - any failure here means the input does not fit the model
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{ckpt.path}: the model does not accept {shape_text} inputs ({first}): pass --input-size with "
            "the side it was trained at (torchvision's ImageNet models: 224)"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(
            f"{ckpt.path}: the model returns {got} on one {shape_text} input, not (batch, classes) logits: "
            "make its forward return the logits"
        )
    return int(out.shape[1])
