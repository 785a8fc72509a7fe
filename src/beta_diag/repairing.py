"""Surgical repair: ``planning.plan`` (groups or the search's candidates, parameters, data, the cut) -> ``apply``
(fine-tune only those, or search the candidates; keep the best epoch on validation, accept it only beyond
chance, never ship what forgets the keep data) -> verify on held-out data -> record. One arm's training
lives in ``tuning``, the search in ``search``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from beta_diag import checkpoint, fingerprint, outputs, prefix, search
from beta_diag.configs import DataChoice, Layers, RankConfig, RepairConfig, RepairMethod
from beta_diag.data import Dataset
from beta_diag.errors import ConfigError
from beta_diag.metadata import Metadata
from beta_diag.planning import RECALIBRATED, Plan, plan
from beta_diag.readers import DataSpec
from beta_diag.runtime import Predictions, Progress
from beta_diag.serial import without_timing
from beta_diag.session import Openable, Session, open_session
from beta_diag.training import Anchor
from beta_diag.tuning import Tuned, fine_tune, predict, recalibrate
from beta_diag.verdicts import Arm, Gate, RepairReport, choose, verdict


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


def _metadata(session: Session, out: Path, plan_dict: dict[str, Any], arm: Arm) -> Metadata:
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
        *(f for c in (train, verify, val, keep_data) if c is not None and c.source is not None for f in c.source.files()),
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
