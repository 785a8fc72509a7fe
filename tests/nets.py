"""Small models named by tests with ``--arch tests.nets:NAME``: a model without BatchNorm (under DDP its training
must equal one process's), and one-block-per-stage variants of torchvision families."""

from torch import nn


def convnet(num_classes: int = 4, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def resnext_tiny(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNeXt (bottleneck blocks, grouped 3x3 convolutions), one block per stage."""
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, groups=4, width_per_group=4)


def wide_resnet_tiny(num_classes: int = 1000) -> nn.Module:
    """torchvision's Wide-ResNet (bottleneck blocks twice as wide inside), one block per stage, narrow stem."""
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, width_per_group=128)
