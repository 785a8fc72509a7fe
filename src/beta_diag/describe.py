"""``info``: what a checkpoint holds, described: metadata, notes, parameters per layer group (or tensors, with no
architecture), the training history summarised, and its fingerprint."""

from __future__ import annotations

from typing import Any

from beta_diag import groups, schedules
from beta_diag.checkpoint import Checkpoint


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """What ``info`` shows (building the model, when the metadata names one, to count its groups)."""

    info: dict[str, Any] = {
        "path": str(ckpt.path),
        "sha256": ckpt.sha256,
        "metadata": ckpt.metadata.to_dict(),
        "notes": list(ckpt.notes),
    }
    info["metadata"].pop("history")
    if ckpt.metadata.arch:
        found = groups.layer_groups(ckpt.build_model())
        total = sum(g.numel for g in found)
        info["parameters"] = total
        info["groups"] = [{"name": g.name, "numel": g.numel, "share": g.numel / total} for g in found]
    else:
        info["tensors"] = len(ckpt.state_dict)
        info["parameters"] = sum(t.numel() for t in ckpt.state_dict.values())
    info["history_summary"] = schedules.history_summary(ckpt.metadata.history)
    info["fingerprint"] = None if ckpt.fingerprint is None else ckpt.fingerprint.describe()
    return info
