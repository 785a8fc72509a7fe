"""Data specs -> in-memory datasets. Nothing here downloads.

Specs: ``fashion-mnist`` (Debian's idx files in /usr/share/datasets/fashion-mnist, or
``fashion-mnist:DIR``), ``cifar10:DIR`` / ``cifar100:DIR`` (the python-batch format torchvision
uses), ``imagefolder:DIR`` (``DIR/train`` and ``DIR/test`` when present), and a tensor bundle
``FILE.safetensors`` holding ``images`` (uint8, (N, H, W) or (N, C, H, W)) and ``labels``.
Images stay uint8 (N, C, H, W) on the CPU; ``Preprocess`` turns a batch into model input.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from beta_diag.errors import DataError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Dataset:
    """Decoded images (uint8, (N, C, H, W)) and labels (int64, (N,))."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    spec: str
    split: str
    notes: tuple[str, ...] = ()  # what loading matched or converted (class names to the model's), in words

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.images[index], self.labels[index], self.class_names, self.spec, self.split, self.notes)


@dataclass(frozen=True)
class Preprocess:
    """uint8 batch -> normalised float model input of ``input_shape`` (C, H, W)."""

    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)  # (B, C, H, W)
        c, h, w = self.input_shape
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            elif c == 1:  # ITU-R 601 luma, as PIL's convert("L")
                x = (x[:, :3] * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise DataError(f"images have {x.shape[1]} channels but the model takes {c}: pass data with {c} channels")
        dh, dw = h - x.shape[2], w - x.shape[3]
        if fits_by_padding(x.shape[2:], (h, w)):
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))  # centred; an odd extra pixel goes right and down
        elif (dh, dw) != (0, 0):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=dh < 0 or dw < 0)
        mean = x.new_tensor(self.mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std


    def conversions(self, image_shape: tuple[int, ...]) -> list[str]:
        """What ``__call__`` does to images of ``image_shape`` (C, H, W) beyond scaling and normalising, in words."""
        c, h, w = self.input_shape
        out = []
        if image_shape[0] != c:
            out.append(f"{image_shape[0]}-channel images are repeated to {c} channels" if image_shape[0] == 1
                       else f"{image_shape[0]}-channel images are converted to grey (ITU-R 601 luma)" if c == 1 else "")
        src = f"{image_shape[1]}x{image_shape[2]}"
        if fits_by_padding(image_shape[1:], (h, w)):
            out.append(f"{src} images are padded with zeros to the model's {h}x{w} (centred)")
        elif tuple(image_shape[1:]) != (h, w):
            out.append(f"{src} images are resized to the model's {h}x{w} (bilinear)")
        return [o for o in out if o]


def fits_by_padding(size: tuple[int, ...] | torch.Size, target: tuple[int, int]) -> bool:
    """The size policy: an image at most an eighth of the model's side smaller (28 into 32) is padded with
    zeros, centred; any other size difference (28 into 224, larger images) is resized."""
    dh, dw = target[0] - size[0], target[1] - size[1]
    return (dh, dw) != (0, 0) and 0 <= dh <= target[0] // 8 and 0 <= dw <= target[1] // 8


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    x = images[: 20000].float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


# --- readers -------------------------------------------------------------------------------

FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _fashion_mnist_file(root: Path, name: str) -> list[Path]:
    """Where an idx file may lie: in ``root`` or torchvision's FashionMNIST/raw below it, plain or gzipped."""
    return [p for d in (root, root / "FashionMNIST" / "raw") for p in (d / name, d / f"{name}.gz") if p.is_file()]


def fashion_mnist_missing(split: str, root: Path | None = None) -> list[str]:
    """The idx files of ``split`` that ``load('fashion-mnist', split)`` would not find (empty: all there)."""
    return [name for name in FASHION_MNIST_FILES[split] if not _fashion_mnist_file(root or FASHION_MNIST_ROOT, name)]


def _fashion_mnist(root: Path | None, split: str, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    from torchvision.datasets import FashionMNIST

    root = root or FASHION_MNIST_ROOT
    with tempfile.TemporaryDirectory(prefix="beta-diag-fmnist-") as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for which, files in FASHION_MNIST_FILES.items():
            for name in files:
                found = _fashion_mnist_file(root, name)
                if which != split:
                    (raw / name).touch()  # torchvision checks that both splits exist; only ours is read
                elif not found:
                    raise DataError(
                        f"fashion-mnist: {name}(.gz) not found in {root}: install it with `apt-get install dataset-fashion-mnist` "
                        "or pass fashion-mnist:DIR"
                    )
                elif found[0].suffix == ".gz":
                    with gzip.open(found[0], "rb") as src, open(raw / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                else:
                    (raw / name).symlink_to(found[0].resolve())
        try:
            ds = FashionMNIST(tmp, train=split == "train", download=False)
        except Exception as exc:
            raise DataError(f"fashion-mnist: idx files in {root} are corrupt ({type(exc).__name__}): reinstall dataset-fashion-mnist") from None
        return ds.data.unsqueeze(1).clone(), ds.targets.long().clone(), FASHION_MNIST_CLASSES


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists and dicts only: a CIFAR batch cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data batch")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a CIFAR python batch ({exc}): re-extract cifar-*-python.tar.gz") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch: re-extract cifar-*-python.tar.gz")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar(kind: str, root: Path, split: str, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    folder, files, meta, key, names_key = {
        "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, "batches.meta", "labels", "label_names"),
        "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_labels", "fine_label_names"),
    }[kind]
    base = root / folder if (root / folder).is_dir() else root
    paths = [base / f for f in files[split]]
    missing = [p.name for p in paths + [base / meta] if not p.is_file()]
    if missing:
        raise DataError(f"{kind}:{root}: missing {', '.join(missing)}: pass the folder holding {folder}/ (extracted from the python tarball)")
    images, labels = [], []
    for p in paths:
        batch = _unpickle(p)
        if "data" not in batch or key not in batch:
            raise DataError(f"{p}: batch has no 'data'/'{key}': re-extract the {kind} tarball")
        images.append(torch.as_tensor(batch["data"]).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(list(batch[key]), dtype=torch.long))
    names = tuple(str(n.decode() if isinstance(n, bytes) else n) for n in _unpickle(base / meta).get(names_key, []))
    return torch.cat(images).to(torch.uint8), torch.cat(labels), names


def _imagefolder(root: Path, split: str, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    folder = root / split if (root / split).is_dir() else root
    try:
        ds = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder:{root}: {exc}: use one sub-folder per class") from None
    size = size or (32, 32)
    images = []
    for path, _ in ds.samples:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                images.append(pil_to_tensor(img))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot decode image ({type(exc).__name__}): remove or replace the file") from None
    labels = torch.tensor([t for _, t in ds.samples], dtype=torch.long)
    return torch.stack(images), labels, tuple(ds.classes)


def _bundle(path: Path, split: str, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if not {"images", "labels"} <= keys:
                raise DataError(f"{path}: a data bundle needs tensors 'images' and 'labels', found {sorted(keys)}: re-create it")
            images, labels, meta = f.get_tensor("images"), f.get_tensor("labels"), f.metadata() or {}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable safetensors data bundle ({exc}): re-create it") from None
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise DataError(f"{path}: 'images' must be uint8 (N, H, W) or (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise DataError(f"{path}: 'labels' must be integers of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    try:
        names = tuple(json.loads(meta.get("class_names", "[]")))
    except json.JSONDecodeError:
        names = ()
    return images, labels.long(), names


Reader = Callable[[Path, str, "tuple[int, int] | None"], "tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]"]
READERS: dict[str, Reader] = {
    "cifar10": lambda root, split, size: _cifar("cifar10", root, split, size),
    "cifar100": lambda root, split, size: _cifar("cifar100", root, split, size),
    "imagefolder": _imagefolder,
}


def resolve_spec(spec: str, base_dir: Path | None = None) -> str:
    """The spec with its file or folder made absolute (relative ones taken from ``base_dir``, else
    the working directory): a checkpoint records data relative to its own folder, or absolute."""
    base = (base_dir or Path.cwd()).resolve()
    if spec.endswith(".safetensors"):
        return str((base / spec).resolve())
    kind, sep, arg = spec.partition(":")
    return f"{kind}:{(base / arg).resolve()}" if sep and arg else spec


def load(spec: str, split: str = "test", limit: int | None = None, seed: int = 0, image_size: tuple[int, int] | None = None) -> Dataset:
    """Decode the data named by ``spec`` (see module docstring). ``limit`` keeps a seeded random subset.

    Example: ``load('fashion-mnist', 'test', limit=2000)``.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': use train or test")
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit}: pass a positive number of examples")
    kind, _, arg = spec.partition(":")
    if spec.endswith(".safetensors"):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"data bundle {spec} not found: check the path")
        images, labels, names = _bundle(path, split, image_size)
    elif kind == "fashion-mnist":
        images, labels, names = _fashion_mnist(Path(arg) if arg else None, split, image_size)
    elif kind in READERS:
        if not arg:
            raise DataError(f"data spec '{spec}' needs a folder: pass {kind}:DIR")
        if not Path(arg).is_dir():
            raise DataError(f"{spec}: folder {arg} does not exist: check the path")
        images, labels, names = READERS[kind](Path(arg), split, image_size)
    else:
        raise DataError(
            f"unknown data spec '{spec}': use fashion-mnist, fashion-mnist:DIR, cifar10:DIR, cifar100:DIR, imagefolder:DIR or FILE.safetensors"
        )
    if labels.numel() == 0:
        raise DataError(f"{spec} ({split}) holds no examples: pass data with images in it")
    if labels.min() < 0:
        raise DataError(f"{spec} ({split}): negative labels: labels must be class indices 0..C-1")
    if not names:
        names = tuple(str(i) for i in range(int(labels.max()) + 1))
    ds = Dataset(images.contiguous(), labels, names, spec, split)
    if limit is not None and limit < len(ds):
        ds = ds.subset(subset_index(len(ds), limit, seed))
    return ds


def subset_index(n: int, limit: int, seed: int, skip: int = 0) -> torch.Tensor:
    """The sorted indices ``--limit`` keeps: a seeded permutation's ``[skip, skip + limit)`` slice."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[skip : skip + limit].sort().values


def match_classes(ds: Dataset, model_classes: tuple[str, ...] | None) -> Dataset:
    """An ImageFolder's labels follow its sorted folder names; when the model names its classes, relabel
    by name (folders may hold a subset of them), and refuse folders the model does not know."""
    if not ds.spec.startswith("imagefolder:") or not model_classes or ds.class_names == tuple(model_classes):
        return ds
    unknown = [n for n in ds.class_names if n not in model_classes]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        known = ", ".join(model_classes[:10]) + (", ..." if len(model_classes) > 10 else "")
        raise DataError(f"{ds.spec} ({ds.split}): folder(s) {shown} name no class of the model ({known}): "
                        "name each folder after one of the model's classes")
    index = torch.tensor([list(model_classes).index(n) for n in ds.class_names])
    note = f"{ds.spec} ({ds.split}): class folders matched to the model's class names by name"
    return Dataset(ds.images, index[ds.labels], tuple(model_classes), ds.spec, ds.split, ds.notes + (note,))


def check_fits(ds: Dataset, num_classes: int, min_classes: int = 1) -> None:
    """Refuse labels outside the model's classes, or data with too few classes."""
    top = int(ds.labels.max())
    if top >= num_classes:
        raise DataError(
            f"{ds.spec} ({ds.split}) has label {top} but the model has {num_classes} classes: pass the data the model was trained on"
        )
    present = int(torch.unique(ds.labels).numel())
    if present < min_classes:
        raise DataError(f"{ds.spec} ({ds.split}) holds only {present} class(es): pass data with at least {min_classes} classes")


def batches(
    ds: Dataset, batch_size: int, device: torch.device, shuffle: bool = False, generator: torch.Generator | None = None,
    index: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels, example indices) on ``device``; pinned, non-blocking on CUDA."""
    for _, x, y, idx in numbered_batches(ds, batch_size, device, shuffle, generator, index):
        yield x, y, idx


def numbered_batches(
    ds: Dataset, batch_size: int, device: torch.device, shuffle: bool = False, generator: torch.Generator | None = None,
    index: torch.Tensor | None = None, owns: Callable[[int], bool] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``batches`` with each batch's first position in the order; ``owns(batch number)`` skips the others' batches."""
    order = index if index is not None else torch.arange(len(ds))
    if shuffle:
        order = order[torch.randperm(order.numel(), generator=generator)]
    cuda = device.type == "cuda"
    for number, start in enumerate(range(0, order.numel(), batch_size)):
        if owns is not None and not owns(number):
            continue
        idx = order[start : start + batch_size]
        x, y = ds.images[idx], ds.labels[idx]
        if cuda:
            x, y = x.pin_memory(), y.pin_memory()
        yield start, x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda), idx


def save_bundle(path: Path, ds: Dataset) -> None:
    """Write a dataset as a tensor bundle (used for the bundled sample data)."""
    from safetensors.torch import save

    from beta_diag.checkpoint import atomic_path, canonical

    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical(save(
            {"images": ds.images.contiguous(), "labels": ds.labels.contiguous()},
            metadata={"class_names": json.dumps(list(ds.class_names)), "source": ds.spec, "split": ds.split},
        )))
