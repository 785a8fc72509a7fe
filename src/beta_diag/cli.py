"""The ``beta-diag`` command line: each command parses, calls one library function, renders. The app and its error
handling live in ``cli_app``; ``repair``, ``eval``, ``fingerprint`` and ``drift`` in their own modules, registered here."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from beta_diag import distributed, outputs
from beta_diag import options as opt
from beta_diag.cli_app import app, handle_errors, say_notes
from beta_diag.configs import (
    PLANNED,
    PLANNED_EPOCHS,
    PLANNED_LR,
    PLANNED_STEPS_PER_EPOCH,
    DataChoice,
    ModelChoice,
    OptimizerName,
    RankConfig,
    TrainConfig,
)
from beta_diag.errors import ConfigError
from beta_diag.options import input_files, parse_arch_args, read_class_map


@app.command()
@handle_errors
def train(
    output: opt.TrainOutput,
    arch: opt.TrainArch = "resnet18_cifar",
    arch_arg: opt.ArchArg = None,
    data: opt.TrainData = "fashion-mnist",
    test_data: opt.TestData = None,
    optimizer: opt.Optimizer = TrainConfig.optimizer,
    momentum: opt.Momentum = TrainConfig.momentum,
    epochs: opt.Epochs = TrainConfig.epochs,
    lr: opt.Lr = None,
    batch_size: opt.BatchSize = TrainConfig.batch_size,
    weight_decay: opt.WeightDecay = TrainConfig.weight_decay,
    warmup: opt.Warmup = TrainConfig.warmup_epochs,
    augment: opt.Augment = TrainConfig.augment,
    seed: opt.Seed = TrainConfig.seed,
    device: opt.Device = "auto",
    limit: opt.Limit = None,
    test_limit: opt.TestLimit = None,
    force: opt.Force = False,
    as_json: opt.Json = False,
    timings: opt.Timings = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Train a model with a momentum schedule and save it with its per-epoch history."""
    from beta_diag import checkpoint, report, schedules
    from beta_diag.training import train as train_model

    train_choice, test_choice = DataChoice(data, "train", limit, seed), DataChoice(test_data, "test", test_limit, seed)
    outputs.preflight({"--output": output}, input_files(specs=(train_choice, test_choice)), force, checkpoint_file="--output")
    config = TrainConfig(
        epochs=epochs,
        lr=lr,  # type: ignore[arg-type]  # None: the optimizer's default LR (TrainConfig fills it in)
        batch_size=batch_size,
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        warmup_epochs=warmup,
        augment=augment,
        seed=seed,
        device=device,
    )
    with report.progress(quiet or as_json) as progress:
        result = train_model(
            arch,
            data=train_choice,
            test=test_choice,
            arch_kwargs=parse_arch_args(arch_arg),
            config=config,
            progress=progress,
        )
    sha = checkpoint.save(output, result.model.state_dict(), result.metadata, force=force, fingerprint=result.fingerprint)
    history = list(result.metadata.history)
    summary = {
        "path": str(output),
        "sha256": sha,
        "history": history,
        "regimes": schedules.regime_fractions(history),
        "seconds": result.seconds,
    }
    report.print_json(summary, timings) if as_json else report.train_summary(summary)


@app.command()
@handle_errors
@opt.takes_model
def info(
    ckpt: opt.Ckpt,
    model: ModelChoice = ModelChoice(),
    as_json: opt.Json = False,
    verbose: opt.Verbose = False,
) -> None:
    """What a checkpoint holds: metadata, parameters per layer group, training history."""
    from beta_diag import checkpoint, report
    from beta_diag.describe import describe

    result = describe(checkpoint.load_as(ckpt, model))
    say_notes(result["path"], result["notes"])
    report.print_json(result) if as_json else report.info_table(result)


@app.command()
@handle_errors
def schedule(
    ckpt: opt.HistoryCkpt = None,
    momentum: opt.PlannedMomenta = None,
    lr: opt.Lr = PLANNED_LR,
    epochs: opt.Epochs = PLANNED_EPOCHS,
    steps_per_epoch: opt.StepsPerEpoch = PLANNED_STEPS_PER_EPOCH,
    warmup: opt.Warmup = 0.0,
    optimizer: opt.Optimizer = OptimizerName.sgd,
    plot: opt.Plot = None,
    force: opt.Force = False,
    as_json: opt.Json = False,
    verbose: opt.Verbose = False,
) -> None:
    """LR, momentum, critical momentum, damping ratio and regime per epoch: of a checkpoint, or planned."""
    from beta_diag import checkpoint, plots, report, schedules

    if ckpt is not None:
        if momentum:
            raise ConfigError("--momentum plans a schedule without a checkpoint: drop it, or drop the checkpoint")
        runs = [schedules.recorded_run(str(ckpt), checkpoint.load(ckpt).metadata.history)]
    else:
        runs = schedules.planned_runs(momentum or list(PLANNED), lr, epochs, steps_per_epoch, warmup, optimizer.value)
    if plot is not None:
        plots.schedule(runs, plot, force, inputs=(ckpt,) if ckpt else ())
    report.print_json({"schedules": runs}) if as_json else report.schedule_table(runs)


@app.command()
@handle_errors
@opt.takes_model
@opt.takes_ranking
def rank(
    ckpt: opt.Ckpt,
    data: opt.Data = None,
    split: opt.Split = None,
    limit: opt.Limit = None,
    class_map: opt.ClassMap = None,
    ranking: RankConfig = RankConfig(),
    top_k: opt.TopK = None,
    train_data: opt.TrainDataSpec = None,
    seed: opt.Seed = 0,
    by_class: opt.ByClass = False,
    model: ModelChoice = ModelChoice(),
    device: opt.Device = "auto",
    out: opt.RankingOut = None,
    plot: opt.Plot = None,
    force: opt.Force = False,
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Rank layer groups by gradient attribution over the misclassified examples; flag the problem layers.

    Exit codes: 0 ranked, 1 error, 2 usage, 3 nothing to rank (every example classified correctly).
    """
    from beta_diag import plots, report
    from beta_diag.ranking import rank as rank_fn
    from beta_diag.session import open_session

    folders = read_class_map(class_map)
    chosen, train_choice = DataChoice(data, split, limit, seed, folders), DataChoice(train_data, "train", class_map=folders)
    outputs.preflight({"--out": out, "--plot": plot}, input_files(ckpt, class_map, specs=(chosen, train_choice)), force)
    config = replace(ranking, top_k=top_k, seed=seed, by_class=by_class)
    session = open_session(ckpt, device=device, model=model)
    with report.progress(quiet or as_json) as progress:
        result = rank_fn(session, data=chosen, config=config, progress=progress, train=train_choice)
    say_notes(session.ckpt.path, result.notes)
    inputs = input_files(ckpt, specs=(chosen, train_choice, result.data))  # the data the checkpoint's metadata named too
    if plot is not None:
        plots.ranking(result, plot, force, inputs)
    if out is not None:
        result.save(out, force=force, inputs=inputs)
    report.print_json(result.to_dict()) if as_json else report.rank_table(result)


@app.command()
@handle_errors
@opt.takes_model
@opt.takes_ranking
def compare(
    inputs: opt.CompareInputs,
    data: opt.Data = None,
    split: opt.Split = None,
    limit: opt.Limit = None,
    class_map: opt.ClassMap = None,
    ranking: RankConfig = RankConfig(),
    top_k: opt.OverlapTopK = None,
    seed: opt.Seed = 0,
    model: ModelChoice = ModelChoice(),
    device: opt.Device = "auto",
    plot: opt.Plot = None,
    force: opt.Force = False,
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Do the same layer groups carry the errors in each checkpoint (e.g. SGD- vs Adam-trained)?

    --arch and --arch-arg apply to every checkpoint given (they must share an architecture to compare).
    """
    from beta_diag import checkpoint, plots, report
    from beta_diag.comparison import compare as compare_fn

    chosen = DataChoice(data, split, limit, seed, read_class_map(class_map))
    outputs.preflight({"--plot": plot}, input_files(*inputs, class_map, specs=(chosen,)), force)
    config = replace(ranking, top_k=top_k, seed=seed)
    opened = [p if p.suffix.lower() == ".json" else checkpoint.load_as(p, model) for p in inputs]
    with report.progress(quiet or as_json) as progress:
        result = compare_fn(opened, data=chosen, config=config, device=device, progress=progress)
    for opened_ckpt, ranked in zip(opened, result.rankings):
        if isinstance(opened_ckpt, checkpoint.Checkpoint):  # a saved ranking's notes were said when it was made
            say_notes(opened_ckpt.path, ranked.notes)
    if plot is not None:
        plots.comparison(result, plot, force, input_files(*inputs, specs=(chosen, *(r.data for r in result.rankings))))
    report.print_json(result.to_dict()) if as_json else report.compare_table(result)


# registration order is --help's order: repair after compare, then eval, fingerprint and drift
from beta_diag import cli_repair  # noqa: F401 - registers repair on ``app``

# isort: split
from beta_diag import cli_eval, cli_monitor  # noqa: F401 - register eval, fingerprint and drift on ``app``


@app.command()
@handle_errors
def archs(as_json: opt.Json = False, verbose: opt.Verbose = False) -> None:
    """List the architecture names --arch accepts."""
    from beta_diag import models, report

    names = models.available()
    report.print_json(names) if as_json else report.stdout().print("\n".join(names))


def main() -> None:
    """The console script. Under torchrun, processes other than 0 print nothing on stdout."""
    for stream in (sys.stdout, sys.stderr):  # a terminal or pipe that cannot encode a character gets '?', not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    clean = False
    try:
        app()
        clean = True
    except SystemExit as done:  # typer ends every command with SystemExit
        clean = done.code in (0, 3, 4, None)  # 3: nothing to rank or repair; 4: drift found a shift: clean ends
        raise
    finally:
        distributed.leave(clean)
