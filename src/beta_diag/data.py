"""Data specs -> in-memory datasets, matched to a model, and batched (``readers`` parses specs and decodes
each format). Images stay uint8 (N, C, H, W) on the CPU; ``Preprocess`` turns a batch into model input.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from beta_diag.errors import DataError
from beta_diag.limits import MAX_CHANNELS, MAX_CLASSES, MAX_INPUT_SIDE
from beta_diag.readers import DataSpec

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
    source: DataSpec | None = None  # the parsed spec it was read from (None: built in memory)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def labelled(self) -> bool:
        """False for unlabelled images (images:DIR), whose labels are all UNLABELLED (-1)."""
        return not bool((self.labels < 0).any())

    def subset(self, index: torch.Tensor) -> Dataset:
        return replace(self, images=self.images[index], labels=self.labels[index])


ToInput = Callable[[torch.Tensor], torch.Tensor]  # a stored batch (or cached features) -> model input; a Preprocess is one


@dataclass(frozen=True)
class Preprocess:
    """uint8 batch -> normalised float model input of ``input_shape`` (C, H, W)."""

    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fit: str | None = None  # a configs.Fit value; None: the default size policy (``fits_by_padding``)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)  # (B, C, H, W)
        c, h, w = self.input_shape
        if x.shape[1] != c:
            self.check_channels(x.shape[1])
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            else:  # colour to grey: ITU-R 601 luma, as PIL's convert("L")
                x = (x[:, :3] * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = fitted(x, (h, w), self.fit)
        mean = x.new_tensor(self.mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def check_channels(self, channels: int) -> None:
        """Grey images are repeated to the model's channels, RGB(A) converted to grey for a grey model; anything else is refused."""
        c = self.input_shape[0]
        if channels != c and channels != 1 and not (c == 1 and channels in (3, 4)):
            raise DataError(f"images have {channels} channels but the model takes {c}: pass data with {c} channels")

    def conversions(self, image_shape: tuple[int, ...]) -> list[str]:
        """What ``__call__`` does to images of ``image_shape`` (C, H, W) beyond scaling and normalising, in words."""
        c, h, w = self.input_shape
        out = []
        if image_shape[0] != c:
            out.append(
                f"{image_shape[0]}-channel images are repeated to {c} channels"
                if image_shape[0] == 1
                else f"{image_shape[0]}-channel images are converted to grey (ITU-R 601 luma)"
                if c == 1
                else ""
            )
        src = f"{image_shape[1]}x{image_shape[2]}"
        if tuple(image_shape[1:]) != (h, w):
            how = fit_of(image_shape[1:], (h, w), self.fit)
            verb, detail = FIT_WORDS[how]
            out.append(f"{src} images are {verb} to the model's {h}x{w} ({detail}" + (f", --resize {how})" if self.fit else ")"))
        return [o for o in out if o]


FIT_WORDS = {  # how: (what is done, how), for the notes
    "pad": ("padded with zeros", "centred"),
    "resize": ("resized", "bilinear"),
    "crop": ("centre-cropped", "after scaling the shorter side to fit, bilinear"),
}


def _pad_or_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Centred: zeros added where ``x`` is smaller, the middle kept where it is larger (an odd pixel goes right and down)."""
    dh, dw = h - x.shape[2], w - x.shape[3]
    x = F.pad(x, (max(dw, 0) // 2, max(dw, 0) - max(dw, 0) // 2, max(dh, 0) // 2, max(dh, 0) - max(dh, 0) // 2))
    top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    return x[:, :, top : top + h, left : left + w]


def fit_of(size: tuple[int, ...] | torch.Size, target: tuple[int, int], fit: str | None) -> str:
    """How an image of ``size`` reaches ``target``: ``fit`` when given, else the default policy (``fits_by_padding``)."""
    return fit or ("pad" if fits_by_padding(size, target) else "resize")


def fitted(x: torch.Tensor, size: tuple[int, int], fit: str | None) -> torch.Tensor:
    """A float batch (B, C, H', W') at the model's ``size`` by ``fit`` (``configs.Fit``; None: pad an image at most an
    eighth smaller, resize any other)."""
    h, w = size
    if tuple(x.shape[2:]) == (h, w):
        return x
    how = fit_of(x.shape[2:], size, fit)
    if how == "pad":
        return _pad_or_crop(x, h, w)
    if how == "crop":
        scale = max(h / x.shape[2], w / x.shape[3])
        side = (max(h, round(x.shape[2] * scale)), max(w, round(x.shape[3] * scale)))
        x = F.interpolate(x, size=side, mode="bilinear", align_corners=False, antialias=scale < 1)
        return _pad_or_crop(x, h, w)
    shrink = x.shape[2] > h or x.shape[3] > w
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)


def fits_by_padding(size: tuple[int, ...] | torch.Size, target: tuple[int, int]) -> bool:
    """The size policy: an image at most an eighth of the model's side smaller (28 into 32) is padded with
    zeros, centred; any other size difference (28 into 224, larger images) is resized."""
    dh, dw = target[0] - size[0], target[1] - size[1]
    return (dh, dw) != (0, 0) and 0 <= dh <= target[0] // 8 and 0 <= dw <= target[1] // 8


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    x = images[:20000].float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def load(
    spec: str | DataSpec, split: str = "test", limit: int | None = None, seed: int = 0, image_size: tuple[int, int] | None = None
) -> Dataset:
    """Decode the data named by ``spec`` (see ``readers``). ``limit`` keeps a seeded random subset.

    Example: ``load('fashion-mnist', 'test', limit=2000)``.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': use train or test")
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit}: pass a positive number of examples")
    source = DataSpec.parse(spec)
    keep = None if limit is None else lambda n: subset_index(n, limit, seed).tolist() if limit < n else list(range(n))
    decoded = source.read(split, image_size, keep)  # a folder decodes only the images --limit keeps
    images, labels, names = decoded.images, decoded.labels, decoded.class_names
    if labels.numel() == 0:
        raise DataError(f"{spec} ({split}) holds no examples: pass data with images in it")
    unlabelled = source.kind == "images"  # every label UNLABELLED (-1), by construction
    if not unlabelled and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
        raise DataError(
            f"{spec} ({split}): label {int(labels.min() if labels.min() < 0 else labels.max())}: "
            f"labels must be class indices 0..C-1, C up to {MAX_CLASSES:,}"
        )
    if not (0 < images.shape[1] <= MAX_CHANNELS and 0 < images.shape[-2] <= MAX_INPUT_SIDE and 0 < images.shape[-1] <= MAX_INPUT_SIDE):
        raise DataError(
            f"{spec} ({split}): images of shape {tuple(images.shape[1:])}: pass images with 1 to {MAX_CHANNELS} channels "
            f"and 1 to {MAX_INPUT_SIDE} pixels per side (at least one pixel per side)"
        )
    if not names:
        names = tuple(str(i) for i in range(int(labels.max()) + 1))
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{spec} ({split}): class names {', '.join(map(repr, twice[:5]))} appear more than once: name each class once")
    if not unlabelled and int(labels.max()) >= len(names):
        raise DataError(
            f"{spec} ({split}): label {int(labels.max())} but {len(names)} class names: name every class the labels use (0..C-1)"
        )
    ds = Dataset(images.contiguous(), labels, names, str(spec), split, decoded.notes, source)
    if limit is not None and limit < len(ds):
        ds = ds.subset(subset_index(len(ds), limit, seed))
    return ds


def subset_index(n: int, limit: int, seed: int, skip: int = 0) -> torch.Tensor:
    """The sorted indices ``--limit`` keeps: a seeded permutation's ``[skip, skip + limit)`` slice."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[skip : skip + limit].sort().values


UNHOLDABLE = '/\\:*?"<>|'  # characters a folder name cannot hold on some system


def folder_key(name: str) -> str:
    """What a class folder's name is matched by: its letters and digits, case folded ("T-shirt/top", "t-shirt_top"
    and "TShirt Top" all match)."""
    return "".join(c for c in name.casefold() if c.isalnum())


def folder_for(name: str) -> str:
    """A folder name every system can hold for class ``name``: the characters it cannot hold become ``_``."""
    return "".join("_" if c in UNHOLDABLE or not c.isprintable() else c for c in name).strip() or "_"


def _class_of(folder: str, model_classes: tuple[str, ...], class_map: dict[str, str] | None = None) -> int | None:
    """The model's class a folder names: as ``class_map`` says, else its exact name, else the one class with its
    ``folder_key``, else its index."""
    if class_map and folder in class_map:
        target = class_map[folder]
        if target in model_classes:
            return model_classes.index(target)
        if target.isdigit() and int(target) < len(model_classes):
            return int(target)
        raise DataError(
            f"--class-map maps folder {folder!r} to {target!r}, which is no class of the model: "
            f"use one of its class names or an index 0..{len(model_classes) - 1}"
        )
    if folder in model_classes:
        return model_classes.index(folder)
    keyed = [i for i, n in enumerate(model_classes) if folder_key(n) == folder_key(folder) and folder_key(folder)]
    if len(keyed) == 1:
        return keyed[0]
    if folder.isdigit() and int(folder) < len(model_classes) and not any(n.isdigit() for n in model_classes):
        return int(folder)
    return None


def match_classes(ds: Dataset, model_classes: tuple[str, ...] | None, class_map: dict[str, str] | None = None) -> Dataset:
    """An ImageFolder's labels follow its sorted folder names; when the model names its classes, relabel
    by class (folders may hold a subset of them): a folder matches a class by its exact name, by its letters
    and digits with case ignored (so "t-shirt_top" is "T-shirt/top", which no folder can be called), or by
    the class index, or as ``class_map`` (``--class-map``) says; folders the model does not know are refused with the
    folder names that would match."""
    if ds.source is None or not ds.source.reader.labels_by_folder or not model_classes or ds.class_names == tuple(model_classes):
        return ds
    model_classes = tuple(model_classes)
    found = {n: _class_of(n, model_classes, class_map) for n in ds.class_names}
    unknown = [n for n, c in found.items() if c is None]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        would = ", ".join(f"{folder_for(n)!r} or {i}" for i, n in enumerate(model_classes[:10])) + (
            ", ..." if len(model_classes) > 10 else ""
        )
        raise DataError(
            f"{ds.spec} ({ds.split}): folder(s) {shown} name no class of the model: name each folder after a class "
            f"(case, spaces and punctuation are ignored) or its index, or pass --class-map FILE: {would}"
        )
    classes = [c for c in found.values() if c is not None]
    twice = [c for c in set(classes) if classes.count(c) > 1]
    if twice:
        raise DataError(
            f"{ds.spec} ({ds.split}): folders {', '.join(repr(n) for n, c in found.items() if c in twice)} name the same class "
            f"{model_classes[twice[0]]!r}: merge them"
        )
    index = torch.tensor(classes)  # in folder order
    how = "by name" if all(n in model_classes for n in ds.class_names) else "by name, ignoring case and punctuation, or index"
    note = f"{ds.spec} ({ds.split}): class folders matched to the model's class names {how}"
    return replace(ds, labels=index[ds.labels], class_names=model_classes, notes=ds.notes + (note,))


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
    ds: Dataset,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    index: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels, example indices) on ``device``; pinned, non-blocking on CUDA."""
    for _, x, y, idx in numbered_batches(ds, batch_size, device, shuffle, generator, index):
        yield x, y, idx


def numbered_batches(
    ds: Dataset,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    index: torch.Tensor | None = None,
    owns: Callable[[int], bool] | None = None,
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

    from beta_diag.checkpoint import canonical
    from beta_diag.outputs import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(
            canonical(
                save(
                    {"images": ds.images.contiguous(), "labels": ds.labels.contiguous()},
                    metadata={"class_names": json.dumps(list(ds.class_names)), "source": ds.spec, "split": ds.split},
                )
            )
        )
