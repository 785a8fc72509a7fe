"""Label-free monitoring: has the data as a whole left what the model saw in training, and where does it show first?

``check`` evaluates the model once with drift's hooks (``fingerprint.recorder``: the fingerprint's points
when the checkpoint has one, else the BatchNorms' running statistics), then:

- the drift profile and its suspect, exactly as ``rank`` reports them (``drift.py``);
- a test of the data as a whole. Per watched channel, two z-scores: the data's channel mean against the
  reference's, and its variance against the reference's, each over the sampling noise of both sides
  (a fingerprint's per-image spread over the data's count and over its own N images; running statistics carry
  no noise of their own, so there the data's own estimate counts). Under "no shift" each is close to standard normal
  (the images are independent draws), so the smallest two-sided p-value times the number of z-scores
  (Bonferroni: valid however the channels correlate) is a p-value for the whole data: a shift is
  declared when it is below ``alpha``, which bounds the false-alarm rate per batch of data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from beta_diag import fingerprint
from beta_diag.configs import Granularity
from beta_diag.data import Dataset
from beta_diag.drift import Drift, Reference, moments, unavailable_reason
from beta_diag.errors import ConfigError
from beta_diag.groups import layer_groups
from beta_diag.session import Session

DEFAULT_ALPHA = 0.05


@dataclass(frozen=True)
class Check:
    """What ``drift`` reports."""

    drift: Drift
    shifted: bool
    p_value: float  # the whole data's (Bonferroni over every z-score)
    alpha: float
    tests: int  # z-scores: two per watched channel
    worst: str | None  # the point holding the largest |z|
    worst_z: float
    images: int
    spec: str
    split: str
    per_point: dict[str, float]  # the largest |z| at each point

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.drift.source,
            "shifted": self.shifted,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "tests": self.tests,
            "worst_point": self.worst,
            "worst_z": self.worst_z,
            "images": self.images,
            "data": {"spec": self.spec, "split": self.split},
            "max_abs_z": self.per_point,
            "drift": self.drift.to_dict(),
        }


def z_scores(ref: Reference, sums: torch.Tensor, spread: torch.Tensor | None, images: int | None = None) -> torch.Tensor:
    """(2, C): the mean's and the variance's z-scores of the data (``sums``: the recorder's (6, C) totals, centred at
    the reference mean) against ``ref``; ``spread``: the reference's own (2, C) variances of its mean and variance at
    its ``images`` images. With a fingerprint, the data's own sampling noise under "no shift" is the fingerprint's
    per-image spread over the data's count (estimated on its N images, stable); a small batch's own estimate of it
    misses the rare large activations of sparse channels and inflates |z|. Without (running statistics), the data's."""
    m1, var, var_m1, var_s2 = moments(sums)
    n = float(sums[0, 0])
    own = torch.stack([var_m1.clamp_min(0.0), var_s2])
    noise = own if spread is None or images is None else spread * images / n + spread
    diff = torch.stack([m1, var - ref.var])
    floor = 1e-12 * (ref.var + ref.eps)  # a dead channel on both sides: no evidence either way
    return torch.where(diff.abs() <= floor, torch.zeros_like(diff), diff / noise.sqrt().clamp_min(1e-30))


def check(session: Session, ds: Dataset, alpha: float = DEFAULT_ALPHA, progress: Any = None) -> Check:
    """Drift and the shift test of ``ds`` against ``session``'s checkpoint (module docstring); labels unused."""
    groups = layer_groups(session.model, Granularity.group)
    found = session.ckpt.fingerprint
    reason = unavailable_reason(session.model) if found is None else None
    if reason is not None:  # refused before the pass over the data, not after it
        raise ConfigError(
            f"{session.ckpt.path}: drift needs a reference, and {reason}: record a fingerprint first (beta-diag fingerprint CKPT -o OUT)"
        )
    recorder = fingerprint.recorder(found, session.model, groups)
    try:
        session.evaluate(ds, progress, on_batch=recorder.commit)
    finally:
        recorder.remove()
    result = recorder.result(groups)
    if not result.available:  # its layers did not run alike on every batch, or none was called
        raise ConfigError(f"{session.ckpt.path}: {result.reason}: record a fingerprint first (beta-diag fingerprint CKPT -o OUT)")
    per_point: dict[str, float] = {}
    tests = 0
    sums = recorder.channel_sums()
    spreads = found.spreads() if found is not None and recorder.source == "fingerprint" else {}
    for layer in result.layers:
        z = z_scores(recorder.refs[layer.name], sums[layer.name], spreads.get(layer.name), found.images if found else None)
        per_point[layer.name] = float(torch.nan_to_num(z.abs(), nan=math.inf).max())
        tests += z.numel()
    worst = max(per_point, key=lambda k: per_point[k]) if per_point else None
    z_max = per_point[worst] if worst else 0.0
    p_min = math.erfc(z_max / math.sqrt(2)) if math.isfinite(z_max) else 0.0
    p = min(1.0, tests * p_min) if tests else 1.0
    return Check(result, bool(tests) and p < alpha, p, alpha, tests, worst, z_max, len(ds), ds.spec, ds.split, per_point)
