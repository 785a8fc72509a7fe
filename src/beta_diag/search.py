"""``--layers auto``: choose the repair among candidates on validation, led by rank's cause.

The candidates: recalibration (every BatchNorm's statistics re-estimated on the training images),
recalibration followed by a fine-tune of the suspect and the flags, the suspect and the flags alone,
the first block (the stem plus the first stage, as Lee et al. 2023 mean it), the back half of the groups,
and all groups. The cause orders them: a shift of the input or features puts recalibration and the whole
model first; a weight fault puts the suspect first. Candidates with the same parameters are tried once.

Cheap by construction: each candidate trains on its own frozen prefix's cached features; after each epoch a
candidate stops when even an optimistic projection of its validation net (its last epoch's gain repeated
over the epochs left) cannot reach the best point already seen. The learning rate is chosen too: once the
candidates have run, the winner is tried again at ``LR_GRID`` times --lr under the same stopping rule.
Every validation point evaluated counts in the gate's Bonferroni correction (``tries``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from beta_diag import groups, prefix
from beta_diag.configs import Granularity, TrainConfig
from beta_diag.data import Dataset
from beta_diag.ranking import Ranking
from beta_diag.recalibration import tracked_norms
from beta_diag.runtime import Predictions, Progress
from beta_diag.session import Session
from beta_diag.training import Anchor
from beta_diag.tuning import Diverged, Tuned, fine_tune, recalibrate
from beta_diag.verdicts import best_epoch

BUDGET = 2  # the search's cost goal, in full fine-tunes of the same epochs (the plan's time estimate)
LR_GRID = (1 / 3, 3.0)  # the winner is retried at these multiples of --lr (its first run is at 1x)
RECALIBRATE = "recalibrate"
SHIFTS = ("statistics", "input_shift", "feature_shift")  # causes that put recalibration and the whole model first


@dataclass(frozen=True)
class Candidate:
    """One way to repair: recalibrate first or not, then fine-tune ``params`` (none: recalibration alone)."""

    name: str
    groups: tuple[str, ...]
    params: tuple[str, ...]
    recalibrate: bool = False


def settles(r: Ranking, cands: list[Candidate]) -> bool:
    """The cause is statistics and recalibration is a candidate: recalibration alone, when the gate accepts it, ends the search."""
    return r.cause is not None and r.cause.kind == "statistics" and bool(cands) and cands[0].name == RECALIBRATE


def first_block(model: nn.Module) -> list[str]:
    """The stem plus the first stage: the leading groups up to the first one made of blocks (within the first
    half); a model without stages: its first quarter of groups (at least one)."""
    names = [g.name for g in groups.layer_groups(model, Granularity.group)]
    blocks = [g.name for g in groups.layer_groups(model, Granularity.block)]
    staged = [i for i, n in enumerate(names[: math.ceil(len(names) / 2)]) if any(b.startswith(n + ".") for b in blocks)]
    return names[: staged[0] + 1] if staged else names[: max(1, len(names) // 4)]


def candidates(model: nn.Module, r: Ranking, suspect_and_flags: list[str], resolve: Callable[[list[str]], list[str]]) -> list[Candidate]:
    """The candidates for ``model`` in the order its cause leads, deduplicated by what they change."""
    names = [g.name for g in groups.layer_groups(model, Granularity.group)]
    cause = r.cause.kind if r.cause is not None else "undetermined"
    trained = {
        "suspect and flags": suspect_and_flags,
        "first block": first_block(model),
        "back half": names[len(names) // 2 :],
        "all groups": names,
    }
    order = ["all groups", "first block", "back half", "suspect and flags"] if cause in SHIFTS else list(trained)
    out = [Candidate(n, tuple(trained[n]), tuple(resolve(trained[n]))) for n in order if trained[n]]
    if tracked_norms(model):
        both = Candidate("recalibrate + suspect and flags", tuple(suspect_and_flags), tuple(resolve(suspect_and_flags)), True)
        alone = Candidate(RECALIBRATE, (), (), True)
        out = [alone, *out, both] if cause in SHIFTS else [*out, alone, both]
    seen: set[tuple[tuple[str, ...], bool]] = set()
    unique = []
    for c in out:
        if (c.params, c.recalibrate) not in seen and (c.params or c.recalibrate):
            seen.add((c.params, c.recalibrate))
            unique.append(c)
    return unique


@dataclass(frozen=True)
class Tried:
    """One arm of the search: a candidate at a learning rate, and what it reached."""

    candidate: Candidate
    lr: float | None  # None: recalibration alone
    tuned: Tuned
    trainable: int

    @property
    def kept(self) -> dict[str, Any]:
        return self.tuned.curve[self.tuned.best]

    @property
    def name(self) -> str:
        return self.candidate.name if self.lr is None else f"{self.candidate.name} (lr {self.lr:g})"

    def to_dict(self, total: int) -> dict[str, Any]:
        k = self.kept
        return {
            "candidate": self.candidate.name,
            "groups": list(self.candidate.groups),
            "recalibrate": self.candidate.recalibrate,
            "lr": self.lr,
            "trainable": self.trainable,
            "fraction": self.trainable / total,
            "epochs": len(self.tuned.curve) - 1,
            "stopped_early": self.tuned.stopped,
            "best_epoch": self.tuned.best,
            "val_acc": k["val_acc"],
            "val_net": k["val_net"],
            "val_loss": k["val_loss"],
            "seconds": self.tuned.seconds,
        }


def rank_key(t: Tried) -> tuple[float, float]:
    """Best first: the larger validation net, then the lower validation loss (the search's order breaks ties)."""
    k = t.kept
    return (-k["val_net"], k["val_loss"] if math.isfinite(k["val_loss"]) else math.inf)


@dataclass(frozen=True)
class Search:
    tried: tuple[Tried, ...]  # in the order they ran
    skipped: tuple[str, ...]  # arms that diverged, with why
    seconds: float  # the whole search: every arm, its prefix features and its validation

    @property
    def tries(self) -> int:
        """Validation points the winner was picked from: the gate's Bonferroni factor."""
        return max(1, sum(len(t.tuned.curve) - 1 for t in self.tried))

    def ranked(self) -> list[Tried]:
        return sorted(self.tried, key=rank_key)


def _bar(tried: list[Tried]) -> int:
    return max((t.kept["val_net"] for t in tried), default=0)


def _stop_rule(tried: list[Tried], epochs: int) -> Callable[[list[dict[str, Any]]], bool]:
    """Stop when net + (epochs left) x max(last gain, 0) cannot beat the best validation net already seen."""
    bar = _bar(tried)

    def stop(curve: list[dict[str, Any]]) -> bool:
        done = len(curve) - 1
        gain = max(0, curve[-1]["val_net"] - curve[-2]["val_net"])
        return bar > 0 and curve[-1]["val_net"] + (epochs - done) * gain < bar

    return stop


def run(
    session: Session,
    cands: list[Candidate],
    data: tuple[Dataset, Dataset],
    before_val: Predictions,
    training: TrainConfig,
    anchor: Anchor | None = None,
    cache: bool = True,
    progress: Progress | None = None,
    settle: Callable[[Tuned], bool] | None = None,
) -> Search:
    """Run every candidate (then the winner's learning-rate grid) on ``data`` = (train, validation); a recalibration
    for which ``settle`` is true ends the search there."""
    start = time.perf_counter()
    train, val = data
    sizes = {n: p.numel() for n, p in session.model.named_parameters()}
    tried: list[Tried] = []
    skipped: list[str] = []
    recal: Tuned | None = None
    shortcut = session.device.type == "cpu"  # outputs through the cut are bit-identical to the whole model's there

    def arm(c: Candidate, lr: float) -> None:
        base = session.model if not c.recalibrate else recal.model  # type: ignore[union-attr]
        cut = prefix.split(base, set(c.params)) if cache else None
        feats: dict[str, Dataset] = {}
        if cut is not None:
            feats["train"] = prefix.cache(cut, train, session.preprocess, session.device)
            if shortcut:
                feats["val"] = prefix.cache(cut, val, session.preprocess, session.device)
        config = replace(training, lr=lr, device=str(session.device))
        try:
            tuned = fine_tune(
                session, base, c.params, data, before_val, config, cut, feats, anchor, progress, _stop_rule(tried, training.epochs)
            )
        except Diverged as e:
            skipped.append(f"{c.name} (lr {lr:g}): {e}")
            return
        tried.append(Tried(c, lr, tuned, sum(sizes[p] for p in c.params)))

    for c in cands:
        if c.recalibrate and recal is None:
            recal = recalibrate(session, data, before_val)
            tried.append(Tried(Candidate(RECALIBRATE, (), (), True), None, recal, 0))
            if settle is not None and settle(recal):
                return Search(tuple(tried), tuple(skipped), time.perf_counter() - start)
        if c.params:
            arm(c, training.lr)
    fine = [t for t in tried if t.lr is not None]
    if fine:
        winner = min(fine, key=rank_key)
        if best_epoch(winner.tuned.curve) > 0:  # a learning-rate grid around a candidate that gained
            for factor in LR_GRID:
                arm(winner.candidate, training.lr * factor)
    return Search(tuple(tried), tuple(skipped), time.perf_counter() - start)
