"""beta-diag: find the layer groups that carry a classifier's errors, and repair just those."""

from beta_diag.checkpoint import Checkpoint, Metadata
from beta_diag.checkpoint import load as load_checkpoint
from beta_diag.checkpoint import save as save_checkpoint
from beta_diag.errors import BetaDiagError
from beta_diag.schedules import critical_momentum, damping_ratio, regime
from beta_diag.training import TrainConfig, train

__version__ = "0.1.0"
__all__ = [
    "BetaDiagError", "Checkpoint", "Metadata", "TrainConfig", "critical_momentum", "damping_ratio",
    "load_checkpoint", "regime", "save_checkpoint", "train",
]
