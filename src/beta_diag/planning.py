"""Repair's plan: which groups (or the search's candidates) and parameters, the training, validation,
verification and keep data, the frozen-prefix cut, and what planning already computed: the hand-off from
``plan`` to ``repairing.apply``, which a user can read (``repair --dry-run``) before any training."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beta_diag import groups, prefix, ranking, search
from beta_diag.configs import AutoLayers, DataChoice, Granularity, Layers, RankConfig, RepairConfig, RepairMethod
from beta_diag.data import Dataset
from beta_diag.errors import BetaDiagError, ConfigError
from beta_diag.ranking import Ranking
from beta_diag.recalibration import tracked_norms
from beta_diag.runtime import Predictions, Progress
from beta_diag.search import Candidate
from beta_diag.session import Openable, Session, open_session
from beta_diag.tuning import predict

ERRORS_SHARE = 0.25  # --focus errors: the training errors plus three times as many correct examples
RECALIBRATED = "BatchNorm statistics"  # what --method recalibrate changes, in place of groups


def auto_groups(r: Ranking, policy: AutoLayers | str = AutoLayers.flags) -> list[str]:
    """The groups ``--layers auto`` repairs under ``policy``, in the ranking's order."""
    policy = AutoLayers(policy)
    suspect = r.drift.suspect if r.drift is not None else None
    if policy is AutoLayers.flags or suspect is None:  # search: its "suspect and flags" candidate is both
        return list(r.flagged)
    if policy is AutoLayers.suspect:
        return [suspect]
    return [suspect] + [g for g in r.flagged if g != suspect]


def resolve_layers(model: nn.Module, layers: list[str]) -> list[str]:
    """Names of groups, blocks or modules -> parameter names; unknown names list the valid groups."""
    if not layers:
        raise ConfigError("--layers names nothing: pass auto or a comma list such as layer3,fc")
    known = {g.name: g for gran in Granularity for g in groups.layer_groups(model, gran)}
    unknown = sorted(n for n in layers if n not in known)
    if unknown:
        valid = ", ".join(g.name for g in groups.layer_groups(model))
        raise ConfigError(
            f"--layers: unknown name(s) {', '.join(unknown)}: use groups ({valid}), "
            "or their blocks/modules (see beta-diag rank --granularity module)"
        )
    return sorted({p for n in layers for p in known[n].param_names}, key=list(dict(model.named_parameters())).index)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a repair will do and everything it needs: the hand-off from ``plan`` to ``apply``.

    ``before`` and ``cached`` hold what planning already computed, keyed by "train", "val" and
    "verify": the original's predictions (verify: from --layers auto's ranking) and the frozen
    prefix's features (with --focus errors, which needs the original's training predictions)."""

    session: Session
    groups: tuple[str, ...]
    params: tuple[str, ...]
    train: Dataset
    val: Dataset
    verify: Dataset
    val_given: bool  # --val-data, rather than a share of the training data
    cut: prefix.Split | None  # traced once, here
    config: RepairConfig
    steps: int
    estimated_seconds: float
    before: dict[str, Predictions] = field(default_factory=dict, compare=False, repr=False)
    cached: dict[str, Dataset] = field(default_factory=dict, compare=False, repr=False)
    because: str = ""  # why these groups (or recalibration): the option, or the cause and policy of --layers auto
    keep: Dataset | None = None  # data the repair must not get worse on (--keep-data, or the checkpoint's own held-out data)
    candidates: tuple[Candidate, ...] = ()  # --layers auto's search: the best of these on validation (groups and params empty)
    settles: bool = False  # the cause is statistics: a recalibration the gate accepts alone ends the search

    @functools.cached_property
    def sizes(self) -> dict[str, int]:
        return {n: p.numel() for n, p in self.session.model.named_parameters()}

    @property
    def trainable(self) -> int:
        sizes = self.sizes
        return sum(sizes[p] for p in self.params)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def fraction(self) -> float:
        return self.trainable / self.total

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        val_from = "given (--val-data)" if self.val_given else f"{c.val_fraction:g} of the training data (seed {c.training.seed})"
        return {
            "groups": list(self.groups),
            "because": self.because,
            "trainable": self.trainable,
            "total": self.total,
            "train_data": {"spec": self.train.spec, "split": self.train.split, "examples": len(self.train), "focus": c.focus},
            "val_data": {"spec": self.val.spec, "split": self.val.split, "examples": len(self.val), "from": val_from},
            "verify_data": {"spec": self.verify.spec, "split": self.verify.split, "examples": len(self.verify)},
            "keep_data": None if self.keep is None else {"spec": self.keep.spec, "split": self.keep.split, "examples": len(self.keep)},
            "config": {**c.to_dict(), "lr_schedule": "cosine", "batchnorm": "chosen groups train, frozen groups eval"},
            "steps": self.steps,
            "cached_prefix": self.cut.prefix_name if self.cut else None,
            "estimated_seconds": self.estimated_seconds,
            "fraction": self.fraction,
            "candidates": [
                {"name": c.name, "groups": list(c.groups), "trainable": sum(self.sizes[n] for n in c.params)} for c in self.candidates
            ],
        }


def _same_data(a: Dataset, b: Dataset) -> bool:
    """Same source: a bundle file is one split whatever --split says; other specs differ by split."""
    if a.source and b.source:
        return a.source.resolved() == b.source.resolved() and (a.source.reader.one_split or a.split == b.split)
    return a.spec == b.spec and a.split == b.split


def _take(p: Predictions, index: torch.Tensor) -> Predictions:
    return Predictions(p.logits[index], p.labels[index])


def _saved_ranking(session: Session, saved: str | Path | None, verify: DataChoice) -> tuple[Ranking | None, DataChoice]:
    if saved is None:
        return None, verify
    r = ranking.load(saved)
    if r.sha256 != session.ckpt.sha256:
        raise ConfigError(f"{saved} ranks another checkpoint ({r.checkpoint}, sha256 differs): rerun beta-diag rank on {session.ckpt.path}")
    return r, DataChoice(verify.spec or r.data, verify.split or r.split, r.limit, r.config.seed)


def _chosen(
    session: Session,
    layers: Layers,
    config: RepairConfig,
    rank_config: RankConfig,
    saved: Ranking | None,
    verify: DataChoice,
    verify_ds: Dataset,
    train: DataChoice,
    progress: Progress | None,
    before: dict[str, Predictions],
) -> tuple[list[str], list[Candidate], bool, str]:
    """What the repair trains: the groups (or the search's candidates), whether recalibration can settle the search, and
    why, in words. ``--layers auto`` ranks first (its evaluation is kept in ``before``)."""
    recalibrate = RepairMethod(config.method) is RepairMethod.recalibrate
    cands: list[Candidate] = []
    settles = False
    because = "--method recalibrate" if recalibrate else "named by --layers"
    if isinstance(layers, str):  # auto, all, or a comma list ("fc" is one name, not 'f', 'c'; empty names dropped)
        layers = layers.strip() if layers.strip() in ("auto", "all") else [n.strip() for n in layers.split(",") if n.strip()]
    if recalibrate:
        if not tracked_norms(session.model):
            raise ConfigError(
                "--method recalibrate: the model has no BatchNorm with running statistics to re-estimate; use --method finetune"
            )
        if layers != "auto":
            raise ConfigError("--method recalibrate re-estimates every BatchNorm's statistics and trains no layer: drop --layers")
        names: list[str] = [RECALIBRATED]
    elif layers == "auto":
        result = saved or ranking.rank(session, data=verify, config=rank_config, dataset=verify_ds, progress=progress, train=train)
        if result.predictions is not None:
            before["verify"] = result.predictions
        if AutoLayers(config.auto_layers) is AutoLayers.search or (result.cause is not None and result.cause.kind == "statistics"):
            names = []
            resolve = functools.partial(resolve_layers, session.model)
            cands = search.candidates(session.model, result, auto_groups(result, AutoLayers.both), resolve)
            cause = f"the cause is {result.cause.kind}: " if result.cause is not None else ""
            settles = search.settles(result, cands)
            settle = " (recalibration first: it ends the search when the gate accepts it alone)" if settles else ""
            listed = ", ".join(c.name for c in cands)
            because = f"{cause}the best on validation of {len(cands)} candidates ({listed}) and the learning rate{settle}"
        else:
            names = auto_groups(result, config.auto_layers)
            cause = f"the cause is {result.cause.kind}; " if result.cause is not None else ""
            because = f"{cause}--auto-layers {AutoLayers(config.auto_layers).value}: the drift suspect and the flagged groups"
    elif layers == "all":  # every group: a full fine-tune, reported as one
        names = [g.name for g in groups.layer_groups(session.model, Granularity.group)]
    else:
        names = list(layers)
    return names, cands, settles, because


def plan(
    ckpt: Openable | Session,
    *,
    layers: Layers = "auto",
    train: DataChoice = DataChoice(),
    verify: DataChoice = DataChoice(),
    config: RepairConfig = RepairConfig(),
    rank_config: RankConfig = RankConfig(),
    saved_ranking: str | Path | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    val: DataChoice | None = None,
    keep_data: DataChoice | None = None,
) -> Plan:
    """What ``apply`` will do (groups, parameters, training/validation/verification data, the cut), without training.
    ``layers``: "auto" (rank's cause and place lead), "all", or group, block or module names (a bare string is a
    comma list: "fc" is one name)."""
    config.check()
    session = ckpt if isinstance(ckpt, Session) else open_session(ckpt, device=device)
    saved, verify = _saved_ranking(session, saved_ranking, verify)
    verify_ds = session.load_data(verify)
    before: dict[str, Predictions] = {}
    recalibrate = RepairMethod(config.method) is RepairMethod.recalibrate
    names, cands, settles, because = _chosen(session, layers, config, rank_config, saved, verify, verify_ds, train, progress, before)
    params = [] if recalibrate or cands else resolve_layers(session.model, names)
    pool = session.load_data(train, default_split="train", unlabelled=recalibrate)  # recalibration needs no labels
    if not pool.labelled and val is None:
        raise ConfigError(f"--train-data {pool.spec} holds unlabelled images: the gate needs labels, pass --val-data with labelled images")
    if _same_data(pool, verify_ds):
        raise ConfigError(f"refusing to train on the verification data ({verify_ds.spec}, {verify_ds.split}): pass --train-data or --split")
    if val is not None:
        val_ds = session.load_data(val, default_split="train")
        for other, what in ((verify_ds, "verification"), (pool, "training")):
            if _same_data(val_ds, other):
                raise ConfigError(f"--val-data {val_ds.spec} ({val_ds.split}) is the {what} data: pass data held out from both")
        train_idx = None
    else:
        n_val = max(1, round(config.val_fraction * len(pool)))
        if len(pool) - n_val < 2:
            raise ConfigError(f"{len(pool)} training examples leave too few to train on after validation: pass more --train-data")
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(config.training.seed))
        val_ds, train_idx = pool.subset(perm[:n_val].sort().values), perm[n_val:].sort().values
    train_ds = pool if train_idx is None else pool.subset(train_idx)
    cut = prefix.split(session.model, set(params)) if config.cache_features and params else None
    cached: dict[str, Dataset] = {}
    if config.focus == "errors":
        if cut is not None:
            cached["train"] = prefix.cache(cut, train_ds, session.preprocess, session.device)
        before["train"] = predict(session, session.model, cut, cached.get("train"), train_ds)
        keep = _focus(before["train"], config.training.seed, f"{train_ds.spec} ({train_ds.split})")
        train_ds, before["train"] = train_ds.subset(keep), _take(before["train"], keep)
        if cut is not None:
            cached["train"] = cached["train"].subset(keep)
    elif config.focus != "all":
        raise ConfigError(f"--focus {config.focus}: use all or errors")
    steps = (1 if recalibrate else config.training.epochs) * -(-len(train_ds) // config.training.batch_size)
    return Plan(
        session=session,
        groups=tuple(names),
        params=tuple(params),
        train=train_ds,
        val=val_ds,
        verify=verify_ds,
        val_given=val is not None,
        cut=cut,
        config=config,
        steps=steps,
        estimated_seconds=prefix.estimate_seconds(session, train_ds, steps, config.training.batch_size) * (search.BUDGET if cands else 1),
        before=before,
        cached=cached,
        because=because,
        keep=_keep_data(session, keep_data, verify_ds, pool),
        candidates=tuple(cands),
        settles=settles,
    )


def _keep_data(session: Session, keep: DataChoice | None, verify_ds: Dataset, pool: Dataset) -> Dataset | None:
    """--keep-data, else the checkpoint's own held-out data when its metadata names it (and it can be read) and the
    repair verifies on other data (on the same data, verification already measures what it keeps)."""
    if keep is not None:
        ds = session.load_data(keep)
    else:
        try:
            ds = session.load_data(DataChoice())  # the test data the checkpoint's metadata names
        except BetaDiagError:
            return None  # no held-out data named, or not on this machine: the plan's keep_data says none
    if _same_data(ds, pool):
        raise ConfigError(f"--keep-data {ds.spec} ({ds.split}) is the training data: pass data the repair does not train on")
    return None if _same_data(ds, verify_ds) else ds


def _focus(before: Predictions, seed: int, where: str) -> torch.Tensor:
    """--focus errors: the training errors plus three times as many correct examples (seeded), as sorted indices."""
    correct = before.correct
    wrong, right = torch.nonzero(~correct).flatten(), torch.nonzero(correct).flatten()
    if wrong.numel() == 0:
        raise ConfigError(f"--focus errors: the model makes no errors on {where}: use --focus all")
    n_right = min(right.numel(), int(wrong.numel() * (1 - ERRORS_SHARE) / ERRORS_SHARE))
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([wrong, right[torch.randperm(right.numel(), generator=gen)[:n_right]]]).sort().values
