"""The repair command: fine-tune only the flagged (or named) layers, verify on held-out data, ship only a real gain."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import typer

from beta_diag import options as opt
from beta_diag import outputs
from beta_diag.cli_app import app, handle_errors, say_notes
from beta_diag.configs import DEFAULT_METRIC, REPAIR_TRAINING, Baseline, DataChoice, Focus, Granularity, ModelChoice, RepairConfig
from beta_diag.options import input_files, rank_config, read_class_map


@app.command()
@handle_errors
@opt.takes_model
def repair(
    ckpt: opt.Ckpt,
    layers: opt.Layers = "auto",
    method: opt.MethodChoice = RepairConfig.method,
    output: opt.RepairOutput = None,
    auto_layers: opt.AutoLayersChoice = RepairConfig.auto_layers,
    ranking_file: opt.RankingFile = None,
    train_data: opt.TrainDataSpec = None,
    data: opt.VerifyData = None,
    split: opt.Split = None,
    limit: opt.Limit = None,
    class_map: opt.ClassMap = None,
    train_limit: opt.TrainLimit = None,
    epochs: opt.Epochs = REPAIR_TRAINING.epochs,
    lr: opt.Lr = REPAIR_TRAINING.lr,
    momentum: opt.Momentum = REPAIR_TRAINING.momentum,
    optimizer: opt.Optimizer = REPAIR_TRAINING.optimizer,
    batch_size: opt.BatchSize = REPAIR_TRAINING.batch_size,
    focus: opt.FocusChoice = Focus.all,
    baseline: opt.BaselineChoice = Baseline.none,
    cache: opt.Cache = True,
    distill: opt.Distill = RepairConfig.distill,
    val_data: opt.ValData = None,
    val_fraction: opt.ValFraction = RepairConfig.val_fraction,
    accept_p: opt.AcceptP = RepairConfig.accept_p,
    keep_data: opt.KeepData = None,
    allow_forgetting: opt.AllowForgetting = RepairConfig.allow_forgetting,
    metric: opt.Metric = DEFAULT_METRIC,
    granularity: opt.Granularity = Granularity.group,
    top_k: opt.TopK = None,
    seed: opt.Seed = 0,
    model: ModelChoice = ModelChoice(),
    device: opt.Device = "auto",
    dry_run: opt.DryRun = False,
    plot: opt.Plot = None,
    force: opt.Force = False,
    as_json: opt.Json = False,
    timings: opt.Timings = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Fine-tune only the flagged (or named) layers with beta-scheduled momentum; verify on held-out data."""
    from beta_diag import checkpoint, plots, report, report_repair
    from beta_diag.planning import plan as plan_fn
    from beta_diag.repairing import default_output
    from beta_diag.repairing import repair as repair_fn

    folders = read_class_map(class_map)
    choices = {
        "train": DataChoice(train_data, "train", train_limit, seed, folders),
        "verify": DataChoice(data, split, limit, seed, folders),
        "val": DataChoice(val_data, "train", None, seed, folders) if val_data else None,
        "keep_data": DataChoice(keep_data, "test", class_map=folders) if keep_data else None,
    }
    repair_inputs = input_files(ckpt, ranking_file, class_map, specs=tuple(choices.values()))
    if not dry_run:
        outputs.preflight({"--output": output or default_output(ckpt), "--plot": plot}, repair_inputs, force, checkpoint_file="--output")
    config = RepairConfig(
        training=replace(
            REPAIR_TRAINING,
            epochs=epochs,
            lr=REPAIR_TRAINING.lr if lr is None else lr,
            batch_size=batch_size,
            optimizer=optimizer,
            momentum=momentum,
            seed=seed,
        ),
        focus=focus.value,
        baseline=baseline.value,
        cache_features=cache,
        distill=distill,
        auto_layers=auto_layers,
        val_fraction=val_fraction,
        accept_p=accept_p,
        method=method,
        allow_forgetting=allow_forgetting,
    )
    asked: dict[str, Any] = {  # what plan and repair share
        "layers": layers,
        **choices,
        "config": config,
        "rank_config": rank_config(metric=metric, granularity=granularity, top_k=top_k, seed=seed),  # the cause leads, the place follows
        "saved_ranking": ranking_file,
        "device": device,
    }
    opened = checkpoint.load_as(ckpt, model)
    with report.progress(quiet or as_json) as progress:
        if dry_run:
            planned = plan_fn(opened, progress=progress, **asked)
        else:
            result = repair_fn(opened, output=output, force=force, progress=progress, **asked)
    say_notes(opened.path, opened.notes if dry_run else result.notes)
    if dry_run:
        report.print_json(planned.to_dict(), timings) if as_json else report_repair.plan_table(planned.to_dict())
        return
    if plot is not None:
        plots.repair(
            result,
            plot,
            force,
            input_files(*repair_inputs, specs=tuple(result.plan[k]["spec"] for k in ("train_data", "val_data", "verify_data"))),
        )
    report.print_json(result.to_dict(), timings) if as_json else report_repair.repair_summary(result)
    if not result.accepted:
        raise typer.Exit(3)  # nothing written: the original is kept (as rank's "nothing to rank")
