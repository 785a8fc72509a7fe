"""Errors a user can cause. Each message names the object, the problem and the next step."""

from __future__ import annotations


class BetaDiagError(Exception):
    """Base class: the CLI prints ``Error: <message>`` and exits 1, without a traceback."""


class CheckpointError(BetaDiagError):
    """A checkpoint file is missing, unreadable, unsafe or does not match its architecture."""


class ModelError(BetaDiagError):
    """An architecture name or factory cannot be built."""


class DataError(BetaDiagError):
    """A data spec cannot be read or does not fit the model."""


class OutputError(BetaDiagError):
    """An output path exists, equals an input, or cannot be written."""


class ConfigError(BetaDiagError):
    """An option value is invalid (beyond what the CLI parser checks)."""


class NoErrorsToDiagnose(BetaDiagError):
    """The model classifies every evaluated example correctly; nothing to rank."""
