"""The ranking of a checkpoint: evaluate, attribute on the errors, score, flag, bootstrap.

Scores and flag rules live in ``scores``; this module runs them on a checkpoint and records the
result as a frozen ``Ranking`` that ``report`` renders and ``compare``/``repair`` reuse.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from beta_diag import causes, fingerprint, outputs
from beta_diag import control as control_mod
from beta_diag.attribution import per_example_norms
from beta_diag.causes import Cause
from beta_diag.configs import DataChoice, Granularity, Metric, RankConfig
from beta_diag.data import Dataset
from beta_diag.drift import Drift
from beta_diag.errors import ConfigError, NoErrorsToDiagnose
from beta_diag.groups import Group, layer_groups
from beta_diag.runtime import Predictions, Progress
from beta_diag.scores import (  # noqa: F401  (re-exported for callers of ranking.*)
    Matrices,
    Stability,
    bootstrap,
    flag_count,
    flags,
    order,
    ranks,
    scores,
    shares,
)
from beta_diag.session import Openable, Session, open_session

FORMAT = "beta-diag-ranking"


@dataclass(frozen=True, kw_only=True)
class GroupScore:
    name: str
    numel: int
    param_share: float
    scores: dict[str, float | None]  # every metric, plus norm_correct; None where not computed
    score: float  # the ranking metric's value
    rank: int
    flagged: bool
    p_flagged: float
    rank_lo: float  # bootstrap 5-95% interval of the rank
    rank_hi: float
    score_lo: float  # and of the score
    score_hi: float


@dataclass(frozen=True, kw_only=True)
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
    drift: Drift | None = None  # activation drift against the BatchNorms' running statistics (None in rankings saved before it)
    notes: tuple[str, ...] = ()  # what opening the checkpoint assumed or converted (Checkpoint.notes)
    cause: Cause | None = None  # what is wrong, from the control pass and the probe (None in rankings saved before it)
    matrices: Matrices | None = field(default=None, compare=False, repr=False)
    predictions: Predictions | None = field(default=None, compare=False, repr=False)  # the evaluation it ranked (not saved)

    def group(self, name: str) -> GroupScore:
        """The scores of the group called ``name``."""
        return next(g for g in self.groups if g.name == name)

    @property
    def flagged(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups if g.flagged)

    @property
    def flag_finding(self) -> str:
        return f"{len(self.flagged)} of {len(self.groups)} groups flagged: {', '.join(self.flagged)}"

    @property
    def verdict(self) -> str:
        """The cause first, then where activations drift and where the errors' gradients point (the flags)."""
        where = self.place_finding
        return where if self.cause is None else f"{self.cause.kind}: {self.cause.summary}; suggested: {self.cause.suggested}. {where}"

    @property
    def place_finding(self) -> str:
        """Both findings on place: where activations drift (the damage) and where the errors' gradients point (the flags)."""
        if self.drift is None:
            return self.flag_finding
        if self.drift.suspect is not None:
            return f"{self.drift.finding}; {self.flag_finding} ({self.config.metric.value}: where a change fixes errors most directly)"
        return f"{self.flag_finding}; {self.drift.finding}"

    def options(self) -> dict[str, Any]:
        """What must match for two rankings to be comparable."""
        return {
            "data": self.data,
            "split": self.split,
            "limit": self.limit,
            **{k: v for k, v in self.config.to_dict().items() if k not in ("by_class",)},
        }

    def save(self, path: str | Path, *, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
        """``save(self, path)``."""
        save(self, path, force=force, inputs=inputs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("matrices")
        d.pop("predictions")
        d["config"] = self.config.to_dict()
        d["drift"] = None if self.drift is None else self.drift.to_dict()
        d["cause"] = None if self.cause is None else self.cause.to_dict()
        d["format"], d["flagged"], d["verdict"], d["errors"] = FORMAT, list(self.flagged), self.verdict, len(self.error_index)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ranking:
        c = dict(d["config"])
        config = RankConfig(
            metric=Metric(c["metric"]),
            granularity=Granularity(c["granularity"]),
            top_k=c["top_k"],
            bootstrap=c["bootstrap"],
            seed=c["seed"],
            by_class=c["by_class"],
            include=tuple(c["include"]),
            contrast=c.get("contrast", False),  # rankings saved before --contrast scored the correct sample always
            control=c.get("control", 0),  # rankings saved before the control pass had none
        )
        return cls(
            checkpoint=d["checkpoint"],
            sha256=d["sha256"],
            data=d["data"],
            split=d["split"],
            limit=d["limit"],
            config=config,
            examples=d["examples"],
            accuracy=d["accuracy"],
            error_index=tuple(d["error_index"]),
            correct_sampled=d["correct_sampled"],
            groups=tuple(GroupScore(**g) for g in d["groups"]),
            bootstrap_flags=tuple(tuple(r) for r in d["bootstrap_flags"]),
            bootstrap_ranks=tuple(tuple(r) for r in d["bootstrap_ranks"]),
            group_names=tuple(d["group_names"]),
            by_class=d.get("by_class"),
            drift=Drift.from_dict(d["drift"]) if d.get("drift") else None,
            notes=tuple(d.get("notes", ())),
            cause=Cause.from_dict(d["cause"]) if d.get("cause") else None,
        )


def save(r: Ranking, path: str | Path, *, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write a ranking as JSON (``rank --out``), under the output rule (``inputs``: files it may not replace); ``load`` reads it back."""
    from beta_diag.serial import dumps

    out = Path(path)
    outputs.check_output(out, force, (Path(r.checkpoint), *inputs))
    with outputs.atomic_path(out, force) as tmp:
        tmp.write_text(dumps(r.to_dict()) + "\n")


def load(path: str | Path) -> Ranking:
    """Read a ranking saved by ``rank --out`` or ``save``."""
    path = Path(path)
    outputs.check_input(path, "ranking", ConfigError)
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError("not a ranking")
        return Ranking.from_dict(d)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such ranking file: check the path or rerun beta-diag rank --out") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ConfigError(f"{path}: not a ranking saved by beta-diag rank --out: rerun rank with --out") from None


def _select_groups(every: list[Group], config: RankConfig) -> list[Group]:
    found = every
    if config.include:
        found = [g for g in found if any(fnmatch.fnmatchcase(g.name, pat) for pat in config.include)]
        if not found:
            names = ", ".join(g.name for g in every[:12])
            raise ConfigError(
                f"--groups {','.join(config.include)} matches no {Granularity(config.granularity).value}: names are {names}, ..."
            )
    if config.top_k is not None and not 1 <= config.top_k <= len(found):
        raise ConfigError(f"--top-k {config.top_k}: there are {len(found)} groups; pass a number from 1 to {len(found)}")
    config.check()
    return found


def _matrices(
    session: Session,
    ds: Dataset,
    wrong: torch.Tensor,
    sample: torch.Tensor,
    found: list[Group],
    config: RankConfig,
    progress: Progress | None,
) -> Matrices:
    """The one attribution pass over the errors (and, with ``--contrast``, one over the correct sample), per group."""
    model, dev, pre = session.model, session.device, session.preprocess
    sketch = config.bootstrap > 0 and Metric(config.metric) is Metric.coherence  # the bootstrap of coherence needs <g_i, S>
    sketch_groups = [list(g.param_names) for g in found] if sketch else None
    err = per_example_norms(model, ds, wrong, pre, dev, config.batch_size, sketch_groups, progress, config.seed)  # one pass
    cor = per_example_norms(model, ds, sample, pre, dev, config.batch_size, None, progress) if sample.numel() else None
    col = {n: j for j, n in enumerate(err.names)}
    assign = np.zeros((len(err.names), len(found)))  # (P, G): which parameter belongs to which group
    for j, g in enumerate(found):
        assign[[col[p] for p in g.param_names if p in col], j] = 1.0
    params = dict(model.named_parameters())
    weight_norm = np.array([float(sum(params[p].detach().double().pow(2).sum() for p in g.param_names)) ** 0.5 for g in found])
    summed_sq = np.array([sum(float(err.summed[p].double().pow(2).sum()) for p in g.param_names if p in err.summed) for g in found])
    return Matrices(
        err.sq_norms.numpy() @ assign,
        cor.sq_norms.numpy() @ assign if cor is not None else np.zeros((0, len(found))),
        np.sqrt(summed_sq),
        np.array([g.numel for g in found], dtype=float),
        weight_norm,
        err.sketch.dots(summed_sq) if err.sketch is not None else None,
    )


def _scored(found: list[Group], m: Matrices, config: RankConfig, total: int) -> tuple[list[GroupScore], Stability | None]:
    """Each group's scores, rank and flag, and their bootstrap intervals (None without replicates)."""
    values = scores(m)
    main = values[Metric(config.metric).value]
    rk, fl = ranks(main), flags(main, config.top_k)
    stab = bootstrap(m, config.metric, config.top_k, config.bootstrap, config.seed) if config.bootstrap else None
    rows = [
        GroupScore(
            name=g.name,
            numel=g.numel,
            param_share=g.numel / total,
            scores={k: None if np.isnan(v[j]) else float(v[j]) for k, v in values.items()},  # None: not computed (contrast off)
            score=float(main[j]),
            rank=int(rk[j]),
            flagged=bool(fl[j]),
            p_flagged=float(stab.p_flagged[j]) if stab else float(fl[j]),
            rank_lo=float(stab.rank_lo[j]) if stab else float(rk[j]),
            rank_hi=float(stab.rank_hi[j]) if stab else float(rk[j]),
            score_lo=float(stab.score_lo[j]) if stab else float(main[j]),
            score_hi=float(stab.score_hi[j]) if stab else float(main[j]),
        )
        for j, g in enumerate(found)
    ]
    return rows, stab


def rank(
    ckpt: Openable | Session,
    *,
    data: DataChoice = DataChoice(),
    config: RankConfig = RankConfig(),
    device: str = "auto",
    dataset: Dataset | None = None,
    progress: Progress | None = None,
    train: DataChoice = DataChoice(split="train"),
) -> Ranking:
    """Rank the layer groups of a checkpoint by gradient attribution over its misclassified examples.

    ``train``: the training data of the control pass (default: the checkpoint's own; ``config.control``
    images of it, 0: none). Raises NoErrorsToDiagnose when every example is right. Example:
    ``rank('sample_checkpoints/fmnist_resnet18w16_sgd_beta.safetensors').verdict``.
    """
    session = ckpt if isinstance(ckpt, Session) else open_session(ckpt, device=device)
    every = layer_groups(session.model, config.granularity)  # drift looks at all of them, the ranking at those --groups selects
    found = _select_groups(every, config)
    ds = dataset if dataset is not None else session.load_data(data)
    recorder = fingerprint.recorder(session.ckpt.fingerprint, session.model, every)  # drift rides the evaluation pass
    try:
        preds = session.evaluate(ds, progress, on_batch=recorder.commit)
    finally:
        recorder.remove()
    drift = recorder.result(every)
    wrong = torch.nonzero(~preds.correct).flatten()
    right = torch.nonzero(preds.correct).flatten()
    if wrong.numel() == 0:
        raise NoErrorsToDiagnose(
            f"the model classifies all {len(ds)} examples of {ds.spec} ({ds.split}) "
            "correctly: nothing to rank; use more data or another split"
        )
    if right.numel() == 0 and config.metric_needs_correct:
        raise ConfigError(
            f"--metric {Metric(config.metric).value} compares the errors with correct examples, and {ds.spec} ({ds.split}) has none: "
            "use --metric coherence, or data the model gets partly right"
        )
    control = replace(train, split=train.split or "train", limit=config.control, seed=config.seed) if config.control else None
    cause = control_mod.diagnose(session, ds, preds, drift, every, control, progress)
    gen = torch.Generator().manual_seed(config.seed)
    sample = right[torch.randperm(right.numel(), generator=gen)[: wrong.numel()]].sort().values if config.scores_correct else right[:0]
    m = _matrices(session, ds, wrong, sample, found, config, progress)
    rows, stab = _scored(found, m, config, sum(p.numel() for p in session.model.parameters()))
    by_class = None
    if config.by_class:
        load, labels = shares(m.errors), ds.labels[wrong].numpy()
        by_class = {ds.class_names[c]: {g.name: float(load[labels == c, j].mean()) for j, g in enumerate(found)} for c in np.unique(labels)}
    return Ranking(
        checkpoint=str(session.ckpt.path),
        sha256=session.ckpt.sha256,
        data=ds.spec,
        split=ds.split,
        limit=data.limit,
        config=config,
        examples=len(ds),
        accuracy=preds.accuracy,
        error_index=tuple(int(i) for i in wrong),
        correct_sampled=int(sample.numel()),
        groups=tuple(sorted(rows, key=lambda r: r.rank)),
        bootstrap_flags=tuple(tuple(bool(b) for b in row) for row in stab.flag_sets) if stab else (),
        bootstrap_ranks=tuple(tuple(int(b) for b in row) for row in stab.replicate_ranks) if stab else (),
        group_names=tuple(g.name for g in found),
        by_class=by_class,
        drift=drift,
        notes=session.ckpt.notes + ds.notes + tuple(session.preprocess.conversions(tuple(ds.images.shape[1:]))) + causes.notes(cause),
        cause=cause,
        matrices=m,
        predictions=preds,
    )
