"""The fingerprint: recorded in one pass, stored in the checkpoint apart from the weights, and drift measured against it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES, sha
from PIL import Image
from typer.testing import CliRunner

from beta_diag import checkpoint, data, fingerprint
from beta_diag.cli import app
from beta_diag.configs import RankConfig, TrainConfig
from beta_diag.ranking import rank
from beta_diag.recalibration import recalibrated
from beta_diag.session import DataChoice, open_session
from beta_diag.training import train

SGD = SAMPLES / "fmnist_resnet18w16_sgd_beta.safetensors"
TRAIN, TEST = str(SAMPLES / "fmnist_train_5k.safetensors"), str(SAMPLES / "fmnist_test_3k.safetensors")
runner = CliRunner()
FAST = RankConfig(bootstrap=0, control=0)  # drift alone: no control pass, no bootstrap


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SGD sample with a fingerprint of 1,000 of its training images, written by the command."""
    out = tmp_path_factory.mktemp("fp") / "sgd_fp.safetensors"
    before = sha(SGD)
    res = runner.invoke(app, ["fingerprint", str(SGD), "--data", TRAIN, "--limit", "1000", "-o", str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["fingerprint"]["images"] == 1000 and sha(SGD) == before
    return out


def test_the_fingerprint_is_each_groups_output_statistics(printed: Path) -> None:
    ckpt = checkpoint.load(printed)
    found = ckpt.fingerprint
    assert found is not None and set(ckpt.state_dict) == set(checkpoint.load(SGD).state_dict)  # the weights as they were
    names = [p.name for p in found.points]
    assert names[:3] == ["conv1", "bn1", "layer1.0"] and names[-1] == "fc" and {"layer4", "layer4.1"} <= set(names)
    # an independent reference: hooks on conv1 and fc over the same 1,000 images, statistics over images and positions
    session = open_session(SGD, device="cpu")
    ds = session.load_data(DataChoice(TRAIN, "train", 1000), default_split="train")
    seen: dict[str, list[torch.Tensor]] = {"conv1": [], "fc": []}
    hooks = [session.model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen[n].append(o.detach())) for n in seen]
    session.evaluate(ds)
    for h in hooks:
        h.remove()
    conv = torch.cat(seen["conv1"]).double().transpose(0, 1).flatten(1)  # (C, images x positions)
    fc = torch.cat(seen["fc"]).double()  # (images, classes)
    for name, mean, var in (("conv1", conv.mean(1), conv.var(1, correction=0)), ("fc", fc.mean(0), fc.var(0, correction=0))):
        assert torch.allclose(found.stats[name][0].double(), mean, rtol=1e-4, atol=1e-5)
        assert torch.allclose(found.stats[name][1].double(), var, rtol=1e-3, atol=1e-5)
    assert printed.stat().st_size < 1.01 * SGD.stat().st_size  # under 1% of the checkpoint
    info = json.loads(runner.invoke(app, ["info", str(printed), "--json"]).stdout)
    assert info["fingerprint"]["points"] == len(names) and info["fingerprint"]["images"] == 1000
    assert "fingerprint: none" in runner.invoke(app, ["info", str(SGD)]).stdout


def test_drift_from_the_fingerprint_names_a_fault_in_the_head_directly(printed: Path, tmp_path: Path) -> None:
    """BatchNorm drift cannot see fc (it runs after the last BatchNorm); the fingerprint watches its output."""
    healthy = rank(printed, data=DataChoice(TEST, limit=1000), config=FAST, device="cpu")
    assert healthy.drift is not None and healthy.drift.source == "fingerprint" and healthy.drift.suspect is None
    ckpt = checkpoint.load(printed)
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) if k == "fc.weight" else v for k, v in ckpt.state_dict.items()}
    damaged = tmp_path / "fc_damaged.safetensors"
    checkpoint.save(damaged, state, ckpt.metadata, fingerprint=ckpt.fingerprint)
    r = rank(damaged, data=DataChoice(TEST, limit=1000), config=FAST, device="cpu")
    assert r.drift is not None and r.drift.source == "fingerprint" and r.drift.suspect == "fc"
    plain = tmp_path / "fc_damaged_plain.safetensors"
    checkpoint.save(plain, state, ckpt.metadata)
    assert rank(plain, data=DataChoice(TEST, limit=1000), config=FAST, device="cpu").drift.suspect is None  # type: ignore[union-attr]


def test_a_damaged_fingerprint_is_refused_with_the_fix(printed: Path, tmp_path: Path) -> None:
    ckpt = checkpoint.load(printed)
    assert ckpt.fingerprint is not None
    stats = dict(ckpt.fingerprint.stats)
    stats["fc"] = stats["fc"].clone()
    stats["fc"][1, 0] = -1.0  # a negative variance
    bad = tmp_path / "bad.safetensors"
    checkpoint.save(
        bad, ckpt.state_dict, ckpt.metadata, fingerprint=fingerprint.Fingerprint(**{**ckpt.fingerprint.__dict__, "stats": stats})
    )
    res = runner.invoke(app, ["info", str(bad)])
    assert res.exit_code == 1 and "fingerprint holds non-finite or negative statistics for fc" in res.output
    assert "record it again with beta-diag fingerprint" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["fingerprint", str(SGD), "--data", TRAIN, "-o", str(printed)])
    assert res.exit_code == 1 and "already exists" in res.output  # never replaces a file without --force


def test_the_control_pass_works_from_the_fingerprint(printed: Path, tmp_path: Path) -> None:
    """BatchNorm statistics overwritten on inverted images: drift from the fingerprint and the control pass name them."""
    ckpt = checkpoint.load(printed)
    session = open_session(ckpt, device="cpu")
    train = session.load_data(DataChoice(TRAIN, limit=500), default_split="train")
    model = recalibrated(session.model, dataclasses.replace(train, images=255 - train.images), session.preprocess, session.device)
    damaged = tmp_path / "overwritten.safetensors"
    checkpoint.save(damaged, model.state_dict(), ckpt.metadata, fingerprint=ckpt.fingerprint)
    r = rank(
        damaged,
        data=DataChoice(TEST, limit=1000),
        config=RankConfig(bootstrap=0, control=500),
        device="cpu",
        train=DataChoice(TRAIN, "train"),
    )
    assert r.drift is not None and r.drift.source == "fingerprint" and r.drift.suspect == "bn1"
    assert r.cause is not None and r.cause.kind == "statistics"


def test_drift_gates_a_deployment_without_labels(printed: Path, tmp_path: Path) -> None:
    """Exit 0 on data like the training data, 4 on a lower-contrast copy of it: as a bundle and as unlabelled images."""
    clean = runner.invoke(app, ["drift", str(printed), "--data", TEST, "--limit", "500", "--json", "--quiet"])
    assert clean.exit_code == 0, clean.output
    d = json.loads(clean.stdout)
    assert (
        d["source"] == "fingerprint"
        and not d["shifted"]
        and d["p_value"] >= 0.05
        and d["tests"] == 2 * sum(layer["channels"] for layer in d["drift"]["layers"])
    )
    ds = data.load(TEST, "test", limit=200)
    low = dataclasses.replace(ds, images=(ds.images.float() * 0.6).round().to(ds.images.dtype))
    bundle = tmp_path / "low_contrast.safetensors"
    data.save_bundle(bundle, low)
    shifted = runner.invoke(app, ["drift", str(printed), "--data", str(bundle), "--plot", str(tmp_path / "d.png"), "--quiet"])
    assert shifted.exit_code == 4, shifted.output
    assert "SHIFTED: p = " in shifted.stdout and "activations leave their training statistics at conv1" in shifted.stdout
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(low.images[:100]):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:03d}.png")
    unlabelled = runner.invoke(app, ["drift", str(printed), "--data", f"images:{folder}", "--json", "--quiet"])
    assert unlabelled.exit_code == 4 and json.loads(unlabelled.stdout)["images"] == 100


def test_train_records_a_fingerprint_so_a_model_without_batchnorm_gets_drift(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = train(
        "tests.nets:convnet",
        data=DataChoice(str(tiny["train"])),
        test=DataChoice(str(tiny["test"])),
        config=TrainConfig(epochs=1, batch_size=64, device="cpu"),
    )
    assert result.fingerprint is not None and result.fingerprint.images == 256 and result.fingerprint.data["split"] == "train"
    plain, printed = tmp_path / "plain.safetensors", tmp_path / "printed.safetensors"
    checkpoint.save(plain, result.model.state_dict(), result.metadata)
    checkpoint.save(printed, result.model.state_dict(), result.metadata, fingerprint=result.fingerprint)
    args = ["--arch", "tests.nets:convnet", "--data", str(tiny["test"]), "--quiet"]
    refused = runner.invoke(app, ["drift", str(plain), *args])
    assert refused.exit_code == 1 and "record a fingerprint first (beta-diag fingerprint CKPT -o OUT)" in refused.output
    watched = runner.invoke(app, ["drift", str(printed), *args, "--json"])
    assert watched.exit_code in (0, 4), watched.output
    assert json.loads(watched.stdout)["drift"]["available"] and json.loads(watched.stdout)["source"] == "fingerprint"


def test_the_sample_without_batchnorm_carries_its_fingerprint_and_drift_names_its_faults(tmp_path: Path) -> None:
    """The bundled ConvNeXt-style sample (GroupNorm/LayerNorm only): healthy, no suspect and no shift on its test data;
    its final LayerNorm damaged, drift from the fingerprint names that group."""
    sample = SAMPLES / "fmnist_convnext24_adam_beta.safetensors"
    ckpt = checkpoint.load(sample)
    assert ckpt.fingerprint is not None and ckpt.fingerprint.images == 30_000
    model = open_session(ckpt, device="cpu").model
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    healthy = rank(sample, data=DataChoice(TEST, limit=600), config=FAST, device="cpu")
    assert healthy.drift is not None and healthy.drift.source == "fingerprint" and healthy.drift.suspect is None
    assert [layer.name for layer in healthy.drift.layers] == ["stem", "stage1", "stage2", "stage3", "norm", "fc"]
    gen = torch.Generator().manual_seed(0)
    state = {k: v + v.abs().mean() * torch.randn(v.shape, generator=gen) if k == "norm.weight" else v for k, v in ckpt.state_dict.items()}
    damaged = tmp_path / "norm_damaged.safetensors"
    checkpoint.save(damaged, state, ckpt.metadata, fingerprint=ckpt.fingerprint)
    r = rank(damaged, data=DataChoice(TEST, limit=600), config=FAST, device="cpu")
    assert r.drift is not None and r.drift.suspect == "norm"  # seen although accuracy barely moves
