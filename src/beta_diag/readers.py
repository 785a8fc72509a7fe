"""Data specs and their readers: the one place a ``--data`` string is parsed, and each format decoded.

Specs: ``fashion-mnist`` (Debian's idx files in /usr/share/datasets/fashion-mnist, or
``fashion-mnist:DIR``), ``cifar10:DIR`` / ``cifar100:DIR`` (the python-batch format torchvision
uses), ``imagefolder:DIR`` (``DIR/train`` and ``DIR/test`` when present), and a tensor bundle
``FILE.safetensors`` holding ``images`` (uint8, (N, H, W) or (N, C, H, W)) and ``labels``.
A new format is one reader function and one ``READERS`` entry. Nothing here downloads.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from beta_diag.errors import DataError
from beta_diag.limits import MAX_CLASSES, MAX_IMAGE_PIXELS, MAX_NAME
from beta_diag.outputs import check_input

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
UNLABELLED = -1  # the label of every image read by images:DIR
DEFAULT_SIZE = (32, 32)  # an ImageFolder's images, when no model names a size


@dataclass(frozen=True)
class Decoded:
    """What a reader returns: uint8 images (N, C, H, W), int64 labels (N,), class names, and notes on what
    reading converted (in words, for stderr and --json)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    notes: tuple[str, ...] = ()


Pick = Callable[[int], list[int]]  # of N examples, the indices --limit keeps (a folder decodes only those)

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _fashion_mnist_file(root: Path, name: str) -> list[Path]:
    """Where an idx file may lie: in ``root`` or torchvision's FashionMNIST/raw below it, plain or gzipped."""
    return [p for d in (root, root / "FashionMNIST" / "raw") for p in (d / name, d / f"{name}.gz") if p.is_file()]


def fashion_mnist_missing(split: str, root: Path | None = None) -> list[str]:
    """The idx files of ``split`` that ``load('fashion-mnist', split)`` would not find (empty: all there)."""
    return [name for name in FASHION_MNIST_FILES[split] if not _fashion_mnist_file(root or FASHION_MNIST_ROOT, name)]


def _fashion_mnist(root: Path | None, split: str, size: tuple[int, int] | None) -> Decoded:
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
                else:
                    check_input(found[0], "data file", DataError)
                    if found[0].suffix == ".gz":
                        with gzip.open(found[0], "rb") as src, open(raw / name, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                    else:
                        (raw / name).symlink_to(found[0].resolve())
        try:
            ds = FashionMNIST(tmp, train=split == "train", download=False)
        except Exception as exc:  # noqa: BLE001 - torchvision raises many types for damaged files
            raise DataError(
                f"fashion-mnist: idx files in {root} are corrupt ({type(exc).__name__}): reinstall dataset-fashion-mnist"
            ) from None
        return Decoded(ds.data.unsqueeze(1).clone(), ds.targets.long().clone(), FASHION_MNIST_CLASSES)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists and dicts only: a CIFAR batch cannot run code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data batch")


def _unpickle(path: Path) -> dict[str, Any]:
    check_input(path, "data batch", DataError)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a CIFAR python batch ({exc}): re-extract cifar-*-python.tar.gz") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch: re-extract cifar-*-python.tar.gz")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar(kind: str, root: Path, split: str, size: tuple[int, int] | None) -> Decoded:
    folder, files, meta, key, names_key = {
        "cifar10": (
            "cifar-10-batches-py",
            {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
            "batches.meta",
            "labels",
            "label_names",
        ),
        "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_labels", "fine_label_names"),
    }[kind]
    base = root / folder if (root / folder).is_dir() else root
    paths = [base / f for f in files[split]]
    missing = [p.name for p in paths + [base / meta] if not p.is_file()]
    if missing:
        raise DataError(
            f"{kind}:{root}: missing {', '.join(missing)}: pass the folder holding {folder}/ (extracted from the python tarball)"
        )
    images, labels = [], []
    for p in paths:
        batch = _unpickle(p)
        if "data" not in batch or key not in batch:
            raise DataError(f"{p}: batch has no 'data'/'{key}': re-extract the {kind} tarball")
        rows = torch.as_tensor(batch["data"])
        if rows.dim() != 2 or rows.shape[1] != 3 * 32 * 32 or rows.dtype != torch.uint8 or len(batch[key]) != rows.shape[0]:
            raise DataError(
                f"{p}: 'data' must be uint8 rows of 3,072 pixels, one per label; got {rows.dtype} {tuple(rows.shape)} for "
                f"{len(batch[key])} labels: re-extract the {kind} tarball"
            )
        images.append(rows.reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(list(batch[key]), dtype=torch.long))
    names = tuple(str(n.decode() if isinstance(n, bytes) else n) for n in _unpickle(base / meta).get(names_key, []))
    return Decoded(torch.cat(images).to(torch.uint8), torch.cat(labels), names)


PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))


def _refuse_pseudo(where: str, top: Path) -> None:
    if any(top == p or p in top.parents for p in PSEUDO_FILESYSTEMS):
        raise DataError(f"{where}: {top} is a pseudo-filesystem, not images: pass a folder of image files")


def _walk_images(where: str, top: Path, folder: Path, label: int) -> list[tuple[Path, int]]:
    """The regular image files under ``folder`` (sorted, links never followed out of ``top``), each with ``label``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    _refuse_pseudo(where, top)
    found = []
    for here, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for f in sorted(files):
            real = Path(os.path.realpath(Path(here) / f))  # a link loop resolves to itself and fails the stat below
            try:
                regular = stat.S_ISREG(os.stat(real).st_mode)
            except OSError:
                continue
            if f.lower().endswith(IMG_EXTENSIONS) and top in real.parents and regular:
                found.append((real, label))
    return found


def _image_files(root: Path, folder: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """(class names, [(image file, class index)]) of one-folder-per-class images, in sorted order, as
    torchvision's ImageFolder finds them, but never following a link out of the tree or into a loop,
    skipping everything that is not a regular file (a named pipe would block), and refusing /proc."""
    top = folder.resolve()
    _refuse_pseudo(f"imagefolder:{root}", top)
    try:
        entries = list(os.scandir(top))
    except OSError as exc:
        raise DataError(f"imagefolder:{root}: cannot list {top} ({exc.strerror}): check the folder and its permissions") from None
    linked = sorted(e.name for e in entries if e.is_symlink())
    if linked:
        raise DataError(
            f"imagefolder:{root}: class folder(s) {', '.join(linked[:5])} are links: links are never followed; "
            "copy or move the images into the folder"
        )
    classes = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    if not classes:
        raise DataError(f"imagefolder:{root}: no class sub-folders in {top}: use one sub-folder per class")
    samples: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        found = _walk_images(f"imagefolder:{root}", top, top / name, index)
        if not found:
            raise DataError(f"imagefolder:{root}: class folder '{name}' holds no image files: remove it or add images")
        samples += found
    return tuple(classes), samples


def _to_8bit(img: Any) -> Any:
    """A 16-bit or float grey image as 8-bit grey: integers 0-65535 and floats 0-1 scaled to 0-255 (not clipped at 255)."""
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)
    scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")


def _decode(
    root: Path, split: str, samples: list[tuple[Path, int]], size: tuple[int, int] | None, kind: str
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Decode image files to one uint8 (N, 3, H, W) tensor at ``size`` (default DEFAULT_SIZE), with notes on what it converted."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    size = size or DEFAULT_SIZE
    images, resized, coloured, wide = [], 0, 0, 0
    for path, _ in samples:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    if img.width * img.height > MAX_IMAGE_PIXELS:
                        raise DataError(
                            f"{path}: {img.width}x{img.height} pixels, beyond {MAX_IMAGE_PIXELS:,}: downscale or remove the image"
                        )
                    resized += img.size != (size[1], size[0])
                    deep = img.mode.startswith(("I", "F"))  # 16-bit (I;16, I) or float: scaled to 8 bits, not clipped
                    wide += deep
                    coloured += img.mode != "RGB"
                    img8 = _to_8bit(img) if deep else img
                    images.append(pil_to_tensor(img8.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)))
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(f"{path}: cannot decode image ({type(exc).__name__}): remove or replace the file") from None
    n, where = len(images), f"{kind}:{root} ({split})"
    notes = (
        ([f"{where}: {resized} of {n} images resized to {size[0]}x{size[1]} when read (bilinear)"] if resized else [])
        + ([f"{where}: {wide} of {n} images of 16 bits or more scaled to 8 bits (0-65535 to 0-255) when read"] if wide else [])
        + ([f"{where}: {coloured} of {n} images converted to RGB when read"] if coloured else [])
    )
    return torch.stack(images), tuple(notes)


def _picked(samples: list[tuple[Path, int]], pick: Pick | None) -> list[tuple[Path, int]]:
    return samples if pick is None else [samples[i] for i in pick(len(samples))]


def _imagefolder(root: Path, split: str, size: tuple[int, int] | None, pick: Pick | None = None) -> Decoded:
    folder = root / split if (root / split).is_dir() else root
    classes, samples = _image_files(root, folder)
    samples = _picked(samples, pick)
    images, notes = _decode(root, split, samples, size, "imagefolder")
    return Decoded(images, torch.tensor([t for _, t in samples], dtype=torch.long), classes, notes)


def _images(root: Path, split: str, size: tuple[int, int] | None, pick: Pick | None = None) -> Decoded:
    """Unlabelled images: every image file under the folder (its SPLIT sub-folder when there is one), labels UNLABELLED."""
    folder = root / split if (root / split).is_dir() else root
    samples = _walk_images(f"images:{root}", folder.resolve(), folder.resolve(), 0)
    if not samples:
        raise DataError(f"images:{root}: no image files in {folder}: add images (png, jpg, ...)")
    samples = _picked(samples, pick)
    images, notes = _decode(root, split, samples, size, "images")
    return Decoded(images, torch.full((len(samples),), UNLABELLED, dtype=torch.long), (), notes)


def _bundle(path: Path, split: str, size: tuple[int, int] | None) -> Decoded:
    from safetensors import safe_open

    check_input(path, "data bundle", DataError)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if not {"images", "labels"} <= keys:
                raise DataError(f"{path}: a data bundle needs tensors 'images' and 'labels', found {sorted(keys)}: re-create it")
            images, labels, meta = f.get_tensor("images"), f.get_tensor("labels"), f.metadata() or {}
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise DataError(f"{path}: not a readable safetensors data bundle ({exc}): re-create it") from None
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise DataError(f"{path}: 'images' must be uint8 (N, H, W) or (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise DataError(f"{path}: 'labels' must be integers of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    try:
        names = json.loads(meta.get("class_names", "[]"))
    except (json.JSONDecodeError, RecursionError):
        names = []
    if not isinstance(names, list) or len(names) > MAX_CLASSES or not all(isinstance(n, str) and len(n) <= MAX_NAME for n in names):
        raise DataError(
            f"{path}: 'class_names' must be a list of up to {MAX_CLASSES:,} strings of up to {MAX_NAME} characters: re-create it"
        )
    return Decoded(images, labels.long(), tuple(names))


def _named(path: Path | None) -> Path:
    """The path of a spec whose reader ``needs_path`` (``DataSpec.parse`` refused the spec without one)."""
    if path is None:
        raise DataError("this data kind needs a path: write KIND:PATH, e.g. imagefolder:DIR")
    return path


@dataclass(frozen=True)
class Reader:
    """A data format: ``read(path, split, size, pick)``; whether the spec must name a path; whether a file is
    one split whatever --split says; whether labels follow sorted folder names (matched to the model's).
    ``pick``: applied by the folder readers before decoding, so that --limit 64 decodes 64 images; the others
    ignore it (``data.load`` takes the same subset after reading)."""

    read: Callable[[Path | None, str, tuple[int, int] | None, Pick | None], Decoded]
    needs_path: bool = True
    one_split: bool = False
    labels_by_folder: bool = False


READERS: dict[str, Reader] = {
    "fashion-mnist": Reader(lambda root, split, size, pick: _fashion_mnist(root, split, size), needs_path=False),
    "cifar10": Reader(lambda root, split, size, pick: _cifar("cifar10", _named(root), split, size)),
    "cifar100": Reader(lambda root, split, size, pick: _cifar("cifar100", _named(root), split, size)),
    "imagefolder": Reader(lambda root, split, size, pick: _imagefolder(_named(root), split, size, pick), labels_by_folder=True),
    "images": Reader(lambda root, split, size, pick: _images(_named(root), split, size, pick)),  # no labels: for recalibration
    "bundle": Reader(lambda path, split, size, pick: _bundle(_named(path), split, size), one_split=True),  # FILE.safetensors
}
SPECS_HELP = "fashion-mnist, fashion-mnist:DIR, cifar10:DIR, cifar100:DIR, imagefolder:DIR, images:DIR (unlabelled) or FILE.safetensors"


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: the reader's name and its file or folder (None: the reader's default place)."""

    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, text: str | DataSpec) -> DataSpec:
        if isinstance(text, DataSpec):
            return text
        if text.endswith(".safetensors"):
            return cls("bundle", Path(text))
        kind, _, arg = text.partition(":")
        if kind not in READERS or kind == "bundle":
            raise DataError(f"unknown data spec '{text}': use {SPECS_HELP}")
        if READERS[kind].needs_path and not arg:
            raise DataError(f"data spec '{text}' needs a folder: pass {kind}:DIR")
        return cls(kind, Path(arg) if arg else None)

    def __str__(self) -> str:
        if self.kind == "bundle":
            return str(self.path)
        return f"{self.kind}:{self.path}" if self.path is not None else self.kind

    @property
    def reader(self) -> Reader:
        return READERS[self.kind]

    @property
    def name(self) -> str:
        """The data set's name as training records it: the format, or a bundle's file."""
        return str(self) if self.kind == "bundle" else self.kind

    def files(self) -> tuple[Path, ...]:
        """The files the spec names itself (a bundle), which no output may replace."""
        return (self.path,) if self.kind == "bundle" and self.path is not None else ()

    def resolved(self, base_dir: Path | None = None) -> DataSpec:
        """Its file or folder made absolute (a relative one taken from ``base_dir``, else the working
        directory): a checkpoint records data relative to its own folder, or absolute."""
        base = (base_dir or Path.cwd()).resolve()
        return self if self.path is None else replace(self, path=(base / self.path).resolve())

    def read(self, split: str, size: tuple[int, int] | None, pick: Pick | None = None) -> Decoded:
        if self.kind == "bundle" and not self.path.exists():  # type: ignore[union-attr]
            raise DataError(f"data bundle {self} not found: check the path")
        if self.kind != "bundle" and self.path is not None and not self.path.is_dir():
            raise DataError(f"{self}: folder {self.path} does not exist: check the path")
        return self.reader.read(self.path, split, size, pick)
