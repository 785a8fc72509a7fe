"""The library's choices and configurations: plain values, importable without torch.

The command line is built from these (its option types and defaults), so ``beta-diag --help``,
``--version`` and usage errors answer before torch loads; the modules that compute import them from
here. A new option's value type or default goes here; what it does goes in its module.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from beta_diag.errors import ConfigError
from beta_diag.limits import MAX_BATCH, MAX_BOOTSTRAP, MAX_EPOCHS

if TYPE_CHECKING:
    from beta_diag.readers import DataSpec

# ranking (scores, groups)


class Metric(str, Enum):
    coherence = "coherence"  # ||sum of error gradients|| / sum of their norms: do the errors agree on a direction?
    specific = "specific"  # mean share of the squared gradient on errors minus on correct examples
    norm = "norm"  # mean error-gradient norm
    per_param = "per_param"  # norm / sqrt(parameters)
    weight_rel = "weight_rel"  # norm / ||theta_g||
    contrast = "contrast"  # norm on errors / norm on correct examples
    share = "share"  # the group's share of the summed error-gradient norms


DEFAULT_METRIC = Metric.coherence
DEFAULT_BOOTSTRAP = 200
DEFAULT_CONTROL = 1000  # training images for rank's control pass and recalibration probe (causes.py)


class Fit(str, Enum):
    """How images of another size are fitted to the model's input (``--resize``; none given: pad a little, else resize)."""

    resize = "resize"  # bilinear to exactly the model's height and width
    pad = "pad"  # zero-padded, centred (a side larger than the model's is centre-cropped)
    crop = "crop"  # scaled so the shorter side fits, then centre-cropped (the usual ImageNet evaluation)


class Granularity(str, Enum):
    group = "group"
    block = "block"
    module = "module"


# training (schedules, training)


class MomentumSchedule(str, Enum):
    constant = "constant"  # 0.9 throughout
    beta = "beta"  # clamp(1 - 2*sqrt(lr), 0.5, 0.99) every step
    hybrid = "hybrid"  # beta until the critical curve reaches 0.9, then constant 0.9
    onecycle = "onecycle"  # torch's OneCycleLR, momentum cycled 0.95 -> 0.85 -> 0.95


def check_lr(lr: float) -> None:
    """The one check of a peak learning rate (``train``, ``repair`` and ``schedule``): finite and positive."""
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr {lr}: pass a finite positive learning rate, e.g. --lr 0.05")


PLANNED_LR, PLANNED_EPOCHS, PLANNED_STEPS_PER_EPOCH = 0.1, 200, 391  # the paper's CIFAR-10 run: 50,000 images in batches of 128
PLANNED = (MomentumSchedule.constant, MomentumSchedule.beta, MomentumSchedule.hybrid)  # what `schedule` plans by default


class OptimizerName(str, Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


@dataclass(frozen=True)
class DataChoice:
    """Which data to use: a spec (None: the checkpoint's own), a split (None: test), a seeded limit, and for image
    folders, which folder holds which of the model's classes where their names do not say (``--class-map``)."""

    spec: str | None = None
    split: str | None = None
    limit: int | None = None
    seed: int = 0
    class_map: tuple[tuple[str, str], ...] = ()  # image folder -> the model's class (name or index): ``--class-map``

    @functools.cached_property
    def source(self) -> DataSpec | None:
        """The spec, parsed once for every use of this choice (None: the checkpoint's own data). A malformed spec
        raises DataError naming the formats."""
        from beta_diag.readers import DataSpec

        return DataSpec.parse(self.spec) if self.spec else None


@dataclass(frozen=True, kw_only=True)
class ModelChoice:
    """What a checkpoint's metadata does not say about its model (or says wrong), given by hand: ``--arch``,
    ``--arch-arg``, ``--input-size`` (height, width), ``--mean``/``--std`` (one value or one per channel),
    ``--resize`` and ``--state-key``. ``None`` (and no arch keywords) keeps what the file says."""

    arch: str | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: Fit | None = None
    state_key: str | None = None


DEFAULT_LR = {OptimizerName.sgd: 0.05, OptimizerName.adam: 0.001, OptimizerName.adamw: 0.001}  # when --lr is not given


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train. ``momentum`` picks the schedule; the LR follows cosine (or 1cycle)."""

    epochs: int = 5
    lr: float = None  # type: ignore[assignment]  # None: DEFAULT_LR of the optimizer, filled in at construction
    batch_size: int = 128
    optimizer: OptimizerName = OptimizerName.sgd
    momentum: MomentumSchedule = MomentumSchedule.beta
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    augment: bool = False
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.lr is None:  # one policy for Python and the command line: Adam at SGD's 0.05 diverges
            object.__setattr__(self, "lr", DEFAULT_LR[OptimizerName(self.optimizer)])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["optimizer"], d["momentum"] = OptimizerName(self.optimizer).value, MomentumSchedule(self.momentum).value
        return d

    def check(self) -> None:
        """Refuse values no training can use: a non-finite or non-positive LR, non-finite decay or warm-up."""
        if not (1 <= self.epochs <= MAX_EPOCHS and 1 <= self.batch_size <= MAX_BATCH):
            raise ConfigError(f"epochs must be 1 to {MAX_EPOCHS:,} and the batch size 1 to {MAX_BATCH:,}: check --epochs and --batch-size")
        check_lr(self.lr)
        for option, value in (("--weight-decay", self.weight_decay), ("--warmup", self.warmup_epochs)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{option} {value}: pass a finite number, 0 or more")


# repair

MAX_DISTILL = 100.0  # beyond this the pull swamps the loss and the steps diverge
DISTILL_TEMPERATURE = 2.0  # the pull's softmax temperature (training.Anchor)


class Focus(str, Enum):
    all = "all"
    errors = "errors"


class Baseline(str, Enum):
    none = "none"
    full = "full"


class RepairMethod(str, Enum):
    """How ``repair`` changes the model: train the chosen layers, or re-estimate the BatchNorm statistics."""

    finetune = "finetune"  # train the chosen layers with beta momentum
    recalibrate = "recalibrate"  # re-estimate every BatchNorm's running statistics on the training data: no labels, no gradients


class AutoLayers(str, Enum):
    """What ``--layers auto`` repairs: the best of several candidates on validation (``search``), or, without a
    search, the groups rank flags, the drift suspect, or both."""

    search = "search"  # recalibration, the suspect and flags, the first block, the back half, all groups: the best on validation

    flags = "flags"  # where the errors' gradients agree most
    suspect = "suspect"  # the drift suspect when there is one, else the flags
    both = "both"  # the drift suspect plus the flags


REPAIR_TRAINING = TrainConfig(epochs=3, lr=0.003, batch_size=128, optimizer=OptimizerName.sgd, momentum=MomentumSchedule.beta)
"""Repair's training: SGD, beta momentum on a cosine LR from 0.003, 3 epochs, no warm-up or augmentation
(the LR was chosen by ``benchmarks/repair_defaults.py``, first on damaged models, then on a healthy one)."""


def repair_training(**changes: Any) -> TrainConfig:
    """Repair's training with some values changed, e.g. ``RepairConfig(training=repair_training(epochs=1))``
    (a bare ``TrainConfig()`` carries ``train``'s defaults: 5 epochs at LR 0.05)."""
    return replace(REPAIR_TRAINING, **changes)


Layers = Literal["auto", "all"] | Sequence[str]  # what repair trains: auto (rank leads), all, or names (a bare string: a comma list)


@dataclass(frozen=True, kw_only=True)
class RepairConfig:
    """How to repair: the ``training`` of the chosen layers (the one training loop's configuration; its
    device is the repair's), plus what only repair has. ``distill`` > 0 adds a pull towards the
    original's predictions on the training examples it already gets right (``training.Anchor``); it is
    off by default (``benchmarks/repair_defaults.py``, scored on images disjoint from the repair's)."""

    training: TrainConfig = REPAIR_TRAINING
    focus: str = "all"  # or "errors"
    baseline: str = "none"  # or "full"
    cache_features: bool = True
    distill: float = 0.0
    auto_layers: AutoLayers = AutoLayers.search  # without a search, both: planted faults 93% won back (flags 83%)
    val_fraction: float = 0.2  # of the training data, held out for the gate (unless validation data are given)
    accept_p: float = 0.05  # the gate: write only if the validation gain's one-sided McNemar p is at most this (1: any gain)
    method: RepairMethod = RepairMethod.finetune
    allow_forgetting: bool = False  # ship a repair significantly worse on the keep data

    def train_config(self, device: str) -> TrainConfig:
        """The shared training loop's configuration, on the repair's device."""
        return replace(self.training, device=device)

    def to_dict(self) -> dict[str, Any]:
        shared = {k: v for k, v in self.training.to_dict().items() if k not in ("warmup_epochs", "augment", "device")}
        return {
            **shared,
            "focus": self.focus,
            "baseline": self.baseline,
            "cache_features": self.cache_features,
            "distill": self.distill,
            "distill_temperature": DISTILL_TEMPERATURE,
            "auto_layers": AutoLayers(self.auto_layers).value,
            "val_fraction": self.val_fraction,
            "accept_p": self.accept_p,
            "method": RepairMethod(self.method).value,
            "allow_forgetting": self.allow_forgetting,
        }

    def check(self) -> None:
        self.training.check()
        if self.training.warmup_epochs or self.training.augment:
            raise ConfigError("repair trains without warm-up or augmentation (the frozen prefix's features are cached): leave both off")
        if not 0 <= self.distill <= MAX_DISTILL:
            raise ConfigError(f"--distill {self.distill}: pass a weight from 0 (off) to {MAX_DISTILL:g}")
        if not 0 < self.val_fraction <= 0.5:
            raise ConfigError(f"--val-fraction {self.val_fraction}: pass a share of the training data above 0 and at most 0.5, e.g. 0.2")
        if RepairMethod(self.method) is RepairMethod.recalibrate and self.focus == "errors":
            raise ConfigError("--method recalibrate re-estimates the statistics of all the training data: drop --focus errors")
        if not 0 <= self.accept_p <= 1:
            raise ConfigError(f"--accept-p {self.accept_p}: pass a p-value from 0 to 1 (1 accepts any gain)")


@dataclass(frozen=True, kw_only=True)
class RankConfig:
    """How to rank. ``include``: glob patterns restricting the groups (e.g. ``layer3*``). ``contrast``
    also scores as many correct examples as there are errors (one more pass; the contrast and
    specific metrics need it and turn it on)."""

    metric: Metric = DEFAULT_METRIC
    granularity: Granularity = Granularity.group
    top_k: int | None = None
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    by_class: bool = False
    include: tuple[str, ...] = ()
    batch_size: int = 64
    contrast: bool = False
    control: int = DEFAULT_CONTROL  # training images for the control pass and probe (0: none; the cause then says what it could not decide)

    @property
    def metric_needs_correct(self) -> bool:
        """The contrast and specific metrics compare the errors with correct examples."""
        return Metric(self.metric) in (Metric.contrast, Metric.specific)

    @property
    def scores_correct(self) -> bool:
        """Whether a sample of correct examples is scored: asked for, or the metric needs it."""
        return self.contrast or self.metric_needs_correct

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metric"], d["granularity"], d["include"] = Metric(self.metric).value, Granularity(self.granularity).value, list(self.include)
        d.pop("batch_size")
        return d

    def check(self) -> None:
        if not 0 <= self.bootstrap <= MAX_BOOTSTRAP:
            raise ConfigError(f"--bootstrap {self.bootstrap}: pass 0 to {MAX_BOOTSTRAP:,} replicates (1,000 gives stable intervals)")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ConfigError(f"batch size {self.batch_size}: pass 1 to {MAX_BATCH:,}")
        if self.control < 0:
            raise ConfigError(f"--control {self.control}: pass a number of training images, or 0 (--no-control) to skip the control pass")
