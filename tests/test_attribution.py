"""Per-example group gradient norms equal a plain per-example autograd loop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from beta_diag import data, groups, models
from beta_diag.attribution import per_example_norms
from tests.conftest import make_images

CPU = torch.device("cpu")


def randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def loop_reference(model: torch.nn.Module, ds: data.Dataset, pre: data.Preprocess) -> dict[str, torch.Tensor]:
    """Per-example gradients, one example at a time (the slow, obvious way). name -> (N, numel)."""
    params = dict(model.named_parameters())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(len(ds)):
        loss = F.cross_entropy(model(pre(ds.images[i : i + 1])), ds.labels[i : i + 1])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            out[n].append(g.detach().double().flatten())
    return {n: torch.stack(v) for n, v in out.items()}


CASES = {
    # ours: BatchNorm everywhere, one ReLU module called twice per block and reused at the stem
    # (16x16 inputs: the stem and layer1 take the grouped-convolution path, later layers the unfold path)
    "resnet18_cifar": (lambda: models.build("resnet18_cifar", {"width": 4, "in_channels": 1, "num_classes": 4}), 1, 16),
    # torchvision's: in-place ReLU reused, max-pool, 1x1 shortcut convolutions
    "torchvision resnet18": (lambda: models.build("resnet18", {"num_classes": 4}), 3, 32),
    # LayerNorm2d (NCHW, normalised over channels) in the stem and downsampling, channels-last LayerNorm and a
    # layer-scale parameter owned by each block (the fallback) in the blocks
    "convnext": (
        lambda: torchvision.models.convnext.ConvNeXt(
            [torchvision.models.convnext.CNBlockConfig(8, 16, 1), torchvision.models.convnext.CNBlockConfig(16, None, 1)],
            num_classes=4,
        ),
        3,
        16,
    ),
    # attention weights used without calling their module, a class token owned by the root: the fallback
    "vision transformer": (
        lambda: torchvision.models.VisionTransformer(
            image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=4
        ),
        3,
        8,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_group_norms_equal_per_example_loop(case: str) -> None:
    build, channels, size = CASES[case]
    torch.manual_seed(0)
    model = randomise_bn(build())
    images, labels = make_images(10, channels=channels, size=size)
    ds = data.Dataset(images, labels, tuple("abcd"), "synthetic", "test")
    pre = data.Preprocess((channels, size, size), (0.3,) * channels, (0.3,) * channels)
    index = torch.arange(10)
    sketched = groups.layer_groups(model, "block")
    got = per_example_norms(model, ds, index, pre, CPU, batch_size=4, sketch_groups=[g.param_names for g in sketched])
    ref = loop_reference(model, ds, pre)
    col = {n: j for j, n in enumerate(got.names)}
    assert set(col) == set(ref)
    for granularity in groups.Granularity:
        for g in groups.layer_groups(model, granularity):
            want = sum(ref[p].pow(2).sum(1) for p in g.param_names)
            have = sum(got.sq_norms[:, col[p]] for p in g.param_names)
            assert torch.allclose(have, want, rtol=1e-4, atol=1e-10), (granularity, g.name)
    for n, per in ref.items():  # the same pass sums the gradient
        want_sum = per.sum(0)
        assert torch.allclose(got.summed[n].double().flatten(), want_sum, rtol=1e-4, atol=1e-6 * float(want_sum.abs().max())), n
    # the sketch: exact (up to its bfloat16 storage) for a group of at most K parameters
    assert got.sketch is not None
    summed_sq = np.array([sum(float(ref[p].sum(0).pow(2).sum()) for p in g.param_names) for g in sketched])
    dots = got.sketch.dots(summed_sq)
    for j, g in enumerate(sketched):
        want_dot = sum(ref[p] @ ref[p].sum(0) for p in g.param_names).numpy()
        if g.numel <= got.sketch.k:
            assert np.allclose(dots[:, j], want_dot, rtol=2e-2, atol=1e-2 * np.abs(want_dot).max()), g.name
        assert dots[:, j].sum() == pytest.approx(summed_sq[j], rel=1e-9)  # scaled to ||S_g||^2 exactly


def test_module_called_twice_sums_its_gradients() -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.fc = torch.nn.Linear(64, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(torch.relu(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    model = Twice().eval()
    images, labels = make_images(6)
    ds = data.Dataset(images, labels, tuple("abcd"), "synthetic", "test")
    pre = data.Preprocess((1, 8, 8), (0.3,), (0.3,))
    got = per_example_norms(model, ds, torch.arange(6), pre, CPU, batch_size=4)
    ref = loop_reference(model, ds, pre)
    for j, n in enumerate(got.names):
        assert torch.allclose(got.sq_norms[:, j], ref[n].pow(2).sum(1), rtol=1e-4), n
