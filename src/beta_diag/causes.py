"""What is wrong, not only where: the cause of a model's errors on some data, from a fixed vocabulary.

``rank`` measures activation drift on the user's data (``drift``). Two cheap passes over a seeded
sample of the model's own training data tell what that drift means (measured by ``control``):
- **the control pass**: the same drift on the training data. No drift there: the model agrees with
  itself, so what differs is the data (``input_shift`` when the inputs themselves differ, compared before
  any layer by ``input_difference``; ``feature_shift`` when only the features drift). Drift on both: the
  model changed after its statistics were recorded.
- **the recalibration probe**: the BatchNorm statistics re-estimated on that sample (``recalibration``),
  on a copy. Where the fresh statistics stop agreeing with the stored ones tells ``statistics`` (every
  BatchNorm from the first disagrees) from ``weights`` (the BatchNorms before the damaged group
  agree), and what recalibration alone recovers is the cheap first fix.
When the model's own statistics disagree at the first BatchNorm, a few standard normalisations are
tried on the training sample: one that makes them agree names a preprocessing mismatch.

``decide`` turns the measured ``Evidence`` into a ``Cause`` with plain rules whose constants
(``CauseRule``) were chosen on seeds 0-1 of ``benchmarks/causes.py`` and are reported on the others.
Without training data it says which causes it could not tell apart and which option would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from beta_diag.shown import times


@dataclass(frozen=True)
class CauseRule:
    """The decision's constants (chosen on seeds 0-1 of benchmarks/causes.py, reported on the others)."""

    collapse: float = 0.8  # one class takes this share of the predictions: degenerate
    collapse2: float = 0.9  # or two classes this share (with more than three classes)
    chance: float = 1.5  # accuracy below chance times this: degenerate
    disagree: float = 1e-3  # a BatchNorm's stored statistics disagree with fresh ones above this KL (drift's floor)
    noise: float = 1.0  # ... and above this many times the sampling noise of the control's drift at that BatchNorm
    spread: float = 0.9  # statistics: this share of the BatchNorms disagree, from the first
    shift: float = 2.0  # the data moved at a BatchNorm: its drift over the training data's (and noise, floor)
    input: float = 2.0  # input_shift: the inputs' coarse features differ by this mean squared z (about 1 when they match)
    lost: float = 0.05  # the model lost accuracy: the training data's this far below its recorded test accuracy
    gap: float = 0.05  # label shift: accuracy this far below the training data's ...
    pair: float = 0.5  # ... with at least this share of the extra errors in a few class pairs
    normalise: float = 4.0  # a normalisation that cuts the first BatchNorm's disagreement by this factor names preprocessing


@dataclass(frozen=True, kw_only=True)
class Evidence:
    """Every figure a cause is decided from (plain numbers, as ``--json`` records them)."""

    examples: int
    classes: int
    accuracy: float
    top_class: str
    top_class_share: float
    top2_share: float
    drift_available: bool
    first_layer: str | None = None  # the first BatchNorm the forward pass calls, and its group
    first_group: str | None = None
    suspect: str | None = None  # the drift suspect on the user's data (``drift.localise``)
    downstream: tuple[str, ...] = ()  # groups after the last BatchNorm: drift cannot see them
    recorded_accuracy: float | None = None  # the test accuracy the checkpoint's training history ends with
    control: dict[str, Any] | None = None  # the control pass and probe, None without training data
    why_no_control: str | None = None


@dataclass(frozen=True)
class Cause:
    """One cause (degenerate, statistics, weights, input_shift, feature_shift, label_shift, none or undetermined),
    its evidence, and what to do. ``degenerate`` is said first whatever the cause."""

    kind: str
    summary: str  # the cause in plain words
    suggested: str  # the fix to try first
    evidence: dict[str, Any]
    place: str | None = None  # the group, for ``weights`` (and the shifts: where the data first differ)
    degenerate: bool = False
    undecided: tuple[str, ...] = ()  # causes that could not be told apart (kind ``undetermined``)
    rule: CauseRule = field(default_factory=CauseRule)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "undecided": list(self.undecided)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cause:
        keep = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k not in ("rule", "undecided")}
        return cls(**keep, undecided=tuple(d.get("undecided", ())), rule=CauseRule(**d.get("rule", {})))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def notes(cause: Cause) -> tuple[str, ...]:
    """What the cause assumed, in words: the data its control pass took for the model's training data."""
    c = cause.evidence.get("control")
    if not c:
        return ()
    note = f"the control pass took {c['examples']} images of {c['spec']} ({c['split']}) as the model's training data"
    return (note + " (--train-data to change it, --no-control to skip it)",)


def decide(e: Evidence, rule: CauseRule = CauseRule(), checkpoint: str = "CKPT") -> Cause:
    """The cause from the evidence; see the module's docstring. ``checkpoint`` names the file in suggested commands."""
    cause = _decide_degenerate(e, rule)
    return replace(cause, suggested=cause.suggested.replace("CKPT", checkpoint))


def _decide_degenerate(e: Evidence, rule: CauseRule) -> Cause:
    ev = asdict(e)
    chance = 1.0 / max(1, e.classes)
    degenerate = (
        e.top_class_share >= rule.collapse or (e.classes > 3 and e.top2_share >= rule.collapse2) or e.accuracy < rule.chance * chance
    )
    lead = ""
    if degenerate:
        lead = (
            f"the model is degenerate: it predicts {e.top_class} for {_pct(e.top_class_share)} of the inputs, accuracy {_pct(e.accuracy)} "
            f"(chance {_pct(chance)}); likely reasons: BatchNorm statistics never converged, preprocessing (mean, std, size), "
            "or a wrong class count. "
        )
    cause = _decide(e, rule, ev)
    if degenerate:
        if cause.kind in ("none", "undetermined"):
            cause = replace(cause, kind="degenerate")
        cause = replace(cause, degenerate=True, summary=lead + cause.summary)
    return cause


def _decide(e: Evidence, rule: CauseRule, ev: dict[str, Any]) -> Cause:
    c = e.control
    if not e.drift_available or c is None:
        return _undetermined(e, rule, ev)
    layers = c["layers"]
    layers = [x for x in layers if x["agreement_kl"] is not None]  # the BatchNorms both passes measured, so indices agree
    disagree = [x["agreement_kl"] > max(rule.disagree, rule.noise * x.get("train_noise", 0.0)) for x in layers]
    now = _pct(c["data_sample_accuracy"])
    recal_text = (
        f"recalibrating the BatchNorm statistics on {c['examples']} training images takes this data from {now} "
        f"to {_pct(c['recalibrated_data_accuracy'] or 0)}"
    )
    return (
        _statistics_or_weights(e, c, layers, disagree, recal_text, rule, ev)
        or _shifted(e, c, layers, now, rule, ev)
        or _by_accuracy(e, c, rule, ev)
    )


def _undetermined(e: Evidence, rule: CauseRule, ev: dict[str, Any]) -> Cause:
    """No drift to read, or no training data to compare with: what could not be decided, and what would decide it."""
    if not e.drift_available:
        return Cause(
            "undetermined",
            "no cause could be decided: activation drift is unavailable for this model",
            "rank with --by-class to see which classes fail; a fingerprint of the training data would tell more",
            ev,
            undecided=("statistics", "weights", "input_shift", "feature_shift", "label_shift"),
            rule=rule,
        )
    moved = e.suspect is not None
    return Cause(
        "undetermined",
        (
            f"activations leave their training statistics at {e.suspect}: the data differ from the training data there, or the "
            "model changed after its statistics were recorded (its weights or statistics); "
            "without training data these cannot be told apart"
            if moved
            else "no activation drift on this data; without training data a label shift cannot be told from a uniformly weak model"
        )
        + (f" ({e.why_no_control})" if e.why_no_control else ""),
        "pass --train-data with the data the model was trained on to decide",
        ev,
        place=e.suspect,
        undecided=("input_shift", "feature_shift", "statistics", "weights") if moved else ("label_shift", "none"),
        rule=rule,
    )


def _statistics_or_weights(
    e: Evidence, c: dict[str, Any], layers: list[dict[str, Any]], disagree: list[bool], recal_text: str, rule: CauseRule, ev: dict[str, Any]
) -> Cause | None:
    """The model disagrees with its own statistics on its training data: the input's normalisation, the statistics
    themselves, or the weights after some point."""
    norms = c["normalisations"]
    if norms and disagree and disagree[0]:
        best = min(norms, key=lambda k: norms[k]["first_kl"] if norms[k]["first_kl"] is not None else math.inf)
        current = norms["current"]["first_kl"]
        if best != "current" and current is not None and norms[best]["first_kl"] * rule.normalise < current:
            m, s = norms[best]["mean"], norms[best]["std"]
            flag = f"--mean {','.join(f'{v:.3g}' for v in m)} --std {','.join(f'{v:.3g}' for v in s)}"
            return Cause(
                "input_shift",
                f"the input is normalised differently from training: with the {best} normalisation ({flag}) the first BatchNorm's "
                f"input matches its statistics {current / max(norms[best]['first_kl'], 1e-12):,.0f} times better",
                f"rerun with {flag}, or record the right mean and std in the checkpoint",
                ev,
                place=e.first_group,
                rule=rule,
            )
    if any(disagree):
        first = disagree.index(True)
        share = sum(disagree[first:]) / max(1, len(disagree) - first)
        if first == 0 and share >= rule.spread:
            return Cause(
                "statistics",
                f"the BatchNorm statistics disagree with the model's own layers on its training data at {sum(disagree)} of {len(disagree)} "
                f"{c.get('unit', 'BatchNorms')}, from the first: the statistics, not the weights, are wrong; {recal_text}",
                "recalibrate the BatchNorm statistics on the training data (no labels or gradients needed): "
                "beta-diag repair CKPT --method recalibrate",
                ev,
                rule=rule,
            )
        place = c["suspect"] or layers[first]["group"]
        return Cause(
            "weights",
            f"the model disagrees with its own statistics on its training data from {layers[first]['name']} on, and agrees before it: "
            f"the weights of {place} changed after its statistics were recorded; {recal_text} (a cheap first fix)",
            f"beta-diag repair CKPT --layers {place}",
            ev,
            place=place,
            rule=rule,
        )
    return None


def _shifted(e: Evidence, c: dict[str, Any], layers: list[dict[str, Any]], now: str, rule: CauseRule, ev: dict[str, Any]) -> Cause | None:
    """The data differ from the training data: at the input, or first at some layer."""
    shifted = [i for i, x in enumerate(layers) if x["shift"] > rule.shift]
    adapt = f"re-estimating the statistics on this data (no labels) takes it from {now} to {_pct(c['adapted_data_accuracy'] or 0)}"
    if c.get("input_difference", 0.0) > rule.input:
        d_in, t_in = c["data_input"], c["train_input"]
        seen = f"the first BatchNorm to see it is {layers[shifted[0]]['name']}" if shifted else "no BatchNorm's statistics moved"
        return Cause(
            "input_shift",
            f"the data differ from the training data at the input (coarse input features apart by z^2 {c['input_difference']:,.1f}, "
            f"about 1 when they match; {seen}): input mean {d_in['input_mean']} and std {d_in['input_std']} after preprocessing against "
            f"the training data's {t_in['input_mean']} and {t_in['input_std']}"
            + (f"; {adapt}" if c["adapted_data_accuracy"] is not None else ""),
            "fix the data or its preprocessing, or adapt to it: fine-tune on labelled data like it (beta-diag repair --train-data ...)",
            ev,
            place=layers[shifted[0]]["feeder_group"] if shifted else e.first_group,
            rule=rule,
        )
    if shifted:
        at = layers[shifted[0]]
        return Cause(
            "feature_shift",
            f"the data differ from the training data first at {at['name']} "
            f"(drift x{times(at['shift'])} over the training data's, "
            f"none before it), while the inputs' coarse features match: {adapt}",
            f"fine-tune from {at['group']} on with labelled data like this (beta-diag repair --train-data ...)",
            ev,
            place=at["group"],
            rule=rule,
        )
    return None


def _by_accuracy(e: Evidence, c: dict[str, Any], rule: CauseRule, ev: dict[str, Any]) -> Cause:
    """No drift and the statistics agree: lost weights after the last BatchNorm, a label shift, or nothing."""
    recorded = e.recorded_accuracy
    if recorded is not None and c["accuracy"] < recorded - rule.lost and e.downstream:
        place = e.downstream[0]
        return Cause(
            "weights",
            f"the model gets {_pct(c['accuracy'])} of its training data right against the {_pct(recorded)} its training history records, "
            "with its statistics in agreement and no activation drift: "
            f"the weights after the last BatchNorm ({', '.join(e.downstream)}) changed",
            f"beta-diag repair CKPT --layers {place}",
            ev,
            place=place,
            rule=rule,
        )
    # the accuracy to expect: the test accuracy the history records, else the training sample's (which a generalisation gap inflates)
    ref = recorded if recorded is not None else c["accuracy"]
    ref_text = f"{_pct(ref)} " + ("recorded by its training history" if recorded is not None else "on the training data")
    gap = ref - e.accuracy
    pairs = c["pairs"]
    extra = max(1.0, gap * e.examples)
    in_pairs = sum(p["excess"] for p in pairs[:2]) / extra
    if gap > rule.gap and in_pairs >= rule.pair:
        named = ", ".join(f"{p['true']} -> {p['predicted']} ({p['errors']})" for p in pairs[:2])
        return Cause(
            "label_shift",
            f"no activation drift, yet accuracy is {_pct(e.accuracy)} against {ref_text}, and "
            f"{_pct(min(1.0, in_pairs))} of the extra errors are in {named}: the labels (or classes) differ from training",
            "check the labels of these classes; retrain the head on relabelled data"
            + (f" (beta-diag repair CKPT --layers {e.downstream[-1]} --train-data ...)" if e.downstream else ""),
            ev,
            rule=rule,
        )
    weak = gap > rule.gap
    return Cause(
        "none",
        (
            f"nothing found: the model is uniformly weaker here ({_pct(e.accuracy)} against {ref_text}) "
            "with its errors spread over many classes and no activation drift"
            if weak
            else f"nothing found: a healthy model ({_pct(e.accuracy)} here, {ref_text}, no activation drift)"
        ),
        "more or better training data" if weak else "nothing to fix; the flags say where a fine-tune would act most directly",
        ev,
        rule=rule,
    )
