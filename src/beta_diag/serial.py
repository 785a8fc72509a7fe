"""JSON as beta-diag writes it, for ``--json`` and saved results: deterministic (sorted keys), strict (NaN and
infinities become null), tuples as lists. Torch-free, so that the library's results save themselves without
reaching up into the renderer."""

from __future__ import annotations

import json
import math
from typing import Any


def clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, tuples lists, keys strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Deterministic JSON (sorted keys) for ``--json`` and saved results."""
    return json.dumps(clean(value), indent=2, sort_keys=True)


TIMING_KEYS = frozenset({"seconds", "estimated_seconds", "compute_saving", "val_seconds"})  # wall-clock: measured, never a result


def without_timing(value: object) -> object:
    """``value`` with every wall-clock field removed, so that files and ``--json`` depend only on the inputs."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, (list, tuple)):
        return [without_timing(v) for v in value]
    return value
