"""Surgical repair: ``plan`` (groups, parameters, data, the cut) -> ``apply`` (fine-tune only those, keep
the best epoch on validation, accept it only beyond chance) -> verify on held-out data -> record.

Policy: only the chosen parameters have ``requires_grad``. Modules that own a chosen parameter
train in train mode (a chosen BatchNorm normalises with batch statistics and re-estimates its
running statistics as the weights it follows move); every frozen module stays in eval mode, so
frozen BatchNorms keep the statistics the rest of the network was trained with. Keeping chosen
BatchNorms in eval mode too was measured: no better for the surgical repair, and a full fine-tune
without normalisation diverged (BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beta_diag import checkpoint, groups, outputs, prefix, ranking
from beta_diag.configs import AutoLayers, Granularity, RankConfig, RepairConfig, RepairMethod
from beta_diag.data import Dataset
from beta_diag.errors import BetaDiagError, ConfigError
from beta_diag.ranking import Ranking
from beta_diag.readers import DataSpec
from beta_diag.recalibration import recalibrated, tracked_norms
from beta_diag.runtime import Predictions, Progress, without_timing
from beta_diag.session import DataChoice, Openable, Session, open_session
from beta_diag.training import Anchor, fit
from beta_diag.verdicts import Arm, Gate, RepairReport, Verdict, best_epoch, choose, validation_record, verdict

ERRORS_SHARE = 0.25  # --focus errors: the training errors plus three times as many correct examples
RECALIBRATED = "BatchNorm statistics"  # what --method recalibrate changes, in place of groups


def auto_groups(r: Ranking, policy: AutoLayers | str = AutoLayers.flags) -> list[str]:
    """The groups ``--layers auto`` repairs under ``policy``, in the ranking's order."""
    policy = AutoLayers(policy)
    suspect = r.drift.suspect if r.drift is not None else None
    if policy is AutoLayers.flags or suspect is None:
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
            f"--layers: unknown name(s) {', '.join(unknown)}: use groups ({valid}), or their blocks/modules (see beta-diag rank --granularity module)"
        )
    return sorted({p for n in layers for p in known[n].param_names}, key=list(dict(model.named_parameters())).index)


@dataclass(frozen=True)
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
        }


def _same_data(a: Dataset, b: Dataset) -> bool:
    """Same source: a bundle file is one split whatever --split says; other specs differ by split."""
    if a.source and b.source:
        return a.source.resolved() == b.source.resolved() and (a.source.reader.one_split or a.split == b.split)
    return a.spec == b.spec and a.split == b.split


def _take(p: Predictions, index: torch.Tensor) -> Predictions:
    return Predictions(p.logits[index], p.labels[index])


def _predict(session: Session, model: nn.Module, cut: prefix.Split | None, feats: Dataset | None, ds: Dataset) -> Predictions:
    """``model``'s outputs on ``ds``: the suffix of its ``cut`` on the prefix features ``feats`` when both are given, else the whole model."""
    if cut is None or feats is None:
        return replace(session, model=model).evaluate(ds)
    return Predictions(prefix.outputs(cut, feats, session.device), ds.labels.clone())


def _saved_ranking(session: Session, saved: str | Path | None, verify: DataChoice) -> tuple[Ranking | None, DataChoice]:
    if saved is None:
        return None, verify
    r = ranking.load(saved)
    if r.sha256 != session.ckpt.sha256:
        raise ConfigError(f"{saved} ranks another checkpoint ({r.checkpoint}, sha256 differs): rerun beta-diag rank on {session.ckpt.path}")
    return r, DataChoice(verify.spec or r.data, verify.split or r.split, r.limit, r.config.seed)


def plan(
    ckpt: Openable | Session,
    layers: list[str] | str = "auto",
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
    """What ``apply`` will do (groups, parameters, training/validation/verification data, the cut), without training."""
    config.check()
    session = ckpt if isinstance(ckpt, Session) else open_session(ckpt, device)
    saved, verify = _saved_ranking(session, saved_ranking, verify)
    verify_ds = session.load_data(verify)
    before: dict[str, Predictions] = {}
    recalibrate = RepairMethod(config.method) is RepairMethod.recalibrate
    because = "--method recalibrate" if recalibrate else "named by --layers"
    if recalibrate:
        if not tracked_norms(session.model):
            raise ConfigError(
                "--method recalibrate: the model has no BatchNorm with running statistics to re-estimate; use --method finetune"
            )
        if layers != "auto":
            raise ConfigError("--method recalibrate re-estimates every BatchNorm's statistics and trains no layer: drop --layers")
        names: list[str] = [RECALIBRATED]
    elif layers == "auto":
        result = saved or ranking.rank(session, verify, rank_config, dataset=verify_ds, progress=progress, train=train)
        if result.predictions is not None:
            before["verify"] = result.predictions
        if result.cause is not None and result.cause.kind == "statistics" and tracked_norms(session.model):
            recalibrate, names = True, [RECALIBRATED]  # the cause leads: retraining layers cannot fix statistics
            config = replace(config, method=RepairMethod.recalibrate, focus="all")  # statistics of all the training data
            because = "the cause is statistics (rank): the BatchNorm statistics are re-estimated on the training data"
        else:
            names = auto_groups(result, config.auto_layers)
            cause = f"the cause is {result.cause.kind}; " if result.cause is not None else ""
            because = f"{cause}--auto-layers {AutoLayers(config.auto_layers).value}: the drift suspect and the flagged groups"
    elif layers == "all":  # every group: a full fine-tune, reported as one
        names = [g.name for g in groups.layer_groups(session.model, Granularity.group)]
    else:
        names = [n.strip() for n in layers.split(",")] if isinstance(layers, str) else list(layers)  # "fc" is one name, not 'f', 'c'
    params = [] if recalibrate else resolve_layers(session.model, names)
    pool = session.load_data(train, default_split="train")
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
        before["train"] = _predict(session, session.model, cut, cached.get("train"), train_ds)
        keep = _focus(before["train"], config.training.seed, f"{train_ds.spec} ({train_ds.split})")
        train_ds, before["train"] = train_ds.subset(keep), _take(before["train"], keep)
        if cut is not None:
            cached["train"] = cached["train"].subset(keep)
    elif config.focus != "all":
        raise ConfigError(f"--focus {config.focus}: use all or errors")
    steps = (1 if recalibrate else config.training.epochs) * -(-len(train_ds) // config.training.batch_size)
    return Plan(
        session,
        tuple(names),
        tuple(params),
        train_ds,
        val_ds,
        verify_ds,
        val is not None,
        cut,
        config,
        steps,
        prefix.estimate_seconds(session, train_ds, steps, config.training.batch_size),
        before,
        cached,
        because,
        _keep_data(session, keep_data, verify_ds, pool),
    )


def _keep_verdict(p: Plan, before: Predictions | None, model: nn.Module, kept_epoch: int) -> Verdict | None:
    """What the kept epoch changed on the keep data (the original kept: nothing)."""
    if p.keep is None or before is None:
        return None
    return verdict(before, before if kept_epoch == 0 else _predict(p.session, model, None, None, p.keep), p.keep.class_names)


def _keep_data(session: Session, keep: DataChoice | None, verify_ds: Dataset, pool: Dataset) -> Dataset | None:
    """--keep-data, else the checkpoint's own held-out data when its metadata names it (and it can be read) and the
    repair verifies on other data (on the same data, verification already measures what it keeps)."""
    if keep is not None:
        ds = session.load_data(keep)
    else:
        try:
            ds = session.load_data(DataChoice(*session.resolve_data(DataChoice(), "test")))
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


def _fine_tune(
    p: Plan,
    params: tuple[str, ...],
    feats: dict[str, Dataset],
    before: dict[str, Predictions],
    anchor: Anchor | None,
    shortcut: bool,
    progress: Progress | None,
) -> tuple[nn.Module, prefix.Split | None, list[dict], Gate, float]:
    """Copy the model and train only ``params`` (their modules in train mode, the rest eval), through the
    plan's cut on cached features when there are any; after each epoch score it on validation and keep
    the best state (the original's counts as epoch 0). Returns the model holding the kept state, its cut,
    the history, the gate and the seconds."""
    session, config = p.session, p.config
    model = copy.deepcopy(session.model)
    chosen = set(params)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    start = time.perf_counter()
    cut = p.cut.on(model) if p.cut is not None and "train" in feats else None
    val_cut = cut if shortcut else None
    curve = [{"epoch": 0, **validation_record(before["val"], before["val"])}]
    kept: dict[str, Any] = {"state": None}

    def on_epoch(_: nn.Module) -> dict[str, Any]:
        began = time.perf_counter()
        point = {"epoch": len(curve), **validation_record(before["val"], _predict(session, model, val_cut, feats.get("val"), p.val))}
        curve.append(point)
        if best_epoch(curve) == point["epoch"]:  # the gate's own rule: the snapshot is the epoch it will keep
            kept["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {**{k: v for k, v in point.items() if k not in ("examples", "epoch")}, "val_seconds": time.perf_counter() - began}

    tc = config.train_config(str(session.device))
    if cut is not None:
        history = fit(cut.suffix, feats["train"], None, lambda x: x, tc, progress=progress, anchor=anchor, on_epoch=on_epoch)
    else:
        history = fit(model, p.train, None, session.preprocess, tc, progress=progress, anchor=anchor, on_epoch=on_epoch)
    losses = [h["train_loss"] for h in history]
    if not all(math.isfinite(v) for v in losses):
        raise ConfigError(
            f"the repair diverged: training loss {losses[-1]} after {len(losses)} epoch(s): nothing written; lower --lr or --distill"
        )
    gate = choose(curve, config.accept_p)
    model.load_state_dict(kept["state"] if gate.best_epoch else session.model.state_dict())
    for param in model.parameters():
        param.requires_grad_(True)
    return model.eval(), cut, history, gate, time.perf_counter() - start


def _recalibrate(p: Plan, before: dict[str, Predictions]) -> tuple[nn.Module, None, list[dict], Gate, float]:
    """--method recalibrate: a copy with every BatchNorm's statistics re-estimated on the training data (its images
    only), scored on validation against the original (epoch 0) and gated like any repair."""
    start = time.perf_counter()
    model = recalibrated(p.session.model, p.train, p.session.preprocess, p.session.device)
    point = {"epoch": 1, **validation_record(before["val"], _predict(p.session, model, None, None, p.val))}
    curve = [{"epoch": 0, **validation_record(before["val"], before["val"])}, point]
    history = [{"epoch": 1, "recalibrated_on": len(p.train), **{k: v for k, v in point.items() if k not in ("examples", "epoch")}}]
    return model, None, history, choose(curve, p.config.accept_p), time.perf_counter() - start


def apply(p: Plan, output: str | Path | None = None, force: bool = False, progress: Progress | None = None) -> RepairReport:
    """Fine-tune the plan's parameters, keep the best epoch on validation, verify on held-out data, and write
    the result only if the gate accepts it (``RepairReport.accepted``; otherwise nothing is written)."""
    session, config = p.session, p.config
    out = _output_path(session, output)
    inputs = (
        session.ckpt.path,
        *(f for ds in (p.train, p.val, p.verify, p.keep) if ds is not None and ds.source for f in ds.source.files()),
    )
    outputs.check_output(out, force, inputs, checkpoint_file=True)
    # With a frozen prefix, one pass of it over each data set gives the original's outputs there and the
    # features the surgical arm trains on. On CPU, where outputs through the cut are bit-identical to the
    # whole model's (tested), validation and verification go through it too; elsewhere the whole model
    # evaluates them, so that the reported accuracy is what the written file gives.
    shortcut = p.cut is not None and session.device.type == "cpu"
    sets = {"train": p.train, "val": p.val, "verify": p.verify}
    kept_before = None if p.keep is None else _predict(session, session.model, None, None, p.keep)  # what it must not forget
    feats = dict(p.cached)
    for k, ds in sets.items():
        if p.cut is not None and k not in feats and (k == "train" or (shortcut and k not in p.before)):
            feats[k] = prefix.cache(p.cut, ds, session.preprocess, session.device)
    before = {
        k: p.before[k] if k in p.before else _predict(session, session.model, p.cut if shortcut or k == "train" else None, feats.get(k), ds)
        for k, ds in sets.items()
    }
    anchor = Anchor(before["train"].logits, before["train"].correct.float() * config.distill) if config.distill else None
    arms, repaired = [], session.model
    every = tuple(p.sizes)  # every parameter, in model order
    for params in [p.params] + ([every] if config.baseline == "full" else []):
        surgical = params is p.params
        mine = feats if surgical else {}
        if surgical and RepairMethod(config.method) is RepairMethod.recalibrate:
            model, cut, history, gate, seconds = _recalibrate(p, before)
        else:
            model, cut, history, gate, seconds = _fine_tune(p, params, mine, before, anchor, shortcut, progress)
        after = {
            k: before[k]
            if gate.best_epoch == 0
            else _predict(session, model, cut if shortcut or k == "train" else None, mine.get(k), sets[k])
            for k in ("verify", "train")
        }  # the original kept: its predictions are known
        arms.append(
            Arm(
                p.groups if surgical else ("all",),
                p.trainable if surgical else p.total,
                seconds,
                verdict(before["verify"], after["verify"], p.verify.class_names),
                verdict(before["train"], after["train"], p.train.class_names),
                tuple(history),
                gate,
                _keep_verdict(p, kept_before, model, gate.best_epoch),
            )
        )
        repaired = model if surgical else repaired
    notes = session.ckpt.notes + tuple(
        dict.fromkeys(n for d in sets.values() for n in (*d.notes, *session.preprocess.conversions(tuple(d.images.shape[1:]))))
    )
    plan_dict = p.to_dict()
    kept_original = RepairReport(plan_dict, arms[0], arms[1] if len(arms) > 1 else None, None, None, session.ckpt.sha256, notes)
    if not kept_original.accepted:  # the gate found no real gain, or the gain forgets the keep data
        return kept_original
    state = repaired.state_dict()
    diverged = list(checkpoint.nonfinite(state))
    if diverged:
        raise ConfigError(
            f"the repair diverged: {len(diverged)} tensors hold NaN/Inf (first {diverged[0]}): nothing written; lower --lr or --distill"
        )
    sha = checkpoint.save(out, state, _metadata(session, out, plan_dict, arms[0]), force=force, inputs=inputs)
    return RepairReport(plan_dict, arms[0], arms[1] if len(arms) > 1 else None, str(out), sha, session.ckpt.sha256, notes)


def default_output(checkpoint_path: str | Path) -> Path:
    """``NAME.repaired.safetensors`` beside the checkpoint."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.repaired.safetensors")


def _output_path(session: Session, output: str | Path | None) -> Path:
    return Path(output) if output else default_output(session.ckpt.path)


def _metadata(session: Session, out: Path, plan_dict: dict[str, Any], arm: Arm) -> checkpoint.Metadata:
    """The parent's metadata with its data re-pointed from the output's folder, and the repair recorded."""
    parent_dir = session.ckpt.path.parent
    data_for_out = {
        split: {
            **rec,
            "spec": rec["spec"] if out.parent.resolve() == parent_dir.resolve() else str(DataSpec.parse(rec["spec"]).resolved(parent_dir)),
        }
        for split, rec in session.ckpt.metadata.data.items()
        if isinstance(rec, dict) and "spec" in rec
    }
    return replace(
        session.ckpt.metadata,
        data=data_for_out,
        repair={
            "parent_sha256": session.ckpt.sha256,
            "parent": session.ckpt.path.name,
            "groups": list(plan_dict["groups"]),
            "trainable_fraction": plan_dict["fraction"],
            "config": plan_dict["config"],
            "train_data": plan_dict["train_data"],
            "val_data": plan_dict["val_data"],
            "verify_data": plan_dict["verify_data"],
            "verify": arm.verify.to_dict(),
            "gate": arm.gate.to_dict(),
            "history": without_timing(arm.history),
        },
    )


def repair(
    ckpt: Openable | Session,
    layers: list[str] | str = "auto",
    output: str | Path | None = None,
    train: DataChoice = DataChoice(),
    verify: DataChoice = DataChoice(),
    config: RepairConfig = RepairConfig(),
    rank_config: RankConfig = RankConfig(),
    saved_ranking: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    val: DataChoice | None = None,
    keep_data: DataChoice | None = None,
) -> RepairReport:
    """``apply(plan(...))``: fine-tune only the named (or flagged) layer groups, keep the best epoch on
    validation, verify on held-out data, and write the result if it beats the original beyond chance.

    Example: ``r = repair('sgd.safetensors', 'auto'); r.accepted, r.surgical.verify.net``.
    """
    session = ckpt if isinstance(ckpt, Session) else open_session(ckpt, device)
    given = (
        session.ckpt.path,
        *([Path(saved_ranking)] if saved_ranking else []),
        *(f for c in (train, verify, val, keep_data) if c is not None and c.spec for f in DataSpec.parse(c.spec).files()),
    )
    outputs.check_output(_output_path(session, output), force, given, checkpoint_file=True)  # before any work
    planned = plan(session, layers, train, verify, config, rank_config, saved_ranking, device, progress, val, keep_data)
    return apply(planned, output, force, progress)
