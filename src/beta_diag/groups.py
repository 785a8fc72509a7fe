"""Parameters -> named layer groups at a granularity.

``group``: a partition of the model into parts that carry signal. It starts from the top-level
children holding parameters (ResNet-18: conv1, bn1, layer1..4, fc) and splits a part into its own
children while there are fewer than ``MIN_GROUPS`` parts, or while one part holds more than
``MAX_SHARE`` of all parameters (the largest splittable part first). A part with a single
parameter-holding child is looked through, so a split never yields the same parameters again.
Families (torchvision names): ResNet/ResNeXt/Wide-ResNet, ShuffleNet and GoogLeNet keep their top
level; MobileNet, EfficientNet, MNASNet, SqueezeNet, DenseNet, ConvNeXt and Swin split ``features``
(``layers``) into its stages or blocks; RegNet splits ``trunk_output`` into block1..4; VGG and
AlexNet split ``classifier``; ViT splits ``encoder`` into its position embedding, each
``encoder.layers.encoder_layer_N`` and the final norm, beside ``class_token``, ``conv_proj`` and
``heads``.
``block``: the parts of each group one level down (layer1.0, layer1.1, ...; a leaf stays whole);
``module``: the leaf modules that own parameters (layer1.0.conv1, ...).
Parameters owned directly by a module that is split (a ViT's class token) form groups of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from beta_diag.configs import Granularity

MIN_GROUPS = 4  # fewer parts than this say little about where the errors live
MAX_SHARE = 0.9  # a part holding more than this share of the parameters is split (ViT's encoder: 99%)


@dataclass(frozen=True)
class Group:
    """A named set of parameters, in model order."""

    name: str
    param_names: tuple[str, ...]
    numel: int


def _parts(model: nn.Module, prefix: str, sizes: dict[str, int]) -> list[str]:
    """The parameter-holding parts of the module at ``prefix`` (its own parameters and its children),
    looking through a module whose parameters all sit in one child. [prefix] when it cannot split."""
    module = model.get_submodule(prefix) if prefix else model
    join = (prefix + ".") if prefix else ""
    parts = [join + n for n, _ in module.named_parameters(recurse=False)]
    parts += [join + n for n, child in module.named_children() if any(True for _ in child.parameters())]
    if len(parts) == 1 and parts[0] not in sizes:  # one child holds everything: look inside it
        inner = _parts(model, parts[0], sizes)
        return inner if len(inner) > 1 else [prefix] if prefix else inner
    return parts if parts else [prefix]


def _split_ok(model: nn.Module, part: str, sizes: dict[str, int]) -> list[str] | None:
    if part in sizes or not any(True for c in model.get_submodule(part).children() for _ in c.parameters()):
        return None  # a parameter, or a leaf layer: its weight and bias stay together
    parts = _parts(model, part, sizes)
    return parts if len(parts) > 1 else None


def _owner(param: str, units: list[str]) -> str:
    return next(u for u in units if param == u or param.startswith(u + "."))


def top_parts(model: nn.Module) -> list[str]:
    """The ``group`` partition: module paths (or root-owned parameter names), in model order."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(sizes.values())
    units = _parts(model, "", sizes)
    if units == [""]:
        return []

    def size(unit: str) -> int:
        return sum(v for n, v in sizes.items() if n == unit or n.startswith(unit + "."))

    while True:
        by_size = sorted(units, key=size, reverse=True)
        if size(by_size[0]) > MAX_SHARE * total and (split := _split_ok(model, by_size[0], sizes)):
            target = by_size[0]
        elif len(units) < MIN_GROUPS:
            found = next(((u, s) for u in by_size if (s := _split_ok(model, u, sizes))), None)
            if found is None:
                break
            target, split = found
        else:
            break
        i = units.index(target)
        units[i : i + 1] = split
    order = {n: i for i, n in enumerate(sizes)}
    return sorted(units, key=lambda u: min(order[n] for n in sizes if n == u or n.startswith(u + ".")))


def layer_groups(model: nn.Module, granularity: Granularity | str = Granularity.group) -> list[Group]:
    """Split the model's trainable parameters into ordered, disjoint groups."""
    granularity = Granularity(granularity)
    tops = top_parts(model)
    order: list[str] = []
    members: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for name, param in model.named_parameters():
        top = _owner(name, tops)
        if granularity is Granularity.group or name == top:
            key = top
        elif granularity is Granularity.module:
            key = name.rpartition(".")[0]
        else:  # block: one level below the group
            rest = name[len(top) + 1 :].split(".")
            key = top if len(rest) == 1 else f"{top}.{rest[0]}"
        if key not in members:
            order.append(key)
            members[key] = []
            sizes[key] = 0
        members[key].append(name)
        sizes[key] += param.numel()
    return [Group(k, tuple(members[k]), sizes[k]) for k in order]
