"""Activation drift: each BatchNorm's input on the data against the running statistics it recorded in training.

A BatchNorm with running statistics is a reference the model carries: its running mean and variance
say what its input looked like over the training data. On held-out data from the same distribution a
healthy model's inputs match them closely; damage upstream (weights, a shifted running mean, a
corrupted input) makes the first BatchNorm after it see something else. Per BatchNorm and channel,
with ``mu``/``s2`` the input's mean and variance on the data (over examples and positions) and ``m``/``v``
the running statistics, drift is the KL divergence of two Gaussians, split in two parts:

    mean part     0.5 z^2,                z = (mu - m) / sqrt(v + eps)
    variance part 0.5 (r - 1 - log r),    r = (s2 + eps) / (v + eps)

averaged over channels (eps: the BatchNorm's own, which it adds to the variance it divides by).

The sums ride ``rank``'s evaluation pass (``Recorder``): forward hooks add, per channel, each
example's mean of the input centred at the running mean and of its square (and their squares, for
the sampling noise), over all examples and over the errors.

Localisation (``localise``): walking the BatchNorms in the order the forward pass calls them, each
one's jump is its drift over the largest of: the drift at any earlier one, its own sampling noise
(the drift that a finite sample adds on average), and a floor (a healthy model's drift stays below
it, so its jumps stay small). The first BatchNorm whose jump exceeds the threshold
names the suspect: its mean part is charged to the BatchNorm's own group (a shifted running mean, or
a bias upstream), its variance part to the group of the layer feeding it (a damaged convolution
changes the spread of what it hands on), whichever is larger; but a variance that moved while the
mean stayed within sampling noise is charged to the BatchNorm's own group (its running variance
changed, not its input: a damaged layer upstream moves the mean of what it hands on too). No jump above the threshold: no drift
found, so any fault lies after the last BatchNorm or does not show in activation statistics.

The same test runs against any ``Reference``: a BatchNorm's running statistics for its input (the
default), or a checkpoint's fingerprint (``fingerprint.py``) for each layer group's output, whose own
sampling noise is added to the data's. A fingerprint point has no feeder: its drift is its own group's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from beta_diag import distributed
from beta_diag.groups import Group
from beta_diag.shown import times

RUNNING_STATS_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass(frozen=True)
class Rule:
    """The localisation rule's constants (chosen on planted faults, seeds 0-1: benchmarks/drift_rule.py)."""

    floor: float = 1e-3  # drift below this is a healthy model's own profile (the samples stay under 1e-3 on held-out data)
    threshold: float = 4.0  # a jump of more than this many times its base names a suspect
    unmoved: float = 2.0  # a mean part within this many times the sampling noise: the input's mean has not moved


def _tracks(module: nn.Module) -> bool:
    return isinstance(module, RUNNING_STATS_NORMS) and module.track_running_stats and module.running_mean is not None


def _buffer(module: nn.modules.batchnorm._NormBase, name: str) -> torch.Tensor:
    """A tracked BatchNorm's running statistic, detached, in float64 (``_tracks`` saw that it exists)."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value.detach().double()


@dataclass(frozen=True)
class Reference:
    """What one place's activations looked like over the training data, per channel: the input of a BatchNorm
    (its running statistics) or the output of a fingerprinted module. ``group``: the group a fingerprint point
    stands for (None: the BatchNorm's own group at the ranking's granularity). ``noise``: the reference's own
    sampling noise in the mean and variance parts (zero for running statistics, whose noise is unknown)."""

    name: str
    at: Literal["input", "output"]
    mean: torch.Tensor = field(repr=False)  # (C,) float64, on the CPU
    var: torch.Tensor = field(repr=False)  # (C,) float64, without eps
    eps: float
    axis: int = 1  # the channel axis of the tensor seen (-1: tokens, channels last)
    group: str | None = None
    noise: tuple[float, float] = (0.0, 0.0)

    @property
    def channels(self) -> int:
        return int(self.mean.numel())


def batchnorm_references(model: nn.Module) -> list[Reference]:
    """Every BatchNorm with running statistics, as a reference for its own input."""
    return [
        Reference(name, "input", _buffer(m, "running_mean").cpu(), _buffer(m, "running_var").cpu(), float(m.eps))
        for name, m in model.named_modules()
        if name and _tracks(m)
    ]


def unavailable_reason(model: nn.Module) -> str | None:
    """Why drift cannot be measured on ``model``, or None when it can."""
    if any(_tracks(m) for m in model.modules()):
        return None
    if any(isinstance(m, RUNNING_STATS_NORMS) for m in model.modules()):
        return "its BatchNorm layers keep no running statistics (track_running_stats=False)"
    if any(isinstance(m, OTHER_NORMS) for m in model.modules()):
        return "its normalisation layers (LayerNorm, GroupNorm or InstanceNorm) keep no running statistics"
    return "it has no BatchNorm layer (none, or folded into the convolutions)"


@dataclass(frozen=True)
class LayerDrift:
    """One BatchNorm's drift on the data. ``feeder``: the parameter-owning layer called just before it."""

    name: str
    group: str | None  # its own group at the ranking's granularity (None for a BatchNorm without parameters)
    feeder: str | None
    feeder_group: str | None
    channels: int
    mean_part: float
    var_part: float
    mean_noise: float  # what sampling alone adds to each part on average, at this many examples
    var_noise: float
    errors_mean_part: float | None  # the same on the errors alone (None without errors)
    errors_var_part: float | None

    @property
    def kl(self) -> float:
        """Non-finite when the input held NaN or Inf."""
        return self.mean_part + self.var_part

    @property
    def noise(self) -> float:
        """The drift that sampling alone adds on average: a jump must stand above it."""
        return self.mean_noise + self.var_noise

    @property
    def errors_kl(self) -> float | None:
        return None if self.errors_mean_part is None or self.errors_var_part is None else self.errors_mean_part + self.errors_var_part


@dataclass(frozen=True)
class Drift:
    """The drift profile of a model on some data and where it points. ``available`` False: ``reason`` says why."""

    available: bool
    reason: str | None = None
    suspect: str | None = None
    margin: float | None = None  # the suspect's jump: its drift over its base (largest earlier drift, own noise, floor)
    suspect_layer: str | None = None
    groups: dict[str, float] | None = None  # per group: the largest jump charged to it
    layers: tuple[LayerDrift, ...] = ()
    rule: Rule = Rule()
    downstream: tuple[str, ...] = ()  # groups whose layers run after the last BatchNorm: drift cannot see them
    source: str = "batchnorm"  # what drift was measured against: "batchnorm" (running statistics) or "fingerprint"

    @property
    def finding(self) -> str:
        """One clause for the verdict."""
        if not self.available:
            return f"drift unavailable: {self.reason}"
        if self.suspect is None:
            if self.source == "fingerprint":
                return "no activation drift found against the fingerprint: the fault does not show in activation statistics"
            after = f" (in {', '.join(self.downstream)})" if self.downstream else ""
            return f"no activation drift found: any fault lies after the last BatchNorm{after} or does not show in activation statistics"
        return (
            f"activations leave their training statistics at {self.suspect} (x{times(self.margin)}): "
            "the damage is likely there, or the data differ from the training data"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [
            {**asdict(layer), "kl": layer.kl, "errors_kl": layer.errors_kl, "jump": jump}
            for layer, jump in zip(self.layers, jumps(self.layers, self.rule.floor))
        ]
        d["finding"] = self.finding
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Drift:
        keep = {f for f in LayerDrift.__dataclass_fields__}
        layers = tuple(LayerDrift(**{k: v for k, v in layer.items() if k in keep}) for layer in d.get("layers", ()))
        return cls(
            d["available"],
            d.get("reason"),
            d.get("suspect"),
            d.get("margin"),
            d.get("suspect_layer"),
            d.get("groups"),
            layers,
            Rule(**d["rule"]) if d.get("rule") else Rule(),
            tuple(d.get("downstream", ())),
            d.get("source", "batchnorm"),
        )


def bases(layers: Sequence[LayerDrift], floor: float = Rule.floor) -> list[float]:
    """What each layer's drift is measured against: the largest drift at any earlier layer, its own
    sampling noise, or ``floor``, whichever is largest."""
    out, top = [], floor
    for layer in layers:
        out.append(max(top, layer.noise))
        top = max(top, layer.kl) if math.isfinite(layer.kl) else top
    return out


def jumps(layers: Sequence[LayerDrift], floor: float = Rule.floor) -> list[float]:
    """Each layer's drift over its base (``bases``)."""
    return [layer.kl / base for layer, base in zip(layers, bases(layers, floor))]


def localise(layers: Sequence[LayerDrift], rule: Rule = Rule()) -> tuple[str | None, float | None, str | None, dict[str, float]]:
    """(suspect group, its jump, the BatchNorm that names it, largest charged jump per group) from a profile in call order."""
    per_group: dict[str, float] = {}
    suspect = margin = layer_name = None
    for layer, base in zip(layers, bases(layers, rule.floor)):
        finite = math.isfinite(layer.kl)
        jump = layer.kl / base if finite else math.inf  # NaN or Inf in a BatchNorm's input: broken from there on
        own, feeder = layer.group or layer.feeder_group, layer.feeder_group or layer.group
        # a variance that moved while the mean stayed within sampling noise: the BatchNorm's own running variance
        # changed, not its input (a damaged layer upstream moves the mean of what it hands on too)
        unmoved = finite and layer.mean_part <= rule.unmoved * layer.mean_noise
        var_to = own if unmoved else feeder
        for group, part in ((own, layer.mean_part), (var_to, layer.var_part)):
            if group is not None:
                per_group[group] = max(per_group.get(group, 0.0), part / base if finite else math.inf)
        if suspect is None and jump > rule.threshold:
            suspect = own if finite and layer.mean_part >= layer.var_part else var_to
            margin, layer_name = jump, layer.name
    return suspect, margin, layer_name, per_group


def _owner(name: str, groups: Sequence[Group]) -> str | None:
    """The group holding module ``name``: the longest group name that is the module or one of its ancestors."""
    best = None
    for g in groups:
        if (name == g.name or name.startswith(g.name + ".")) and (best is None or len(g.name) > len(best)):
            best = g.name
    return best


class Recorder:
    """Forward hooks at every reference (default: every BatchNorm with running statistics), for one evaluation pass.

    Each hook takes its batch's per-example, per-channel mean and mean square of the tensor it watches (two
    fused reductions over the activation); ``commit`` (called with the batch's logits and labels)
    centres them at the reference means in float64, m1 = mean - m and m2 = square - 2 m mean + m^2
    (the mean square of the centred input), and adds m1, m2 and their products (m1^2, m2^2, m1 m2: the sampling noise,
    with examples, not positions, as the independent draws) to the totals over all examples and
    over the errors: for all references at once, one small matrix product per batch on the model's
    device, no host transfer. Per-example statistics are float32 (one image's positions), totals
    float64. A module called more than once per forward pass is left out (its calls see different
    tensors). Also records, on the first batch, the order in which parameter-owning layers run.
    Unlabelled data (labels -1) count as no error.
    """

    def __init__(self, model: nn.Module, references: Sequence[Reference] | None = None, source: str = "batchnorm") -> None:
        self.model = model
        self.source = source
        refs = batchnorm_references(model) if references is None else list(references)
        modules = dict(model.named_modules())
        self.refs: dict[str, Reference] = {r.name: r for r in refs if r.name in modules}
        self.order: list[str] = []
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.repeated: set[str] = set()
        self.layout: list[str] | None = None  # the references of the first batch, in call order: columns of ``total``
        self.irregular = False  # a later batch ran other references than the first
        self.ref_means: torch.Tensor | None = None  # (sum C,) float64
        self.total: torch.Tensor | None = None  # (2, 6, sum C) float64: [all, errors] x [n, m1, m2, m1^2, m2^2, m1 m2] summed
        self.batch_totals: list[torch.Tensor] = []  # under torchrun: this process's per-batch sums, to add in global order
        self.reduced = False
        self.handles = [modules[name].register_forward_hook(self._stats(name)) for name in self.refs]
        self.order_handles = [
            m.register_forward_hook(self._seen(name))
            for name, m in model.named_modules()
            if name and any(True for _ in m.parameters(recurse=False)) and name not in self.refs
        ]

    def _seen(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: object) -> None:
            if self.layout is None and name not in self.order:
                self.order.append(name)

        return hook

    def _stats(self, name: str) -> Any:
        ref = self.refs[name]

        def hook(module: nn.Module, args: tuple[Any, ...], output: object) -> None:
            seen = (args[0] if args else None) if ref.at == "input" else output
            if not isinstance(seen, torch.Tensor) or seen.dim() < 2 or seen.shape[ref.axis] != ref.channels:
                return
            if name in self.pending:
                self.repeated.add(name)
                return
            if self.layout is None and name not in self.order:
                self.order.append(name)
            x = seen.detach().float()
            x = x if ref.axis == 1 else x.movedim(ref.axis, 1)  # (B, C, ...)
            dims = tuple(range(2, x.dim()))
            # two fused reductions (torch.var_mean is 10-40x slower here on CPU): per-example mean and mean square, (B, C)
            positions = math.prod(x.shape[2:])
            mean = x.mean(dims) if dims else x
            square = torch.linalg.vector_norm(x, dim=dims).square() / positions if dims else x.square()
            self.pending[name] = (mean, square)

        return hook

    def commit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the batch just evaluated; its errors are the examples whose argmax differs from the label."""
        if not self.pending:
            return
        if self.layout is None:
            self.layout = list(self.pending)
            for h in self.order_handles:  # the call order is known after one batch
                h.remove()
            self.ref_means = torch.cat([self.refs[n].mean for n in self.layout]).to(logits.device)
        elif list(self.pending) != self.layout:
            self.irregular = True
        if not self.irregular:
            mean = torch.cat([self.pending[n][0] for n in self.layout], 1).double()  # (B, sum C)
            assert self.ref_means is not None  # set with the layout
            m1 = mean - self.ref_means
            m2 = torch.cat([self.pending[n][1] for n in self.layout], 1).double() - 2 * self.ref_means * mean + self.ref_means.square()
            m = torch.stack([torch.ones_like(m1), m1, m2, m1.square(), m2.square(), m1 * m2], 1)  # (B, 6, sum C)
            wrong = ((logits.argmax(1) != labels) & (labels >= 0)).to(m)
            add = torch.einsum("kb,bsc->ksc", torch.stack([torch.ones_like(wrong), wrong]), m)  # (2, 6, sum C)
            self.total = add if self.total is None else self.total + add
            if distributed.current().size > 1:
                self.batch_totals.append(add.cpu())
        self.pending.clear()

    def remove(self) -> None:
        for h in self.handles + self.order_handles:
            h.remove()

    def _reduce(self) -> None:
        """Under torchrun each process saw every size-th batch: add all processes' batches in batch order,
        as one process adds them, so that the figures are bit-identical to one process's."""
        world = distributed.current()
        if world.size == 1 or self.reduced:
            return
        self.reduced = True  # channel_sums and result both ask: gather once
        everyone = world.round((self.layout, self.order, self.irregular, self.batch_totals))
        self.layout = next((p[0] for p in everyone if p[0] is not None), None)  # type: ignore[index]
        self.order = next((p[1] for p in everyone if p[0] is not None), self.order)  # type: ignore[index]
        self.irregular = any(p[2] for p in everyone)  # type: ignore[index]
        parts = [p[3] for p in everyone]  # type: ignore[index]
        ordered = [parts[b % world.size][b // world.size] for b in range(sum(len(p) for p in parts))]  # batch b: process b % size's
        if ordered:
            self.total = ordered[0].clone()
            for add in ordered[1:]:
                self.total = self.total + add

    def channel_sums(self, errors: bool = False) -> dict[str, torch.Tensor]:
        """Per reference called once per pass: the (6, C) float64 totals over every example (or the errors)."""
        self._reduce()
        if self.total is None or self.layout is None or self.irregular:
            return {}
        split = self.total[int(errors)].cpu().split([self.refs[n].channels for n in self.layout], dim=1)
        return {n: t for n, t in zip(self.layout, split) if n not in self.repeated}

    def result(self, groups: Sequence[Group], rule: Rule = Rule()) -> Drift:
        """The profile over what was evaluated, and the suspect among ``groups``."""
        reason = unavailable_reason(self.model) if self.source == "batchnorm" else None
        if reason is not None:
            return Drift(False, reason, source=self.source)
        self._reduce()
        if self.irregular:
            return Drift(False, "the layers it watches do not run on every batch alike", source=self.source)
        sums = (
            {}
            if self.total is None or self.layout is None
            else dict(zip(self.layout, self.total.cpu().split([self.refs[n].channels for n in self.layout], dim=2)))
        )
        layers = []
        for name in [n for n in self.order if n in sums and n not in self.repeated]:
            ref = self.refs[name]
            feeder = (
                None
                if ref.at == "output"
                else next((n for n in reversed(self.order[: self.order.index(name)]) if n not in self.refs), None)
            )
            parts, err = _parts(ref, sums[name][0]), _parts(ref, sums[name][1])
            assert parts is not None  # a layer in the layout saw every evaluated example
            mean, var, mean_noise, var_noise = parts
            own = ref.group if ref.group is not None else _owner(name, groups)
            layers.append(
                LayerDrift(
                    name,
                    own,
                    feeder,
                    None if feeder is None else _owner(feeder, groups),
                    ref.channels,
                    mean,
                    var,
                    mean_noise,
                    var_noise,
                    *(err[:2] if err else (None, None)),
                )
            )
        if not layers:
            what = "watched layer" if self.source == "fingerprint" else "BatchNorm"
            why = f"every {what} is called more than once per pass" if self.repeated else f"no {what} with a reference was called"
            return Drift(False, f"{why} on the data", source=self.source)
        suspect, margin, layer, per_group = localise(layers, rule)
        last = max(self.order.index(n) for n in self.refs if n in self.order)
        downstream = tuple(dict.fromkeys(g for n in self.order[last + 1 :] if (g := _owner(n, groups)) is not None))
        return Drift(True, None, suspect, margin, layer, per_group, tuple(layers), rule, downstream, self.source)


def moments(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel, from a recorder's (6, C) totals centred at the reference mean m: mu - m, the data's variance
    s2, and the sampling variances of both estimates (Var(mu) and, by the delta method, Var(s2))."""
    n = float(sums[0, 0])
    m1, m2, q1, q2, q12 = (sums[i] / n for i in range(1, 6))  # m1 = mu - m
    var = (m2 - m1.square()).clamp_min(0.0)
    var_m1, var_m2, cov = (q1 - m1.square()) / n, (q2 - m2.square()) / n, (q12 - m1 * m2) / n
    var_s2 = (var_m2 - 4 * m1 * cov + 4 * m1.square() * var_m1).clamp_min(0.0)
    return m1, var, var_m1, var_s2


def _parts(ref: Reference, sums: torch.Tensor) -> tuple[float, float, float, float] | None:
    """Channel-averaged mean part, variance part and their sampling noise from ``sums`` (6, C); None without examples.

    KL(N(mu, s2) || N(m, v)) with mu - m = E[m1], s2 = E[m2] - E[m1]^2. Noise: what sampling adds to
    each part on average, to second order in the estimates' errors: 0.5 Var(mu)/v and
    0.25 Var(s2)/v^2, with Var(s2) = Var(E m2) - 4 mu Cov(E m1, E m2) + 4 mu^2 Var(E m1) (delta method),
    plus the reference's own (``Reference.noise``)."""
    if float(sums[0, 0]) == 0:
        return None
    ref_var = ref.var + ref.eps  # (C,)
    m1, var, var_m1, var_s2 = moments(sums)
    r = (var + ref.eps) / ref_var
    parts = (
        0.5 * m1.square() / ref_var,
        0.5 * (r - 1.0 - torch.log(r)),
        0.5 * var_m1.clamp_min(0.0) / ref_var,
        0.25 * var_s2 / ref_var.square(),
    )
    mean, var_part, mean_noise, var_noise = (float(p.mean()) for p in parts)
    return mean, var_part, mean_noise + ref.noise[0], var_noise + ref.noise[1]
