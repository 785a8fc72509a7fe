"""BatchNorm statistics re-estimated on data: the recalibration probe, and how far the stored statistics agree.

Re-estimating a BatchNorm's running mean and variance on a few hundred images needs no labels and no
gradients: one forward pass with the BatchNorms in train mode (cumulative averages, ``momentum=None``)
and everything else in eval mode (dropout off). Each BatchNorm then normalises with batch statistics,
so every one sees the input its recalibrated upstream hands it. It always works on a copy.

The fresh statistics against the stored ones (``agreement``) tell where a model's own statistics stop
matching its layers on its training data: a healthy model's agree everywhere; a shifted or rescaled
statistic disagrees at that BatchNorm alone (the recalibrated one hands on what it used to); weights
damaged in one group leave the BatchNorms before it in agreement; statistics overwritten or never
converged disagree at every BatchNorm from the first. Per BatchNorm, the disagreement is the KL
divergence of the two Gaussians, as for drift (``drift``): ``0.5 z^2 + 0.5 (r - 1 - log r)``,
averaged over channels.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from beta_diag import data as data_mod
from beta_diag.data import Dataset, ToInput
from beta_diag.drift import RUNNING_STATS_NORMS


def tracked_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._NormBase]:
    """Every BatchNorm with running statistics, by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if name and isinstance(m, RUNNING_STATS_NORMS) and m.track_running_stats and m.running_mean is not None
    }


@torch.no_grad()
def recalibrated(model: nn.Module, ds: Dataset, preprocess: ToInput, device: torch.device, batch_size: int = 128) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose BatchNorm running statistics are re-estimated on ``ds``; labels unused."""
    out = copy.deepcopy(model).eval()
    norms = tracked_norms(out)
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch, not an exponential one
        m.train()
    for _, x, _, _ in data_mod.numbered_batches(ds, batch_size, device):
        if x.shape[0] > 1:  # a one-image batch has no variance to estimate
            out(preprocess(x))
    originals = tracked_norms(model)
    for name, m in norms.items():
        m.momentum = originals[name].momentum  # the copy keeps the original's own update rule
    return out.eval()


@dataclass(frozen=True)
class Agreement:
    """One BatchNorm's stored statistics against those re-estimated on data (``recalibrated``)."""

    name: str
    kl: float  # KL(fresh || stored), averaged over channels; 0 when they agree
    mean_part: float
    var_part: float


def agreement(original: nn.Module, fresh: nn.Module) -> list[Agreement]:
    """Per BatchNorm of ``original`` (module order), how far its stored statistics are from ``fresh``'s."""
    out = []
    fresh_norms = tracked_norms(fresh)
    for name, m in tracked_norms(original).items():
        f = fresh_norms[name]
        assert m.running_var is not None and f.running_mean is not None and f.running_var is not None and m.running_mean is not None
        stored_var = m.running_var.detach().double().cpu() + m.eps
        z2 = (f.running_mean.detach().double().cpu() - m.running_mean.detach().double().cpu()).square() / stored_var
        r = (f.running_var.detach().double().cpu() + m.eps) / stored_var
        mean_part, var_part = float((0.5 * z2).mean()), float((0.5 * (r - 1 - torch.log(r))).mean())
        kl = mean_part + var_part
        out.append(Agreement(name, kl if math.isfinite(kl) else math.inf, mean_part, var_part))
    return out
