"""A count sketch of each error's gradient per layer group: the bootstrap's dot products in one pass.

The bootstrap of coherence needs d_i = <g_i, S_g> for every error i and group g, where S_g is the
errors' summed gradient, known only once the pass over the errors is over. Instead of a second
pass, each example's gradient in group g is sketched into K buckets while it is computed:
coordinate c of the group (its parameters laid end to end) goes to bucket c mod K with a random
sign s_c (a count sketch, Charikar, Chen and Farach-Colton 2002, here with a strided hash). Sketches
add up, so sk(S_g) = sum_i sk(g_i) comes free, and <sk(g_i), sk(S_g)> is an unbiased estimate of
d_i; for a group of at most K parameters it is exact up to the sketches' bfloat16 storage (no two
coordinates share a bucket, and the signs cancel). The estimates are then scaled so that they sum to ||S_g||^2 exactly (S_g itself is
summed exactly in the same pass), which keeps the bootstrap centred on the point estimate.

How good it is (``python benchmarks/sketch_accuracy.py``, the samples' 242 and 217 errors, K = 4096):
the estimates are exact for conv1, bn1 and fc (up to bfloat16) and within 4-14% (L1) for the larger
groups, with correlations above 0.99; they move a 2,000-replicate bootstrap's P(flagged) by at most
0.018 and the ends of its score interval by at most 2.9% of its width, where two default
200-replicate bootstraps differ by 0.055-0.095 and 9-19%. ``tests/test_sketch.py`` checks it against exact dot
products on a small model folded into 256 buckets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MAX_BUCKETS = 4096  # per group and example
MIN_BUCKETS = 256
BUDGET_BYTES = 32 * 2**20  # K halves until the stored sketches (bfloat16) fit, down to MIN_BUCKETS (past which they may not)


def buckets(examples: int, groups: int) -> int:
    """K for ``examples`` x ``groups`` sketches within the budget, a power of two in [256, 4096]."""
    fit = BUDGET_BYTES // max(1, 2 * examples * groups)
    k = MAX_BUCKETS
    while k > MIN_BUCKETS and k > fit:
        k //= 2
    return k


def _seed(*parts: int) -> int:
    """An independent 63-bit seed for each (seed, stream, parameter) triple."""
    return int(np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(2, np.uint64)[0] % 2**63)


def _add_wrapped(target: torch.Tensor, v: torch.Tensor, first: int) -> None:
    """target (B, K) += v (B, n) laid from bucket ``first`` on, wrapping around K."""
    k, b = target.shape[1], v.shape[0]
    head = min(v.shape[1], k - first)
    target[:, first : first + head] += v[:, :head]
    rest = v[:, head:]
    full = rest.shape[1] // k
    if full:
        target += rest[:, : full * k].reshape(b, full, k).sum(1)
    if rest.shape[1] > full * k:
        target[:, : rest.shape[1] - full * k] += rest[:, full * k :]


class GroupSketch:
    """Per-example sketches (N, G, K) of the gradients of ``groups`` (lists of parameter names).

    Two ways in, both unbiased and linear in the gradient: ``fold`` takes materialised per-example
    gradients (coordinate c of the group to bucket c mod K, random sign); ``project`` takes a linear
    or convolution layer's factors (input x, output gradient g, per example sum_l g_l x_l^T) and
    sketches G R, the gradient times a Gaussian matrix R (columns x r, r = max(1, K // rows)),
    without ever forming G: one-sided, the rows stay exact (a layer with more rows than K also
    gets random signs and wraps). Large factored layers take ``project``; the rest fold. Every
    parameter draws its signs and R from its own seed, made when first needed."""

    def __init__(
        self, groups: Sequence[Sequence[str]], shapes: dict[str, torch.Size], examples: int, device: torch.device, seed: int = 0
    ) -> None:
        self.k = buckets(examples, len(groups))
        self.seed, self.device, self.shapes = seed, device, shapes
        self.slots: dict[str, tuple[int, int, int]] = {}  # parameter -> (group, first bucket, its number)
        for j, names in enumerate(groups):
            offset = 0
            for name in names:
                if name in shapes:
                    self.slots[name] = (j, offset % self.k, len(self.slots))
                    offset += shapes[name].numel()
        self._signs: dict[tuple[str, int], torch.Tensor] = {}
        self.projections: dict[str, torch.Tensor] = {}
        self.rows = torch.zeros(examples, len(groups), self.k, dtype=torch.bfloat16)
        self._batch: torch.Tensor | None = None

    def _random_signs(self, name: str, size: int, stream: int) -> torch.Tensor:
        key = (name, stream)
        if key not in self._signs:  # int8: a byte per coordinate, for the parameters that use them only
            gen = torch.Generator().manual_seed(_seed(self.seed, stream, self.slots[name][2]))
            self._signs[key] = (torch.randint(0, 2, (size,), generator=gen, dtype=torch.int8) * 2 - 1).to(self.device)
        return self._signs[key]

    def start(self, batch: int, device: torch.device) -> None:
        self._batch = torch.zeros(batch, self.rows.shape[1], self.k, device=device)

    def materialise(self, name: str) -> bool:
        """Whether a factored layer's per-example gradients should be formed and folded (small enough to be exact)."""
        return name in self.slots and self.shapes[name].numel() <= self.k

    def fold(self, name: str, each: torch.Tensor, start: int = 0) -> None:
        """Fold one parameter's per-example gradients (B, numel), examples ``start``.. of the batch, into its group's buckets."""
        if name not in self.slots or self._batch is None:
            return
        group, first, _ = self.slots[name]
        v = each.float() * self._random_signs(name, each.shape[1], 0)
        _add_wrapped(self._batch[start : start + v.shape[0], group], v, first)

    def project(self, name: str, xs: torch.Tensor, gs: torch.Tensor) -> None:
        """Sketch a factored layer's per-example gradients from xs (B, G, I, L) and gs (B, G, O, L)."""
        if name not in self.slots or self._batch is None:
            return
        if name not in self.projections:  # Gaussian, variance 1/r: E[<a R, b R>] = <a, b>
            r = max(1, self.k // self.shapes[name][0])
            gen = torch.Generator().manual_seed(_seed(self.seed, 1, self.slots[name][2]))
            self.projections[name] = (torch.randn(xs.shape[2], r, generator=gen) / r**0.5).to(self.device)
        px = torch.einsum("bgil,ir->bgrl", xs, self.projections[name])
        sketched = torch.einsum("bgol,bgrl->bgor", gs, px).reshape(gs.shape[0], -1)  # (B, O * r)
        if sketched.shape[1] > self.k:  # more rows than buckets: signs, so that rows sharing a bucket cancel on average
            sketched = sketched * self._random_signs(name, sketched.shape[1], 2)
        _add_wrapped(self._batch[:, self.slots[name][0]], sketched, 0)

    def finish(self, rows: slice) -> None:
        assert self._batch is not None
        self.rows[rows] = self._batch.to("cpu", torch.bfloat16)
        self._batch = None

    def dots(self, summed_sq: np.ndarray) -> np.ndarray:
        """(N, G) estimates of <g_i, S_g>, scaled to sum to ``summed_sq`` (G,) = ||S_g||^2 exactly."""
        d = np.zeros((self.rows.shape[0], self.rows.shape[1]))
        for j in range(self.rows.shape[1]):  # a group at a time: no float64 copy of every sketch at once
            group = self.rows[:, j].float()  # (N, K)
            d[:, j] = (group @ group.sum(0)).double().numpy()  # with the sketch of S
        sketched = d.sum(0)
        return d * np.divide(summed_sq, sketched, out=np.ones_like(summed_sq), where=sketched > 0)
