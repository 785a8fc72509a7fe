"""A model without BatchNorm, for ``--arch tests.nets:convnet``: under DDP its training must equal one process's."""

from torch import nn


def convnet(num_classes: int = 4, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
