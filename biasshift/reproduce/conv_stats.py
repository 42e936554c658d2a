"""Paired-run statistics of the conv-net comparison: the paper's Wilcoxon test and a bootstrap.

The paper compares the units over 10 runs in which "the same run number shares initial
weights" and reports the Wilcoxon signed-rank test (Section 4.3). With paired seeds the natural
statistics are those of the per-seed differences ``d_r = x_r - y_r``:

* :func:`wilcoxon_exact` — the exact two-sided Wilcoxon signed-rank p-value, from the exact
  distribution of ``W+`` over all ``2^n`` sign assignments of the ranks of ``|d|`` (counted by
  dynamic programming over the rank sums) (zero differences dropped, ties given
  average ranks: scipy's ``zero_method="wilcox"``). The statistic is ``W+ = Σ_{d_r > 0}
  rank_r``; ``p = min(1, 2 min(P(W+ <= w), P(W+ >= w)))`` under the null that every sign is
  ±1 with probability 1/2. With ``n`` non-zero differences the smallest attainable p is
  ``2 / 2^n`` (:func:`smallest_p`): 0.031 for 6 seeds, 0.002 for 10 — so "p < 0.001" as
  the paper writes needs at least 11 paired runs.
* :func:`paired_bootstrap_ci` — a run-level percentile bootstrap CI of the mean difference:
  the ``n`` paired seeds are resampled with replacement (whole pairs, so the pairing is kept).
* :func:`mean_sd` — mean and sample standard deviation (``ddof=1``), as the paper's "± sd".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["mean_sd", "paired_bootstrap_ci", "scipy_wilcoxon_exact", "smallest_p",
           "wilcoxon_exact"]

#: the exact null distribution is built for at most this many non-zero differences
MAX_EXACT_N = 60


def _paired(x: Sequence[float], y: Sequence[float] | None, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    d = a if y is None else a - np.asarray(y, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"{what}: expected 1-D paired samples, got shape {d.shape}")
    if y is not None and np.shape(y) != np.shape(x):
        raise ValueError(f"{what}: x and y must have the same length (paired seeds), got "
                         f"{np.shape(x)} and {np.shape(y)}")
    if not np.isfinite(d).all():
        raise ValueError(f"{what}: non-finite values in the paired differences {d.tolist()}; "
                         "leave diverged runs out of both arms")
    return d


def smallest_p(n: int) -> float:
    """The smallest two-sided exact Wilcoxon p-value attainable with ``n`` non-zero pairs."""
    return min(1.0, 2.0 / 2.0 ** int(n))


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def wilcoxon_exact(x: Sequence[float], y: Sequence[float] | None = None) -> tuple[float, float]:
    """``(W+, p)``: the exact two-sided Wilcoxon signed-rank test of ``x - y`` (or of ``x``).

    Zero differences are dropped (``zero_method="wilcox"``); tied ``|d|`` get average ranks and
    the null distribution counts all ``2^n`` sign patterns of those ranks (exact also with
    ties). No non-zero difference: ``(0.0, 1.0)``. Raises for more than
    :data:`MAX_EXACT_N` non-zero pairs or non-finite values.
    """
    d = _paired(x, y, "wilcoxon_exact")
    d = d[d != 0.0]
    n = len(d)
    if n == 0:
        return 0.0, 1.0
    if n > MAX_EXACT_N:
        raise ValueError(f"wilcoxon_exact: {n} pairs; the exact enumeration is for at most "
                         f"{MAX_EXACT_N} (use scipy.stats.wilcoxon's normal approximation)")
    ranks = _average_ranks(np.abs(d))
    w = float(ranks[d > 0].sum())
    # the null distribution of 2 W+ (average ranks are multiples of 1/2): the number of sign
    # patterns with each sum, built one rank at a time (counts exact in Python ints)
    r2 = [round(2 * r) for r in ranks]
    counts = [1] + [0] * sum(r2)
    for r in r2:
        counts = [c + (counts[s - r] if s >= r else 0) for s, c in enumerate(counts)]
    w2 = round(2 * w)
    total = 2 ** n
    lo = sum(counts[: w2 + 1]) / total
    hi = sum(counts[w2:]) / total
    return w, min(1.0, 2.0 * min(lo, hi))


def scipy_wilcoxon_exact(x: Sequence[float], y: Sequence[float] | None = None) -> float:
    """scipy's exact two-sided p (``method="exact"``); for data without ties or zeros it equals
    :func:`wilcoxon_exact` (scipy's exact distribution assumes untied ranks)."""
    from scipy.stats import wilcoxon

    d = _paired(x, y, "scipy_wilcoxon_exact")
    return float(wilcoxon(d, alternative="two-sided", method="exact").pvalue)


def paired_bootstrap_ci(
    x: Sequence[float], y: Sequence[float] | None = None, *, level: float = 0.95,
    resamples: int = 10_000, seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``d = x - y`` and its percentile bootstrap CI.

    Whole seeds are resampled with replacement (``resamples`` times, numpy generator
    ``seed``), so each resample keeps the pairing of the two arms. With one pair the CI is the
    point itself.
    """
    d = _paired(x, y, "paired_bootstrap_ci")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap_ci: level must be in (0, 1), got {level}")
    if len(d) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(int(resamples), len(d)))
    means = d[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(d.mean()), float(lo), float(hi)


def mean_sd(x: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sd, n)`` of the finite values (sample sd, ``ddof=1``; 0 for one value)."""
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return math.nan, math.nan, 0
    sd = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return float(a.mean()), sd, len(a)
