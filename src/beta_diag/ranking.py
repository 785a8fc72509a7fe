"""Per-example gradient norms -> group scores -> ranking, flags and bootstrap stability.

Everything here derives from three per-example matrices (examples x groups): squared gradient
norms on the errors ``E`` and on a same-size sample of correct examples ``C``, and the errors'
dot products with their own summed gradient ``D`` (for coherence).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

DEFAULT_BOOTSTRAP = 200


class Metric(str, Enum):
    coherence = "coherence"  # ||sum of error gradients|| / sum of their norms: do the errors agree on a direction?
    specific = "specific"  # mean share of the squared gradient on errors minus on correct examples
    norm = "norm"  # mean error-gradient norm
    per_param = "per_param"  # norm / sqrt(parameters)
    weight_rel = "weight_rel"  # norm / ||theta_g||
    contrast = "contrast"  # norm on errors / norm on correct examples
    share = "share"  # the group's share of the summed error-gradient norms


DEFAULT_METRIC = Metric.coherence


@dataclass(frozen=True)
class Matrices:
    """Per-example inputs of the scores; rows are examples, columns groups."""

    errors: np.ndarray  # (Ne, G) squared norms
    correct: np.ndarray  # (Nc, G) squared norms
    dots: np.ndarray  # (Ne, G) <g_i, S_g>, S_g = sum of the errors' gradients of group g
    numel: np.ndarray  # (G,) parameters per group
    weight_norm: np.ndarray  # (G,) ||theta_g||


def _shares(sq: np.ndarray) -> np.ndarray:
    total = sq.sum(-1, keepdims=True)
    return np.divide(sq, total, out=np.zeros_like(sq), where=total > 0)


def scores(m: Matrices, err_w: np.ndarray | None = None, cor_w: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every metric per group. ``err_w``/``cor_w`` (B, N) resampling weights give (B, G) bootstrap replicates."""
    ew = np.ones((1, m.errors.shape[0])) if err_w is None else err_w
    cw = np.ones((1, m.correct.shape[0])) if cor_w is None else cor_w
    ne, nc = ew.sum(1, keepdims=True), np.maximum(cw.sum(1, keepdims=True), 1)
    err_norm = np.sqrt(m.errors)
    norm = ew @ err_norm / ne
    norm_c = cw @ np.sqrt(m.correct) / nc
    s_norm = np.sqrt(np.maximum(m.dots.sum(0), 0))  # ||S_g||, exactly, since sum_i <g_i, S> = ||S||^2
    # ||S*|| of a resample, to first order: its projection on S. Exact for the full sample.
    proj = ew @ m.dots / np.where(s_norm > 0, s_norm, 1)
    out = {
        Metric.norm.value: norm,
        Metric.per_param.value: norm / np.sqrt(m.numel),
        Metric.weight_rel.value: norm / np.where(m.weight_norm > 0, m.weight_norm, 1),
        Metric.contrast.value: np.divide(norm, norm_c, out=np.zeros_like(norm), where=norm_c > 0),
        Metric.share.value: norm / np.maximum(norm.sum(1, keepdims=True), 1e-300),
        Metric.specific.value: ew @ _shares(m.errors) / ne - cw @ _shares(m.correct) / nc,
        Metric.coherence.value: np.divide(proj, ew @ err_norm, out=np.zeros_like(proj), where=ew @ err_norm > 0),
        "norm_correct": norm_c,
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
    cw = np.stack([np.bincount(rng.integers(0, nc, nc), minlength=nc) for _ in range(replicates)]).astype(float) if nc else np.zeros((replicates, 0))
    values = scores(m, ew, cw)[Metric(metric).value]
    rk, fl = ranks(values), flags(values, top_k)
    return Stability(
        fl.mean(0), np.percentile(rk, 5, axis=0), np.percentile(rk, 95, axis=0), np.percentile(values, 5, axis=0), np.percentile(values, 95, axis=0), fl, rk,
    )


# --- the ranking of a checkpoint ---------------------------------------------------------------

import fnmatch  # noqa: E402
import json  # noqa: E402
from dataclasses import asdict, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from beta_diag.attribution import Progress, per_example_norms, summed_gradient  # noqa: E402
from beta_diag.data import Dataset  # noqa: E402
from beta_diag.errors import ConfigError, NoErrorsToDiagnose  # noqa: E402
from beta_diag.groups import Granularity, layer_groups  # noqa: E402
from beta_diag.session import DataChoice, Session, open_session  # noqa: E402

FORMAT = "beta-diag-ranking"


@dataclass(frozen=True)
class RankConfig:
    """How to rank. ``include``: glob patterns restricting the groups (e.g. ``layer3*``)."""

    metric: Metric = DEFAULT_METRIC
    granularity: Granularity = Granularity.group
    top_k: int | None = None
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    by_class: bool = False
    include: tuple[str, ...] = ()
    batch_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metric"], d["granularity"], d["include"] = Metric(self.metric).value, Granularity(self.granularity).value, list(self.include)
        d.pop("batch_size")
        return d


@dataclass(frozen=True)
class GroupScore:
    name: str
    numel: int
    param_share: float
    scores: dict[str, float]  # every metric, plus norm_correct
    score: float  # the ranking metric's value
    rank: int
    flagged: bool
    p_flagged: float
    rank_lo: float  # bootstrap 5-95% interval of the rank
    rank_hi: float
    score_lo: float  # and of the score
    score_hi: float


@dataclass(frozen=True)
class Ranking:
    """Which layer groups carry a checkpoint's errors. Render with ``report``; save with ``save``."""

    checkpoint: str
    sha256: str
    data: str
    split: str
    limit: int | None
    config: RankConfig
    examples: int
    accuracy: float
    error_index: tuple[int, ...]
    correct_sampled: int
    groups: tuple[GroupScore, ...]  # in rank order
    bootstrap_flags: tuple[tuple[bool, ...], ...]  # (B, G) in model order of ``group_names``
    bootstrap_ranks: tuple[tuple[int, ...], ...]  # (B, G) likewise
    group_names: tuple[str, ...]  # model order
    by_class: dict[str, dict[str, float]] | None = None
    matrices: Matrices | None = field(default=None, compare=False, repr=False)

    @property
    def flagged(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups if g.flagged)

    @property
    def verdict(self) -> str:
        return f"{len(self.flagged)} of {len(self.groups)} groups flagged: {', '.join(self.flagged)}"

    def options(self) -> dict[str, Any]:
        """What must match for two rankings to be comparable."""
        return {"data": self.data, "split": self.split,
                "limit": self.limit, **{k: v for k, v in self.config.to_dict().items() if k not in ("by_class",)}}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("matrices")
        d["config"] = self.config.to_dict()
        d["format"], d["flagged"], d["verdict"], d["errors"] = FORMAT, list(self.flagged), self.verdict, len(self.error_index)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ranking:
        c = dict(d["config"])
        config = RankConfig(Metric(c["metric"]), Granularity(c["granularity"]), c["top_k"], c["bootstrap"], c["seed"], c["by_class"], tuple(c["include"]))
        return cls(
            d["checkpoint"], d["sha256"], d["data"], d["split"], d["limit"], config, d["examples"], d["accuracy"], tuple(d["error_index"]),
            d["correct_sampled"], tuple(GroupScore(**g) for g in d["groups"]), tuple(tuple(r) for r in d["bootstrap_flags"]),
            tuple(tuple(r) for r in d["bootstrap_ranks"]), tuple(d["group_names"]), d.get("by_class"),
        )


def load(path: str | Path) -> Ranking:
    """Read a ranking saved by ``rank --out``."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError("not a ranking")
        return Ranking.from_dict(d)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such ranking file: check the path or rerun beta-diag rank --out") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ConfigError(f"{path}: not a ranking saved by beta-diag rank --out: rerun rank with --out") from None


def _select_groups(session: Session, config: RankConfig) -> list:
    found = layer_groups(session.model, config.granularity)
    if config.include:
        found = [g for g in found if any(fnmatch.fnmatchcase(g.name, pat) for pat in config.include)]
        if not found:
            names = ", ".join(g.name for g in layer_groups(session.model, config.granularity)[:12])
            raise ConfigError(f"--groups {','.join(config.include)} matches no {Granularity(config.granularity).value}: names are {names}, ...")
    if config.top_k is not None and not 1 <= config.top_k <= len(found):
        raise ConfigError(f"--top-k {config.top_k}: there are {len(found)} groups; pass a number from 1 to {len(found)}")
    if config.bootstrap < 0:
        raise ConfigError("--bootstrap must be 0 or more replicates")
    return found


def rank(
    ckpt: str | Path | Session, data: DataChoice = DataChoice(), config: RankConfig = RankConfig(), device: str = "auto",
    dataset: Dataset | None = None, progress: Progress | None = None,
) -> Ranking:
    """Rank the layer groups of a checkpoint by gradient attribution over its misclassified examples.

    Raises NoErrorsToDiagnose when every example is right. Example:
    ``rank('sample_checkpoints/fmnist_resnet18w16_sgd_beta.safetensors').verdict``.
    """
    session = ckpt if isinstance(ckpt, Session) else open_session(ckpt, device)
    found = _select_groups(session, config)
    ds = dataset if dataset is not None else session.load_data(data)
    preds = session.evaluate(ds, progress)
    wrong = torch.nonzero(~preds.correct).flatten()
    right = torch.nonzero(preds.correct).flatten()
    if wrong.numel() == 0:
        raise NoErrorsToDiagnose(f"the model classifies all {len(ds)} examples of {ds.spec} ({ds.split}) correctly: nothing to rank; use more data or another split")
    gen = torch.Generator().manual_seed(config.seed)
    sample = right[torch.randperm(right.numel(), generator=gen)[: wrong.numel()]].sort().values
    model, dev, pre = session.model, session.device, session.preprocess
    direction = summed_gradient(model, ds, wrong, pre, dev) if Metric(config.metric) is Metric.coherence else None
    err = per_example_norms(model, ds, wrong, pre, dev, config.batch_size, direction, progress)
    cor = per_example_norms(model, ds, sample, pre, dev, config.batch_size, None, progress)
    col = {n: j for j, n in enumerate(err.names)}
    assign = np.zeros((len(err.names), len(found)))  # (P, G): which parameter belongs to which group
    for j, g in enumerate(found):
        assign[[col[p] for p in g.param_names if p in col], j] = 1.0
    params = dict(model.named_parameters())
    weight_norm = np.array([float(sum(params[p].detach().double().pow(2).sum() for p in g.param_names)) ** 0.5 for g in found])
    m = Matrices(
        err.sq_norms.numpy() @ assign, cor.sq_norms.numpy() @ assign,
        err.dots.numpy() @ assign if err.dots is not None else np.zeros((wrong.numel(), len(found))),
        np.array([g.numel for g in found], dtype=float), weight_norm,
    )
    values = scores(m)
    if direction is None:
        values[Metric.coherence.value] = np.full(len(found), np.nan)
    main = values[Metric(config.metric).value]
    rk, fl = ranks(main), flags(main, config.top_k)
    stab = bootstrap(m, config.metric, config.top_k, config.bootstrap, config.seed) if config.bootstrap else None
    total = sum(p.numel() for p in model.parameters())
    rows = [
        GroupScore(
            g.name, g.numel, g.numel / total, {k: float(v[j]) for k, v in values.items()}, float(main[j]), int(rk[j]), bool(fl[j]),
            float(stab.p_flagged[j]) if stab else float(fl[j]), float(stab.rank_lo[j]) if stab else float(rk[j]),
            float(stab.rank_hi[j]) if stab else float(rk[j]), float(stab.score_lo[j]) if stab else float(main[j]),
            float(stab.score_hi[j]) if stab else float(main[j]),
        )
        for j, g in enumerate(found)
    ]
    by_class = None
    if config.by_class:
        shares, labels = _shares(m.errors), ds.labels[wrong].numpy()
        by_class = {ds.class_names[c]: {g.name: float(shares[labels == c, j].mean()) for j, g in enumerate(found)} for c in np.unique(labels)}
    return Ranking(
        str(session.ckpt.path), session.ckpt.sha256, ds.spec, ds.split, data.limit, config, len(ds), preds.accuracy,
        tuple(int(i) for i in wrong), int(sample.numel()), tuple(sorted(rows, key=lambda r: r.rank)),
        tuple(tuple(bool(b) for b in row) for row in stab.flag_sets) if stab else (),
        tuple(tuple(int(b) for b in row) for row in stab.replicate_ranks) if stab else (), tuple(g.name for g in found), by_class, m,
    )
