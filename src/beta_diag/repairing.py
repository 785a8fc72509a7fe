"""Surgical repair: ``plan`` (groups or the search's candidates, parameters, data, the cut) -> ``apply``
(fine-tune only those, or search the candidates; keep the best epoch on validation, accept it only beyond
chance, never ship what forgets the keep data) -> verify on held-out data -> record. One arm's training
lives in ``tuning``, the search in ``search``."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beta_diag import checkpoint, fingerprint, groups, outputs, prefix, ranking, search
from beta_diag.configs import AutoLayers, Granularity, Layers, RankConfig, RepairConfig, RepairMethod
from beta_diag.data import Dataset
from beta_diag.errors import BetaDiagError, ConfigError
from beta_diag.ranking import Ranking
from beta_diag.readers import DataSpec
from beta_diag.recalibration import tracked_norms
from beta_diag.runtime import Predictions, Progress
from beta_diag.search import Candidate
from beta_diag.serial import without_timing
from beta_diag.session import DataChoice, Openable, Session, open_session
from beta_diag.training import Anchor
from beta_diag.tuning import Tuned, fine_tune, predict, recalibrate
from beta_diag.verdicts import Arm, Gate, RepairReport, choose, verdict

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
    cands: list[Candidate] = []
    settles = False
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
        names = [n.strip() for n in layers.split(",")] if isinstance(layers, str) else list(layers)  # "fc" is one name, not 'f', 'c'
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


def apply(p: Plan, *, output: str | Path | None = None, force: bool = False, progress: Progress | None = None) -> RepairReport:
    """Fine-tune the plan's parameters (or search its candidates), keep the best epoch on validation, verify on
    held-out data, and write the result only if the gate accepts it (``RepairReport.accepted``; otherwise nothing
    is written)."""
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
    feats = dict(p.cached)
    for k, ds in sets.items():
        if p.cut is not None and k not in feats and (k == "train" or (shortcut and k not in p.before)):
            feats[k] = prefix.cache(p.cut, ds, session.preprocess, session.device)
    before = {
        k: p.before[k] if k in p.before else predict(session, session.model, p.cut if shortcut or k == "train" else None, feats.get(k), ds)
        for k, ds in sets.items()
    }
    if p.keep is not None:
        before["keep"] = predict(session, session.model, None, None, p.keep)  # what it must not forget
    anchor = Anchor(before["train"].logits, before["train"].correct.float() * config.distill) if config.distill else None
    training = config.train_config(str(session.device))
    found: dict[str, Any] | None = None
    if p.candidates:
        surgical, repaired, found = _searched(p, before, anchor, progress)
    else:
        if RepairMethod(config.method) is RepairMethod.recalibrate:
            tuned = recalibrate(session, (p.train, p.val), before["val"])
        else:
            tuned = fine_tune(session, session.model, p.params, (p.train, p.val), before["val"], training, p.cut, feats, anchor, progress)
        surgical, repaired = _arm(p, p.groups, p.trainable, tuned, choose(tuned.curve, config.accept_p), before, feats), tuned.model
    baseline = None
    if config.baseline == "full":
        every = tuple(p.sizes)  # every parameter, in model order
        tuned = fine_tune(session, session.model, every, (p.train, p.val), before["val"], training, None, None, anchor, progress)
        baseline = _arm(p, ("all",), p.total, tuned, choose(tuned.curve, config.accept_p), before, {})
    notes = session.ckpt.notes + tuple(
        dict.fromkeys(n for d in sets.values() for n in (*d.notes, *session.preprocess.conversions(tuple(d.images.shape[1:]))))
    )
    plan_dict = p.to_dict()
    if found is not None:  # the search's winner is what the repair trained
        plan_dict.update(groups=list(surgical.groups), trainable=surgical.trainable, fraction=surgical.trainable / p.total)
    report = RepairReport(plan_dict, surgical, baseline, None, None, session.ckpt.sha256, notes, found)
    if not report.accepted:  # the gate found no real gain, or the gain forgets the keep data
        return report
    state = repaired.state_dict()
    diverged = list(checkpoint.nonfinite(state))
    if diverged:
        raise ConfigError(
            f"the repair diverged: {len(diverged)} tensors hold NaN/Inf (first {diverged[0]}): nothing written; lower --lr or --distill"
        )
    found_fp = fingerprint.measure(repaired, session.preprocess, session.device, p.train)  # on the data it trained on
    sha = checkpoint.save(out, state, _metadata(session, out, plan_dict, surgical), force=force, inputs=inputs, fingerprint=found_fp)
    return replace(report, output=str(out), sha256=sha)


def _arm(
    p: Plan, names: tuple[str, ...], trainable: int, tuned: Tuned, gate: Gate, before: dict[str, Predictions], feats: dict[str, Dataset]
) -> Arm:
    """The verdicts of one arm's kept epoch on the verification, training and keep data (the original kept: its own
    predictions). ``feats``: the plan's prefix features, where the cut gives the whole model's outputs."""
    kept = gate.best_epoch > 0

    def after(k: str, ds: Dataset) -> Predictions:
        if not kept:
            return before[k]
        return predict(p.session, tuned.model, tuned.cut if k in feats else None, feats.get(k), ds)  # features: through the cut

    return Arm(
        groups=names,
        trainable=trainable,
        seconds=tuned.seconds,
        verify=verdict(before["verify"], after("verify", p.verify), p.verify.class_names),
        train=verdict(before["train"], after("train", p.train), p.train.class_names) if p.train.labelled else None,
        history=tuple(tuned.history),
        gate=gate,
        keep=None if p.keep is None else verdict(before["keep"], after("keep", p.keep), p.keep.class_names),
    )


def _searched(
    p: Plan, before: dict[str, Predictions], anchor: Anchor | None, progress: Progress | None
) -> tuple[Arm, nn.Module, dict[str, Any]]:
    """--layers auto: run the search, then take its candidates best first; ship the first the gate accepts that does
    not forget the keep data (every accepted candidate is checked there), unless forgetting is allowed."""
    config = p.config
    s = search.run(
        p.session,
        list(p.candidates),
        (p.train, p.val),
        before["val"],
        config.train_config(str(p.session.device)),
        anchor,
        config.cache_features,
        progress,
        settle=lambda tuned: p.settles and choose(tuned.curve, config.accept_p).accepted,
    )
    ranked = s.ranked()
    if not ranked:
        raise ConfigError(f"every candidate of the search diverged ({'; '.join(s.skipped)}): nothing written; lower --lr")
    chosen: tuple[Arm, nn.Module, search.Tried] | None = None
    passed_over: dict[str, Any] | None = None
    for t in ranked:
        gate = choose(t.tuned.curve, config.accept_p, s.tries)
        if not gate.accepted:
            continue
        a = _arm(p, _label(t), t.trainable, t.tuned, gate, before, {})
        if not a.forgets or config.allow_forgetting:
            chosen = (a, t.tuned.model, t)
            break
        passed_over = passed_over or {"candidate": t.name, "keep": a.keep.to_dict() if a.keep else None, "arm": a, "tried": t}
    if chosen is None:  # nothing ships: report the candidate best on validation (the one held back, when one forgot)
        t = ranked[0]
        a = (
            passed_over["arm"]
            if passed_over
            else _arm(p, _label(t), t.trainable, t.tuned, choose(t.tuned.curve, config.accept_p, s.tries), before, {})
        )
        chosen = (a, t.tuned.model, t)
    arm, model, winner = chosen
    found = {
        "winner": winner.name,
        "tries": s.tries,
        "seconds": s.seconds,
        "tried": [t.to_dict(p.total) for t in s.tried],
        "skipped": list(s.skipped),
        "passed_over": None
        if passed_over is None or passed_over["arm"] is arm
        else {k: v for k, v in passed_over.items() if k not in ("arm", "tried")},
    }
    return arm, model, found


def _label(t: search.Tried) -> tuple[str, ...]:
    """What an arm changed, as Arm.groups: recalibration is named as what it changes."""
    return ((RECALIBRATED,) if t.candidate.recalibrate else ()) + t.candidate.groups


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
    *,
    layers: Layers = "auto",
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
    session = ckpt if isinstance(ckpt, Session) else open_session(ckpt, device=device)
    given = (
        session.ckpt.path,
        *([Path(saved_ranking)] if saved_ranking else []),
        *(f for c in (train, verify, val, keep_data) if c is not None and c.spec for f in DataSpec.parse(c.spec).files()),
    )
    outputs.check_output(_output_path(session, output), force, given, checkpoint_file=True)  # before any work
    planned = plan(
        session,
        layers=layers,
        train=train,
        verify=verify,
        config=config,
        rank_config=rank_config,
        saved_ranking=saved_ranking,
        progress=progress,
        val=val,
        keep_data=keep_data,
    )
    return apply(planned, output=output, force=force, progress=progress)
