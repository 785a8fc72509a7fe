"""Parameters -> named layer groups at a granularity.

``group``: the top-level children holding parameters (ResNet-18: conv1, bn1, layer1..4, fc);
``block``: their children (layer1.0, layer1.1, ...; a top-level leaf stays whole);
``module``: the leaf modules that own parameters (layer1.0.conv1, ...).
Parameters owned directly by the root (a ViT's class token) form a group of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn



class Granularity(str, Enum):
    group = "group"
    block = "block"
    module = "module"


@dataclass(frozen=True)
class Group:
    """A named set of parameters, in model order."""

    name: str
    param_names: tuple[str, ...]
    numel: int


def _owner_depth(granularity: Granularity) -> int | None:
    return {Granularity.group: 1, Granularity.block: 2, Granularity.module: None}[granularity]


def layer_groups(model: nn.Module, granularity: Granularity | str = Granularity.group) -> list[Group]:
    """Split the model's trainable parameters into ordered, disjoint groups."""
    granularity = Granularity(granularity)
    depth = _owner_depth(granularity)
    order: list[str] = []
    members: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        module_path = parts[:-1]
        if not module_path:
            key = name  # parameter owned by the root module
        elif depth is None:
            key = ".".join(module_path)
        else:
            key = ".".join(module_path[:depth])
        if key not in members:
            order.append(key)
            members[key] = []
            sizes[key] = 0
        members[key].append(name)
        sizes[key] += param.numel()
    return [Group(k, tuple(members[k]), sizes[k]) for k in order]
