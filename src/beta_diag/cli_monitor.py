"""The fingerprint and drift commands: record what a model's layers see on its training data, and watch new data against it."""

from __future__ import annotations

import typer

from beta_diag import options as opt
from beta_diag import outputs
from beta_diag.cli_app import app, handle_errors, say_notes
from beta_diag.configs import DataChoice, ModelChoice
from beta_diag.options import input_files, read_class_map

SHIFT_EXIT = 4  # drift: the data have shifted (0: they have not)


@app.command()
@handle_errors
@opt.takes_model
def fingerprint(
    ckpt: opt.Ckpt,
    output: opt.TrainOutput,
    data: opt.Data = None,
    limit: opt.Limit = None,
    class_map: opt.ClassMap = None,
    seed: opt.Seed = 0,
    model: ModelChoice = ModelChoice(),
    device: opt.Device = "auto",
    force: opt.Force = False,
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Write a copy of the checkpoint with a fingerprint: every layer group's output statistics on the training data.

    --data: the data to record on (default: the training data the checkpoint's metadata names; labels unused).
    """
    from beta_diag import checkpoint, report
    from beta_diag.fingerprint import record
    from beta_diag.session import open_session

    chosen = DataChoice(data, "train", limit, seed, read_class_map(class_map))
    outputs.preflight({"--output": output}, input_files(ckpt, class_map, specs=(chosen,)), force, checkpoint_file="--output")
    session = open_session(ckpt, device=device, model=model)
    say_notes(session.ckpt.path, session.ckpt.notes)
    ds = session.load_data(chosen, default_split="train", unlabelled=True)
    with report.progress(quiet or as_json) as progress:
        found = record(session, ds, progress)
    inputs = input_files(ckpt, specs=(chosen, ds.spec))  # the data the metadata named, too
    sha = checkpoint.save(output, session.ckpt.state_dict, session.ckpt.metadata, force=force, inputs=inputs, fingerprint=found)
    summary = {"path": str(output), "sha256": sha, "fingerprint": found.describe()}
    report.print_json(summary) if as_json else report.fingerprint_summary(summary)


@app.command()
@handle_errors
@opt.takes_model
def drift(
    ckpt: opt.Ckpt,
    data: opt.Data = None,
    split: opt.Split = None,
    limit: opt.Limit = None,
    class_map: opt.ClassMap = None,
    seed: opt.Seed = 0,
    alpha: opt.Alpha = 0.05,
    model: ModelChoice = ModelChoice(),
    device: opt.Device = "auto",
    plot: opt.Plot = None,
    force: opt.Force = False,
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Label-free monitoring: per-group drift of the data against the checkpoint's fingerprint (or its BatchNorm
    statistics), the suspect, and whether the data as a whole have shifted.

    No labels needed (images:DIR, a bundle without labels). Exit codes: 0 no shift, 4 shift, 1 error, 2 usage:
    a deployment script can gate on it. --alpha bounds the false-alarm rate per run on unshifted data.
    """
    from beta_diag import monitor, plots, report
    from beta_diag.session import open_session

    chosen = DataChoice(data, split, limit, seed, read_class_map(class_map))
    outputs.preflight({"--plot": plot}, input_files(ckpt, class_map, specs=(chosen,)), force)
    session = open_session(ckpt, device=device, model=model)
    say_notes(session.ckpt.path, session.ckpt.notes)
    ds = session.load_data(chosen, unlabelled=True)
    with report.progress(quiet or as_json) as progress:
        result = monitor.check(session, ds, alpha, progress)
    if plot is not None:
        plots.drift(result, plot, force, input_files(ckpt, specs=(chosen, ds.spec)))
    report.print_json(result.to_dict()) if as_json else report.drift_table(result)
    if result.shifted:
        raise typer.Exit(SHIFT_EXIT)
