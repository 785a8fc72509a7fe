"""What a checkpoint says about itself: the metadata in a safetensors header, checked as a schema when read
(types, ranges, finiteness, limits), so that nothing downstream meets a malformed value."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from beta_diag import schedules
from beta_diag.configs import Fit
from beta_diag.errors import CheckpointError
from beta_diag.limits import MAX_CHANNELS, MAX_CLASSES, MAX_HISTORY, MAX_INPUT_SIDE, MAX_NAME

FORMAT_VERSION = "1"
# Metadata keys stored as JSON; everything else is a plain string.
_JSON_KEYS = ("arch_kwargs", "num_classes", "input_shape", "mean", "std", "class_names", "data", "training", "history", "repair")


@dataclass(frozen=True)
class Metadata:
    """What a checkpoint says about itself. ``extra`` carries provenance (training, history, repair)."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    input_shape: tuple[int, int, int] | None = None  # (C, H, W)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    dataset: str | None = None
    resize: str | None = None  # a Fit value: how images of another size are fitted (None: pad a little, else resize)
    data: dict[str, Any] = field(default_factory=dict)  # {"train": {"spec", "split"}, "test": {...}}
    training: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, Any], ...] = ()
    repair: dict[str, Any] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        out = {"format": "beta-diag", "format_version": FORMAT_VERSION}
        for key, value in self.to_dict().items():
            if value in (None, {}, (), []):
                continue
            out[key] = json.dumps(value) if key in _JSON_KEYS else str(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "class_names": list(self.class_names) if self.class_names else None,
            "dataset": self.dataset,
            "resize": self.resize,
            "data": self.data,
            "training": self.training,
            "history": list(self.history),
            "repair": self.repair,
        }

    @classmethod
    def from_strings(cls, raw: dict[str, str], source: str) -> Metadata:
        values: dict[str, Any] = {}
        for key in ("arch", "dataset", "resize", *_JSON_KEYS):
            if key not in raw:
                continue
            value: Any = raw[key]
            if key in _JSON_KEYS and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise CheckpointError(f"{source}: metadata '{key}' is not valid JSON: re-save the checkpoint") from None
                except RecursionError:
                    raise CheckpointError(
                        f"{source}: metadata '{key}' is nested too deeply to be metadata: re-save the checkpoint"
                    ) from None
            values[key] = value
        return cls.from_dict(values, source)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> Metadata:
        def check(key: str, ok: bool, want: str) -> None:
            if key in values and values[key] is not None and not ok:
                raise CheckpointError(f"{source}: metadata '{key}' must be {want}, got {values[key]!r}: fix or remove it")

        v = values
        check("arch", isinstance(v.get("arch"), str), "a string")
        check("arch_kwargs", isinstance(v.get("arch_kwargs"), dict), "a JSON object")
        inner = v.get("arch_kwargs")
        count = inner.get("num_classes", 1) if isinstance(inner, dict) else 1
        if not (
            isinstance(count, int) and not isinstance(count, bool) and 0 < count <= MAX_CLASSES
        ):  # the same bound, wherever it is given
            raise CheckpointError(
                f"{source}: metadata 'arch_kwargs' num_classes must be a positive "
                f"integer up to {MAX_CLASSES:,}, got {count!r}: fix or remove it"
            )
        check(
            "num_classes",
            isinstance(v.get("num_classes"), int) and 0 < v.get("num_classes", 0) <= MAX_CLASSES,
            f"a positive integer up to {MAX_CLASSES:,}",
        )
        shape = v.get("input_shape")
        check(
            "input_shape",
            _int_list(shape, 3) and shape is not None and shape[0] <= MAX_CHANNELS and max(shape[1:]) <= MAX_INPUT_SIDE,
            f"a list of 3 positive integers [C, H, W], C up to {MAX_CHANNELS} and sides up to {MAX_INPUT_SIDE}",
        )
        check("mean", _num_list(v.get("mean")), "a list of finite numbers")
        check("std", _num_list(v.get("std")) and all(s > 0 for s in v.get("std") or [1]), "a list of finite positive numbers")
        names = v.get("class_names")
        check(
            "class_names",
            isinstance(names, list)
            and len(names) <= MAX_CLASSES
            and all(isinstance(n, str) and len(n) <= MAX_NAME for n in names)
            and len(set(names)) == len(names),
            f"a list of up to {MAX_CLASSES:,} distinct strings of up to {MAX_NAME} characters",
        )
        check("resize", v.get("resize") in {f.value for f in Fit}, "one of " + ", ".join(f.value for f in Fit))
        check("data", isinstance(v.get("data"), dict), "a JSON object")
        check(
            "history",
            isinstance(v.get("history"), list)
            and len(v.get("history") or []) <= MAX_HISTORY
            and all(isinstance(h, dict) for h in v.get("history") or []),
            f"a list of up to {MAX_HISTORY:,} JSON objects",
        )
        problem = schedules.history_problem(v.get("history") or [])
        if problem is not None:
            raise CheckpointError(f"{source}: metadata 'history' {problem}: fix or remove it")
        return cls(
            arch=v.get("arch"),
            arch_kwargs=v.get("arch_kwargs") or {},
            num_classes=v.get("num_classes"),
            input_shape=tuple(v["input_shape"]) if v.get("input_shape") else None,
            mean=tuple(v["mean"]) if v.get("mean") else None,
            std=tuple(v["std"]) if v.get("std") else None,
            class_names=tuple(str(c) for c in v["class_names"]) if v.get("class_names") else None,
            dataset=v.get("dataset"),
            resize=v.get("resize"),
            data=v.get("data") or {},
            training=v.get("training") or {},
            history=tuple(v.get("history") or ()),
            repair=v.get("repair") or {},
        )


def _int_list(value: Any, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(isinstance(x, int) and x > 0 for x in value)


def _num_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and 0 < len(value) <= MAX_CHANNELS
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    )
