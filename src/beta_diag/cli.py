"""The ``beta-diag`` command line: each command parses, calls one library function, renders."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from beta_diag import checkpoint, distributed, models, outputs, plots, report, schedules
from beta_diag.errors import BetaDiagError, ConfigError, NoErrorsToDiagnose
from beta_diag.groups import Granularity
from beta_diag.ranking import DEFAULT_BOOTSTRAP, DEFAULT_METRIC, Metric, RankConfig
from beta_diag.repairing import MAX_DISTILL, AutoLayers, Baseline, Focus, RepairConfig, default_output
from beta_diag.schedules import MomentumSchedule
from beta_diag.session import DataChoice
from beta_diag.training import OptimizerName, TrainConfig

app = typer.Typer(
    name="beta-diag",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Find the layer groups that carry a classifier's errors, compare across optimizers, repair just those.",
)

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON only on stdout.")]
TimingsOpt = Annotated[bool, typer.Option("--timings", help="Include wall-clock seconds in --json (then it differs run to run).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show the traceback of an error (for bug reports).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present, else CPU), cpu or cuda.")]
ArchOpt = Annotated[
    str | None, typer.Option("--arch", "--model", help="Architecture name or package.module:factory (overrides the metadata).")
]
ArchArgOpt = Annotated[
    list[str] | None, typer.Option("--arch-arg", help="Architecture keyword argument KEY=VALUE, repeatable (e.g. width=16).")
]
InputSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-size", help="Model input height x width in pixels, e.g. 28 or 224x224 (default: the metadata's; else 32, said on stderr)."
    ),
]
MeanOpt = Annotated[
    str | None, typer.Option("--mean", help="Normalisation mean of [0, 1] pixels: one value or one per channel, e.g. 0.485,0.456,0.406.")
]
StdOpt = Annotated[str | None, typer.Option("--std", help="Normalisation std: one value or one per channel, e.g. 0.229,0.224,0.225.")]
StateKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--state-key", help="Key of a .pt/.pth dict that holds the weights (default: state_dict, model_state_dict, model or net)."
    ),
]
CkptArg = Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, .pt/.pth, or a folder holding model.safetensors.")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Also draw a PNG figure to this path.")]


def handle_errors(func: F) -> F:
    """Turn library errors into ``Error: ...`` + exit 1, Ctrl-C into exit 130; tracebacks only with --verbose."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", False)
        who = distributed.label()  # under torchrun, the other processes' errors are marked
        try:
            return func(*args, **kwargs)
        except NoErrorsToDiagnose as exc:
            if not who:
                print(f"Nothing to rank: {exc}", file=sys.stderr)
            raise typer.Exit(3) from None
        except BetaDiagError as exc:
            if verbose:
                traceback.print_exc()
            print(f"{who}Error: {exc}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print(f"{who}Error: interrupted; no output was written", file=sys.stderr)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except BrokenPipeError:  # the reader of stdout left (| head): what it read is all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except Exception as exc:  # noqa: BLE001 - a bug: say so, keep the traceback for --verbose
            if verbose:
                traceback.print_exc()
            print(
                f"{who}Error: internal error ({type(exc).__name__}: {exc}); rerun with --verbose and report the traceback", file=sys.stderr
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def data_files(*specs: str | None) -> tuple[Path, ...]:
    """The files data specs name (bundles), which no output may replace; a malformed spec is left to the command to refuse."""
    from beta_diag.readers import DataSpec

    found: list[Path] = []
    for spec in specs:
        with contextlib.suppress(BetaDiagError):
            found += DataSpec.parse(spec).files() if spec else []
    return tuple(found)


def parse_arch_args(items: list[str] | None) -> dict[str, Any]:
    """``["width=16", "name=x"]`` -> ``{"width": 16, "name": "x"}`` (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--arch-arg '{item}' is not KEY=VALUE: write e.g. --arch-arg width=16")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _numbers(option: str, text: str | None, kind: type) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in re.split(r"[,x]" if kind is int else ",", text.strip()) if v.strip())  # sizes: 224x224
    except ValueError:
        raise ConfigError(f"{option} {text}: pass numbers separated by commas (sizes: 28 or 224x224)") from None


def load_checkpoint(
    path: Path,
    arch: str | None,
    arch_args: list[str] | None,
    input_size: str | None = None,
    mean: str | None = None,
    std: str | None = None,
    state_key: str | None = None,
) -> checkpoint.Checkpoint:
    """The checkpoint with the model options applied (its ``notes`` say what loading converted or assumed)."""
    size = _numbers("--input-size", input_size, int)
    if size is not None and len(size) not in (1, 2):
        raise ConfigError(f"--input-size {input_size}: pass one side (28) or height x width (224x224)")
    ckpt = (
        checkpoint.load(path, state_key)
        .with_overrides(
            arch,
            parse_arch_args(arch_args),
            None if size is None else (size[0], size[-1]),
            _numbers("--mean", mean, float),
            _numbers("--std", std, float),
        )
        .inferred()
    )
    return ckpt


def say_notes(source: object, notes: tuple[str, ...] | list[str]) -> None:
    """What opening a checkpoint assumed or converted, once on stderr, after the command succeeded
    (a failing command prints its one error line only)."""
    if distributed.is_main():
        for note in notes:
            print(f"Note: {source}: {note}", file=sys.stderr)


@app.command()
@handle_errors
def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")],
    arch: Annotated[str, typer.Option("--arch", "--model", help="Architecture name or package.module:factory.")] = "resnet18_cifar",
    arch_arg: ArchArgOpt = None,
    data: Annotated[
        str, typer.Option("--data", help="Data spec: fashion-mnist, cifar10:DIR, imagefolder:DIR, FILE.safetensors.")
    ] = "fashion-mnist",
    test_data: Annotated[str | None, typer.Option("--test-data", help="Test data spec (default: the test split of --data).")] = None,
    optimizer: Annotated[OptimizerName, typer.Option("--optimizer")] = TrainConfig.optimizer,
    momentum: Annotated[MomentumSchedule, typer.Option("--momentum", help="Momentum schedule.")] = TrainConfig.momentum,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = TrainConfig.epochs,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default 0.05 for sgd, 0.001 for adam/adamw).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = TrainConfig.batch_size,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = TrainConfig.weight_decay,
    warmup: Annotated[float, typer.Option("--warmup", min=0.0, help="Linear warm-up, in epochs.")] = TrainConfig.warmup_epochs,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random 2-pixel crops and flips.")] = TrainConfig.augment,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1)] = TrainConfig.seed,
    device: DeviceOpt = "auto",
    limit: Annotated[int | None, typer.Option("--limit", help="Train on a seeded subset of N images.")] = None,
    test_limit: Annotated[int | None, typer.Option("--test-limit", help="Test on a seeded subset of N images.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    timings: TimingsOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train a model with a momentum schedule and save it with its per-epoch history."""
    from beta_diag.training import train as train_model

    outputs.check_output(output, force, data_files(data, test_data), checkpoint_file=True)
    config = TrainConfig(
        epochs=epochs,
        lr=lr,
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
        result = train_model(arch, data, test_data, parse_arch_args(arch_arg), config, limit, test_limit, progress)
    sha = checkpoint.save(output, result.model.state_dict(), result.metadata, force=force)
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
def info(
    ckpt: CkptArg,
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    state_key: StateKeyOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """What a checkpoint holds: metadata, parameters per layer group, training history."""
    result = load_checkpoint(ckpt, arch, arch_arg, input_size, mean, std, state_key).describe()
    say_notes(result["path"], result["notes"])
    report.print_json(result) if as_json else report.info_table(result)


@app.command()
@handle_errors
def schedule(
    ckpt: Annotated[Path | None, typer.Argument(help="Checkpoint whose training history to show (omit to plan a schedule).")] = None,
    momentum: Annotated[list[MomentumSchedule] | None, typer.Option("--momentum", help="Schedule(s) to plan; repeatable.")] = None,
    lr: Annotated[float, typer.Option("--lr", min=1e-12, help="Peak learning rate of the planned schedule.")] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 200,
    steps_per_epoch: Annotated[int, typer.Option("--steps-per-epoch", min=1)] = 391,
    warmup: Annotated[float, typer.Option("--warmup", min=0.0)] = 0.0,
    optimizer: Annotated[OptimizerName, typer.Option("--optimizer")] = OptimizerName.sgd,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """LR, momentum, critical momentum, damping ratio and regime per epoch: of a checkpoint, or planned."""
    if ckpt is not None:
        if momentum:
            raise ConfigError("--momentum plans a schedule without a checkpoint: drop it, or drop the checkpoint")
        runs = [schedules.recorded_run(str(ckpt), checkpoint.load(ckpt).metadata.history)]
    else:
        runs = schedules.planned_runs(momentum or list(schedules.PLANNED), lr, epochs, steps_per_epoch, warmup, optimizer.value)
    if plot is not None:
        plots.schedule(runs, plot, force, inputs=(ckpt,) if ckpt else ())
    report.print_json({"schedules": runs}) if as_json else report.schedule_table(runs)


DataOpt = Annotated[str | None, typer.Option("--data", help="Data spec (default: the data the checkpoint's metadata names).")]
SplitOpt = Annotated[str | None, typer.Option("--split", help="train or test (default: test, the held-out split).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use a seeded random subset of N examples.")]
MetricOpt = Annotated[Metric, typer.Option("--metric", help="Score that ranks the groups (see README).")]
GranularityOpt = Annotated[
    Granularity, typer.Option("--granularity", help="group: top-level children; block: their children; module: leaf layers.")
]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Flag exactly K groups (default: the largest-gap rule).")]
BootstrapOpt = Annotated[int, typer.Option("--bootstrap", help="Bootstrap replicates over the errors (0: none).")]
SeedOpt = Annotated[
    int, typer.Option("--seed", min=0, max=2**63 - 1, help="Seed of --limit, the correct-example sample and the bootstrap.")
]
GroupsOpt = Annotated[
    str | None, typer.Option("--groups", help="Comma list of glob patterns restricting the groups ranked, e.g. 'layer3*'.")
]


def rank_config(
    metric: Metric, granularity: Granularity, top_k: int | None, bootstrap: int, seed: int, by_class: bool, groups_glob: str | None
) -> RankConfig:
    include = tuple(p.strip() for p in groups_glob.split(",") if p.strip()) if groups_glob is not None else ()
    if groups_glob is not None and not include:
        raise ConfigError(f"--groups '{groups_glob}' names no pattern: pass e.g. --groups 'layer3*,fc', or drop it to rank every group")
    return RankConfig(metric, granularity, top_k, bootstrap, seed, by_class, include)


@app.command()
@handle_errors
def rank(
    ckpt: CkptArg,
    data: DataOpt = None,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    metric: MetricOpt = DEFAULT_METRIC,
    granularity: GranularityOpt = Granularity.group,
    top_k: TopKOpt = None,
    bootstrap: BootstrapOpt = DEFAULT_BOOTSTRAP,
    seed: SeedOpt = 0,
    by_class: Annotated[bool, typer.Option("--by-class", help="Also show which true classes' errors load each group.")] = False,
    groups_glob: GroupsOpt = None,
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    state_key: StateKeyOpt = None,
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option("--out", help="Save the ranking as JSON for compare and repair.")] = None,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Rank layer groups by gradient attribution over the misclassified examples; flag the problem layers.

    Exit codes: 0 ranked, 1 error, 2 usage, 3 nothing to rank (every example classified correctly).
    """
    from beta_diag.ranking import rank as rank_fn
    from beta_diag.session import open_session

    outputs.distinct(out=out, plot=plot)
    for path in (out, plot):
        if path is not None:
            outputs.check_output(path, force, (ckpt, *data_files(data)))
    config = rank_config(metric, granularity, top_k, bootstrap, seed, by_class, groups_glob)
    session = open_session(load_checkpoint(ckpt, arch, arch_arg, input_size, mean, std, state_key), device)
    with report.progress(quiet or as_json) as progress:
        result = rank_fn(session, DataChoice(data, split, limit, seed), config, progress=progress)
    say_notes(session.ckpt.path, result.notes)
    inputs = (ckpt, *data_files(data, result.data))  # the data the checkpoint's metadata named too
    if plot is not None:
        plots.ranking(result, plot, force, inputs)
    if out is not None:
        result.save(out, force, inputs)
    report.print_json(result.to_dict()) if as_json else report.rank_table(result)


@app.command()
@handle_errors
def compare(
    inputs: Annotated[list[Path], typer.Argument(help="Two or more checkpoints (or rankings saved by rank --out).")],
    data: DataOpt = None,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    metric: MetricOpt = DEFAULT_METRIC,
    granularity: GranularityOpt = Granularity.group,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Flag exactly K groups in each, and report overlap@K.")] = None,
    bootstrap: BootstrapOpt = DEFAULT_BOOTSTRAP,
    seed: SeedOpt = 0,
    groups_glob: GroupsOpt = None,
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    state_key: StateKeyOpt = None,
    device: DeviceOpt = "auto",
    plot: PlotOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Do the same layer groups carry the errors in each checkpoint (e.g. SGD- vs Adam-trained)?

    --arch and --arch-arg apply to every checkpoint given (they must share an architecture to compare).
    """
    from beta_diag.comparison import compare as compare_fn

    if plot is not None:
        outputs.check_output(plot, force, (*inputs, *data_files(data)))
    config = rank_config(metric, granularity, top_k, bootstrap, seed, False, groups_glob)
    opened = [p if p.suffix.lower() == ".json" else load_checkpoint(p, arch, arch_arg, input_size, mean, std, state_key) for p in inputs]
    with report.progress(quiet or as_json) as progress:
        result = compare_fn(opened, DataChoice(data, split, limit, seed), config, device, top_k, progress)
    for opened_ckpt, ranked in zip(opened, result.rankings):
        if isinstance(opened_ckpt, checkpoint.Checkpoint):  # a saved ranking's notes were said when it was made
            say_notes(opened_ckpt.path, ranked.notes)
    if plot is not None:
        plots.comparison(result, plot, force, (*inputs, *data_files(data, *(r.data for r in result.rankings))))
    report.print_json(result.to_dict()) if as_json else report.compare_table(result)


@app.command()
@handle_errors
def repair(
    ckpt: CkptArg,
    layers: Annotated[
        str, typer.Option("--layers", help="auto (the groups rank flags) or a comma list of groups/blocks/modules.")
    ] = "auto",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Repaired checkpoint (default: NAME.repaired.safetensors beside the input).")
    ] = None,
    auto_layers: Annotated[
        AutoLayers,
        typer.Option(
            "--auto-layers",
            help="What --layers auto repairs: both (the drift suspect plus the flags), suspect (the suspect, else the flags) or flags (where the errors agree).",
        ),
    ] = RepairConfig.auto_layers,
    ranking_file: Annotated[Path | None, typer.Option("--ranking", help="Reuse a ranking saved by rank --out (refused if stale).")] = None,
    train_data: Annotated[
        str | None, typer.Option("--train-data", help="Training data spec (default: the checkpoint's train split).")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="Verification data spec (default: the held-out data rank uses).")] = None,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = RepairConfig.epochs,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = RepairConfig.lr,
    momentum: Annotated[MomentumSchedule, typer.Option("--momentum")] = RepairConfig.momentum,
    optimizer: Annotated[OptimizerName, typer.Option("--optimizer")] = RepairConfig.optimizer,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = RepairConfig.batch_size,
    focus: Annotated[
        Focus, typer.Option("--focus", help="all: the whole training data; errors: its errors plus 3x as many correct examples.")
    ] = Focus.all,
    baseline: Annotated[
        Baseline, typer.Option("--baseline", help="full: also fine-tune the whole model with the same budget, for comparison.")
    ] = Baseline.none,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Compute the frozen prefix's output once.")] = True,
    distill: Annotated[
        float,
        typer.Option(
            "--distill",
            min=0.0,
            max=MAX_DISTILL,
            help="Weight of the pull towards the original's predictions on the training examples it gets right (0: off).",
        ),
    ] = RepairConfig.distill,
    val_data: Annotated[
        str | None, typer.Option("--val-data", help="Validation data spec for the gate (default: --val-fraction of the training data).")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of the training data held out to choose the epoch and gate the repair.")
    ] = RepairConfig.val_fraction,
    accept_p: Annotated[
        float,
        typer.Option("--accept-p", help="Write the repair only if its validation gain has exact McNemar p at most this (1: any gain)."),
    ] = RepairConfig.accept_p,
    metric: MetricOpt = DEFAULT_METRIC,
    granularity: GranularityOpt = Granularity.group,
    top_k: TopKOpt = None,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    state_key: StateKeyOpt = None,
    device: DeviceOpt = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.")] = False,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    timings: TimingsOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-tune only the flagged (or named) layers with beta-scheduled momentum; verify on held-out data."""
    from beta_diag.repairing import plan as plan_fn
    from beta_diag.repairing import repair as repair_fn

    repair_inputs = (ckpt, *data_files(data, train_data, val_data), *([ranking_file] if ranking_file else []))
    if not dry_run:
        outputs.distinct(output=output or default_output(ckpt), plot=plot)
        for path in (output, plot):
            if path is not None:
                outputs.check_output(path, force, repair_inputs, checkpoint_file=path is output)
    chosen: list[str] | str = "auto" if layers.strip() == "auto" else [n.strip() for n in layers.split(",") if n.strip()]
    config = RepairConfig(
        epochs,
        lr,
        batch_size,
        optimizer,
        momentum,
        RepairConfig.weight_decay,
        seed,
        focus.value,
        baseline.value,
        cache,
        distill,
        auto_layers,
        val_fraction,
        accept_p,
    )
    rank_cfg = RankConfig(metric, granularity, top_k, DEFAULT_BOOTSTRAP, seed)
    train_choice, verify_choice = DataChoice(train_data, "train", None, seed), DataChoice(data, split, limit, seed)
    val_choice = DataChoice(val_data, "train", None, seed) if val_data else None
    opened = load_checkpoint(ckpt, arch, arch_arg, input_size, mean, std, state_key)
    with report.progress(quiet or as_json) as progress:
        if dry_run:
            planned = plan_fn(opened, chosen, train_choice, verify_choice, config, rank_cfg, ranking_file, device, progress, val_choice)
        else:
            result = repair_fn(
                opened, chosen, output, train_choice, verify_choice, config, rank_cfg, ranking_file, device, force, progress, val_choice
            )
    say_notes(opened.path, opened.notes if dry_run else result.notes)
    if dry_run:
        report.print_json(planned.to_dict(), timings) if as_json else report.plan_table(planned.to_dict())
        return
    if plot is not None:
        plots.repair(
            result, plot, force, (*repair_inputs, *data_files(*(result.plan[k]["spec"] for k in ("train_data", "val_data", "verify_data"))))
        )
    report.print_json(result.to_dict(), timings) if as_json else report.repair_summary(result)
    if not result.accepted:
        raise typer.Exit(3)  # nothing written: the original is kept (as rank's "nothing to rank")


@app.command()
@handle_errors
def archs(as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """List the architecture names --arch accepts."""
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
        clean = done.code in (0, 3, None)  # 3: nothing to rank or repair, a clean end
        raise
    finally:
        distributed.leave(clean)
