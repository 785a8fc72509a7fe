"""The fingerprint: what every layer group's output looked like over the training data, kept in the checkpoint.

BatchNorm drift (``drift.py``) tests a BatchNorm's input against the running statistics it recorded;
a model without BatchNorm (LayerNorm, GroupNorm, folded for export) carries no such reference, and no
BatchNorm sees the output of the last layers. A fingerprint records one itself: for each point (the
output of every layer group, at ``group`` and ``block`` granularity, in call order), per channel (conv
channels; the embedding dimension over tokens for (B, T, D) outputs; the features of (B, F) outputs):

    mean      m = E[a]                    a: one image's mean of the channel over its positions
    var       v = E[b] - m^2              b: one image's mean square (so v is over images and positions)
    var_a     Var(a)                      per image: the sampling noise of m at N images is var_a / N
    var_m2    Var(b - 2 m a)              per image: the sampling noise of v (delta method, around m)

with N, the number of images. Drift against it is the KL test of ``drift.py`` on each point's output,
with the reference's own noise added; a point's drift is its own group's (no feeder to share it with).

Stored inside the checkpoint: one float32 (4, C) tensor per point under ``PREFIX`` and a metadata
entry ``fingerprint`` (format version, data spec and split, images, preprocessing, points). Loading a
model ignores them (``checkpoint.load`` sets them apart); ``info`` shows them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from beta_diag.configs import Granularity
from beta_diag.drift import Recorder, Reference, moments
from beta_diag.errors import CheckpointError
from beta_diag.groups import Group, layer_groups
from beta_diag.limits import MAX_FEATURES, MAX_NAME

if TYPE_CHECKING:
    from beta_diag.data import Dataset, Preprocess
    from beta_diag.session import Session

PREFIX = "__fingerprint__/"
VERSION = 1
EPS_SHARE = 1e-3  # a channel's variance floor: this share of its point's mean variance (a dead channel stays finite)
MAX_POINTS = 10_000
KINDS = ("group", "block")


@dataclass(frozen=True)
class Point:
    """One place the fingerprint watches: a module's output. ``axis``: its channel axis (1, or -1 for tokens)."""

    name: str
    kind: str  # "group" or "block": the granularity that names it (a leaf group is both: "group")
    axis: int
    channels: int


@dataclass(frozen=True)
class Fingerprint:
    points: tuple[Point, ...]  # in call order
    stats: dict[str, torch.Tensor]  # per point: (4, C) float32: mean, var, var_a, var_m2 (module docstring)
    images: int
    data: dict[str, Any]  # {"spec", "split"}: what it was recorded on
    preprocessing: dict[str, Any]  # {"input_shape", "mean", "std"}: how those images were fed

    def header(self) -> dict[str, Any]:
        """The metadata entry (JSON)."""
        return {
            "version": VERSION,
            "images": self.images,
            "data": self.data,
            "preprocessing": self.preprocessing,
            "points": [{"name": p.name, "kind": p.kind, "axis": p.axis, "channels": p.channels} for p in self.points],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + p.name: self.stats[p.name].float().contiguous() for p in self.points}

    def references(self, names: Collection[str] | None = None) -> list[Reference]:
        """The points (those in ``names``, when given) as drift references, with the noise of N images."""
        out = []
        for p in self.points:
            if names is not None and p.name not in names:
                continue
            mean, var, var_a, var_m2 = self.stats[p.name].double()
            eps = EPS_SHARE * float(var.mean()) + 1e-12
            ref = var + eps
            noise = (float((0.5 * var_a / self.images / ref).mean()), float((0.25 * var_m2 / self.images / ref.square()).mean()))
            out.append(Reference(p.name, "output", mean, var, eps, p.axis, p.name, noise))
        return out

    def spreads(self) -> dict[str, torch.Tensor]:
        """Per point, (2, C) float64: the sampling variance of its channel means and variances at its N images."""
        return {name: t[2:].double() / self.images for name, t in self.stats.items()}

    def describe(self) -> dict[str, Any]:
        """What ``info`` shows."""
        return {**{k: v for k, v in self.header().items() if k != "points"}, "points": len(self.points), "kinds": _count(self.points)}


def recorder(found: Fingerprint | None, model: nn.Module, groups: Sequence[Group]) -> Recorder:
    """Drift's hooks on ``model``: at the fingerprint's points that name one of ``groups`` when there is a fingerprint
    (``group`` and ``block`` granularity), else at its BatchNorms (their running statistics)."""
    names = {g.name for g in groups}
    refs = [] if found is None else found.references(names)
    return Recorder(model, refs, source="fingerprint") if refs else Recorder(model)


def _count(points: Sequence[Point]) -> dict[str, int]:
    return {k: sum(p.kind == k for p in points) for k in KINDS if any(p.kind == k for p in points)}


def points_of(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> list[Point]:
    """Every group's and block's module whose output on one blank input is a tensor of rank 2 or more, called
    once per pass, in call order."""
    modules = dict(model.named_modules())
    kinds: dict[str, str] = {}
    for kind in ("block", "group"):  # a name both granularities hold is a group's
        for g in layer_groups(model, Granularity(kind)):
            if g.name in modules and g.name:
                kinds[g.name] = kind
    seen: dict[str, list[torch.Tensor | None]] = {}

    def watch(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: object) -> None:
            seen.setdefault(name, []).append(output if isinstance(output, torch.Tensor) else None)

        return hook

    handles = [modules[n].register_forward_hook(watch(n)) for n in kinds]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, outputs in seen.items():
        t = outputs[0]
        if len(outputs) != 1 or t is None or t.dim() < 2:
            continue
        axis = -1 if t.dim() == 3 else 1  # (B, T, D): tokens, channels last
        out.append(Point(name, kinds[name], axis, int(t.shape[axis])))
    return out


def record(session: Session, ds: Dataset, progress: Any = None) -> Fingerprint:
    """The fingerprint of ``session``'s model on ``ds`` (labels unused): one evaluation pass."""
    return measure(session.model, session.preprocess, session.device, ds, progress)


def measure(model: nn.Module, pre: Preprocess, device: torch.device, ds: Dataset, progress: Any = None) -> Fingerprint:
    """The fingerprint of ``model`` on ``ds`` as ``pre`` feeds it (labels unused): one evaluation pass."""
    from beta_diag.runtime import evaluate

    points = points_of(model, pre.input_shape, device)
    if not points:
        raise CheckpointError("the model has no layer group whose output is a tensor to fingerprint")
    zeros = [
        Reference(p.name, "output", torch.zeros(p.channels, dtype=torch.float64), torch.ones(p.channels, dtype=torch.float64), 0.0, p.axis)
        for p in points
    ]
    recorder = Recorder(model, zeros, source="fingerprint")  # centred at zero: the totals are raw moments
    try:
        evaluate(model, ds, pre, device, progress=progress, on_batch=recorder.commit)
    finally:
        recorder.remove()
    sums = recorder.channel_sums()
    stats = {}
    for p in points:
        mean, var, var_mean, var_var = moments(sums[p.name])  # centred at zero: mean is the channel mean itself
        n = float(sums[p.name][0, 0])
        stats[p.name] = torch.stack([mean, var, n * var_mean, n * var_var]).float()  # per image: var_a, var_m2
    return Fingerprint(
        tuple(points),  # points_of found them in call order
        stats,
        len(ds),
        {"spec": ds.spec, "split": ds.split},
        {"input_shape": list(pre.input_shape), "mean": list(pre.mean), "std": list(pre.std)},
    )


def parse(header: Any, tensors: dict[str, torch.Tensor], source: str) -> Fingerprint | None:
    """The fingerprint a checkpoint holds (None: none), checked before use: every point's tensor present,
    of its shape, finite, variances not negative. Raises CheckpointError naming the fix."""
    if header is None and not tensors:
        return None

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: its fingerprint {why}: record it again with beta-diag fingerprint, or remove it")

    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise bad(f"has no readable metadata entry of version {VERSION}")
    raw = header.get("points")
    images = header.get("images")
    if not isinstance(images, int) or isinstance(images, bool) or images < 2:
        raise bad("names no number of images (2 or more)")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_POINTS:
        raise bad(f"lists no points (1 to {MAX_POINTS:,})")
    points = []
    for p in raw:
        ok = isinstance(p, dict) and isinstance(p.get("name"), str) and 0 < len(p["name"]) <= MAX_NAME and p.get("kind") in KINDS
        ok = ok and p.get("axis") in (1, -1) and isinstance(p.get("channels"), int) and 0 < p["channels"] <= MAX_FEATURES
        if not ok:
            raise bad(f"has a malformed point ({str(p)[:80]})")
        points.append(Point(p["name"], p["kind"], p["axis"], p["channels"]))
    names = {p.name for p in points}
    if len(names) != len(points) or set(tensors) != {PREFIX + n for n in names}:
        raise bad("lists other points than its tensors hold")
    stats = {}
    for p in points:
        t = tensors[PREFIX + p.name]
        if tuple(t.shape) != (4, p.channels) or not t.is_floating_point():
            raise bad(f"holds a {tuple(t.shape)} tensor for {p.name}, not (4, {p.channels}) floats")
        t = t.float()
        if not bool(torch.isfinite(t).all()) or bool((t[1:] < 0).any()):
            raise bad(f"holds non-finite or negative statistics for {p.name}")
        stats[p.name] = t
    data, pre = header.get("data"), header.get("preprocessing")
    data, pre = (data if isinstance(data, dict) else {}), (pre if isinstance(pre, dict) else {})
    return Fingerprint(tuple(points), stats, images, data, pre)
