"""Checkpoint files: ``.safetensors`` with metadata, ``.pt/.pth`` state dicts, HF-style folders.

Metadata lives in the safetensors header (``__metadata__``, string values, JSON where
structured). ``.pt/.pth`` files are read with ``torch.load(weights_only=True)`` only.
Writes are atomic: a temporary name beside the target, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import nn

from beta_diag import distributed, infer, models
from beta_diag import fingerprint as fingerprint_mod
from beta_diag.configs import Fit, ModelChoice
from beta_diag.errors import CheckpointError
from beta_diag.fingerprint import Fingerprint
from beta_diag.limits import MAX_INPUT_SIDE
from beta_diag.metadata import Metadata
from beta_diag.outputs import atomic_path, check_input, check_output

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class Checkpoint:
    """Weights plus metadata, as read from ``path``."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: Metadata
    sha256: str
    arch_from_user: bool = False  # True when --arch named the architecture, not the file
    notes: tuple[str, ...] = ()  # what loading assumed or converted (a wrapper key, a stripped prefix), for stderr and --json
    resolved: bool = False  # True once ``inferred`` has filled in what the weights say; an override clears it
    fingerprint: Fingerprint | None = None  # the activation statistics it carries (fingerprint.py), kept apart from the weights

    def with_model(self, choice: ModelChoice) -> Checkpoint:
        """The same checkpoint with the architecture (``--arch``, ``--arch-arg``) or the preprocessing
        (``--input-size``, ``--mean``, ``--std``: one value or one per channel; ``--resize``) given by hand."""
        meta, input_size = self.metadata, choice.input_size
        if choice.resize is not None:
            meta = replace(meta, resize=Fit(choice.resize).value)
        if choice.arch_kwargs:
            meta = replace(meta, arch_kwargs={**meta.arch_kwargs, **choice.arch_kwargs})
        channels = meta.input_shape[0] if meta.input_shape else infer.first_conv_channels(self.state_dict) or 3
        if input_size is not None:
            if not all(isinstance(v, int) and 1 <= v <= MAX_INPUT_SIDE for v in input_size):
                raise CheckpointError(f"--input-size {input_size}: pass sides from 1 to {MAX_INPUT_SIDE} pixels, e.g. --input-size 28")
            meta = replace(meta, input_shape=(channels, *input_size))
        for name, values in (("mean", choice.mean), ("std", choice.std)):  # checked, then one per channel
            if values is None:
                continue
            if len(values) not in (1, channels) or not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
                raise CheckpointError(
                    f"--{name} {','.join(map(str, values))}: pass one finite number or {channels} (one per input channel)"
                    + (", all positive" if name == "std" else "")
                )
            per_channel = tuple(values) * (channels if len(values) == 1 else 1)
            meta = replace(meta, mean=per_channel) if name == "mean" else replace(meta, std=per_channel)
        if choice.arch is not None:
            return replace(self, metadata=replace(meta, arch=choice.arch), arch_from_user=True, resolved=False)
        return self if meta == self.metadata else replace(self, metadata=meta, resolved=False)

    def _arch_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.metadata.arch_kwargs)
        if self.metadata.num_classes is not None and "num_classes" not in kwargs:
            kwargs["num_classes"] = self.metadata.num_classes
        return kwargs

    def inferred(self) -> Checkpoint:
        """The checkpoint with what its weights say filled in where nothing named it, and its input assumed
        where nothing says (``infer.fill_in``); each inference and assumption is added to ``notes``."""
        if self.resolved:
            return self
        arch = self.metadata.arch or ""
        may_build = bool(arch) and (":" not in arch or self.arch_from_user)
        meta, notes = infer.fill_in(self.metadata, self.state_dict, may_build)
        return replace(self, metadata=meta, notes=self.notes + tuple(notes), resolved=True)

    def build_model(self) -> nn.Module:
        """Build the architecture named in the metadata and load the weights strictly (eval mode)."""
        meta = self.metadata
        if not meta.arch:
            raise CheckpointError(f"{self.path}: metadata has no 'arch': pass --arch, e.g. --arch resnet18_cifar")
        if ":" in meta.arch and not self.arch_from_user:
            raise CheckpointError(
                f"{self.path}: metadata names code to import ({meta.arch}); beta-diag never runs code a file names: "
                f"if you trust it, pass --arch {meta.arch}"
            )
        kwargs = self._arch_kwargs()
        suggest = lambda: infer.suggest_arch_arg(str(meta.arch), kwargs, self.state_dict)
        # checked before the real build, on a sketch that allocates nothing large, so metadata naming a huge model
        # allocates nothing; a model that cannot be sketched is built for real only when --arch named it
        skeleton = infer.skeleton(meta.arch, kwargs)
        if skeleton is None and not self.arch_from_user:
            models.check_arguments(meta.arch, kwargs)  # arguments it does not take: that error, with its fix
            raise CheckpointError(
                f"{self.path}: '{meta.arch}' with {kwargs} cannot be sketched before it is built, so its size cannot be checked "
                f"against the weights first: if you trust the file, pass --arch {meta.arch}"
            )
        model = models.build(meta.arch, kwargs) if skeleton is None else None
        check_weights((skeleton or model).state_dict(), self.state_dict, str(self.path), suggest)  # type: ignore[union-attr]
        model = model or models.build(meta.arch, kwargs)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_keys(kind: str, keys: list[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
    return f"{len(keys)} {kind} ({shown})"


LOADABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # floating dtypes a model is loaded from


def nonfinite(state_dict: dict[str, torch.Tensor], as_in: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Floating tensors holding NaN/Inf, with how many such values each holds (a corrupt file, a diverged run);
    with ``as_in`` (the model's state dict), counted after the cast to the model's dtype: 1e300 in float64 is Inf in float32."""

    def cast(k: str, t: torch.Tensor) -> torch.Tensor:
        want = as_in[k].dtype if as_in is not None and k in as_in and as_in[k].is_floating_point() else t.dtype
        return t.to(want)

    counts = {k: int((~torch.isfinite(cast(k, t))).sum()) for k, t in state_dict.items() if t.is_floating_point()}
    return {k: n for k, n in counts.items() if n}


def check_weights(
    expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str, suggest: Callable[[], str | None] | None = None
) -> None:
    """Refuse weights that do not fit ``expected`` (a model's state dict, possibly on the meta device): missing or
    unexpected keys, other shapes (``suggest()`` names the option value that fits, when one does), integer
    tensors where the model holds floats (a relabelled dtype), floating dtypes a model cannot load (float8, complex),
    negative running variances, and values that are NaN/Inf in the dtype the model runs in."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = [_describe_keys(kind, keys) for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(
            f"{source}: weights do not match architecture: {'; '.join(parts)}: "
            "pass the --arch (and its arguments) the checkpoint was trained with"
        )
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state_dict[k].shape != v.shape]
    if wrong:
        raise CheckpointError(
            f"{source}: {len(wrong)} weight shape(s) differ from the architecture (file vs model): {', '.join(sorted(wrong)[:3])}: "
            + (
                f"pass {fix} (every weight's shape fits it)"
                if (fix := suggest and suggest())
                else "pass the architecture arguments the checkpoint was trained with (--arch-arg KEY=VALUE)"
            )
        )
    relabelled = [
        f"{k} ({str(state_dict[k].dtype).removeprefix('torch.')})"
        for k, v in expected.items()
        if v.is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if relabelled:
        raise CheckpointError(
            f"{source}: {len(relabelled)} tensor(s) hold integers where the model holds floats: "
            f"{', '.join(relabelled[:3])}: the checkpoint is corrupt; retrain or restore it"
        )
    exotic = sorted({str(t.dtype).removeprefix("torch.") for t in state_dict.values() if t.is_floating_point() and t.dtype not in LOADABLE})
    if exotic or any(t.is_complex() for t in state_dict.values()):
        raise CheckpointError(
            f"{source}: weights of dtype {', '.join(exotic) or 'complex'}, which beta-diag does not load: "
            "re-save them as float32, float16 or bfloat16"
        )
    negative = [k for k, t in state_dict.items() if k.endswith("running_var") and t.is_floating_point() and bool((t < 0).any())]
    if negative:
        raise CheckpointError(
            f"{source}: BatchNorm running variances below zero ({', '.join(negative[:3])}): the checkpoint is corrupt; "
            "retrain or restore it"
        )
    bad: dict[str, int] = {}
    for k, n in nonfinite(state_dict, expected).items():
        bad[k.split(".")[0]] = bad.get(k.split(".")[0], 0) + n
    if bad:
        listed = ", ".join(f"{g}: {n}" for g, n in sorted(bad.items()))
        raise CheckpointError(f"{source}: weights hold NaN/Inf values ({listed}): the checkpoint is corrupt; retrain or restore it")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: file is empty or truncated ({size} bytes), not a safetensors checkpoint: re-save or re-download it")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{path}: header claims {header_len} bytes but the file has {size}: "
            "not a safetensors file, or truncated; re-save or re-download it"
        )
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - safe_open is no dict: it has keys() only
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}): re-save or re-download it") from None
    return tensors, raw_meta


STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")  # where training scripts commonly keep the weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DistributedDataParallel, torch.compile


def _unwrap(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip the prefixes that DataParallel/DDP and torch.compile put before every key; notes say which."""
    notes = []
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if tensors and all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                notes.append(
                    f"stripped the '{prefix}' prefix from every key ({'torch.compile' if prefix == '_orig_mod.' else 'DataParallel/DDP'})"
                )
                changed = True
    return tensors, notes


def _read_torch(path: Path, state_key: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: the file holds Python objects beyond plain tensors, and beta-diag only loads with "
            "weights_only=True; re-save it with torch.save(model.state_dict(), path) or as .safetensors"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(
            f"{path}: not a readable PyTorch file ({type(exc).__name__}): re-save it with torch.save(model.state_dict(), path)"
        ) from None
    notes = []
    if state_key is not None:
        if not isinstance(obj, dict) or not isinstance(obj.get(state_key), dict):
            keys = ", ".join(sorted(str(k) for k in obj)[:10]) if isinstance(obj, dict) else "none"
            raise CheckpointError(
                f"{path}: holds no dict under the key '{state_key}' (its keys: {keys}): pass --state-key with one of them"
            )
        return obj[state_key], [f"read the weights under the key '{state_key}' (--state-key)"]
    for wrapper in STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            notes.append(f"read the weights under the key '{wrapper}'")
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        nested = sorted(str(k) for k, v in obj.items() if isinstance(v, dict)) if isinstance(obj, dict) else []
        if nested:
            raise CheckpointError(
                f"{path}: holds no state dict of tensors itself nor under {', '.join(STATE_KEYS)} (its dicts: "
                f"{', '.join(nested[:10])}): pass --state-key with the one holding the weights"
            )
        raise CheckpointError(
            f"{path}: does not hold a state dict of tensors (nor one under {', '.join(STATE_KEYS)}): "
            "re-save it with torch.save(model.state_dict(), path)"
        )
    return obj, notes


def load(path: str | os.PathLike[str], *, state_key: str | None = None) -> Checkpoint:
    """Read a checkpoint: ``.safetensors``, ``.pt``/``.pth``, or a folder with ``model.safetensors``.

    ``state_key``: the key of a ``.pt``/``.pth`` dict that holds the weights (default: the dict itself,
    or the first of ``STATE_KEYS`` it has).

    Raises CheckpointError with the fix for every unreadable or unsafe input.
    Example: ``ckpt = load('sample_checkpoints/fmnist_resnet18w16_sgd_beta.safetensors')``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file: check the path")
    config: dict[str, Any] = {}
    file = path
    if path.is_dir():
        file = path / "model.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{path}: folder has no model.safetensors: pass the checkpoint file itself")
        if (path / "config.json").exists():
            check_input(path / "config.json", "checkpoint's config.json", CheckpointError)
            try:
                config = json.loads((path / "config.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise CheckpointError(f"{path / 'config.json'}: not valid JSON (or nested too deeply): fix or remove it") from None
            if not isinstance(config, dict):
                raise CheckpointError(f"{path / 'config.json'}: must hold a JSON object of metadata keys: fix or remove it")
    check_input(file, "checkpoint", CheckpointError)  # a pipe or device would hang or be read as weights
    suffix = file.suffix.lower()
    if state_key is not None and suffix not in (".pt", ".pth", ".bin"):
        raise CheckpointError(f"{file}: --state-key is for .pt/.pth files, whose dicts may hold the weights under a key: drop it")
    header: Any = None
    if suffix == ".safetensors":
        tensors, raw = _read_safetensors(file)
        notes: list[str] = []
        if "fingerprint" in raw:
            try:
                header = json.loads(raw["fingerprint"])
            except (json.JSONDecodeError, RecursionError):
                header = "unreadable"  # parse names the fix
        meta_values: dict[str, Any] = dict(Metadata.from_strings(raw, str(file)).to_dict())
        if config:
            meta_values = {
                **{k: v for k, v in config.items() if k in meta_values},
                **{k: v for k, v in meta_values.items() if v not in (None, {}, [])},
            }
        metadata = Metadata.from_dict(meta_values, str(file))
    elif suffix in (".pt", ".pth", ".bin"):
        (tensors, notes), metadata = _read_torch(file, state_key), Metadata()
    else:
        raise CheckpointError(
            f"{file}: unsupported file type '{suffix}': pass a .safetensors, .pt or .pth file, or a folder holding model.safetensors"
        )
    marked = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(fingerprint_mod.PREFIX)]}
    found = fingerprint_mod.parse(header, marked, str(file))
    tensors, stripped = _unwrap(tensors)
    return Checkpoint(
        path=file, state_dict=tensors, metadata=metadata, sha256=file_sha256(file), notes=tuple(notes + stripped), fingerprint=found
    )


def canonical(blob: bytes) -> memoryview:
    """A safetensors file whose header lists metadata keys sorted and tensors by offset.

    safetensors writes metadata in hash-map order, which varies run to run; sorted, the same
    weights and metadata always give the same bytes (and sha256). The data section is unchanged.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | dict(
        sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    )
    raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    out = bytearray(len(raw).to_bytes(8, "little") + raw)
    out += memoryview(blob)[8 + n :]
    return memoryview(out)


def load_as(path: str | os.PathLike[str], model: ModelChoice) -> Checkpoint:
    """``load``, then ``model``'s options applied and what the weights say filled in; ``notes`` say what
    loading converted, inferred or assumed. Example: ``load_as('model.pt', ModelChoice(arch='resnet18'))``."""
    return load(path, state_key=model.state_key).with_model(model).inferred()


def save(
    path: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor],
    metadata: Metadata,
    force: bool = False,
    inputs: tuple[Path, ...] = (),
    fingerprint: Fingerprint | None = None,
) -> str:
    """Write a ``.safetensors`` checkpoint atomically, with ``fingerprint`` when given; returns its sha256."""
    out = Path(path)
    if distributed.is_main():  # the others checked before any work; now process 0 may have written it
        check_output(out, force, inputs, checkpoint_file=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    strings = metadata.to_strings()
    Metadata.from_strings(strings, f"{out} (not written)")  # what we write, we accept: the checks every reader applies
    if metadata.class_names and metadata.num_classes is not None and len(metadata.class_names) != metadata.num_classes:
        raise CheckpointError(f"{out} (not written): {len(metadata.class_names)} class names for {metadata.num_classes} classes")
    if fingerprint is not None:
        tensors |= fingerprint.tensors()
        strings["fingerprint"] = json.dumps(fingerprint.header())
    blob = canonical(save_bytes(tensors, metadata=strings))
    with atomic_path(out, force) as tmp, open(tmp, "wb") as f:  # atomic_path names the output on a write error
        f.write(blob)
    return hashlib.sha256(blob).hexdigest()
