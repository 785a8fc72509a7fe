"""``eval``: how a checkpoint does on some data, in one evaluation pass: accuracy, mean loss, per-class accuracy
under the class names, and the most frequent confusions. What a user runs before and after a repair."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from beta_diag.data import Dataset
    from beta_diag.session import Session

TOP_CONFUSIONS = 5


@dataclass(frozen=True)
class Evaluation:
    """One checkpoint on one data set: accuracy, mean loss, per-class accuracy under the class names, and the
    most frequent confusions."""

    checkpoint: str
    data: str
    split: str
    examples: int
    accuracy: float
    mean_loss: float  # cross-entropy, nats per example
    per_class: dict[str, dict[str, float]]  # class name -> {"examples", "accuracy"}, classes the data hold
    confusions: list[dict[str, Any]]  # the most frequent (true, predicted) errors: {"true", "predicted", "count"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(session: Session, ds: Dataset, *, top: int = TOP_CONFUSIONS, progress: Any = None) -> Evaluation:
    """``session``'s model on labelled ``ds``: one evaluation pass."""
    preds = session.evaluate(ds, progress)
    logits, labels = preds.logits.float(), preds.labels
    guessed = preds.preds
    names = ds.class_names
    classes = max(logits.shape[1], len(names))
    matrix = torch.bincount(labels * classes + guessed, minlength=classes * classes).view(classes, classes)  # true x predicted

    def name(c: int) -> str:
        return names[c] if c < len(names) else str(c)

    per_class = {
        name(c): {"examples": int(matrix[c].sum()), "accuracy": float(matrix[c, c] / matrix[c].sum())}
        for c in range(classes)
        if matrix[c].sum() > 0
    }
    off = matrix.clone().fill_diagonal_(0).flatten()
    counts, order = off.sort(descending=True)
    confusions = [
        {"true": name(int(i) // classes), "predicted": name(int(i) % classes), "count": int(n)}
        for n, i in zip(counts[:top], order[:top])
        if n > 0
    ]
    return Evaluation(
        str(session.ckpt.path),
        ds.spec,
        ds.split,
        len(ds),
        preds.accuracy,
        float(F.cross_entropy(logits, labels)),
        per_class,
        confusions,
    )
