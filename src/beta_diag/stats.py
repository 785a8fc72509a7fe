"""Exact tests on paired outcomes: did a change fix more examples than it broke, beyond chance?

Two models judged on the same examples differ only on the discordant ones: ``fixed`` (wrong before,
right after) and ``broken`` (right before, wrong after). Under "no difference" each of the
``m = fixed + broken`` discordant examples is a fair coin (exact McNemar test), so
``fixed ~ Binomial(m, 1/2)``. The net ``fixed - broken = m (2q - 1)`` for the share ``q`` of
discordant examples that were fixed; its interval is ``m (2q - 1)`` at the exact (Clopper-Pearson)
bounds of ``q``, given ``m``. Pure Python: exact for any count, no SciPy.
"""

from __future__ import annotations

import math


def _log_pmf(k: int, n: int, q: float) -> float:
    if q <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if q >= 1.0:
        return 0.0 if k == n else -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(q) + (n - k) * math.log1p(-q)


def binomial_tail(k: int, n: int, q: float = 0.5) -> float:
    """P(X >= k) for X ~ Binomial(n, q)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = [_log_pmf(i, n, q) for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)) if top > -math.inf else 0.0


def mcnemar_one_sided(fixed: int, broken: int) -> float:
    """P(at least ``fixed`` fixed of the discordant examples) under no difference: small when the change
    fixed more than chance would (1.0 when nothing differs)."""
    return binomial_tail(fixed, fixed + broken)


def mcnemar_two_sided(fixed: int, broken: int) -> float:
    """The exact McNemar p-value: twice the smaller tail, at most 1."""
    m = fixed + broken
    return min(1.0, 2 * binomial_tail(max(fixed, broken), m)) if m else 1.0


def _bound(k: int, n: int, tail: float, upper: bool) -> float:
    """Clopper-Pearson bound of a binomial proportion by bisection on the exact tail."""
    if (not upper and k == 0) or (upper and k == n):
        return 0.0 if not upper else 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if upper:  # the largest q with P(X <= k | q) >= tail
            ok = 1.0 - binomial_tail(k + 1, n, mid) >= tail
            lo, hi = (mid, hi) if ok else (lo, mid)
        else:  # the smallest q with P(X >= k | q) >= tail
            ok = binomial_tail(k, n, mid) >= tail
            lo, hi = (lo, mid) if ok else (mid, hi)
    return (lo + hi) / 2


def net_interval(fixed: int, broken: int, level: float = 0.95) -> tuple[float, float]:
    """Exact interval of ``fixed - broken`` given the number of discordant examples (0, 0 when none)."""
    m = fixed + broken
    if m == 0:
        return 0.0, 0.0
    tail = (1 - level) / 2
    return m * (2 * _bound(fixed, m, tail, False) - 1), m * (2 * _bound(fixed, m, tail, True) - 1)
