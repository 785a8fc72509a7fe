"""The command line's shared options, each declared once (typer's ``Annotated`` pattern), and their
parsing into library values. Policies and checks live in the library; these only name and convert.
Torch-free (with ``configs``), so the command line answers --help before torch loads."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from beta_diag import configs
from beta_diag.configs import (
    MAX_DISTILL,
    AutoLayers,
    Baseline,
    DataChoice,
    Fit,
    Focus,
    ModelChoice,
    MomentumSchedule,
    OptimizerName,
    RankConfig,
)
from beta_diag.errors import BetaDiagError, ConfigError
from beta_diag.limits import MAX_BATCH, MAX_BOOTSTRAP, MAX_EPOCHS

F = TypeVar("F", bound=Callable[..., Any])

# every command


def print_version(value: bool) -> None:
    """--version: the package's version, then exit 0 (before any command, and before torch loads)."""
    if value:
        from beta_diag import __version__

        print(f"beta-diag {__version__}")
        raise typer.Exit()


Version = Annotated[bool, typer.Option("--version", callback=print_version, is_eager=True, help="Print the version and exit.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON only on stdout.")]
Timings = Annotated[bool, typer.Option("--timings", help="Include wall-clock seconds in --json (then it differs run to run).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Verbose = Annotated[bool, typer.Option("--verbose", help="Show the traceback of an error (for bug reports).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present, else CPU), cpu or cuda.")]
Arch = Annotated[
    str | None, typer.Option("--arch", "--model", help="Architecture name or package.module:factory (overrides the metadata).")
]
ArchArg = Annotated[
    list[str] | None, typer.Option("--arch-arg", help="Architecture keyword argument KEY=VALUE, repeatable (e.g. width=16).")
]
InputSize = Annotated[
    str | None,
    typer.Option(
        "--input-size", help="Model input height x width in pixels, e.g. 28 or 224x224 (default: the metadata's; else 32, said on stderr)."
    ),
]
Mean = Annotated[
    str | None, typer.Option("--mean", help="Normalisation mean of [0, 1] pixels: one value or one per channel, e.g. 0.485,0.456,0.406.")
]
Std = Annotated[str | None, typer.Option("--std", help="Normalisation std: one value or one per channel, e.g. 0.229,0.224,0.225.")]
Resize = Annotated[
    Fit | None,
    typer.Option(
        "--resize",
        help="How images of another size fit the model: resize (bilinear), pad (centred zeros), crop (shorter side, centre crop). "
        "Default: pad up to an eighth of a side, else resize. Recorded in checkpoints written.",
    ),
]
StateKey = Annotated[
    str | None,
    typer.Option(
        "--state-key", help="Key of a .pt/.pth dict that holds the weights (default: state_dict, model_state_dict, model or net)."
    ),
]
Ckpt = Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, .pt/.pth, or a folder holding model.safetensors.")]
Ckpts = Annotated[list[Path], typer.Argument(help="One or more checkpoints (each as for rank).")]
EvalData = Annotated[
    list[str] | None, typer.Option("--data", help="Data spec, repeatable: each checkpoint on each (default: its own held-out data).")
]
Plot = Annotated[Path | None, typer.Option("--plot", help="Also draw a PNG figure to this path.")]
Alpha = Annotated[
    float, typer.Option("--alpha", min=1e-12, max=0.5, help="drift: the false-alarm rate of the shift test on unshifted data.")
]

# training, shared by train, repair and schedule; their defaults are each command's library defaults
Epochs = Annotated[int, typer.Option("--epochs", min=1, max=MAX_EPOCHS, help="Epochs to train (schedule: to plan).")]
Lr = Annotated[float | None, typer.Option("--lr", help="Peak learning rate (train without it: 0.05 for sgd, 0.001 for adam/adamw).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, max=MAX_BATCH, help="Examples per step.")]
Optimizer = Annotated[OptimizerName, typer.Option("--optimizer", help="sgd (heavy-ball momentum), adam or adamw.")]
Momentum = Annotated[MomentumSchedule, typer.Option("--momentum", help="Momentum schedule (beta: mu(t) = 1 - 2 sqrt(lr(t))).")]
Warmup = Annotated[float, typer.Option("--warmup", min=0.0, help="Linear warm-up, in epochs.")]
Seed = Annotated[
    int, typer.Option("--seed", min=0, max=2**63 - 1, help="Seed of every random choice: subsets, samples, the bootstrap, training.")
]

# rank, compare and repair
Data = Annotated[str | None, typer.Option("--data", help="Data spec (default: the data the checkpoint's metadata names).")]
Split = Annotated[str | None, typer.Option("--split", help="train or test (default: test, the held-out split).")]
Limit = Annotated[int | None, typer.Option("--limit", help="Use a seeded random subset of N examples.")]
ClassMap = Annotated[
    Path | None,
    typer.Option("--class-map", help="Image folders: which folder holds which class (JSON {folder: class} or 'folder,class' lines)."),
]
TrainLimit = Annotated[int | None, typer.Option("--train-limit", help="repair: train on a seeded random subset of N training examples.")]
Metric = Annotated[configs.Metric, typer.Option("--metric", help="Score that ranks the groups (see README).")]
Granularity = Annotated[
    configs.Granularity, typer.Option("--granularity", help="group: top-level children; block: their children; module: leaf layers.")
]
TopK = Annotated[int | None, typer.Option("--top-k", help="Flag exactly K groups (default: the largest-gap rule).")]
Contrast = Annotated[
    bool,
    typer.Option("--contrast", help="Also score as many correct examples as errors: the contrast and specific scores (one more pass)."),
]
Bootstrap = Annotated[int, typer.Option("--bootstrap", min=0, max=MAX_BOOTSTRAP, help="Bootstrap replicates over the errors (0: none).")]
TrainDataSpec = Annotated[
    str | None,
    typer.Option(
        "--train-data", help="The model's training data (default: the checkpoint's train split): rank's control pass, repair's training."
    ),
]
Control = Annotated[
    int,
    typer.Option("--control", min=0, help="Training images for the control pass and recalibration probe that decide the cause (0: none)."),
]
NoControl = Annotated[bool, typer.Option("--no-control", help="Skip the control pass (the cause then says what it could not decide).")]
Groups = Annotated[str | None, typer.Option("--groups", help="Comma list of glob patterns restricting the groups ranked, e.g. 'layer3*'.")]


# train
TrainOutput = Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")]
TrainArch = Annotated[str, typer.Option("--arch", "--model", help="Architecture name or package.module:factory.")]
TrainData = Annotated[str, typer.Option("--data", help="Data spec: fashion-mnist, cifar10:DIR, imagefolder:DIR, FILE.safetensors.")]
TestData = Annotated[str | None, typer.Option("--test-data", help="Test data spec (default: the test split of --data).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", min=0.0)]
Augment = Annotated[bool, typer.Option("--augment/--no-augment", help="Random 2-pixel crops and flips.")]
TestLimit = Annotated[int | None, typer.Option("--test-limit", help="Test on a seeded subset of N images.")]

# schedule
HistoryCkpt = Annotated[Path | None, typer.Argument(help="Checkpoint whose training history to show (omit to plan a schedule).")]
PlannedMomenta = Annotated[list[MomentumSchedule] | None, typer.Option("--momentum", help="Schedule(s) to plan; repeatable.")]
StepsPerEpoch = Annotated[int, typer.Option("--steps-per-epoch", min=1)]

# rank
ByClass = Annotated[bool, typer.Option("--by-class", help="Also show which true classes' errors load each group.")]
RankingOut = Annotated[Path | None, typer.Option("--out", help="Save the ranking as JSON for compare and repair.")]

# compare
CompareInputs = Annotated[list[Path], typer.Argument(help="Two or more checkpoints (or rankings saved by rank --out).")]
OverlapTopK = Annotated[int | None, typer.Option("--top-k", help="Flag exactly K groups in each, and report overlap@K.")]

# repair
Layers = Annotated[
    str,
    typer.Option(
        "--layers", help="auto (the groups rank flags), all (every group: a full fine-tune), or a comma list of groups/blocks/modules."
    ),
]
RepairOutput = Annotated[
    Path | None, typer.Option("--output", "-o", help="Repaired checkpoint (default: NAME.repaired.safetensors beside the input).")
]
AutoLayersChoice = Annotated[
    AutoLayers,
    typer.Option(
        "--auto-layers",
        help="What --layers auto repairs: search (the best candidate on validation: recalibration, the suspect and flags, the first "
        "block, the back half, all groups), or without a search both (the drift suspect plus the flags), suspect or flags.",
    ),
]
RankingFile = Annotated[Path | None, typer.Option("--ranking", help="Reuse a ranking saved by rank --out (refused if stale).")]
VerifyData = Annotated[str | None, typer.Option("--data", help="Verification data spec (default: the held-out data rank uses).")]
MethodChoice = Annotated[
    configs.RepairMethod,
    typer.Option(
        "--method",
        help="finetune: train the chosen layers; recalibrate: re-estimate every BatchNorm's statistics on the training data "
        "(no labels, no gradients).",
    ),
]
FocusChoice = Annotated[
    Focus, typer.Option("--focus", help="all: the whole training data; errors: its errors plus 3x as many correct examples.")
]
BaselineChoice = Annotated[
    Baseline, typer.Option("--baseline", help="full: also fine-tune the whole model with the same budget, for comparison.")
]
Cache = Annotated[bool, typer.Option("--cache/--no-cache", help="Compute the frozen prefix's output once.")]
Distill = Annotated[
    float,
    typer.Option(
        "--distill",
        help="Weight of the pull towards the original's predictions on the training examples it gets right "
        f"(0: off; at most {MAX_DISTILL:g}).",
    ),
]
ValData = Annotated[
    str | None, typer.Option("--val-data", help="Validation data spec for the gate (default: --val-fraction of the training data).")
]
ValFraction = Annotated[
    float, typer.Option("--val-fraction", help="Share of the training data held out to choose the epoch and gate the repair.")
]
KeepData = Annotated[
    str | None,
    typer.Option(
        "--keep-data",
        help="Data the repair must not get worse on (default: the checkpoint's own held-out data when the repair verifies on other data).",
    ),
]
AllowForgetting = Annotated[
    bool, typer.Option("--allow-forgetting", help="Ship a repair even if it is significantly worse on the keep data.")
]
AcceptP = Annotated[
    float,
    typer.Option("--accept-p", help="Write the repair only if its validation gain has exact McNemar p at most this (1: any gain)."),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.")]


def rank_config(*, groups_glob: str | None = None, no_control: bool = False, **fields: Any) -> RankConfig:
    """``RankConfig`` from the rank options: ``--groups`` as a comma list of patterns, ``--no-control`` as control 0."""
    include = tuple(p.strip() for p in groups_glob.split(",") if p.strip()) if groups_glob is not None else ()
    if groups_glob is not None and not include:
        raise ConfigError(f"--groups '{groups_glob}' names no pattern: pass e.g. --groups 'layer3*,fc', or drop it to rank every group")
    if no_control:
        fields["control"] = 0
    return RankConfig(include=include, **fields)


MAX_CLASS_MAP_BYTES = 1 << 20


def read_class_map(path: Path | None) -> tuple[tuple[str, str], ...]:
    """``--class-map FILE``: image folder -> the model's class (a name or an index), from a JSON object or from lines
    ``folder<TAB>class`` (or ``folder,class``; blank lines and ``#`` comments skipped). Empty without a file."""
    if path is None:
        return ()
    from beta_diag.outputs import check_input

    check_input(path, "class map", ConfigError)
    if not path.is_file():
        raise ConfigError(f"--class-map {path}: no such file: check the path")
    if path.stat().st_size > MAX_CLASS_MAP_BYTES:
        raise ConfigError(f"--class-map {path}: larger than {MAX_CLASS_MAP_BYTES:,} bytes: one line per folder is enough")
    text = path.read_text(encoding="utf-8", errors="replace")
    pairs: list[tuple[object, object]]
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise ConfigError(f'--class-map {path}: not valid JSON: write an object {{"folder": "class"}}') from None
        if not isinstance(loaded, dict):
            raise ConfigError(f'--class-map {path}: write a JSON object {{"folder": "class"}}')
        pairs = list(loaded.items())
    else:
        pairs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t") if "\t" in line else line.split(",")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ConfigError(f"--class-map {path}: line {number} is not 'folder<TAB>class' or 'folder,class'")
            pairs.append((parts[0].strip(), parts[1].strip()))
    if not all(isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool) for k, v in pairs):
        raise ConfigError(f"--class-map {path}: every folder must map to a class name or index")
    return tuple((str(k), str(v)) for k, v in pairs)


def input_files(*paths: Path | None, specs: tuple[str | DataChoice | None, ...] = ()) -> tuple[Path, ...]:
    """The files a command reads, which no output may replace: the paths given, and the files its data choices (or
    specs recorded in results) name, such as bundles; a malformed spec is left to the command to refuse."""
    found = [p for p in paths if p is not None]
    for spec in specs:
        choice = spec if isinstance(spec, DataChoice) else DataChoice(spec)
        with contextlib.suppress(BetaDiagError):
            found += choice.source.files() if choice.source is not None else []
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


def _numbers(option: str, text: str | None, kind: type[int | float]) -> tuple[Any, ...] | None:
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in re.split(r"[,x]" if kind is int else ",", text.strip()) if v.strip())  # sizes: 224x224
    except ValueError:
        raise ConfigError(f"{option} {text}: pass numbers separated by commas (sizes: 28 or 224x224)") from None


MODEL_OPTIONS = {  # option: (declaration, default)
    "arch": (Arch, None),
    "arch_arg": (ArchArg, None),
    "input_size": (InputSize, None),
    "mean": (Mean, None),
    "std": (Std, None),
    "resize": (Resize, None),
    "state_key": (StateKey, None),
}
RANK_OPTIONS = {  # the options rank and compare share; each command adds its own --top-k, --seed (and rank --by-class)
    "metric": (Metric, configs.DEFAULT_METRIC),
    "granularity": (Granularity, configs.Granularity.group),
    "bootstrap": (Bootstrap, configs.DEFAULT_BOOTSTRAP),
    "contrast": (Contrast, False),
    "control": (Control, configs.DEFAULT_CONTROL),
    "no_control": (NoControl, False),
    "groups_glob": (Groups, None),
}


def model_choice(
    arch: str | None = None,
    arch_arg: list[str] | None = None,
    input_size: str | None = None,
    mean: str | None = None,
    std: str | None = None,
    resize: Fit | None = None,
    state_key: str | None = None,
) -> ModelChoice:
    """The model options as the command line gives them (text), parsed into the library's ``ModelChoice``."""
    size = _numbers("--input-size", input_size, int)
    if size is not None and len(size) not in (1, 2):
        raise ConfigError(f"--input-size {input_size}: pass one side (28) or height x width (224x224)")
    return ModelChoice(
        arch=arch,
        arch_kwargs=parse_arch_args(arch_arg),
        input_size=None if size is None else (size[0], size[-1]),
        mean=_numbers("--mean", mean, float),
        std=_numbers("--std", std, float),
        resize=resize,
        state_key=state_key,
    )


def _takes(param: str, options: dict[str, tuple[Any, Any]], build: Callable[..., Any]) -> Callable[[F], F]:
    """A decorator that declares ``options`` on a command in place of its ``param`` parameter, and calls the command
    with ``build(**options given)`` there: options several commands share are declared once."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        declared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, (annotation, default) in options.items()
        ]
        params = []
        for p in signature.parameters.values():
            params += declared if p.name == param else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name, default) for name, (_, default) in options.items()}
            return command(**kwargs, **{param: build(**given)})

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
        return wrapper  # type: ignore[return-value]

    return decorate


takes_model = _takes("model", MODEL_OPTIONS, model_choice)  # every command that opens a checkpoint: one ModelChoice
takes_ranking = _takes("ranking", RANK_OPTIONS, rank_config)  # rank and compare: one RankConfig, before --top-k and --seed
