"""One repair arm: fine-tune some parameters of a copy of a model, keeping the best epoch on validation,
or re-estimate its BatchNorm statistics. Shared by a repair of named layers and ``--layers auto``'s search.

Policy: only the chosen parameters have ``requires_grad``. Modules that own a chosen parameter
train in train mode (a chosen BatchNorm normalises with batch statistics and re-estimates its
running statistics as the weights it follows move); every frozen module stays in eval mode, so
frozen BatchNorms keep the statistics the rest of the network was trained with. Keeping chosen
BatchNorms in eval mode too was measured: no better for the surgical repair, and a full fine-tune
without normalisation diverged (BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from beta_diag import prefix
from beta_diag.configs import TrainConfig
from beta_diag.data import Dataset
from beta_diag.errors import ConfigError
from beta_diag.recalibration import recalibrated
from beta_diag.runtime import Predictions, Progress
from beta_diag.session import Session
from beta_diag.training import Anchor, fit
from beta_diag.verdicts import best_epoch, validation_record


class Diverged(ConfigError):
    """A fine-tune whose training loss became non-finite."""


def predict(session: Session, model: nn.Module, cut: prefix.Split | None, feats: Dataset | None, ds: Dataset) -> Predictions:
    """``model``'s outputs on ``ds``: the suffix of its ``cut`` on the prefix features ``feats`` when both are given,
    else the whole model."""
    if cut is None or feats is None:
        return replace(session, model=model).evaluate(ds)
    return Predictions(prefix.outputs(cut, feats, session.device), ds.labels.clone())


@dataclass(frozen=True)
class Tuned:
    """What one arm produced: the model at its kept epoch (``best``; 0 means the original is kept, and a
    fine-tune then holds the original's state), the cut it trained through, the validation curve (epoch 0 is
    the original) and the history."""

    model: nn.Module
    cut: prefix.Split | None
    curve: list[dict[str, Any]]
    history: list[dict[str, Any]]
    seconds: float

    @property
    def best(self) -> int:
        return best_epoch(self.curve)

    @property
    def stopped(self) -> bool:
        return bool(self.history and self.history[-1].get("stopped"))


def first_point(before_val: Predictions) -> dict[str, Any]:
    return {"epoch": 0, **validation_record(before_val, before_val)}


def fine_tune(
    session: Session,
    base: nn.Module,
    params: tuple[str, ...],
    data: tuple[Dataset, Dataset],
    before_val: Predictions,
    training: TrainConfig,
    cut: prefix.Split | None = None,
    feats: dict[str, Dataset] | None = None,
    anchor: Anchor | None = None,
    progress: Progress | None = None,
    stop: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> Tuned:
    """Copy ``base`` and train only ``params`` (their modules in train mode, the rest eval) on ``data`` = (train,
    validation), through ``cut`` (traced on ``base``) on its cached ``feats`` when given; after each epoch score it
    on validation against ``before_val`` (the original's predictions) and snapshot the best epoch. ``stop(curve)``
    true after an epoch ends the run there. The features also score validation when ``feats`` holds "val"."""
    train, val = data
    feats = feats or {}
    model = copy.deepcopy(base)
    chosen = set(params)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    start = time.perf_counter()
    on = cut.on(model) if cut is not None and "train" in feats else None
    curve = [first_point(before_val)]
    kept: dict[str, Any] = {"state": None}

    def on_epoch(_: nn.Module) -> dict[str, Any]:
        began = time.perf_counter()
        point = {"epoch": len(curve), **validation_record(before_val, predict(session, model, on, feats.get("val"), val))}
        curve.append(point)
        if best_epoch(curve) == point["epoch"]:  # the gate's own rule: the snapshot is the epoch it will keep
            kept["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record = {k: v for k, v in point.items() if k not in ("examples", "epoch")}
        halt = stop is not None and len(curve) <= training.epochs and stop(curve)
        return {**record, "val_seconds": time.perf_counter() - began, **({"stopped": True} if halt else {})}

    if on is not None:
        history = fit(on.suffix, feats["train"], None, lambda x: x, training, progress=progress, anchor=anchor, on_epoch=on_epoch)
    else:
        history = fit(model, train, None, session.preprocess, training, progress=progress, anchor=anchor, on_epoch=on_epoch)
    losses = [h["train_loss"] for h in history]
    if not all(math.isfinite(v) for v in losses):
        raise Diverged(
            f"the repair diverged: training loss {losses[-1]} after {len(losses)} epoch(s): nothing written; lower --lr or --distill"
        )
    model.load_state_dict(kept["state"] if kept["state"] is not None and best_epoch(curve) else base.state_dict())
    for param in model.parameters():
        param.requires_grad_(True)
    return Tuned(model.eval(), on, curve, history, time.perf_counter() - start)


def recalibrate(session: Session, data: tuple[Dataset, Dataset], before_val: Predictions) -> Tuned:
    """A copy with every BatchNorm's statistics re-estimated on the training images (no labels, no gradients),
    scored on validation against the original (epoch 0): one point, like a one-epoch fine-tune."""
    train, val = data
    start = time.perf_counter()
    model = recalibrated(session.model, train, session.preprocess, session.device)
    point = {"epoch": 1, **validation_record(before_val, predict(session, model, None, None, val))}
    history = [{"epoch": 1, "recalibrated_on": len(train), **{k: v for k, v in point.items() if k not in ("examples", "epoch")}}]
    return Tuned(model, None, [first_point(before_val), point], history, time.perf_counter() - start)
