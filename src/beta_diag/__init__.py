"""beta-diag: find the layer groups that carry a classifier's errors, and repair just those.

Importing the package is light: each public name loads its module (and torch) when first used,
so the command line can answer ``--help`` and be interrupted while it starts without a traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BetaDiagError": "beta_diag.errors",
    "Checkpoint": "beta_diag.checkpoint",
    "Metadata": "beta_diag.checkpoint",
    "load_checkpoint": ("beta_diag.checkpoint", "load"),
    "save_checkpoint": ("beta_diag.checkpoint", "save"),
    "critical_momentum": "beta_diag.schedules",
    "damping_ratio": "beta_diag.schedules",
    "regime": "beta_diag.schedules",
    "TrainConfig": "beta_diag.training",
    "train": "beta_diag.training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'beta_diag' has no attribute '{name}'")
    where = _EXPORTS[name]
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
