"""Per-example gradient norms -> group scores, ranks, flags and bootstrap stability (pure numpy).

Everything here derives from per-example matrices (examples x groups): squared gradient norms on
the errors ``E`` and, when asked for, on a same-size sample of correct examples ``C`` (contrast,
specific); the norms of the errors' summed gradient per group, exact; and, for the bootstrap of
coherence, the errors' dot products with that summed gradient ``D`` (estimated by ``sketch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from beta_diag.configs import Metric


@dataclass(frozen=True)
class Matrices:
    """Per-example inputs of the scores; rows are examples, columns groups."""

    errors: np.ndarray  # (Ne, G) squared norms
    correct: np.ndarray  # (Nc, G) squared norms; no rows when the correct examples were not scored
    summed_norm: np.ndarray  # (G,) ||S_g||, S_g = sum of the errors' gradients of group g
    numel: np.ndarray  # (G,) parameters per group
    weight_norm: np.ndarray  # (G,) ||theta_g||
    dots: np.ndarray | None = None  # (Ne, G) <g_i, S_g>, summing to ||S_g||^2; needed only to bootstrap coherence


def shares(sq: np.ndarray) -> np.ndarray:
    total = sq.sum(-1, keepdims=True)
    return np.divide(sq, total, out=np.zeros_like(sq), where=total > 0)


def scores(m: Matrices, err_w: np.ndarray | None = None, cor_w: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every metric per group (NaN where its inputs were not computed). ``err_w``/``cor_w`` (B, N)
    resampling weights give (B, G) bootstrap replicates."""
    ew = np.ones((1, m.errors.shape[0])) if err_w is None else err_w
    cw = np.ones((1, m.correct.shape[0])) if cor_w is None else cor_w
    ne, nc = ew.sum(1, keepdims=True), np.maximum(cw.sum(1, keepdims=True), 1)
    err_norm = np.sqrt(m.errors)
    norm = ew @ err_norm / ne
    norm_c = cw @ np.sqrt(m.correct) / nc
    s_norm = m.summed_norm
    if err_w is None:
        proj = s_norm[None]  # the full sample: ||S|| itself
    elif m.dots is not None:  # ||S*|| of a resample, to first order: its projection on S
        proj = ew @ m.dots / np.where(s_norm > 0, s_norm, 1)
    else:
        proj = np.full((ew.shape[0], len(s_norm)), np.nan)
    no_correct = np.nan if m.correct.shape[0] == 0 else 1.0
    out = {
        Metric.norm.value: norm,
        Metric.per_param.value: norm / np.sqrt(m.numel),
        Metric.weight_rel.value: norm / np.where(m.weight_norm > 0, m.weight_norm, 1),
        Metric.contrast.value: np.divide(norm, norm_c, out=np.zeros_like(norm), where=norm_c > 0) * no_correct,
        Metric.share.value: norm / np.maximum(norm.sum(1, keepdims=True), 1e-300),
        Metric.specific.value: (ew @ shares(m.errors) / ne - cw @ shares(m.correct) / nc) * no_correct,
        Metric.coherence.value: np.divide(proj, ew @ err_norm, out=np.zeros_like(proj), where=ew @ err_norm > 0),
        "norm_correct": norm_c * no_correct,
    }
    return out if err_w is not None else {k: v[0] for k, v in out.items()}


def order(values: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties keep model order (stable)."""
    return np.argsort(-values, axis=-1, kind="stable")


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based rank of each group (1 = highest score), along the last axis."""
    idx = order(values)
    out = np.empty_like(idx)
    np.put_along_axis(out, idx, np.arange(1, values.shape[-1] + 1) + np.zeros_like(idx), axis=-1)
    return out


def flag_count(values: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """How many top groups to flag: ``top_k``, or the largest gap in the sorted scores among the
    first floor(G/2) positions (at least 1). Works on (G,) or (B, G)."""
    g = values.shape[-1]
    if top_k is not None:
        return np.full(values.shape[:-1], min(top_k, g))
    bound = max(1, g // 2)
    ordered = -np.sort(-values, axis=-1)
    gaps = ordered[..., :bound] - ordered[..., 1 : bound + 1] if g > 1 else np.zeros(values.shape[:-1] + (1,))
    return np.argmax(gaps, axis=-1) + 1  # first of equal gaps: the smaller set


def flags(values: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Boolean flags per group (same shape as ``values``)."""
    k = flag_count(values, top_k)
    return ranks(values) <= np.expand_dims(k, -1)


@dataclass(frozen=True)
class Stability:
    p_flagged: np.ndarray  # (G,)
    rank_lo: np.ndarray  # (G,) 5th percentile of the rank
    rank_hi: np.ndarray  # (G,) 95th percentile
    score_lo: np.ndarray  # (G,) 5th percentile of the score
    score_hi: np.ndarray  # (G,) 95th percentile
    flag_sets: np.ndarray  # (B, G) bool: each replicate's flags (compare uses them)
    replicate_ranks: np.ndarray  # (B, G) each replicate's ranks


def bootstrap(m: Matrices, metric: Metric, top_k: int | None, replicates: int, seed: int) -> Stability:
    """Resample errors (and the correct sample) with replacement; rank and flag each replicate."""
    rng = np.random.default_rng(seed)
    ne, nc = m.errors.shape[0], m.correct.shape[0]
    ew = np.stack([np.bincount(rng.integers(0, ne, ne), minlength=ne) for _ in range(replicates)]).astype(float)
    cw = (
        np.stack([np.bincount(rng.integers(0, nc, nc), minlength=nc) for _ in range(replicates)]).astype(float)
        if nc
        else np.zeros((replicates, 0))
    )
    values = scores(m, ew, cw)[Metric(metric).value]
    rk, fl = ranks(values), flags(values, top_k)
    return Stability(
        fl.mean(0),
        np.percentile(rk, 5, axis=0),
        np.percentile(rk, 95, axis=0),
        np.percentile(values, 5, axis=0),
        np.percentile(values, 95, axis=0),
        fl,
        rk,
    )
