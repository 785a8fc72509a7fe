"""beta-diag: find the layer groups that carry a classifier's errors, and repair just those.

Importing the package is light: each public name loads its module (and torch) when first used,
so the command line can answer ``--help`` and be interrupted while it starts without a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # the commands
    "rank": "beta_diag.ranking",
    "compare": "beta_diag.comparison",
    "plan": "beta_diag.planning",
    "apply": "beta_diag.repairing",
    "repair": "beta_diag.repairing",
    "train": "beta_diag.training",
    "open_session": "beta_diag.session",
    "evaluate": "beta_diag.evaluation",
    # their configurations and results
    "RankConfig": "beta_diag.configs",
    "Ranking": "beta_diag.ranking",
    "Comparison": "beta_diag.comparison",
    "RepairConfig": "beta_diag.configs",
    "REPAIR_TRAINING": "beta_diag.configs",
    "repair_training": "beta_diag.configs",
    "Plan": "beta_diag.planning",
    "RepairReport": "beta_diag.verdicts",
    "Verdict": "beta_diag.verdicts",
    "TrainConfig": "beta_diag.configs",
    "TrainResult": "beta_diag.training",
    "Evaluation": "beta_diag.evaluation",
    "DataChoice": "beta_diag.configs",
    "ModelChoice": "beta_diag.configs",
    "Checkpoint": "beta_diag.checkpoint",
    "Metadata": "beta_diag.metadata",
    "load_checkpoint": ("beta_diag.checkpoint", "load"),
    "save_checkpoint": ("beta_diag.checkpoint", "save"),
    "load_ranking": ("beta_diag.ranking", "load"),
    "save_ranking": ("beta_diag.ranking", "save"),
    "critical_momentum": "beta_diag.schedules",
    "damping_ratio": "beta_diag.schedules",
    "regime": "beta_diag.schedules",
    # the errors: every one names its fix
    "BetaDiagError": "beta_diag.errors",
    "CheckpointError": "beta_diag.errors",
    "ModelError": "beta_diag.errors",
    "DataError": "beta_diag.errors",
    "OutputError": "beta_diag.errors",
    "ConfigError": "beta_diag.errors",
    "NoErrorsToDiagnose": "beta_diag.errors",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - the names above, in one place

if TYPE_CHECKING:  # the real types, for type checkers (at run time, __getattr__ loads each name when first used)
    from beta_diag.checkpoint import Checkpoint
    from beta_diag.checkpoint import load as load_checkpoint
    from beta_diag.checkpoint import save as save_checkpoint
    from beta_diag.comparison import Comparison, compare
    from beta_diag.configs import REPAIR_TRAINING, DataChoice, ModelChoice, RankConfig, RepairConfig, TrainConfig, repair_training
    from beta_diag.errors import BetaDiagError, CheckpointError, ConfigError, DataError, ModelError, NoErrorsToDiagnose, OutputError
    from beta_diag.evaluation import Evaluation, evaluate
    from beta_diag.metadata import Metadata
    from beta_diag.planning import Plan, plan
    from beta_diag.ranking import Ranking, rank
    from beta_diag.ranking import load as load_ranking
    from beta_diag.ranking import save as save_ranking
    from beta_diag.repairing import apply, repair
    from beta_diag.schedules import critical_momentum, damping_ratio, regime
    from beta_diag.session import open_session
    from beta_diag.training import TrainResult, train
    from beta_diag.verdicts import RepairReport, Verdict


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'beta_diag' has no attribute '{name}'")
    where = _EXPORTS[name]
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
