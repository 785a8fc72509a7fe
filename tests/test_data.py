import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beta_diag import data
from beta_diag.errors import DataError
from beta_diag.readers import DataSpec
from tests.conftest import make_images, write_bundle


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format of (Fashion-)MNIST: magic (0, 0, ubyte=8, ndim), big-endian dims, bytes."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 8, 7, 6, 5]))
    ds = data.load(f"fashion-mnist:{tmp_path}", "test")
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(test_x.astype(np.uint8)))
    assert ds.labels.tolist() == [9, 8, 7, 6, 5]
    assert ds.class_names[9] == "Ankle boot"
    train = data.load(f"fashion-mnist:{tmp_path}", "train", limit=4, seed=1)
    assert len(train) == 4
    assert torch.equal(train.images, data.load(f"fashion-mnist:{tmp_path}", "train", limit=4, seed=1).images)


def test_fashion_mnist_missing_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.load(f"fashion-mnist:{tmp_path}", "test")


def write_cifar10(root: Path, n: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [i % 10 for i in range(n)],
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return folder


def test_cifar10_python_batches(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    train = data.load(f"cifar10:{tmp_path}", "train")
    assert train.images.shape == (30, 3, 32, 32)
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    test = data.load(f"cifar10:{folder}", "test")  # the batches folder itself works too
    assert torch.equal(test.images, torch.from_numpy(raw[b"data"]).reshape(-1, 3, 32, 32))
    assert test.class_names[:2] == ("class0", "class1")


class Exploit:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_cifar_batch_holding_code_is_refused(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)
    with pytest.raises(DataError, match="builtins.print is not allowed in a data batch"):
        data.load(f"cifar10:{tmp_path}", "test")


def test_imagefolder(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = data.load(f"imagefolder:{tmp_path}", "train", image_size=(8, 8))
    assert ds.images.shape == (6, 3, 8, 8) and ds.class_names == ("cat", "dog")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.notes == (f"imagefolder:{tmp_path} (train): 6 of 6 images resized to 8x8 when read (bilinear)",)
    Image.fromarray(np.full((8, 8), 9, dtype=np.uint8)).save(tmp_path / "dog" / "grey.png")
    assert data.load(f"imagefolder:{tmp_path}", "train", image_size=(8, 8)).notes[1:] == (
        f"imagefolder:{tmp_path} (train): 1 of 7 images converted to RGB when read",
    )
    (tmp_path / "dog" / "3.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"3.png: cannot decode image .*: remove or replace the file"):
        data.load(f"imagefolder:{tmp_path}", "train")


def test_bundle_and_limit(tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "b.safetensors", 20)
    ds = data.load(str(path), "test")
    images, labels = make_images(20)
    assert torch.equal(ds.images, images) and torch.equal(ds.labels, labels)
    sub = data.load(str(path), "test", limit=5, seed=3)
    assert len(sub) == 5 and torch.equal(sub.labels, data.load(str(path), "test", limit=5, seed=3).labels)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nowhere.safetensors", "data bundle nowhere.safetensors not found"),
        ("cifar10:/no/such/dir", "folder /no/such/dir does not exist"),
        ("cifar10", "needs a folder: pass cifar10:DIR"),
        ("mnist-fancy", "unknown data spec 'mnist-fancy'"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        data.load(spec)


def test_a_spec_is_parsed_once_into_one_type(tmp_path: Path) -> None:
    assert DataSpec.parse("fashion-mnist") == DataSpec("fashion-mnist") and str(DataSpec("fashion-mnist")) == "fashion-mnist"
    folder = DataSpec.parse("imagefolder:pics")
    assert (folder.kind, folder.path, str(folder)) == ("imagefolder", Path("pics"), "imagefolder:pics")
    assert folder.resolved(tmp_path) == DataSpec("imagefolder", tmp_path.resolve() / "pics")
    bundle = DataSpec.parse("d/x.safetensors")
    assert (bundle.kind, str(bundle), bundle.name, bundle.reader.one_split) == ("bundle", "d/x.safetensors", "d/x.safetensors", True)
    assert DataSpec.parse("cifar10:/c").name == "cifar10" and not DataSpec.parse("cifar10:/c").reader.one_split
    ds = data.load(str(write_bundle(tmp_path / "b.safetensors", 8)))
    assert ds.source == DataSpec("bundle", tmp_path / "b.safetensors") and ds.subset(torch.arange(2)).source == ds.source


def test_limit_zero_and_labels_outside_classes(tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "b.safetensors", 20, classes=4)
    with pytest.raises(DataError, match="--limit 0: pass a positive number"):
        data.load(str(path), limit=0)
    with pytest.raises(DataError, match="has label 3 but the model has 3 classes"):
        data.check_fits(data.load(str(path)), 3)


def test_preprocess_channels_pad_and_normalise() -> None:
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    out = data.Preprocess((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(x)
    assert out.shape == (2, 3, 32, 32)
    assert out[0, 0, 0, 0] == -1.0 and out[0, 0, 2, 2] == 1.0  # zero padding, then normalised
    grey = data.Preprocess((1, 16, 16), (0.0,), (1.0,))(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8))
    assert grey.shape == (1, 1, 16, 16) and torch.allclose(grey, torch.ones_like(grey))


def test_one_size_policy_whatever_the_parity() -> None:
    """Pad (centred, the odd pixel right and down) when at most an eighth of the model's side smaller; else resize."""
    pre = data.Preprocess((1, 32, 32), (0.0,), (1.0,))
    img = torch.full((1, 1, 29, 29), 255, dtype=torch.uint8)
    x = pre(img)
    assert x.shape == (1, 1, 32, 32) and x[0, 0, 1:30, 1:30].eq(1).all() and x[0, 0, 0].eq(0).all() and x[0, 0, 30:].eq(0).all()
    assert pre.conversions((1, 29, 29)) == ["29x29 images are padded with zeros to the model's 32x32 (centred)"]
    assert pre.conversions((1, 28, 28)) == ["28x28 images are padded with zeros to the model's 32x32 (centred)"]
    assert pre.conversions((1, 27, 27)) == ["27x27 images are resized to the model's 32x32 (bilinear)"]
    assert pre(torch.full((1, 1, 27, 27), 255, dtype=torch.uint8)).eq(1).all()  # resized, not padded
    big = data.Preprocess((3, 224, 224), (0.0,) * 3, (1.0,) * 3)
    assert big.conversions((1, 28, 28)) == [
        "1-channel images are repeated to 3 channels",
        "28x28 images are resized to the model's 224x224 (bilinear)",
    ]
    assert big.conversions((3, 224, 224)) == [] and big.conversions((3, 300, 300)) == [
        "300x300 images are resized to the model's 224x224 (bilinear)"
    ]


FOLDERS = DataSpec.parse("imagefolder:/d")


def test_image_folders_are_matched_to_the_models_class_names() -> None:
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    folders = data.Dataset(images, torch.tensor([0, 1, 1]), ("boot", "coat"), "imagefolder:/d", "test", source=FOLDERS)
    matched = data.match_classes(folders, ("coat", "shirt", "boot"))
    assert matched.labels.tolist() == [2, 0, 0] and matched.class_names == ("coat", "shirt", "boot")
    assert matched.notes == ("imagefolder:/d (test): class folders matched to the model's class names by name",)
    assert data.match_classes(folders, ("boot", "coat")) is folders  # same order: nothing to do, nothing said
    bundle = data.Dataset(
        images, torch.tensor([0, 1, 1]), ("boot", "coat"), "x.safetensors", "test", source=DataSpec.parse("x.safetensors")
    )
    assert data.match_classes(bundle, ("coat", "boot")) is bundle  # bundles' labels are the model's own indices
    with pytest.raises(
        DataError, match=r"folder\(s\) 'sandal' name no class of the model: name each folder after a class .* 'coat' or 0, 'boot' or 1"
    ):
        data.match_classes(
            data.Dataset(images, torch.tensor([0, 1, 1]), ("boot", "sandal"), "imagefolder:/d", "test", source=FOLDERS), ("coat", "boot")
        )


def test_folders_can_hold_class_names_that_no_folder_can_be_called() -> None:
    """Fashion-MNIST's "T-shirt/top" cannot be a folder: "t-shirt_top", "TShirt Top" or its index 0 name it."""
    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    classes = ("T-shirt/top", "Trouser", "Ankle boot")
    for folders, want in ((("TShirt Top", "ankle_boot"), [0, 2, 2, 0]), (("0", "2"), [0, 2, 2, 0])):
        ds = data.Dataset(images, torch.tensor([0, 1, 1, 0]), folders, "imagefolder:/d", "test", source=FOLDERS)
        matched = data.match_classes(ds, classes)
        assert matched.labels.tolist() == want and matched.class_names == classes
        assert "ignoring case and punctuation, or index" in matched.notes[-1]
    bad = data.Dataset(images, torch.tensor([0, 1, 1, 0]), ("T-shirt", "Trouser"), "imagefolder:/d", "test", source=FOLDERS)
    with pytest.raises(DataError, match=r"'T-shirt_top' or 0, 'Trouser' or 1, 'Ankle boot' or 2"):
        data.match_classes(bad, classes)
    assert data.folder_for("T-shirt/top") == "T-shirt_top" and data.folder_key("T-shirt/top") == data.folder_key("t shirt TOP")
