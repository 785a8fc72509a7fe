"""The control pass and the recalibration probe: what ``causes.decide`` needs, measured on copies of the model.

``probe`` takes the user's data as ``rank`` evaluated it (predictions and drift) and a seeded sample of
the model's training data, and measures: the drift on the training data (the control pass); every
BatchNorm's statistics re-estimated on that sample and their agreement with the stored ones
(``recalibration``); what recalibration recovers on the user's data, and what re-estimating the
statistics on the user's own data (no labels) recovers, when there is something to recover; whether a
standard normalisation makes the first BatchNorm agree; how far the inputs differ before any layer
(``input_difference``); the input's per-channel statistics; and which class confusions grew.
``diagnose`` is ``rank``'s entry: load the training sample (or say why there is none), probe, decide.
The checkpoint and the session's model are never changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from beta_diag import data as data_mod
from beta_diag import drift as drift_mod
from beta_diag import fingerprint
from beta_diag.causes import Cause, Evidence, decide
from beta_diag.configs import DataChoice
from beta_diag.data import Dataset, Preprocess
from beta_diag.drift import Drift, LayerDrift
from beta_diag.errors import BetaDiagError
from beta_diag.groups import Group
from beta_diag.recalibration import agreement, recalibrated
from beta_diag.runtime import Predictions, Progress, evaluate
from beta_diag.session import Session

ADAPT_WHEN = 2.0  # measure what adapting to the data recovers once its drift passes this many times the training data's
NORMALISATIONS = {  # what a model trained elsewhere was most likely normalised with
    "0.5": ((0.5,), (0.5,)),
    "none (0 and 1)": ((0.0,), (1.0,)),
    "ImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def recorded_accuracy(history: Sequence[dict[str, Any]]) -> float | None:
    """The test accuracy a checkpoint's training history ends with, when it records a plausible one."""
    last = history[-1].get("test_acc") if history else None
    return float(last) if isinstance(last, (int, float)) and not isinstance(last, bool) and 0 <= last <= 1 else None


def _channel_stats(ds: Dataset, pre: Preprocess, limit: int = 512, chunk: int = 64) -> dict[str, list[float]]:
    """Per-channel mean and std of the model's input (after preprocessing) and of the [0, 1] pixels before normalising,
    over the first ``limit`` images, ``chunk`` at a time (a 224x224 batch of 1,000 would take 600 MB)."""
    sums = torch.zeros(3, pre.input_shape[0], dtype=torch.float64)  # n, sum, sum of squares per channel
    for start in range(0, min(limit, len(ds)), chunk):
        x = pre(ds.images[start : min(start + chunk, limit)]).double()
        sums += torch.stack([torch.full((x.shape[1],), x[:, 0].numel(), dtype=torch.float64), x.sum((0, 2, 3)), x.square().sum((0, 2, 3))])
    mean = sums[1] / sums[0]
    std = (sums[2] / sums[0] - mean.square()).clamp_min(0).sqrt()
    scale, shift = torch.tensor(pre.std, dtype=torch.float64).expand_as(mean), torch.tensor(pre.mean, dtype=torch.float64).expand_as(mean)

    def rounded(t: torch.Tensor) -> list[float]:
        return [round(float(v), 4) for v in t]

    return {
        "input_mean": rounded(mean),
        "input_std": rounded(std),
        "pixel_mean": rounded(mean * scale + shift),
        "pixel_std": rounded(std * scale),
    }


def _input_features(ds: Dataset, pre: Preprocess, limit: int = 1000, chunk: int = 128) -> torch.Tensor:
    """Per image, a coarse picture of the model's input: per channel, the 4x4 grid of means, of mean squares, and of
    high-frequency energy (the input minus its 2x2 average). (N, 48 C) float64."""
    rows = []
    for start in range(0, min(limit, len(ds)), chunk):
        x = pre(ds.images[start : min(start + chunk, limit)])
        smooth = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True), size=x.shape[-2:], mode="nearest")

        def grid(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(t, 4).flatten(1)

        rows.append(torch.cat([grid(x), grid(x.square()), grid((x - smooth).square())], 1).double())
    return torch.cat(rows)


def input_difference(data: Dataset, train: Dataset, pre: Preprocess) -> float:
    """How far the data's inputs are from the training data's, before any layer: the mean over coarse input
    features (``_input_features``) of the squared two-sample z of their means; about 1 when they match."""
    a, b = _input_features(data, pre), _input_features(train, pre)
    se = a.var(0) / len(a) + b.var(0) / len(b)
    z2 = (a.mean(0) - b.mean(0)).square() / se.clamp_min(1e-12)
    return float(z2[se > 0].mean()) if bool((se > 0).any()) else 0.0


Watch = Callable[[torch.nn.Module], drift_mod.Recorder]  # a model -> the recorder of its drift (BatchNorm or fingerprint)


def _profile(
    model: torch.nn.Module, ds: Dataset, pre: Preprocess, device: torch.device, groups: Sequence[Group], watch: Watch
) -> tuple[Predictions, Drift]:
    recorder = watch(model)
    try:
        preds = evaluate(model, ds, pre, device, on_batch=recorder.commit)
    finally:
        recorder.remove()
    return preds, recorder.result(groups)


def _pairs(preds: Predictions, names: Sequence[str], reference: Predictions | None) -> list[dict[str, Any]]:
    """Confusions (true -> predicted) by how many errors they add over the reference's rates, largest first."""
    c = preds.logits.shape[1]
    names = [names[i] if i < len(names) else str(i) for i in range(c)]  # data may name fewer classes than the model has
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


def _normalisations(
    model: torch.nn.Module, train: Dataset, pre: Preprocess, device: torch.device, groups: Sequence[Group], watch: Watch
) -> dict[str, dict[str, Any]]:
    """The first BatchNorm disagrees: is it the input's scale? Its drift on a few training images under each common
    normalisation, the current one and the training data's own."""
    normalisations: dict[str, dict[str, Any]] = {}
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
        _, d = _profile(model, few, cand, device, groups, watch)
        normalisations[label] = {"mean": list(cand.mean), "std": list(cand.std), "first_kl": d.layers[0].kl if d.layers else None}
    return normalisations


def _per_layer(layers: Sequence[LayerDrift], train_drift: Drift, agree: dict[str, Any], floor: float) -> list[dict[str, Any]]:
    """Per watched point: the data's drift against the training data's (its shift), and the recalibration agreement."""
    per_layer = []
    for u, t in zip(layers, train_drift.layers):
        base = max(t.kl, u.noise + t.noise, floor)
        per_layer.append(
            {
                "name": u.name,
                "group": u.group or u.feeder_group,
                "feeder_group": u.feeder_group or u.group,
                "data_kl": u.kl,
                "train_kl": t.kl,
                "train_noise": t.noise,
                "shift": u.kl / base if math.isfinite(u.kl) else math.inf,
                # a BatchNorm's own; a fingerprint point's: the largest of the BatchNorms inside it (None: it holds none)
                "agreement_kl": agree[u.name].kl
                if u.name in agree
                else max((a.kl for n, a in agree.items() if n.startswith(u.name + ".")), default=None),
            }
        )
    return per_layer


def _evidence(
    data: Dataset, preds: Predictions, data_drift: Drift, recorded_accuracy: float | None, why_no_control: str | None
) -> Evidence:
    """What the user's data alone says: the predictions' spread over classes and where drift starts."""
    counts = torch.bincount(preds.preds, minlength=preds.logits.shape[1]).double() / max(1, len(preds.labels))
    top2 = counts.sort(descending=True).values[:2]
    top = int(counts.argmax())
    layers = data_drift.layers if data_drift.available else ()
    first = layers[0] if layers else None
    return Evidence(
        examples=len(preds.labels),
        classes=int(preds.logits.shape[1]),
        accuracy=preds.accuracy,
        top_class=data.class_names[top] if top < len(data.class_names) else str(top),
        top_class_share=float(top2[0]),
        top2_share=float(top2.sum()),
        drift_available=data_drift.available,
        first_layer=first.name if first else None,
        first_group=(first.group or first.feeder_group) if first else None,
        suspect=data_drift.suspect,
        downstream=data_drift.downstream,
        recorded_accuracy=recorded_accuracy,
        control=None,
        why_no_control=why_no_control,
    )


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
    watch: Watch = drift_mod.Recorder,
) -> Evidence:
    """Measure what ``decide`` needs: the user's data as ``rank`` evaluated it, and, when ``train`` (a
    sample of the training data) is given, the control pass and the recalibration probe on copies."""
    evidence = _evidence(data, preds, data_drift, recorded_accuracy, why_no_control)
    layers = data_drift.layers if data_drift.available else ()
    if train is None or not data_drift.available:
        return evidence if train is None else replace(evidence, why_no_control=data_drift.reason)
    if progress:
        progress("control", 0, 4)
    train_preds, train_drift = _profile(model, train, pre, device, groups, watch)
    if progress:
        progress("control", 1, 4)
    fresh = recalibrated(model, train, pre, device)
    agree = {a.name: a for a in agreement(model, fresh)}
    order = [layer.name for layer in train_drift.layers] if data_drift.source == "batchnorm" else list(agree)  # the BatchNorms
    agree_list = [agree[n] for n in order if n in agree]
    index = data_mod.subset_index(len(data), len(train), seed) if len(data) > len(train) else torch.arange(len(data))
    sample = data.subset(index)
    sample_preds = Predictions(preds.logits[index], preds.labels[index])
    recal_data = adapt_data = None
    if any(a.kl > data_drift.rule.floor for a in agree_list):  # what recalibration recovers, when it has something to recover
        recal_data = evaluate(fresh, sample, pre, device).accuracy
    if progress:
        progress("control", 2, 4)
    if any(u.kl > ADAPT_WHEN * max(t.kl, u.noise + t.noise, data_drift.rule.floor) for u, t in zip(layers, train_drift.layers)):
        adapt_data = evaluate(
            recalibrated(model, sample, pre, device), sample, pre, device
        ).accuracy  # label-free: the data's own statistics
    if progress:
        progress("control", 3, 4)
    normalisations = (
        _normalisations(model, train, pre, device, groups, watch) if agree_list and agree_list[0].kl > data_drift.rule.floor else {}
    )
    if progress:
        progress("control", 4, 4)
    per_layer = _per_layer(layers, train_drift, agree, data_drift.rule.floor)
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
        "unit": "BatchNorms" if data_drift.source == "batchnorm" else "watched layer groups holding BatchNorms",
        "normalisations": normalisations,
        "input_difference": input_difference(sample, train, pre),  # the seeded sample: a folder's first images are one class's
        "data_input": _channel_stats(sample, pre),
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
    if train is not None and data_drift.available:  # without drift the control has nothing to compare: read nothing
        try:
            sample = session.load_data(train, default_split="train")
        except BetaDiagError as exc:
            why = f"no training data for the control pass ({exc})"
    recorded = recorded_accuracy(session.ckpt.metadata.history)
    seed = train.seed if train is not None else 0
    e = probe(
        session.model,
        session.preprocess,
        session.device,
        data,
        preds,
        data_drift,
        sample,
        groups,
        why,
        recorded,
        seed,
        progress,
        watch=lambda model: fingerprint.recorder(session.ckpt.fingerprint, model, groups),
    )
    cause = decide(e, checkpoint=str(session.ckpt.path))
    return replace(cause, evidence=json.loads(json.dumps(cause.evidence)))  # plain JSON values, as a saved ranking reads them back
