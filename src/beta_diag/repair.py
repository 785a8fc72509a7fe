"""Surgical repair: plan (groups, parameters, data) -> apply (fine-tune only those) -> verify -> record.

Policy: only the chosen parameters have ``requires_grad``. Modules that own a chosen parameter
train in train mode (a chosen BatchNorm normalises with batch statistics and re-estimates its
running statistics as the weights it follows move); every frozen module stays in eval mode, so
frozen BatchNorms keep the statistics the rest of the network was trained with. Keeping chosen
BatchNorms in eval mode too was measured: no better for the surgical repair, and a full fine-tune
without normalisation diverged (BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beta_diag import checkpoint, features, groups, ranking
from beta_diag.training import Progress
from beta_diag.data import Dataset
from beta_diag.errors import ConfigError
from beta_diag.readers import DataSpec
from beta_diag.ranking import RankConfig, Ranking
from beta_diag.schedules import MomentumSchedule
from beta_diag.session import DataChoice, Session, open_session
from beta_diag.training import Anchor, OptimizerName, Predictions, TrainConfig, fit, without_timing

MAX_DISTILL = 100.0  # beyond this the pull swamps the loss and the steps diverge
ERRORS_SHARE = 0.25  # --focus errors: the training errors plus three times as many correct examples


class Focus(str, Enum):
    all = "all"
    errors = "errors"


class Baseline(str, Enum):
    none = "none"
    full = "full"


class AutoLayers(str, Enum):
    """What ``--layers auto`` repairs: the groups rank flags, the drift suspect, or both."""

    flags = "flags"  # where the errors' gradients agree most
    suspect = "suspect"  # the drift suspect when there is one, else the flags
    both = "both"  # the drift suspect plus the flags


def auto_groups(r: Ranking, policy: AutoLayers | str = AutoLayers.flags) -> list[str]:
    """The groups ``--layers auto`` repairs under ``policy``, in the ranking's order."""
    policy = AutoLayers(policy)
    suspect = r.drift.suspect if r.drift is not None else None
    if policy is AutoLayers.flags or suspect is None:
        return list(r.flagged)
    if policy is AutoLayers.suspect:
        return [suspect]
    return [suspect] + [g for g in r.flagged if g != suspect]


@dataclass(frozen=True)
class RepairConfig:
    """How to fine-tune. Defaults: SGD, beta momentum on a cosine LR from 0.003, 3 epochs. ``distill``
    > 0 adds a pull towards the original's predictions on the training examples it already gets
    right (``training.Anchor``). The LR and the pull (off) were chosen by ``benchmarks/repair_defaults.py``:
    first on damaged models (the share of the damage won back on the verification data), then on a
    healthy one, scored on images disjoint from the repair's training and verification data."""

    epochs: int = 3
    lr: float = 0.003
    batch_size: int = 128
    optimizer: OptimizerName = OptimizerName.sgd
    momentum: MomentumSchedule = MomentumSchedule.beta
    weight_decay: float = 5e-4
    seed: int = 0
    focus: str = "all"  # or "errors"
    baseline: str = "none"  # or "full"
    cache_features: bool = True
    distill: float = 0.0
    auto_layers: AutoLayers = AutoLayers.both  # planted faults: 93% won back (flags 83%); shifts: 87% (flags 84%, suspect 57%)

    def train_config(self, device: str) -> TrainConfig:
        """The shared training loop's configuration: no warm-up, no augmentation (so features can be cached)."""
        return TrainConfig(
            epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, optimizer=self.optimizer, momentum=self.momentum,
            weight_decay=self.weight_decay, warmup_epochs=0.0, augment=False, seed=self.seed, device=device,
        )

    def to_dict(self) -> dict[str, Any]:
        shared = {k: v for k, v in self.train_config("auto").to_dict().items() if k not in ("warmup_epochs", "augment", "device")}
        return {**shared, "focus": self.focus, "baseline": self.baseline, "cache_features": self.cache_features,
                "distill": self.distill, "distill_temperature": Anchor.temperature, "auto_layers": AutoLayers(self.auto_layers).value}


@dataclass(frozen=True)
class Plan:
    groups: tuple[str, ...]
    trainable: int
    total: int
    train_data: dict[str, Any]
    verify_data: dict[str, Any]
    config: dict[str, Any]
    steps: int
    cached_prefix: str | None  # the frozen prefix whose output is computed once, if any
    estimated_seconds: float

    @property
    def fraction(self) -> float:
        return self.trainable / self.total


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


def verdict(before: Predictions, after: Predictions, class_names: tuple[str, ...]) -> Verdict:
    b, a = before.correct, after.correct
    per_class = {}
    for c in torch.unique(before.labels).tolist():
        m = before.labels == c
        per_class[class_names[c]] = {"fixed": int((~b & a & m).sum()), "broken": int((b & ~a & m).sum()), "errors_before": int((~b & m).sum()),
                                     "errors_after": int((~a & m).sum())}
    return Verdict(len(b), before.accuracy, after.accuracy, int((~b & a).sum()), int((b & ~a).sum()), per_class)


@dataclass(frozen=True)
class Arm:
    """One fine-tune: what it trained and what it changed. ``seconds``: the fine-tune itself. A frozen
    prefix's features are not in it: they come from the pass that evaluates the original on the
    training data, which every arm's verdict needs anyway."""

    groups: tuple[str, ...]
    trainable: int
    seconds: float
    verify: Verdict
    train: Verdict
    history: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class RepairReport:
    plan: Plan
    surgical: Arm
    baseline: Arm | None
    output: str | None
    sha256: str | None
    parent_sha256: str
    notes: tuple[str, ...] = ()  # what opening the checkpoint assumed or converted (Checkpoint.notes)

    @property
    def compute_saving(self) -> float | None:
        return 1 - self.surgical.seconds / self.baseline.seconds if self.baseline else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"]["fraction"] = self.plan.fraction
        for arm in ("surgical", "baseline"):
            if d[arm]:
                d[arm]["verify"]["net"] = getattr(self, arm).verify.net
                d[arm]["train"]["net"] = getattr(self, arm).train.net
        d["compute_saving"] = self.compute_saving
        return d


def resolve_layers(model: nn.Module, layers: list[str]) -> list[str]:
    """Names of groups, blocks or modules -> parameter names; unknown names list the valid groups."""
    if not layers:
        raise ConfigError("--layers names nothing: pass auto or a comma list such as layer3,fc")
    known = {g.name: g for gran in groups.Granularity for g in groups.layer_groups(model, gran)}
    unknown = sorted(n for n in layers if n not in known)
    if unknown:
        valid = ", ".join(g.name for g in groups.layer_groups(model))
        raise ConfigError(f"--layers: unknown name(s) {', '.join(unknown)}: use groups ({valid}), or their blocks/modules (see beta-diag rank --granularity module)")
    return sorted({p for n in layers for p in known[n].param_names}, key=list(dict(model.named_parameters())).index)


def _focus(session: Session, ds: Dataset, focus: str, seed: int) -> Dataset:
    if focus == "all":
        return ds
    if focus != "errors":
        raise ConfigError(f"--focus {focus}: use all or errors")
    correct = session.evaluate(ds).correct
    wrong, right = torch.nonzero(~correct).flatten(), torch.nonzero(correct).flatten()
    if wrong.numel() == 0:
        raise ConfigError(f"--focus errors: the model makes no errors on {ds.spec} ({ds.split}): use --focus all")
    n_right = min(right.numel(), int(wrong.numel() * (1 - ERRORS_SHARE) / ERRORS_SHARE))
    gen = torch.Generator().manual_seed(seed)
    keep = torch.cat([wrong, right[torch.randperm(right.numel(), generator=gen)[:n_right]]]).sort().values
    return ds.subset(keep)


def _same_data(a: Dataset, b: Dataset) -> bool:
    """Same source: a bundle file is one split whatever --split says; other specs differ by split."""
    if a.source and b.source and a.source.reader.one_split and b.source.reader.one_split:
        return a.source.resolved() == b.source.resolved()
    return a.spec == b.spec and a.split == b.split


def _fine_tune(
    session: Session, params: list[str], train_ds: Dataset, config: RepairConfig, anchor: Anchor | None, cached: Dataset | None,
    progress: Progress | None,
) -> tuple[nn.Module, features.Split | None, list[dict], float]:
    """Copy the model, train only ``params`` (their modules in train mode, the rest eval); return it, its
    cut (when it trained on ``cached``, the frozen prefix's features of ``train_ds``), history and seconds."""
    model = copy.deepcopy(session.model)
    chosen = set(params)
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    start = time.perf_counter()
    split = features.split(model, chosen) if cached is not None else None
    tc = config.train_config(str(session.device))
    if split is not None:
        history = fit(split.suffix, cached, None, lambda x: x, tc, progress=progress, anchor=anchor)
    else:
        history = fit(model, train_ds, None, session.preprocess, tc, progress=progress, anchor=anchor)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval(), split, history, time.perf_counter() - start


def _predict(session: Session, model: nn.Module, cut: features.Split | None, feats: Dataset | None, ds: Dataset) -> Predictions:
    """``model``'s outputs on ``ds``: the suffix of its ``cut`` on the prefix features ``feats`` when both are given, else the whole model."""
    if cut is None or feats is None:
        return replace(session, model=model).evaluate(ds)
    return Predictions(features.outputs(cut, feats, session.device), ds.labels.clone())


def plan_and_data(
    session: Session, layers: list[str] | str, train: DataChoice, verify: DataChoice, config: RepairConfig, rank_config: RankConfig,
    saved_ranking: Ranking | None, progress: Progress | None,
) -> tuple[Plan, list[str], Dataset, Dataset]:
    if not 0 <= config.distill <= MAX_DISTILL:
        raise ConfigError(f"--distill {config.distill}: pass a weight from 0 (off) to {MAX_DISTILL:g}")
    verify_ds = session.load_data(verify)
    if layers == "auto":
        result = saved_ranking or ranking.rank(session, verify, rank_config, dataset=verify_ds, progress=progress)
        names = auto_groups(result, config.auto_layers)
    else:
        names = list(layers)
    params = resolve_layers(session.model, names)
    train_ds = _focus(session, session.load_data(train, default_split="train"), config.focus, config.seed)
    if _same_data(train_ds, verify_ds):
        raise ConfigError(f"refusing to train on the verification data ({verify_ds.spec}, {verify_ds.split}): pass --train-data or --split")
    sizes = dict((n, p.numel()) for n, p in session.model.named_parameters())
    split = features.split(session.model, set(params)) if config.cache_features else None
    steps = config.epochs * -(-len(train_ds) // config.batch_size)
    plan = Plan(
        tuple(names), sum(sizes[p] for p in params), sum(sizes.values()),
        {"spec": train_ds.spec, "split": train_ds.split, "examples": len(train_ds), "focus": config.focus},
        {"spec": verify_ds.spec, "split": verify_ds.split, "examples": len(verify_ds)},
        {**config.to_dict(), "lr_schedule": "cosine", "batchnorm": "chosen groups train, frozen groups eval"}, steps, split.prefix_name if split else None,
        features.estimate_seconds(session, train_ds, steps, config.batch_size),
    )
    return plan, params, train_ds, verify_ds


def _prepare(
    session: Session, layers: list[str] | str, train: DataChoice, verify: DataChoice, config: RepairConfig, rank_config: RankConfig,
    saved_ranking: str | Path | None, progress: Progress | None,
) -> tuple[Plan, list[str], Dataset, Dataset]:
    saved = None
    if saved_ranking is not None:
        saved = ranking.load(saved_ranking)
        if saved.sha256 != session.ckpt.sha256:
            raise ConfigError(f"{saved_ranking} ranks another checkpoint ({saved.checkpoint}, sha256 differs): rerun beta-diag rank on {session.ckpt.path}")
        verify = DataChoice(verify.spec or saved.data, verify.split or saved.split, saved.limit, saved.config.seed)
    return plan_and_data(session, layers, train, verify, config, rank_config, saved, progress)


def plan(
    ckpt: str | Path | Session, layers: list[str] | str = "auto", train: DataChoice = DataChoice(), verify: DataChoice = DataChoice(),
    config: RepairConfig = RepairConfig(), rank_config: RankConfig = RankConfig(), saved_ranking: str | Path | None = None,
    device: str = "auto", progress: Progress | None = None,
) -> Plan:
    """What ``repair`` would do (groups, parameters, data, schedule), without training or writing."""
    session = ckpt if isinstance(ckpt, Session) else open_session(ckpt, device)
    return _prepare(session, layers, train, verify, config, rank_config, saved_ranking, progress)[0]


def repair(
    ckpt: str | Path | Session, layers: list[str] | str = "auto", output: str | Path | None = None, train: DataChoice = DataChoice(),
    verify: DataChoice = DataChoice(), config: RepairConfig = RepairConfig(), rank_config: RankConfig = RankConfig(),
    saved_ranking: str | Path | None = None, device: str = "auto", force: bool = False, progress: Progress | None = None,
) -> RepairReport:
    """Fine-tune only the named (or flagged) layer groups, verify on held-out data, write the result.

    Example: ``repair('sgd.safetensors', 'auto').surgical.verify.net``.
    """
    session = ckpt if isinstance(ckpt, Session) else open_session(ckpt, device)
    out = Path(output) if output else session.ckpt.path.with_name(f"{session.ckpt.path.name.removesuffix('.safetensors')}.repaired.safetensors")
    checkpoint.check_output(out, force, (session.ckpt.path,), checkpoint_file=True)
    plan, params, train_ds, verify_ds = _prepare(session, layers, train, verify, config, rank_config, saved_ranking, progress)
    cut = features.split(session.model, set(params)) if config.cache_features else None
    # With a frozen prefix, one pass of it over the training data gives the original's outputs there and
    # the features the surgical arm trains on. On CPU, where outputs through the cut are bit-identical to
    # the whole model's (tested), the verification data and the arm's outputs after go through it too;
    # elsewhere the whole model evaluates, so that the reported accuracy is what the written file gives.
    shortcut = cut if cut is not None and session.device.type == "cpu" else None
    sets = {"verify": verify_ds, "train": train_ds}
    feats = {k: features.cache(cut, ds, session.preprocess, session.device) for k, ds in sets.items() if cut and (shortcut or k == "train")}
    before_v, before_t = (_predict(session, session.model, shortcut, feats.get(k), ds) for k, ds in sets.items())
    anchor = Anchor(before_t.logits, before_t.correct.float() * config.distill) if config.distill else None
    arms = []
    for arm_params in ([params] + ([[n for n, _ in session.model.named_parameters()]] if config.baseline == "full" else [])):
        surgical = arm_params is params
        mine = feats if surgical else {}
        model, arm_cut, history, seconds = _fine_tune(session, arm_params, train_ds, config, anchor, mine.get("train"), progress)
        after_v, after_t = (_predict(session, model, arm_cut if shortcut else None, mine.get(k), ds) for k, ds in sets.items())
        arms.append(Arm(
            plan.groups if surgical else ("all",), plan.trainable if surgical else plan.total,
            seconds, verdict(before_v, after_v, verify_ds.class_names), verdict(before_t, after_t, train_ds.class_names), tuple(history),
        ))
        if arm_params is params:
            repaired = model
    parent_dir = session.ckpt.path.parent
    data_for_out = {
        split: {**rec, "spec": rec["spec"] if out.parent.resolve() == parent_dir.resolve() else str(DataSpec.parse(rec["spec"]).resolved(parent_dir))}
        for split, rec in session.ckpt.metadata.data.items() if isinstance(rec, dict) and "spec" in rec
    }
    meta = replace(session.ckpt.metadata, data=data_for_out, repair={
        "parent_sha256": session.ckpt.sha256, "parent": session.ckpt.path.name, "groups": list(plan.groups), "trainable_fraction": plan.fraction,
        "config": plan.config, "train_data": plan.train_data, "verify_data": plan.verify_data,
        "verify": {**asdict(arms[0].verify), "net": arms[0].verify.net}, "history": without_timing(arms[0].history),
    })
    state = repaired.state_dict()
    diverged = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if diverged:
        raise ConfigError(f"the repair diverged: {len(diverged)} tensors hold NaN/Inf (first {diverged[0]}): nothing written; lower --lr or --distill")
    sha = checkpoint.save(out, state, meta, force=force, inputs=(session.ckpt.path,))
    notes = session.ckpt.notes + tuple(dict.fromkeys(
        n for d in (train_ds, verify_ds) for n in (*d.notes, *session.preprocess.conversions(tuple(d.images.shape[1:])))))
    return RepairReport(plan, arms[0], arms[1] if len(arms) > 1 else None, str(out), sha, session.ckpt.sha256, notes)
