"""Every torchvision classification family: exact per-example norms, groups that carry signal, and
rank, compare and repair on a plain state dict (small variants at small inputs, so the suite stays quick)."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from beta_diag import checkpoint, data, groups, models
from beta_diag.attribution import per_example_norms
from beta_diag.cli import app
from tests.conftest import make_images, write_bundle
from tests.test_attribution import loop_reference, randomise_bn

CPU = torch.device("cpu")
runner = CliRunner()
VIT = "torchvision.models.vision_transformer:VisionTransformer"
SWIN = "torchvision.models.swin_transformer:SwinTransformer"

# family -> (--arch, --arch-arg values (never num_classes: the weights say it), input side)
FAMILIES = {
    "resnet": ("resnet18", {}, 16),
    "resnext": ("tests.nets:resnext_tiny", {}, 16),
    "wide_resnet": ("tests.nets:wide_resnet_tiny", {}, 16),
    "mobilenet_v2": ("mobilenet_v2", {"width_mult": 0.25}, 32),
    "mobilenet_v3": ("mobilenet_v3_small", {"width_mult": 0.25}, 32),
    "efficientnet": ("efficientnet_b0", {}, 32),
    "regnet": ("regnet_x_400mf", {}, 32),
    "densenet": (
        "torchvision.models.densenet:DenseNet",
        {"growth_rate": 4, "block_config": [1, 1, 1, 1], "num_init_features": 8, "bn_size": 2},
        32,
    ),
    "shufflenet": ("shufflenet_v2_x0_5", {}, 32),
    "squeezenet": ("squeezenet1_1", {}, 32),
    "mnasnet": ("mnasnet0_5", {}, 32),
    "convnext": ("torchvision.models.convnext:ConvNeXt", {"block_setting": None}, 16),  # block_setting built below
    "vit": (VIT, {"image_size": 16, "patch_size": 4, "num_layers": 2, "num_heads": 2, "hidden_dim": 8, "mlp_dim": 16}, 16),
    "swin": (SWIN, {"patch_size": [4, 4], "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1], "window_size": [2, 2]}, 16),
}


def build(family: str, num_classes: int | None = 4) -> torch.nn.Module:
    arch, kwargs, _ = FAMILIES[family]
    kwargs = dict(kwargs)
    if family == "convnext":  # its stages are objects, not JSON: the test builds them (the CLI test names a factory instead)
        from torchvision.models.convnext import CNBlockConfig

        kwargs["block_setting"] = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return models.build(arch, kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_norms_equal_a_plain_loop_and_groups_carry_signal(family: str) -> None:
    side = FAMILIES[family][2]
    torch.manual_seed(0)
    model = randomise_bn(build(family))
    images, labels = make_images(6, channels=3, size=side)
    ds = data.Dataset(images, labels, tuple("abcd"), "synthetic", "test")
    pre = data.Preprocess((3, side, side), (0.4,) * 3, (0.3,) * 3)
    index = torch.arange(6)
    got = per_example_norms(model, ds, index, pre, CPU, batch_size=4, sketch_groups=[g.param_names for g in groups.layer_groups(model)])
    ref = loop_reference(model, ds, pre)
    col = {n: j for j, n in enumerate(got.names)}
    assert set(col) == set(ref)
    for g in groups.layer_groups(model, "module"):
        want = sum(ref[p].pow(2).sum(1) for p in g.param_names)
        have = sum(got.sq_norms[:, col[p]] for p in g.param_names)
        assert torch.allclose(have, want, rtol=1e-4, atol=1e-10), g.name
    found = groups.layer_groups(model)
    total = sum(g.numel for g in found)
    assert len(found) >= groups.MIN_GROUPS
    assert max(g.numel for g in found) <= groups.MAX_SHARE * total or len(found) == len(groups.layer_groups(model, "block"))


def test_documented_groups_of_full_size_families() -> None:
    """The groups module's docstring, checked on the full-size models (built on the meta device: no memory)."""
    with torch.device("meta"):

        def names(arch: str) -> list[str]:
            return [g.name for g in groups.layer_groups(models.build(arch, {"num_classes": 10}))]

        assert names("resnet18") == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
        assert names("mobilenet_v2") == [f"features.{i}" for i in range(19)] + ["classifier"]
        assert names("convnext_tiny") == [f"features.{i}" for i in range(8)] + ["classifier"]
        assert names("vit_b_16") == (
            ["class_token", "conv_proj", "encoder.pos_embedding"]
            + [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
            + ["encoder.ln", "heads"]
        )
        assert names("densenet121")[:3] == ["features.conv0", "features.norm0", "features.denseblock1"]
        assert names("vgg11") == ["features", "classifier.0", "classifier.3", "classifier.6"]
    assert names("regnet_x_400mf") == ["stem"] + [f"trunk_output.block{i}" for i in range(1, 5)] + ["fc"]


@pytest.fixture(scope="module")
def colour(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("colour")
    return {
        side: (
            write_bundle(root / f"train{side}.safetensors", 32, channels=3, size=side, seed=1, label_noise=0.3),
            write_bundle(root / f"test{side}.safetensors", 24, channels=3, size=side, seed=2, label_noise=0.3),
        )
        for side in (16, 32)
    }


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "convnext"] + ["convnext_tiny"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rank_compare_repair_on_a_plain_state_dict(family: str, colour: dict, tmp_path: Path) -> None:
    """A user's ``torch.save(model.state_dict())``: the classes come from the weights, the commands run end to end."""
    if family == "convnext_tiny":  # the registry name at full size, on 32x32 inputs
        arch, kwargs, side, model = "convnext_tiny", {}, 32, models.build("convnext_tiny", {"num_classes": 4})
    else:
        arch, kwargs, side = FAMILIES[family]
        model = build(family)
    train_file, test_file = colour[side]
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(model.state_dict(), a)
    torch.manual_seed(1)
    torch.save((build(family) if family != "convnext_tiny" else models.build(arch, {"num_classes": 4})).state_dict(), b)
    name = ["--arch", arch, "--input-size", str(side)] + [x for k, v in kwargs.items() for x in ("--arch-arg", f"{k}={json.dumps(v)}")]
    ranked = runner.invoke(app, ["rank", str(a), *name, "--data", str(test_file), "--bootstrap", "5", "--json"])
    assert ranked.exit_code == 0, ranked.output
    result = json.loads(ranked.stdout)
    assert any("inferred num_classes=4" in n for n in result["notes"])
    assert len(result["groups"]) == len(groups.layer_groups(model))
    compared = runner.invoke(app, ["compare", str(a), str(b), *name, "--data", str(test_file), "--bootstrap", "5", "--json"])
    assert compared.exit_code == 0, compared.output
    out = tmp_path / "r.safetensors"
    repaired = runner.invoke(
        app,
        [
            "repair",
            str(a),
            *name,
            "--data",
            str(test_file),
            "--train-data",
            str(train_file),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--accept-p",
            "1",
            "-o",
            str(out),
            "--json",
        ],
    )
    report = json.loads(repaired.stdout)
    curve = report["surgical"]["gate"]["curve"]  # epoch 0 (the original) and epoch 1
    gained = len(curve) == 2 and curve[1]["val_net"] > 0  # --accept-p 1 ships any validation gain; none: the original is kept
    assert repaired.exit_code == (0 if gained else 3), repaired.output
    assert report["accepted"] is gained and out.is_file() is gained
    if gained:
        written = checkpoint.load(out).metadata  # what was used is recorded: the inferred classes, the input size
        assert (written.arch, written.arch_kwargs["num_classes"], written.input_shape) == (arch, 4, (3, side, side))


def test_a_vit_input_size_comes_from_its_weights() -> None:
    """vit_b_16 trained at 32x32: the position embedding says image_size=32, and the input follows (no options)."""
    with torch.device("meta"):
        weights = models.build("vit_b_16", {"image_size": 32, "num_classes": 10}).state_dict()
    ckpt = checkpoint.Checkpoint(Path("vit.pt"), weights, checkpoint.Metadata(arch="vit_b_16"), "0" * 64).inferred()
    assert ckpt.metadata.arch_kwargs == {"num_classes": 10, "image_size": 32}
    assert ckpt.metadata.input_shape == (3, 32, 32)
    assert [n.split(" (")[0] for n in ckpt.notes[:3]] == [
        "inferred num_classes=10 from the weights",
        "inferred image_size=32 from the weights",
        "took 3x32x32 inputs from the model's image_size",
    ]


def test_an_input_the_model_cannot_take_is_refused_naming_the_option(colour: dict, tmp_path: Path) -> None:
    a = tmp_path / "squeeze.pt"
    torch.save(models.build("squeezenet1_1", {"num_classes": 4}).state_dict(), a)
    out = runner.invoke(app, ["rank", str(a), "--arch", "squeezenet1_1", "--input-size", "8", "--data", str(colour[32][1])])
    assert out.exit_code == 1
    assert "the model does not accept 3x8x8 inputs" in out.output and "pass --input-size" in out.output
    assert "Traceback" not in out.output
