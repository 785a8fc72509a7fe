"""Architecture registry: name -> builder.

Names: the CIFAR-style ResNets of the paper (``resnet18_cifar``, ``resnet20_cifar``), a small ConvNeXt-style
network without BatchNorm (``convnext_cifar``), every
torchvision classification model (``resnet18``, ``vit_b_16``, ...), and ``package.module:factory``
for a user's own architecture. Builders take keyword arguments; ``num_classes`` always.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beta_diag.errors import ModelError

Builder = Callable[..., nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; one ReLU module used twice per block."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a 3x3 stem and no max-pool (He et al. 2016, CIFAR variant).

    Top-level children with parameters: conv1, bn1, layer1..layerN, fc.
    """

    def __init__(
        self,
        blocks: list[int],
        widths: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.n_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w, H, W)
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, classes)


def resnet18_cifar(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> nn.Module:
    """The paper's ResNet-18: 4 stages of 2 blocks, widths w, 2w, 4w, 8w; 7 top-level groups."""
    return CifarResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], num_classes, in_channels)


def resnet20_cifar(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> nn.Module:
    """ResNet-20 of He et al.: 3 stages of 3 blocks, widths w, 2w, 4w; 6 top-level groups."""
    return CifarResNet([3, 3, 3], [width, 2 * width, 4 * width], num_classes, in_channels)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (Liu et al. 2022): 7x7 depthwise convolution, a LayerNorm over channels and positions
    (GroupNorm with one group), an inverted 4x MLP of 1x1 convolutions with GELU, and a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.GroupNorm(1, dim)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


class SmallConvNeXt(nn.Module):
    """A ConvNeXt-style network for small images, with no BatchNorm anywhere.

    Top-level children with parameters: stem (2x2 patchify + norm), stage1..stageN (a downsampling norm and
    2x2 convolution, then blocks), norm (LayerNorm after global pooling), fc.
    """

    def __init__(self, depths: list[int], widths: list[int], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 2, 2), nn.GroupNorm(1, widths[0]))
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(depths, widths, strict=True)):
            down: list[nn.Module] = [] if i == 0 else [nn.GroupNorm(1, in_planes), nn.Conv2d(in_planes, planes, 2, 2)]
            self.add_module(f"stage{i + 1}", nn.Sequential(*down, *(ConvNeXtBlock(planes) for _ in range(n))))
            in_planes = planes
        self.n_stages = len(depths)
        self.norm = nn.LayerNorm(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, w, H/2, W/2)
        for i in range(self.n_stages):
            x = getattr(self, f"stage{i + 1}")(x)
        return self.fc(self.norm(x.mean((2, 3))))  # (B, classes)


def convnext_cifar(num_classes: int = 10, width: int = 24, in_channels: int = 3) -> nn.Module:
    """3 stages of 2 ConvNeXt blocks, widths w, 2w, 4w, GroupNorm/LayerNorm only; 6 top-level groups."""
    return SmallConvNeXt([2, 2, 2], [width, 2 * width, 4 * width], num_classes, in_channels)


LOCAL_MODELS: dict[str, Builder] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet20_cifar": resnet20_cifar,
    "convnext_cifar": convnext_cifar,
}


def torchvision_names() -> list[str]:
    """Classification model names of torchvision (not detection, segmentation, video)."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available() -> list[str]:
    """Every registered architecture name, ours first."""
    return list(LOCAL_MODELS) + torchvision_names()


def _import_factory(spec: str) -> Builder:
    """``package.module:factory``, or ``path/to/file.py:factory`` for a model file that is no package."""
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ImportError(f"no such file {path}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            if loader is None or loader.loader is None:
                raise ImportError(f"{path} is not a Python file")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"cannot import module '{module_name}' for --model {spec}: {exc}; "
            "make it importable (pip install it or add its folder to PYTHONPATH)"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(
            f"module '{module_name}' has no callable '{attr}': pass --model package.module:factory "
            "naming a function that returns an nn.Module"
        )
    return factory


def resolve(arch: str) -> Builder:
    """Return the builder for ``arch``; unknown names raise ModelError listing the valid ones."""
    if ":" in arch:
        return _import_factory(arch)
    if arch in LOCAL_MODELS:
        return LOCAL_MODELS[arch]
    names = torchvision_names()
    if arch in names:
        import torchvision.models

        def build_torchvision(**kwargs: Any) -> nn.Module:
            return torchvision.models.get_model(arch, weights=None, **kwargs)

        return build_torchvision
    shown = ", ".join(list(LOCAL_MODELS) + names[:12])
    raise ModelError(
        f"unknown architecture '{arch}': use one of {shown}, ... ({len(names) + len(LOCAL_MODELS)} in all; "
        "`beta-diag archs` lists them) or package.module:factory"
    )


def check_arguments(arch: str, kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments ``arch``'s builder does not take, without building it."""
    try:
        inspect.signature(resolve(arch)).bind(**kwargs)
    except TypeError as exc:
        raise ModelError(f"cannot build '{arch}' with {kwargs}: {exc}; check the architecture arguments") from None
    except ValueError:  # a builder without a signature: building it will tell
        pass


def build(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build ``arch`` with keyword arguments, e.g. ``build('resnet18_cifar', {'width': 16})``."""
    builder = resolve(arch)
    try:
        model = builder(**(kwargs or {}))
    except TypeError as exc:
        raise ModelError(f"cannot build '{arch}' with {kwargs}: {exc}; check the architecture arguments") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"'{arch}' returned {type(model).__name__}, not an nn.Module: return the model from the factory")
    return model
