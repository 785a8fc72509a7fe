"""The one training loop, shared by ``train`` and ``repair`` (evaluation lives in ``runtime``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beta_diag import data as data_mod
from beta_diag import distributed, fingerprint
from beta_diag.checkpoint import nonfinite
from beta_diag.configs import DISTILL_TEMPERATURE, DataChoice, OptimizerName, TrainConfig
from beta_diag.data import Dataset, Preprocess, ToInput
from beta_diag.errors import ConfigError
from beta_diag.fingerprint import Fingerprint
from beta_diag.metadata import Metadata
from beta_diag.runtime import Progress, autocast, evaluate, prepare, resolve_device
from beta_diag.schedules import MomentumScheduler, epoch_record, lr_scheduler
from beta_diag.serial import without_timing


@dataclass(frozen=True)
class Anchor:
    """A pull towards reference predictions: per example, ``weight`` times the KL divergence from the
    reference logits' softmax to the model's, both at ``temperature`` (knowledge distillation, Hinton
    et al. 2015), scaled by temperature^2 so that its gradient does not shrink with T. Repair anchors
    the examples the original model already classifies correctly (focal distillation, Yan et al. 2021,
    "positive-congruent training"), so that fixing errors stays free and breaking what works costs."""

    logits: torch.Tensor  # (N, classes) reference logits in dataset order
    weight: torch.Tensor  # (N,) per-example weight; 0 leaves an example to cross-entropy alone
    temperature: float = DISTILL_TEMPERATURE

    def loss(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Summed over the batch whose dataset indices are ``idx``."""
        t = self.temperature
        ref = F.log_softmax(self.logits[idx].to(logits.device).float() / t, 1)
        kl = F.kl_div(F.log_softmax(logits.float() / t, 1), ref, log_target=True, reduction="none").sum(1)
        return (self.weight[idx].to(logits.device) * kl).sum() * t * t


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 2-pixel zero padding and horizontal flip, per example. x: (B, C, H, W)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    oy = torch.randint(0, 5, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 5, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 4)
    cols = (ox[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    x = padded.gather(2, rows).gather(3, cols)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device).view(b, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    name = OptimizerName(config.optimizer)
    if name is OptimizerName.sgd:
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if name is OptimizerName.adam else torch.optim.AdamW
    return cls(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)


def set_train_mode(model: nn.Module) -> None:
    """Train mode only for modules that own a trainable parameter; frozen parts stay in eval mode.

    So a frozen BatchNorm keeps its running statistics, and a trained one updates them.
    """
    model.eval()
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()


def fit(
    model: nn.Module,
    train_ds: Dataset,
    test_ds: Dataset | None,
    preprocess: ToInput,
    config: TrainConfig,
    progress: Progress | None = None,
    anchor: Anchor | None = None,
    on_epoch: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train the parameters that have ``requires_grad``; return the per-epoch history. ``on_epoch(model)``
    runs after each epoch (eval mode, e.g. repair's validation) and adds its figures to the epoch's record;
    a record with ``stopped`` true ends training there (the schedule is not shortened: the run is cut).

    The loss is cross-entropy, plus ``anchor.loss`` when an anchor is given (repair's distillation).
    Modules owning a trainable parameter train in train mode; frozen ones stay in eval mode.
    Under torchrun: DistributedDataParallel; every process draws the same global batch (and
    augmentation) and trains on its contiguous slice, with the loss scaled so that the averaged
    gradient is that of the global batch's mean loss. BatchNorm statistics are per process on
    CPU and synchronised (SyncBatchNorm) on CUDA.
    """
    config.check()
    device = resolve_device(config.device)
    model = prepare(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen; choose at least one layer group")
    world = distributed.current()
    if len(train_ds) < 2 * world.size:
        raise ConfigError(f"{len(train_ds)} training examples for {world.size} processes: pass more data or start fewer processes")
    net = model
    if world.size > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]  # torch's own, untyped
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(params, config)
    steps_per_epoch = -(-len(train_ds) // config.batch_size)
    total = config.epochs * steps_per_epoch
    sched = lr_scheduler(opt, config.momentum, total, round(config.warmup_epochs * steps_per_epoch))
    mom = MomentumScheduler(opt, config.momentum)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(config.epochs):
        start = time.perf_counter()
        set_train_mode(model)
        lrs, mus, loss_sum, pull_sum, seen, hits = [], [], 0.0, 0.0, 0.0, 0.0
        for step, (x, y, idx) in enumerate(data_mod.batches(train_ds, config.batch_size, device, shuffle=True, generator=gen)):
            if (
                world.size > 1 and y.numel() < 2 * world.size
            ):  # a last global batch too small to slice (BatchNorm needs 2): skipped, on schedule
                mom.step()
                sched.step()
                continue
            inputs = preprocess(x)
            if config.augment:
                inputs = augment(inputs, gen)
            global_batch = y.numel()
            inputs, y, idx = (t.tensor_split(world.size)[world.rank] for t in (inputs, y, idx))
            if device.type == "cuda" and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            lrs.append(opt.param_groups[0]["lr"])
            mus.append(mom.step())
            with autocast(device):
                logits = net(inputs)
                ce = F.cross_entropy(logits.float(), y, reduction="sum")
                pull = anchor.loss(logits, idx) if anchor is not None else None
                loss = (ce if pull is None else ce + pull) * (world.size / global_batch)  # DDP averages over processes
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]  # torch's own, untyped
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += float(ce.detach())  # cross-entropy alone: the same measure with or without an anchor
            pull_sum += 0.0 if pull is None else float(pull.detach())
            hits += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            if progress:
                progress(f"epoch {epoch + 1}/{config.epochs}", step + 1, steps_per_epoch)
        world.sync_buffers(model)
        loss_sum, pull_sum, hits, seen = world.total([loss_sum, pull_sum, hits, seen], device)
        record = {"epoch": epoch + 1, **epoch_record(lrs, mus), "train_loss": loss_sum / seen, "train_acc": hits / seen}
        if anchor is not None:
            record["anchor_loss"] = pull_sum / seen  # the mean pull towards the reference, as optimised
        if test_ds is not None:
            record["test_acc"] = evaluate(model, test_ds, preprocess, device).accuracy
        if on_epoch is not None:
            record.update(on_epoch(model.eval()))
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if record.get("stopped"):  # on_epoch ended the run early (repair's search: this arm cannot catch the best)
            break
    model.eval()
    return history


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (model initialisation) and restore it afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@dataclass(frozen=True)
class TrainResult:
    """A trained model (eval mode, CPU) and the metadata to save with it."""

    model: nn.Module
    metadata: Metadata  # records no wall-clock, so the same command writes the same bytes
    seconds: float
    fingerprint: Fingerprint | None = None  # its activation statistics on the training data (fingerprint.py)


def train(
    arch: str,
    *,
    data: DataChoice = DataChoice("fashion-mnist"),
    test: DataChoice | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    config: TrainConfig = TrainConfig(),
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``arch`` on the train split of ``data``, testing each epoch on ``test`` (default: the test split
    of ``data``'s spec). A choice's ``limit`` takes a subset seeded by its ``seed``.

    Example: ``train('resnet18_cifar', data=DataChoice('fashion-mnist', limit=2000), arch_kwargs={'width': 16})``.
    """
    import inspect

    from beta_diag import models

    config.check()  # before any data is read
    train_spec = data.source
    if train_spec is None:
        raise ConfigError("train needs data: pass e.g. DataChoice('fashion-mnist')")
    if (test is None or test.source is None) and train_spec.reader.one_split:
        raise ConfigError(f"{train_spec} is a bundle, which holds one split: pass --test-data with held-out images")
    test_spec = test.source if test is not None and test.source is not None else train_spec
    limit, test_limit = data.limit, test.limit if test is not None else None
    train_ds = data_mod.load(train_spec, "train", limit=limit, seed=data.seed)
    test_ds = data_mod.load(test_spec, "test", limit=test_limit, seed=data.seed if test is None else test.seed)
    data_mod.check_fits(train_ds, 10**9, min_classes=2)
    num_classes = max(len(train_ds.class_names), int(train_ds.labels.max()) + 1)
    data_mod.check_fits(test_ds, num_classes)
    kwargs = dict(arch_kwargs or {})
    channels, height, width = train_ds.images.shape[1:]
    mean, std = data_mod.channel_stats(train_ds.images)
    if "in_channels" in inspect.signature(models.resolve(arch)).parameters:
        kwargs.setdefault("in_channels", int(channels))
    elif channels == 1:  # torchvision models take RGB: grey is repeated over 3 channels
        channels, mean, std = 3, mean * 3, std * 3
    kwargs.setdefault("num_classes", num_classes)
    with seeded(config.seed):
        model = models.build(arch, kwargs)
    preprocess = Preprocess((int(channels), int(height), int(width)), mean, std)
    history = fit(model, train_ds, test_ds, preprocess, config, progress=progress)
    diverged = list(nonfinite(model.state_dict()))
    if diverged:
        raise ConfigError(f"training diverged: {len(diverged)} tensors hold NaN/Inf (first {diverged[0]}): nothing written; lower --lr")
    meta = Metadata(
        arch=arch,
        arch_kwargs={k: v for k, v in kwargs.items() if k != "num_classes"},
        num_classes=num_classes,
        input_shape=preprocess.input_shape,
        mean=mean,
        std=std,
        class_names=train_ds.class_names,
        dataset=train_spec.name,
        data={
            "train": {"spec": str(train_spec.resolved()), "split": "train"},
            "test": {"spec": str(test_spec.resolved()), "split": "test"},
        },
        training={
            **config.to_dict(),
            "limit": limit,
            "test_limit": test_limit,
            "train_examples": len(train_ds),
            "test_examples": len(test_ds),
            "torch": torch.__version__,
        },
        history=tuple(without_timing(history)),  # type: ignore[arg-type]
    )
    found = fingerprint.measure(model, preprocess, resolve_device(config.device), train_ds, progress)
    return TrainResult(model.cpu().eval(), meta, sum(h["seconds"] for h in history), found)
