"""What a checkpoint's weights say about its architecture and input, where its metadata is silent.

From the weights, for a registry architecture: ``num_classes`` (the classifier's output size),
``in_channels`` (the first convolution's input, for builders that take it) and a ViT's
``image_size`` (its position embedding's length times the patch size). Then the input: the
metadata's shape, else the model's own ``image_size`` (ViT), else C x 32 x 32 from the first
convolution; mean and std 0.5 when none are named. Every inference and assumption is returned as a
note, for stderr and ``--json``. Models are sketched on the meta device, so nothing is allocated; an
architecture whose constructor computes with small tensors (RegNet's widths) is sketched with only its
large tensors on the meta device (``LargeOnMeta``), so a file naming a huge model allocates nothing either.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from beta_diag import models

DEFAULT_SIDE = 32  # pixels, when neither the metadata nor the model names an input size
ASSUMED = "assumed "  # how a note that guesses (input shape, normalisation) begins, as against one that reads or infers


def is_assumption(note: str) -> bool:
    """Whether ``note`` says what was guessed about the user's model or data (said first, as a warning)."""
    return note.startswith(ASSUMED)


def first_conv_channels(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Input channels of the first 4-D weight (the first convolution, in the order the model saved it)."""
    first = next((t for k, t in state_dict.items() if k.endswith("weight") and t.dim() == 4), None)
    return int(first.shape[1]) if first is not None else None


class LargeOnMeta(TorchFunctionMode):
    """Tensor factories asked for more than ``SMALL`` elements (parameters, buffers) make meta tensors; smaller ones
    (a constructor's own arithmetic: RegNet computes its widths with tensors) stay on the CPU."""

    SMALL = 1 << 16
    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full})

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            first = args[0] if args else kwargs.get("size", ())
            size = first if isinstance(first, (tuple, list, torch.Size)) else [a for a in args if isinstance(a, int)]
            if math.prod(int(x) for x in size) > self.SMALL:
                kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def skeleton(arch: str, kwargs: dict[str, Any]) -> nn.Module | None:
    """The architecture's modules and parameter shapes with nothing large allocated: on the meta device, or, when
    its constructor computes with tensors, with its large tensors there (``LargeOnMeta``); None when neither builds."""
    try:
        with torch.device("meta"):
            return models.build(arch, kwargs)
    except Exception:  # noqa: BLE001, S110 - some constructors compute with tensors; sketch them with small tensors real
        pass
    try:
        with LargeOnMeta():
            return models.build(arch, kwargs)
    except Exception:  # noqa: BLE001 - build_model reports it with the fix
        return None


def _shape(state_dict: dict[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    return tuple(state_dict[key].shape) if key in state_dict else None


def _from_weights(model: nn.Module, arch: str, kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
    """kwarg -> (value, the weight that says so), for what the weights and the default-built model disagree on."""
    found: dict[str, tuple[int, str]] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if layers and "num_classes" not in kwargs:
        key = f"{layers[-1][0]}.weight"  # the classifier is the last linear or convolution registered
        shape = _shape(state_dict, key)
        if shape and shape[0] != layers[-1][1].weight.shape[0]:
            found["num_classes"] = (shape[0], key)
    first = layers[0][1] if layers else None
    takes_channels = "in_channels" in inspect.signature(models.resolve(arch)).parameters
    if isinstance(first, nn.Conv2d) and takes_channels and "in_channels" not in kwargs:
        key = f"{layers[0][0]}.weight"
        shape = _shape(state_dict, key)
        if shape and len(shape) == 4 and shape[1] != first.weight.shape[1]:
            found["in_channels"] = (shape[1] * first.groups, key)
    patch, side = getattr(model, "patch_size", None), getattr(model, "image_size", None)
    mine, key = getattr(getattr(model, "encoder", None), "pos_embedding", None), "encoder.pos_embedding"
    shape = _shape(state_dict, key)
    if isinstance(patch, int) and isinstance(side, int) and mine is not None and shape and len(shape) == 3 and "image_size" not in kwargs:
        extra = mine.shape[1] - (side // patch) ** 2  # the class token(s)
        grid = math.isqrt(max(shape[1] - extra, 0))
        if shape[1] != mine.shape[1] and grid > 0 and grid * grid == shape[1] - extra:
            found["image_size"] = (grid * patch, key)
    return found


def fill_in(metadata: Any, state_dict: dict[str, torch.Tensor], may_build: bool) -> tuple[Any, list[str]]:
    """(metadata with what the weights say filled in, notes saying what was inferred or assumed).

    ``may_build``: the architecture may be built (a registry name, or code the user named with --arch)."""
    meta, notes = metadata, []
    if meta.arch and may_build:
        kwargs = dict(meta.arch_kwargs)
        if meta.num_classes is not None:
            kwargs.setdefault("num_classes", meta.num_classes)
        model = skeleton(meta.arch, kwargs)
        found = _from_weights(model, meta.arch, kwargs, state_dict) if model is not None else {}
        if found:
            notes += [f"inferred {k}={v} from the weights ({key}); --arch-arg {k}=N overrides it" for k, (v, key) in found.items()]
            meta = replace(meta, arch_kwargs={**meta.arch_kwargs, **{k: v for k, (v, _) in found.items()}})
            if "image_size" in found:
                model = skeleton(meta.arch, {**kwargs, "image_size": found["image_size"][0]})
        side = getattr(model, "image_size", None) if meta.input_shape is None else None
        if isinstance(side, int) and side > 0:
            c = first_conv_channels(state_dict) or 3
            meta = replace(meta, input_shape=(c, side, side))
            notes.append(
                f"took {c}x{side}x{side} inputs from the model's image_size (the metadata names no input shape): "
                "pass --input-size to change it"
            )
    if meta.input_shape is None:
        c = first_conv_channels(state_dict) or 3
        meta = replace(meta, input_shape=(c, DEFAULT_SIDE, DEFAULT_SIDE))
        notes.append(
            f"assumed {c}x{DEFAULT_SIDE}x{DEFAULT_SIDE} inputs (the metadata names no input shape): "
            "pass --input-size if the model expects another"
        )
    if meta.mean is None or meta.std is None:
        c = meta.input_shape[0]
        meta = replace(meta, mean=meta.mean or (0.5,) * c, std=meta.std or (0.5,) * c)
        notes.append(
            "assumed pixels scaled to [0, 1] then normalised with mean 0.5 and std 0.5 per channel "
            "(the metadata names none): pass --mean and --std"
        )
    return meta, notes


def suggest_arch_arg(arch: str, kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> str | None:
    """``--arch-arg KEY=N`` for an integer argument of the builder that makes every weight's shape fit the
    file, tried from the first differing weight's size ratio (resnet18_cifar saved at width 16: ``width=16``);
    None when no single integer argument does."""
    model = skeleton(arch, kwargs)
    try:
        params = inspect.signature(models.resolve(arch)).parameters
    except (TypeError, ValueError):
        return None
    if model is None:
        return None
    differ = next(((k, v.shape) for k, v in model.state_dict().items() if k in state_dict and state_dict[k].shape != v.shape), None)
    if differ is None:
        return None
    key, want = differ
    have = state_dict[key].shape
    for name, param in params.items():
        current = kwargs.get(name, param.default)
        if not isinstance(current, int) or isinstance(current, bool) or current <= 0 or len(have) != len(want):
            continue
        for f, m in zip(have, want):
            if f == m or (f * current) % m:
                continue
            trial = skeleton(arch, {**kwargs, name: f * current // m})
            fits = trial is not None and all(k in state_dict and state_dict[k].shape == v.shape for k, v in trial.state_dict().items())
            if fits:
                return f"--arch-arg {name}={f * current // m}"
    return None
