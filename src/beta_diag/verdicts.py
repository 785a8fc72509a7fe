"""What a repair changed: before/after verdicts with exact tests, the validation gate, and the report.

A verdict compares the original and a repaired model on the same examples: ``fixed`` (wrong ->
right), ``broken`` (right -> wrong), their net, the exact McNemar p-value and a 95% interval of
the net (``stats``). The gate keeps the best epoch on validation data (the original, epoch 0, is
a candidate) and accepts it only if its validation gain beats chance (``accept_p``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from beta_diag import stats
from beta_diag.runtime import Predictions


@dataclass(frozen=True)
class Verdict:
    """Before/after on one data set. fixed: wrong -> right; broken: right -> wrong; net = fixed - broken."""

    examples: int
    accuracy_before: float
    accuracy_after: float
    fixed: int
    broken: int
    per_class: dict[str, dict[str, int]]

    @property
    def net(self) -> int:
        return self.fixed - self.broken

    @property
    def p_value(self) -> float:
        """Exact two-sided McNemar: how often chance alone moves the net this far from zero."""
        return stats.mcnemar_two_sided(self.fixed, self.broken)

    @functools.cached_property
    def net_interval(self) -> tuple[float, float]:
        return stats.net_interval(self.fixed, self.broken)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "net": self.net, "p_value": self.p_value, "net_interval": list(self.net_interval)}


def verdict(before: Predictions, after: Predictions, class_names: tuple[str, ...]) -> Verdict:
    b, a = before.correct, after.correct
    per_class = {}
    for c in torch.unique(before.labels).tolist():
        m = before.labels == c
        per_class[class_names[c]] = {
            "fixed": int((~b & a & m).sum()),
            "broken": int((b & ~a & m).sum()),
            "errors_before": int((~b & m).sum()),
            "errors_after": int((~a & m).sum()),
        }
    return Verdict(len(b), before.accuracy, after.accuracy, int((~b & a).sum()), int((b & ~a).sum()), per_class)


@dataclass(frozen=True)
class Gate:
    """The validation gate of one fine-tune: the curve (epoch 0 is the original), the epoch kept, and
    whether it beat the original by more than chance. ``p_value``: the one-sided exact McNemar test of
    the kept epoch's validation fixed vs broken, times the number of validation points it was chosen
    from, ``tries`` (Bonferroni: the best of several is picked on the same data; a search counts every
    epoch of every candidate it tried)."""

    examples: int
    curve: tuple[dict[str, Any], ...]  # per epoch: val_loss, val_acc, val_fixed, val_broken, val_net
    best_epoch: int
    p_value: float
    accept_p: float
    tries: int = 1

    @property
    def kept(self) -> dict[str, Any]:
        return self.curve[self.best_epoch]

    @property
    def accepted(self) -> bool:
        return self.best_epoch > 0 and self.accept_p > 0 and self.p_value <= self.accept_p  # --accept-p 0: never

    @property
    def reason(self) -> str:
        k = self.kept
        if self.best_epoch == 0:
            return f"no epoch beat the original on validation ({self.examples} examples)"
        figures = f"epoch {self.best_epoch}: fixed {k['val_fixed']}, broke {k['val_broken']}, net {k['val_net']:+d} on validation, "
        figures += f"p = {self.p_value:.3g}"
        figures += f" (corrected for {self.tries} validation points)" if self.tries > 1 else ""
        return f"{figures} {'<=' if self.accepted else '>'} {self.accept_p:g}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "curve": list(self.curve), "accepted": self.accepted, "reason": self.reason}


def best_epoch(curve: list[dict[str, Any]]) -> int:
    """The epoch with the best validation net among those that fix more than they break (ties: lower
    validation loss, a non-finite one last, then earlier); 0, the original, when none does."""
    better = [e for e in range(1, len(curve)) if curve[e]["val_net"] > 0]

    def order(e: int) -> tuple[float, float, int]:
        loss = curve[e]["val_loss"] if math.isfinite(curve[e]["val_loss"]) else math.inf
        return (-curve[e]["val_net"], loss, e)

    return min(better, key=order) if better else 0


def choose(curve: list[dict[str, Any]], accept_p: float, tries: int | None = None) -> Gate:
    """The gate over a validation curve whose epoch 0 is the original: keep ``best_epoch``, and test it,
    corrected for ``tries`` points picked from (default: the curve's epochs)."""
    best = best_epoch(curve)
    kept = curve[best]
    tries = tries or max(1, len(curve) - 1)
    p = min(1.0, stats.mcnemar_one_sided(kept["val_fixed"], kept["val_broken"]) * tries) if best else 1.0
    return Gate(
        examples=int(kept["examples"]),
        curve=tuple({k: v for k, v in c.items() if k != "examples"} for c in curve),
        best_epoch=best,
        p_value=p,
        accept_p=accept_p,
        tries=tries,
    )


def validation_record(before: Predictions, after: Predictions) -> dict[str, Any]:
    """One point of the validation curve: loss and accuracy of ``after``, fixed/broken against ``before``."""
    b, a = before.correct, after.correct
    fixed, broken = int((~b & a).sum()), int((b & ~a).sum())
    loss = float(torch.nn.functional.cross_entropy(after.logits.float(), after.labels))
    return {
        "val_loss": loss,
        "val_acc": after.accuracy,
        "val_fixed": fixed,
        "val_broken": broken,
        "val_net": fixed - broken,
        "examples": len(b),
    }


FORGET_P = 0.05  # a repair significantly worse than the original on the keep data is not shipped (--allow-forgetting ships it)


@dataclass(frozen=True)
class Arm:
    """One fine-tune: what it trained, the epoch its gate kept, and what that changed. ``seconds``: the
    fine-tune with its validation. A frozen prefix's features are not in it: they come from the pass
    that evaluates the original on the training data, which every arm's verdict needs anyway."""

    groups: tuple[str, ...]
    trainable: int
    seconds: float
    verify: Verdict
    train: Verdict | None  # None: unlabelled training images (a recalibration)
    history: tuple[dict[str, Any], ...]
    gate: Gate
    keep: Verdict | None = None  # on the data it must not get worse on (--keep-data); None without any

    @property
    def forgets(self) -> bool:
        """Significantly worse on the keep data: more broken than fixed, two-sided exact McNemar p <= FORGET_P."""
        return self.keep is not None and self.keep.net < 0 and self.keep.p_value <= FORGET_P

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep": None if self.keep is None else self.keep.to_dict(),
            "forgets": self.forgets,
            "groups": list(self.groups),
            "trainable": self.trainable,
            "seconds": self.seconds,
            "verify": self.verify.to_dict(),
            "train": None if self.train is None else self.train.to_dict(),
            "history": list(self.history),
            "gate": self.gate.to_dict(),
        }


@dataclass(frozen=True)
class RepairReport:
    """What a repair did: the plan, the surgical arm's gate and held-out verdicts (and the full fine-tune's, when
    asked), whether it was accepted and written (``output``, ``sha256``), and the search it ran."""

    plan: dict[str, Any]  # Plan.to_dict(): what was chosen, on which data
    surgical: Arm
    baseline: Arm | None
    output: str | None  # None: the gate kept the original, and nothing was written
    sha256: str | None
    parent_sha256: str
    notes: tuple[str, ...] = ()  # what opening the checkpoint assumed or converted (Checkpoint.notes)
    search: dict[str, Any] | None = None  # --layers auto's search: winner, tries, each arm tried, the candidate passed over

    @property
    def held_back(self) -> bool:
        """The gate accepted a gain, but it forgets what the model knew (the keep data) and forgetting was not allowed."""
        return self.surgical.gate.accepted and self.surgical.forgets and not self.plan["config"].get("allow_forgetting", False)

    @property
    def accepted(self) -> bool:
        return self.surgical.gate.accepted and not self.held_back

    @property
    def full(self) -> bool:
        """Every parameter trained: a full fine-tune, never called surgical."""
        return bool(self.surgical.trainable == self.plan["total"])

    @property
    def compute_saving(self) -> float | None:
        return 1 - self.surgical.seconds / self.baseline.seconds if self.baseline else None

    @property
    def verdict(self) -> str:
        k = self.surgical.keep
        if self.held_back and k is not None:
            who = f"the best candidate, {self.search['winner']}," if self.search else "the repair"
            return (
                f"not shipped: {who} gains on validation ({self.surgical.gate.reason}) but forgets on the keep data "
                f"{self.plan['keep_data']['spec']}: {100 * k.accuracy_before:.2f}% -> {100 * k.accuracy_after:.2f}%, fixed {k.fixed}, "
                f"broke {k.broken}, p = {k.p_value:.2g}; the original is kept (--allow-forgetting ships it)"
            )
        if not self.accepted:
            return f"nothing to repair: the original is kept ({self.surgical.gate.reason})"
        v = self.surgical.verify
        lo, hi = v.net_interval
        share = f"{100 * self.surgical.trainable / self.plan['total']:.1f}% of the parameters"
        what = (
            f"recalibrated the BatchNorm statistics on {self.plan['train_data']['examples']} images"
            if self.surgical.trainable == 0
            else f"{'fine-tuned the whole model' if self.full else 'repaired ' + ', '.join(self.surgical.groups)} "
            f"(epoch {self.surgical.gate.best_epoch})"
        )
        if self.search:
            what += f"; {self.search['winner']}, {share}, the best of {len(self.search['tried'])} arms tried on validation"
        over = (self.search or {}).get("passed_over")
        skipped = (
            f"; passed over {over['candidate']}, which forgets on the keep data ({100 * over['keep']['accuracy_before']:.2f}% -> "
            f"{100 * over['keep']['accuracy_after']:.2f}%; --allow-forgetting ships it)"
            if over
            else ""
        )
        return (
            f"{what}: fixed {v.fixed}, broke {v.broken}, "
            f"net {v.net:+d} (95% {math.floor(lo):+d} to {math.ceil(hi):+d}, p = {v.p_value:.2g}) on held-out data; wrote {self.output}"
            + skipped
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "surgical": self.surgical.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "accepted": self.accepted,
            "full_fine_tune": self.full,
            "verdict": self.verdict,
            "output": self.output,
            "sha256": self.sha256,
            "parent_sha256": self.parent_sha256,
            "notes": list(self.notes),
            "compute_saving": self.compute_saving,
            "search": self.search,
        }
