"""What is wrong, not only where: the cause of a model's errors on some data, from a fixed vocabulary.

``rank`` measures activation drift on the user's data (``drift``). Two cheap passes over a seeded
sample of the model's own training data tell what that drift means (``probe``):
- **the control pass**: the same drift on the training data. No drift there but drift on the user's
  data: the data moved (``input_shift`` when the first BatchNorm sees it, ``feature_shift`` deeper).
  Drift on both: the model changed after its statistics were recorded.
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

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from beta_diag import data as data_mod
from beta_diag import drift as drift_mod
from beta_diag.data import Dataset, Preprocess
from beta_diag.drift import Drift
from beta_diag.errors import BetaDiagError
from beta_diag.groups import Group
from beta_diag.recalibration import agreement, recalibrated
from beta_diag.runtime import Predictions, Progress, evaluate
from beta_diag.session import DataChoice, Session

KINDS = ("degenerate", "statistics", "weights", "input_shift", "feature_shift", "label_shift", "none", "undetermined")
NORMALISATIONS = {  # what a model trained elsewhere was most likely normalised with
    "0.5": ((0.5,), (0.5,)),
    "none (0 and 1)": ((0.0,), (1.0,)),
    "ImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class CauseRule:
    """The decision's constants (chosen on seeds 0-1 of benchmarks/causes.py, reported on the others)."""

    collapse: float = 0.8  # one class takes this share of the predictions: degenerate
    collapse2: float = 0.9  # or two classes this share (with more than three classes)
    chance: float = 1.5  # accuracy below chance times this: degenerate
    disagree: float = 1e-3  # a BatchNorm's stored statistics disagree with fresh ones above this KL (drift's floor)
    noise: float = 2.0  # ... and above this many times the sampling noise of the control's drift at that BatchNorm
    spread: float = 0.75  # statistics: this share of the BatchNorms disagree, from the first
    shift: float = 4.0  # the data moved at a BatchNorm: its drift over the training data's (and noise, floor)
    early: float = 0.25  # input_shift: the data first differ within this share of the BatchNorms (in call order)
    lost: float = 0.05  # the model lost accuracy: the training data's this far below its recorded test accuracy
    gap: float = 0.05  # label shift: accuracy this far below the training data's ...
    pair: float = 0.5  # ... with at least this share of the extra errors in a few class pairs
    normalise: float = 10.0  # a normalisation that cuts the first BatchNorm's disagreement by this factor names preprocessing


@dataclass(frozen=True)
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
    """One cause from ``KINDS``, its evidence, and what to do. ``degenerate`` is said first whatever the cause."""

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


def recorded_accuracy(history: Sequence[dict[str, Any]]) -> float | None:
    """The test accuracy a checkpoint's training history ends with, when it records a plausible one."""
    last = history[-1].get("test_acc") if history else None
    return float(last) if isinstance(last, (int, float)) and not isinstance(last, bool) and 0 <= last <= 1 else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _channel_stats(ds: Dataset, pre: Preprocess, limit: int = 1000) -> dict[str, list[float]]:
    """Per-channel mean and std of the model's input (after preprocessing) and of the [0, 1] pixels before normalising."""
    x = pre(ds.images[:limit])  # (N, C, H, W), normalised
    std = torch.tensor(pre.std).view(1, -1, 1, 1).expand(1, x.shape[1], 1, 1)
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1).expand(1, x.shape[1], 1, 1)
    raw = x * std + mean
    return {
        "input_mean": [round(float(v), 4) for v in x.mean((0, 2, 3))],
        "input_std": [round(float(v), 4) for v in x.std((0, 2, 3))],
        "pixel_mean": [round(float(v), 4) for v in raw.mean((0, 2, 3))],
        "pixel_std": [round(float(v), 4) for v in raw.std((0, 2, 3))],
    }


def _profile(
    model: torch.nn.Module, ds: Dataset, pre: Preprocess, device: torch.device, groups: Sequence[Group]
) -> tuple[Predictions, Drift]:
    recorder = drift_mod.Recorder(model)
    try:
        preds = evaluate(model, ds, pre, device, on_batch=recorder.commit)
    finally:
        recorder.remove()
    return preds, recorder.result(groups)


def _pairs(preds: Predictions, names: Sequence[str], reference: Predictions | None) -> list[dict[str, Any]]:
    """Confusions (true -> predicted) by how many errors they add over the reference's rates, largest first."""
    c = len(names)
    conf = torch.zeros(c, c)
    conf.index_put_((preds.labels, preds.preds), torch.ones(len(preds.labels)), accumulate=True)
    counts = conf.sum(1, keepdim=True).clamp_min(1)
    if reference is not None:
        ref = torch.zeros(c, c)
        ref.index_put_((reference.labels, reference.preds), torch.ones(len(reference.labels)), accumulate=True)
        excess = conf - ref / ref.sum(1, keepdim=True).clamp_min(1) * counts
    else:
        excess = conf.clone()
    excess.fill_diagonal_(0)
    top = torch.argsort(excess.flatten(), descending=True)[:5]
    return [
        {
            "true": names[int(i) // c],
            "predicted": names[int(i) % c],
            "errors": int(conf.flatten()[i]),
            "excess": round(float(excess.flatten()[i]), 1),
        }
        for i in top
        if excess.flatten()[i] > 0
    ]


def probe(
    model: torch.nn.Module,
    pre: Preprocess,
    device: torch.device,
    data: Dataset,
    preds: Predictions,
    data_drift: Drift,
    train: Dataset | None,
    groups: Sequence[Group],
    why_no_control: str | None = None,
    recorded_accuracy: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> Evidence:
    """Measure what ``decide`` needs: the user's data as ``rank`` evaluated it, and, when ``train`` (a
    sample of the training data) is given, the control pass and the recalibration probe on copies."""
    counts = torch.bincount(preds.preds, minlength=preds.logits.shape[1]).double() / max(1, len(preds.labels))
    top2 = counts.sort(descending=True).values[:2]
    layers = data_drift.layers if data_drift.available else ()
    first = layers[0] if layers else None
    evidence = Evidence(
        len(preds.labels),
        int(preds.logits.shape[1]),
        preds.accuracy,
        data.class_names[int(counts.argmax())] if int(counts.argmax()) < len(data.class_names) else str(int(counts.argmax())),
        float(top2[0]),
        float(top2.sum()),
        data_drift.available,
        first.name if first else None,
        (first.group or first.feeder_group) if first else None,
        data_drift.suspect,
        data_drift.downstream,
        recorded_accuracy,
        None,
        why_no_control,
    )
    if train is None or not data_drift.available:
        return evidence if train is None else replace(evidence, why_no_control=data_drift.reason)
    if progress:
        progress("control", 0, 4)
    train_preds, train_drift = _profile(model, train, pre, device, groups)
    if progress:
        progress("control", 1, 4)
    fresh = recalibrated(model, train, pre, device)
    order = [layer.name for layer in train_drift.layers]
    agree = {a.name: a for a in agreement(model, fresh)}
    agree_list = [agree[n] for n in order if n in agree]
    index = data_mod.subset_index(len(data), len(train), seed) if len(data) > len(train) else torch.arange(len(data))
    sample = data.subset(index)
    sample_preds = Predictions(preds.logits[index], preds.labels[index])
    recal_data = adapt_data = None
    if any(a.kl > data_drift.rule.floor for a in agree_list):  # what recalibration recovers, when it has something to recover
        recal_data = evaluate(fresh, sample, pre, device).accuracy
    if progress:
        progress("control", 2, 4)
    if any(u.kl > 2 * max(t.kl, u.noise + t.noise, data_drift.rule.floor) for u, t in zip(layers, train_drift.layers)):
        adapt_data = evaluate(
            recalibrated(model, sample, pre, device), sample, pre, device
        ).accuracy  # label-free: the data's own statistics
    if progress:
        progress("control", 3, 4)
    normalisations = {}
    if agree_list and agree_list[0].kl > data_drift.rule.floor:  # the first BatchNorm disagrees: is it the input's scale?
        few = train.subset(torch.arange(min(len(train), 256)))
        for label, (mean, std) in {
            "current": (pre.mean, pre.std),
            **NORMALISATIONS,
            "training data's own": data_mod.channel_stats(train.images),
        }.items():
            if len(mean) not in (1, pre.input_shape[0]):
                continue
            c = pre.input_shape[0]
            cand = Preprocess(pre.input_shape, tuple(mean) * (c // len(mean)), tuple(std) * (c // len(std)))
            _, d = _profile(model, few, cand, device, groups)
            normalisations[label] = {"mean": list(cand.mean), "std": list(cand.std), "first_kl": d.layers[0].kl if d.layers else None}
    if progress:
        progress("control", 4, 4)
    per_layer = []
    for u, t in zip(layers, train_drift.layers):
        base = max(t.kl, u.noise + t.noise, data_drift.rule.floor)
        per_layer.append(
            {
                "name": u.name,
                "group": u.group or u.feeder_group,
                "feeder_group": u.feeder_group or u.group,
                "data_kl": u.kl,
                "train_kl": t.kl,
                "train_noise": t.noise,
                "shift": u.kl / base if math.isfinite(u.kl) else math.inf,
                "agreement_kl": agree[u.name].kl if u.name in agree else None,
            }
        )
    control = {
        "spec": train.spec,
        "split": train.split,
        "examples": len(train),
        "accuracy": train_preds.accuracy,
        "suspect": train_drift.suspect,
        "suspect_layer": train_drift.suspect_layer,
        "data_sample": len(sample),
        "data_sample_accuracy": sample_preds.accuracy,
        "recalibrated_data_accuracy": recal_data,  # None: the statistics agree, nothing to recover
        "adapted_data_accuracy": adapt_data,  # None: the data did not move
        "layers": per_layer,
        "normalisations": normalisations,
        "data_input": _channel_stats(data, pre),
        "train_input": _channel_stats(train, pre),
        "pairs": _pairs(preds, data.class_names, train_preds),
    }
    return replace(evidence, control=control)


def diagnose(
    session: Session,
    data: Dataset,
    preds: Predictions,
    data_drift: Drift,
    groups: Sequence[Group],
    train: DataChoice | None,
    progress: Progress | None = None,
) -> Cause:
    """``rank``'s cause: the control pass and probe on a seeded sample of the training data (``train``;
    None: no control, said in the cause), then ``decide``. Only copies of the model are changed."""
    why = "the control pass was turned off (--no-control)" if train is None else None
    sample = None
    if train is not None:
        try:
            sample = session.load_data(train, default_split="train")
        except BetaDiagError as exc:
            why = f"no training data for the control pass ({exc})"
    recorded = recorded_accuracy(session.ckpt.metadata.history)
    seed = train.seed if train is not None else 0
    e = probe(session.model, session.preprocess, session.device, data, preds, data_drift, sample, groups, why, recorded, seed, progress)
    return decide(e, checkpoint=str(session.ckpt.path))


def decide(e: Evidence, rule: CauseRule = CauseRule(), checkpoint: str = "CKPT") -> Cause:
    """The cause from the evidence; see the module's docstring. ``checkpoint`` names the file in suggested commands."""
    cause = _decide_degenerate(e, rule)
    return replace(cause, suggested=cause.suggested.replace("CKPT", checkpoint))


def _decide_degenerate(e: Evidence, rule: CauseRule) -> Cause:
    ev = json.loads(json.dumps(asdict(e)))  # plain JSON values (lists, not tuples), as a saved ranking reads them back
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
    if not e.drift_available:
        return Cause(
            "undetermined",
            "no cause could be decided: activation drift is unavailable for this model",
            "rank with --by-class to see which classes fail; a fingerprint of the training data would tell more",
            ev,
            undecided=("statistics", "weights", "input_shift", "feature_shift", "label_shift"),
            rule=rule,
        )
    c = e.control
    if c is None:
        moved = e.suspect is not None
        return Cause(
            "undetermined",
            (
                f"activations leave their training statistics at {e.suspect}: the data differ from the training data there, or the "
                "model changed after its statistics were recorded (its weights or statistics); without training data these cannot be told apart"
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
    layers = c["layers"]
    disagree = [
        x["agreement_kl"] > max(rule.disagree, rule.noise * x.get("train_noise", 0.0)) for x in layers if x["agreement_kl"] is not None
    ]
    recal_text = f"recalibrating the BatchNorm statistics on {c['examples']} training images takes this data from {_pct(c['data_sample_accuracy'])} to {_pct(c['recalibrated_data_accuracy'] or 0)}"
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
                f"BatchNorms, from the first: the statistics, not the weights, are wrong; {recal_text}",
                "recalibrate the BatchNorm statistics on the training data (no labels or gradients needed)",
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
    shifted = [i for i, x in enumerate(layers) if x["shift"] > rule.shift]
    if shifted:
        at = layers[shifted[0]]
        adapt = f"re-estimating the statistics on this data (no labels) takes it from {_pct(c['data_sample_accuracy'])} to {_pct(c['adapted_data_accuracy'] or 0)}"
        d_in, t_in = c["data_input"], c["train_input"]
        if shifted[0] < max(1, math.ceil(rule.early * len(layers))):
            return Cause(
                "input_shift",
                f"the data differ from the training data at the input: the early BatchNorm {at['name']} sees drift x{drift_mod.times(at['shift'])} "
                f"over the training data's, which shows none; input mean {d_in['input_mean']} and std {d_in['input_std']} "
                f"after preprocessing against the training data's {t_in['input_mean']} and {t_in['input_std']}; {adapt}",
                "fix the data or its preprocessing, or adapt to it: fine-tune on labelled data like it (beta-diag repair --train-data ...)",
                ev,
                place=at["feeder_group"],
                rule=rule,
            )
        return Cause(
            "feature_shift",
            f"the data differ from the training data first at {at['name']} (drift x{drift_mod.times(at['shift'])} over the training data's, "
            f"none before it): the inputs' early statistics look alike but their features do not; {adapt}",
            f"fine-tune from {at['group']} on with labelled data like this (beta-diag repair --train-data ...)",
            ev,
            place=at["group"],
            rule=rule,
        )
    recorded = e.recorded_accuracy
    if recorded is not None and c["accuracy"] < recorded - rule.lost and e.downstream:
        place = e.downstream[0]
        return Cause(
            "weights",
            f"the model gets {_pct(c['accuracy'])} of its training data right against the {_pct(recorded)} its training history records, "
            f"with its statistics in agreement and no activation drift: the weights after the last BatchNorm ({', '.join(e.downstream)}) changed",
            f"beta-diag repair CKPT --layers {place}",
            ev,
            place=place,
            rule=rule,
        )
    gap = c["accuracy"] - e.accuracy
    pairs = c["pairs"]
    extra = max(1.0, gap * e.examples)
    in_pairs = sum(p["excess"] for p in pairs[:2]) / extra
    if gap > rule.gap and in_pairs >= rule.pair:
        named = ", ".join(f"{p['true']} -> {p['predicted']} ({p['errors']})" for p in pairs[:2])
        return Cause(
            "label_shift",
            f"no activation drift, yet accuracy is {_pct(e.accuracy)} against {_pct(c['accuracy'])} on the training data, and "
            f"{_pct(min(1.0, in_pairs))} of the extra errors are in {named}: the labels (or classes) differ from training",
            "check the labels of these classes; retrain the head on relabelled data (beta-diag repair --layers fc --train-data ...)",
            ev,
            rule=rule,
        )
    weak = gap > rule.gap
    return Cause(
        "none",
        (
            f"nothing found: the model is uniformly weaker here ({_pct(e.accuracy)} against {_pct(c['accuracy'])} on the training data) "
            "with its errors spread over many classes and no activation drift"
            if weak
            else f"nothing found: a healthy model ({_pct(e.accuracy)} here, {_pct(c['accuracy'])} on the training data, no activation drift)"
        ),
        "more or better training data" if weak else "nothing to fix; the flags say where a fine-tune would act most directly",
        ev,
        rule=rule,
    )
