"""Rankings of two or more checkpoints -> Comparison: overlap@k, Jaccard, Spearman, Kendall,
and the bootstrap probability that the flagged sets coincide."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from beta_diag import checkpoint, ranking, scores
from beta_diag.configs import DataChoice, ModelChoice, RankConfig
from beta_diag.errors import ConfigError
from beta_diag.ranking import Ranking
from beta_diag.runtime import Progress
from beta_diag.session import Openable, open_session


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks by descending value, ties sharing their average rank."""
    order = np.argsort(-values, kind="stable")
    out = np.empty(len(values))
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        out[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the average ranks (ties handled); 1.0 when both are constant and equal."""
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float(np.array_equal(ra, rb))


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b over all pairs, ties counted as in tau-b."""
    concordant = discordant = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif da == db:
            concordant += 1
        else:
            discordant += 1
    denom = np.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    if denom == 0:  # an input without order: agreement only if both are constant, as in spearman
        return float(bool((a == a[0]).all() and (b == b[0]).all()))
    return float((concordant - discordant) / denom)


@dataclass(frozen=True)
class Pair:
    a: int
    b: int
    overlap: dict[int, float]  # k -> |top-k(A) & top-k(B)| / k
    overlap_ci: dict[int, tuple[float, float]]  # k -> bootstrap 5-95% interval
    jaccard: float  # of the flagged sets
    spearman: float
    kendall: float
    p_same_flags: float | None  # bootstrap probability that the flagged sets coincide
    p_chance: dict[int, float]  # k -> P(two random draws of k of the G groups share at least the observed top-k overlap)
    p_chance_flags: float  # the same for the flagged sets, with their sizes
    share_overlap: dict[int, tuple[float, float]]  # k -> overlap@k of A and of B with the top-k by parameter share


@dataclass(frozen=True)
class Comparison:
    """Rankings of the same groups in two or more checkpoints, side by side: each pair's overlap of flags
    (and its chance probability), rank correlations and bootstrap agreement; the groups flagged by all."""

    labels: tuple[str, ...]
    rankings: tuple[Ranking, ...]
    group_names: tuple[str, ...]
    pairs: tuple[Pair, ...]
    flagged_by_all: tuple[str, ...]
    flagged_by_majority: tuple[str, ...]

    @property
    def verdict(self) -> str:
        first = self.pairs[0]
        g = len(self.group_names)
        same = all(set(r.flagged) == set(self.rankings[0].flagged) for r in self.rankings)
        rho = min(p.spearman for p in self.pairs)
        who = "both" if len(self.rankings) == 2 else f"all {len(self.rankings)}"
        if same:
            flagged = self.rankings[0].flagged
            chance = f"; P(as much overlap by chance) {first.p_chance_flags:.2g}" if len(self.rankings) == 2 else ""
            return f"same {len(flagged)} of {g} groups flagged in {who}: {', '.join(flagged)}; Spearman {rho:.2f}{chance}"
        sets = "; ".join(f"{label}: {', '.join(r.flagged)}" for label, r in zip(self.labels, self.rankings))
        return f"flagged sets differ ({sets}); Jaccard {first.jaccard:.2f}, Spearman {rho:.2f}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "beta-diag-comparison",
            "verdict": self.verdict,
            "inputs": [
                {
                    "label": label,
                    "checkpoint": r.checkpoint,
                    "sha256": r.sha256,
                    "flagged": list(r.flagged),
                    "accuracy": r.accuracy,
                    "errors": len(r.error_index),
                    "drift_suspect": None if r.drift is None else r.drift.suspect,
                    "cause": None if r.cause is None else r.cause.to_dict(),
                    "notes": list(r.notes),
                }
                for label, r in zip(self.labels, self.rankings)
            ],
            "options": self.rankings[0].options(),
            "group_names": list(self.group_names),
            "groups": [{"name": n, "per_input": [_group_row(r, n) for r in self.rankings]} for n in self.group_names],
            "pairs": [
                {
                    "a": self.labels[p.a],
                    "b": self.labels[p.b],
                    "overlap_at_k": {str(k): v for k, v in p.overlap.items()},
                    "overlap_at_k_ci": {str(k): list(v) for k, v in p.overlap_ci.items()},
                    "jaccard": p.jaccard,
                    "spearman": p.spearman,
                    "kendall": p.kendall,
                    "p_same_flags": p.p_same_flags,
                    "p_chance_at_k": {str(k): v for k, v in p.p_chance.items()},
                    "p_chance_flags": p.p_chance_flags,
                    "share_overlap_at_k": {str(k): list(v) for k, v in p.share_overlap.items()},
                }
                for p in self.pairs
            ],
            "flagged_by_all": list(self.flagged_by_all),
            "flagged_by_majority": list(self.flagged_by_majority),
        }


def _group_row(r: Ranking, name: str) -> dict[str, Any]:
    g = r.group(name)
    return {"rank": g.rank, "score": g.score, "flagged": g.flagged, "p_flagged": g.p_flagged}


def _aligned(r: Ranking, names: tuple[str, ...], field: str) -> np.ndarray:
    """A per-group field of ``r`` in the order ``names`` (rankings may list groups in other orders)."""
    return np.array([getattr(r.group(n), field) for n in names])


def _replicates(rows: tuple[tuple[int, ...], ...] | tuple[tuple[bool, ...], ...], r: Ranking, names: tuple[str, ...]) -> np.ndarray:
    """(B, G) bootstrap rows of ``r`` with columns in the order ``names``."""
    col = [r.group_names.index(n) for n in names]
    return np.array(rows)[:, col]


def p_overlap_by_chance(total: int, ka: int, kb: int, shared: int) -> float:
    """P(|A & B| >= shared) for A, B drawn uniformly as ka- and kb-subsets of ``total`` groups (hypergeometric tail)."""
    ways = sum(math.comb(ka, i) * math.comb(total - ka, kb - i) for i in range(shared, min(ka, kb) + 1))
    return ways / math.comb(total, kb)


def _pair(i: int, j: int, a: Ranking, b: Ranking, top_k: int | None) -> Pair:
    names = a.group_names
    ks = sorted({len(a.flagged), len(b.flagged)} | ({top_k} if top_k else set()))
    ra, rb = _aligned(a, names, "rank"), _aligned(b, names, "rank")
    sa, sb = _aligned(a, names, "score"), _aligned(b, names, "score")
    overlap = {k: float(((ra <= k) & (rb <= k)).sum() / k) for k in ks}
    fa, fb = set(a.flagged), set(b.flagged)
    jaccard = len(fa & fb) / len(fa | fb) if fa | fb else 1.0
    ci: dict[int, tuple[float, float]] = {}
    p_same = None
    n = min(len(a.bootstrap_ranks), len(b.bootstrap_ranks))
    if n:
        bra, brb = _replicates(a.bootstrap_ranks[:n], a, names), _replicates(b.bootstrap_ranks[:n], b, names)
        for k in ks:
            per = ((bra <= k) & (brb <= k)).sum(1) / k
            ci[k] = (float(np.percentile(per, 5)), float(np.percentile(per, 95)))
        same = _replicates(a.bootstrap_flags[:n], a, names) == _replicates(b.bootstrap_flags[:n], b, names)
        p_same = float(same.all(1).mean())
    g = len(names)
    p_chance = {k: p_overlap_by_chance(g, k, k, round(overlap[k] * k)) for k in ks}
    share_rank = scores.ranks(_aligned(a, names, "param_share"))  # ties in model order, as a ranking's own
    share_overlap = {k: (float(((ra <= k) & (share_rank <= k)).sum() / k), float(((rb <= k) & (share_rank <= k)).sum() / k)) for k in ks}
    p_flags = p_overlap_by_chance(g, len(fa), len(fb), len(fa & fb))
    return Pair(i, j, overlap, ci, jaccard, spearman(sa, sb), kendall_tau_b(sa, sb), p_same, p_chance, p_flags, share_overlap)


def compare_rankings(rankings: list[Ranking], labels: list[str] | None = None, top_k: int | None = None) -> Comparison:
    """Compare rankings made with the same options over the same groups."""
    if len(rankings) < 2:
        raise ConfigError("compare needs two or more checkpoints or rankings")
    labels = labels or [r.checkpoint for r in rankings]
    first = rankings[0]
    for label, r in zip(labels[1:], rankings[1:]):
        if set(r.group_names) != set(first.group_names):
            differ = sorted(set(r.group_names) ^ set(first.group_names))
            raise ConfigError(
                f"{label} has other layer groups than {labels[0]} (differing: "
                f"{', '.join(differ[:8])}): compare checkpoints of one architecture"
            )
        for key, value in first.options().items():
            if r.options().get(key) != value:
                raise ConfigError(
                    f"{label} was ranked with {key}={r.options().get(key)!r}, {labels[0]} with {value!r}: rank both with the same options"
                )
    pairs = tuple(_pair(i, j, rankings[i], rankings[j], top_k) for i, j in itertools.combinations(range(len(rankings)), 2))
    names = first.group_names
    counts = {n: sum(n in r.flagged for r in rankings) for n in names}
    return Comparison(
        tuple(labels),
        tuple(rankings),
        names,
        pairs,
        tuple(n for n in names if counts[n] == len(rankings)),
        tuple(n for n in names if counts[n] > len(rankings) / 2),
    )


def _load_saved(path: Path) -> Ranking:
    saved = ranking.load(path)
    ckpt = Path(saved.checkpoint)
    if ckpt.is_file() and checkpoint.file_sha256(ckpt) != saved.sha256:
        raise ConfigError(f"{path} is stale: {ckpt} changed since it was ranked (sha256 differs): rerun beta-diag rank --out")
    return saved


def compare(
    inputs: Sequence[Openable],
    *,
    data: DataChoice = DataChoice(),
    config: RankConfig = RankConfig(),
    device: str = "auto",
    progress: Progress | None = None,
    model: ModelChoice | None = None,
) -> Comparison:
    """Rank each checkpoint (or read each saved ranking) with identical options, then compare.

    ``config.top_k``: flag exactly K groups in each and report overlap@K (default: the largest-gap rule).
    ``model`` (``--arch``, ``--input-size`` and the other model options) applies to every checkpoint
    given, for plain state dicts. The data is decoded once for all checkpoints. Example:
    ``compare(['sgd.safetensors', 'adam.safetensors']).verdict``.
    """
    paths = [p.path if isinstance(p, checkpoint.Checkpoint) else Path(p) for p in inputs]
    top_k = config.top_k  # overlap@K as asked, also when saved rankings bring their own options
    saved = {
        i: _load_saved(p) for i, p in enumerate(paths) if p.suffix.lower() == ".json" and not isinstance(inputs[i], checkpoint.Checkpoint)
    }
    sessions = {
        i: open_session(inputs[i] if isinstance(inputs[i], checkpoint.Checkpoint) else p, device=device, model=model)
        for i, p in enumerate(paths)
        if i not in saved
    }
    specs = {i: s.resolve_data(data) for i, s in sessions.items()}
    if len(set(specs.values())) > 1:
        listed = ", ".join(f"{paths[i]}: {sp}" for i, (sp, _) in specs.items())
        raise ConfigError(f"the checkpoints name different data ({listed}): pass --data to rank all on the same data")
    if saved and sessions:  # rank checkpoints with the options of the saved ranking, so that they compare
        ref = next(iter(saved.values()))
        config = replace(ref.config, by_class=config.by_class)
        data = DataChoice(data.spec or ref.data, ref.split, ref.limit, ref.config.seed)
    dataset = sessions[min(sessions)].load_data(data) if sessions else None
    results: dict[int, Ranking] = dict(saved)
    done: dict[str, Ranking] = {}
    for i, session in sessions.items():
        if session.ckpt.sha256 not in done:  # the same file twice is ranked once
            done[session.ckpt.sha256] = ranking.rank(session, data=data, config=config, dataset=dataset, progress=progress)
        results[i] = done[session.ckpt.sha256]
    return compare_rankings([results[i] for i in range(len(paths))], [str(p) for p in paths], top_k)
