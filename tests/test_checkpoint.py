import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from beta_diag import checkpoint, groups, models
from beta_diag.checkpoint import Metadata
from beta_diag.configs import ModelChoice
from beta_diag.errors import CheckpointError, ModelError, OutputError
from tests.conftest import REPO


def small_model() -> torch.nn.Module:
    return models.build("resnet18_cifar", {"width": 2, "in_channels": 1, "num_classes": 3})


META = Metadata(
    arch="resnet18_cifar",
    arch_kwargs={"width": 2, "in_channels": 1},
    num_classes=3,
    input_shape=(1, 8, 8),
    mean=(0.5,),
    std=(0.25,),
    class_names=("a", "b", "c"),
    dataset="synthetic",
    history=({"epoch": 1, "lr": 0.1, "momentum": 0.37, "mu_c": 0.37, "zeta": 1.0, "regime": "critical"},),
    training={"seed": 3},
)


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "m.safetensors"
    sha = checkpoint.save(path, model.state_dict(), META)
    ckpt = checkpoint.load(path)
    assert ckpt.sha256 == sha == checkpoint.file_sha256(path)
    assert ckpt.metadata == META
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value), key
    rebuilt = ckpt.build_model()
    assert not rebuilt.training
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)


def test_save_refuses_existing_output_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, small_model().state_dict(), META)
    before = path.read_bytes()
    with pytest.raises(OutputError, match="already exists: choose another output path or pass --force"):
        checkpoint.save(path, small_model().state_dict(), META)
    assert path.read_bytes() == before
    checkpoint.save(path, small_model().state_dict(), META, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_pt_state_dict_loads_with_weights_only(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "m.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    ckpt = checkpoint.load(path).with_model(
        ModelChoice(arch="resnet18_cifar", arch_kwargs={"width": 2, "in_channels": 1, "num_classes": 3})
    )
    assert torch.equal(ckpt.build_model().fc.weight, model.fc.weight)


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_with_code_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match="refused: the file holds Python objects beyond plain tensors"):
        checkpoint.load(path)
    assert not marker.exists()


def test_key_mismatch_lists_sorted_keys_and_counts(tmp_path: Path) -> None:
    state = small_model().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"], state["bn1.weight"]
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, state, META)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path).build_model()
    assert str(err.value) == (
        f"{path}: weights do not match architecture: 2 missing (bn1.weight, fc.bias); 1 unexpected (extra.weight): "
        "pass the --arch (and its arguments) the checkpoint was trained with"
    )


def test_shape_mismatch_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, small_model().state_dict(), META)
    with pytest.raises(CheckpointError, match=r"weight shape\(s\) differ .*: pass --arch-arg width=2 \(every weight's shape fits it\)$"):
        checkpoint.load(path).with_model(ModelChoice(arch_kwargs={"width": 4})).build_model()  # the value is found, not guessed
    with pytest.raises(CheckpointError, match=r"weight shape\(s\) differ .*: pass --arch-arg num_classes=3 "):
        checkpoint.load(path).with_model(ModelChoice(arch_kwargs={"num_classes": 5})).build_model()
    torchvision = pytest.importorskip("torchvision")
    r18 = tmp_path / "narrow.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=4, width_mult=0.5).state_dict(), r18)
    with pytest.raises(
        CheckpointError, match=r"differ .*: pass the architecture arguments the checkpoint was trained with \(--arch-arg KEY=VALUE\)$"
    ):
        checkpoint.load(r18).with_model(
            ModelChoice(arch="mobilenet_v3_small")
        ).inferred().build_model()  # width_mult 0.5: no integer argument fits


def test_nan_weights_are_named_by_group(tmp_path: Path) -> None:
    state = small_model().state_dict()
    state["fc.weight"][0, :2] = float("nan")
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, state, META)
    with pytest.raises(CheckpointError, match=r"NaN/Inf values \(fc: 2\)"):
        checkpoint.load(path).build_model()


def test_half_weights_load(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}, META)
    loaded = checkpoint.load(path).build_model()
    assert loaded.fc.weight.dtype == torch.float32
    assert torch.allclose(loaded.fc.weight, model.fc.weight, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is empty or truncated (0 bytes)"),
        (b"\xff" * 64, "header claims"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not a readable safetensors file"),
    ],
)
def test_unreadable_safetensors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="re-save or re-download it") as err:
        checkpoint.load(path)
    assert message in str(err.value)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, small_model().state_dict(), META)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint.load(path)


def test_metadata_with_wrong_types(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"num_classes": '"ten"'})
    with pytest.raises(CheckpointError, match="metadata 'num_classes' must be a positive integer"):
        checkpoint.load(path)


def test_metadata_without_arch(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(small_model().state_dict(), str(path))
    with pytest.raises(CheckpointError, match="metadata has no 'arch': pass --arch, e.g. --arch resnet18_cifar"):
        checkpoint.load(path).build_model()


def test_hf_folder_with_config(tmp_path: Path) -> None:
    model = small_model()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "arch": "resnet18_cifar",
                "arch_kwargs": {"width": 2, "in_channels": 1},
                "num_classes": 3,
                "input_shape": [1, 8, 8],
                "mean": [0.2],
                "std": [0.3],
            }
        )
    )
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.path == tmp_path / "model.safetensors"
    assert torch.equal(ckpt.build_model().fc.weight, model.fc.weight)
    assert (ckpt.metadata.input_shape, ckpt.metadata.mean, ckpt.metadata.std) == ((1, 8, 8), (0.2,), (0.3,))
    assert ckpt.inferred().notes == ()  # the README's config.json keys leave nothing to assume


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ModelError, match="unknown architecture 'resnet19': use one of resnet18_cifar, resnet20_cifar, "):
        models.build("resnet19")


def test_registry_builds_all_kinds() -> None:
    names = [g.name for g in groups.layer_groups(models.build("resnet18_cifar"))]
    assert names == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert len(groups.layer_groups(models.build("resnet20_cifar"))) == 6
    tv = models.build("resnet18", {"num_classes": 5})
    assert tv.fc.out_features == 5
    user = models.build("torch.nn:Linear", {"in_features": 3, "out_features": 2})
    assert isinstance(user, torch.nn.Linear)
    with pytest.raises(ModelError, match="cannot import module 'no_such_pkg.mod'"):
        models.build("no_such_pkg.mod:make")


def test_code_named_by_a_file_is_never_imported(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "m.safetensors"
    meta = Metadata(arch="pathlib:Path.touch", arch_kwargs={"self": str(marker)})
    checkpoint.save(path, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, meta)
    with pytest.raises(CheckpointError, match=r"metadata names code to import \(pathlib:Path.touch\); .* pass --arch pathlib:Path.touch"):
        checkpoint.load(path).build_model()
    assert not marker.exists()
    plain = tmp_path / "plain.safetensors"
    checkpoint.save(plain, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, Metadata())
    trusted = checkpoint.load(plain).with_model(ModelChoice(arch="torch.nn:Linear", arch_kwargs={"in_features": 3, "out_features": 2}))
    assert isinstance(trusted.build_model(), torch.nn.Linear)  # named on the command line: trusted


def test_canonical_header_is_stable_and_loads(tmp_path: Path) -> None:
    """Metadata keys sorted, tensors by offset, data untouched: same inputs, same bytes, a valid file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    tensors = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(3, dtype=torch.float64), "empty": torch.zeros(0)}
    meta = {f"k{i}": f'wert {i} \u00e9\u4e2d "quoted"' for i in range(12)}
    blobs = {bytes(checkpoint.canonical(save(tensors, metadata=meta))) for _ in range(5)}
    assert len(blobs) == 1
    blob = blobs.pop()
    assert int.from_bytes(blob[:8], "little") % 8 == 0
    path = tmp_path / "c.safetensors"
    path.write_bytes(blob)
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(path, "pt") as f:
        assert f.metadata() == meta


def test_a_model_file_by_path(tmp_path: Path) -> None:
    model = models.build(f"{REPO / 'examples' / 'my_model.py'}:SmallNet", {"num_classes": 3})
    assert [g.name for g in groups.layer_groups(model)] == ["stem", "body", "head.1", "head.3"]  # head split: 3 groups are too few
    assert model.head[-1].out_features == 3
    with pytest.raises(ModelError, match=r"cannot import module '.*nope.py' .*no such file .*nope.py; make it importable"):
        models.build(f"{tmp_path / 'nope.py'}:SmallNet")
