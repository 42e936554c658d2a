r"""Run-level statistics for experiments with few seeds: bootstrap CIs, exact paired tests,
pooled within-group correlations, effect sizes.

The unit of replication is the **run** (a seed): units, layers and steps of one run are not
independent samples, so every interval here resamples seeds, and every paired comparison of two
arms pairs run ``r`` of one arm with run ``r`` of the other (the same initial weights and
mini-batches, see ``biasshift reproduce bias-shift-mechanism``).

* :func:`bootstrap_ci` — percentile bootstrap CI of a statistic of per-seed values (rows of a
  ``(seeds, ...)`` array resampled with replacement, Efron & Tibshirani 1993, ch. 13).
* :func:`sign_flip_test` — the exact paired permutation test: under H₀ (no arm effect) each
  paired difference ``d_r`` is symmetric about 0, so all ``2ⁿ`` sign patterns of ``(±d_r)`` are
  equally likely; the two-sided p-value is the fraction of patterns with ``|mean| ≥`` the
  observed one (Fisher 1935; exact by enumeration for ``n ≤ 20``).  Its smallest value is
  ``2/2ⁿ`` when no difference is zero (0.0625 for 5 seeds, 0.031 for 6).
* :func:`wilcoxon_exact` — the exact Wilcoxon signed-rank test (:func:`scipy.stats.wilcoxon`,
  ``method="exact"``; zero differences dropped, Wilcoxon's convention).
* :func:`paired_comparison` — all of the above for ``a − b`` plus the effect size
  ``d_z = mean(d)/sd(d)`` (Cohen 1988, the paired standardised mean difference) and the ratio
  of the means.
* :func:`fisher_z_pool` — pooled correlation of several groups by Fisher's z: ``z̄ = Σ(n_g−3)
  atanh(r_g) / Σ(n_g−3)``, back-transformed with ``tanh`` (Hedges & Olkin 1985).
* :func:`pooled_spearman` — Spearman's ρ within each group (e.g. a layer × a training phase)
  across runs, pooled by Fisher's z, with a bootstrap CI that resamples seeds (all rows of a
  seed move together).

Every function rejects non-finite input it cannot use with a :class:`ValueError` that names it,
or drops it where the docstring says so (counted in the result).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["PairedComparison", "bootstrap_ci", "cohens_dz", "fisher_z_pool",
           "paired_comparison", "pooled_spearman", "sign_flip_test", "wilcoxon_exact"]

_MAX_EXACT = 20  # 2^20 sign patterns


def _as_1d(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence of per-seed values, got shape {a.shape}")
    return a


def bootstrap_ci(values: Sequence[float] | np.ndarray,
                 statistic: Callable[[np.ndarray], float] = np.mean, *, n_boot: int = 10_000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the statistic of the per-seed ``values`` and its percentile
    bootstrap CI, resampling seeds with replacement (``n_boot`` resamples, a private generator
    seeded with ``seed``).  Non-finite values are dropped; with fewer than 2 finite values the
    interval is ``(nan, nan)``.  ``statistic`` maps a 1-D array to a number (vectorised over a
    2-D ``(n_boot, n)`` array via ``axis=1`` when it accepts ``axis``)."""
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level!r}")
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot!r}")
    a = _as_1d(values, "bootstrap_ci")
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    est = float(statistic(a))
    if a.size < 2:
        return est, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    samples = a[idx]
    try:
        boot = np.asarray(statistic(samples, axis=1), dtype=np.float64)  # type: ignore[call-arg]
    except TypeError:
        boot = np.asarray([statistic(s) for s in samples], dtype=np.float64)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return est, float(lo), float(hi)


def sign_flip_test(d: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided paired permutation (sign-flip) p-value of the mean of the differences
    ``d`` (every one of the ``2ⁿ`` sign patterns; ``n ≤ 20``).  NaN for no finite difference;
    non-finite differences are dropped."""
    a = _as_1d(d, "sign_flip_test")
    a = a[np.isfinite(a)]
    n = a.size
    if n == 0:
        return float("nan")
    if n > _MAX_EXACT:
        raise ValueError(f"sign_flip_test: exact enumeration is for n <= {_MAX_EXACT} pairs, got "
                         f"{n}; use wilcoxon_exact or a Monte Carlo permutation test")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    stats = np.abs(signs @ a) / n
    obs = abs(a.sum()) / n
    # a tolerance for floating-point ties between patterns with equal |mean|
    return float(np.mean(stats >= obs - 1e-12 * max(1.0, np.abs(a).max())))


def wilcoxon_exact(d: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided Wilcoxon signed-rank p-value of ``d`` (zeros and non-finite values
    dropped; NaN when nothing is left).  With tied ``|d|`` scipy falls back to its normal
    approximation (and says so in a warning)."""
    from scipy.stats import wilcoxon

    a = _as_1d(d, "wilcoxon_exact")
    a = a[np.isfinite(a) & (a != 0)]
    if a.size == 0:
        return float("nan")
    return float(wilcoxon(a, method="exact" if len(np.unique(np.abs(a))) == a.size
                          else "approx").pvalue)


def cohens_dz(d: Sequence[float] | np.ndarray) -> float:
    """The paired effect size ``mean(d) / sd(d)`` (sd with ``n − 1``); NaN for < 2 values,
    ``±inf`` when all differences are equal and non-zero."""
    a = _as_1d(d, "cohens_dz")
    a = a[np.isfinite(a)]
    if a.size < 2:
        return float("nan")
    sd = float(np.std(a, ddof=1))
    m = float(np.mean(a))
    if sd == 0:
        return 0.0 if m == 0 else math.copysign(math.inf, m)
    return m / sd


@dataclass(frozen=True)
class PairedComparison:
    """``a − b`` over paired seeds (see :func:`paired_comparison`)."""

    n: int
    mean_a: float
    mean_b: float
    diff: float
    diff_low: float
    diff_high: float
    ratio: float
    ratio_low: float
    ratio_high: float
    d_z: float
    p_sign_flip: float
    p_wilcoxon: float
    a_wins: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def paired_comparison(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                      n_boot: int = 10_000, level: float = 0.95, seed: int = 0
                      ) -> PairedComparison:
    """Compare two arms over paired seeds (``a[r]`` and ``b[r]`` from seed ``r``).

    Pairs with a non-finite member are dropped.  The mean difference and the ratio of means
    ``mean(a)/mean(b)`` get percentile bootstrap CIs from the same resampled seeds; the p-values
    are the exact sign-flip and Wilcoxon tests of ``a − b``; ``a_wins`` counts seeds with
    ``a < b`` (e.g. fewer steps to a loss).
    """
    x, y = _as_1d(a, "paired_comparison a"), _as_1d(b, "paired_comparison b")
    if x.shape != y.shape:
        raise ValueError(f"paired_comparison: a has {x.size} seeds, b {y.size}; pass one value "
                         "per seed of both arms, in seed order")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    nan = float("nan")
    if n == 0:
        return PairedComparison(0, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, 0)
    d = x - y
    diff, lo, hi = bootstrap_ci(d, n_boot=n_boot, level=level, seed=seed)
    rlo = rhi = nan
    ratio = float(x.mean() / y.mean()) if y.mean() != 0 else nan
    if n >= 2:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = x[idx].mean(1) / y[idx].mean(1)
        r = r[np.isfinite(r)]
        if r.size:
            alpha = (1 - level) / 2
            rlo, rhi = (float(v) for v in np.quantile(r, [alpha, 1 - alpha]))
    return PairedComparison(n, float(x.mean()), float(y.mean()), diff, lo, hi, ratio, rlo, rhi,
                            cohens_dz(d), sign_flip_test(d), wilcoxon_exact(d),
                            int(np.sum(x < y)))


def fisher_z_pool(r: Sequence[float] | np.ndarray, n: Sequence[int] | np.ndarray) -> float:
    """Pooled correlation ``tanh(Σ w_g atanh(r_g) / Σ w_g)``, ``w_g = n_g − 3``; groups with
    ``n_g ≤ 3`` or a non-finite ``r_g`` are left out (NaN when none is left).  ``|r| = 1`` is
    clipped to ``1 − 1e-12`` before ``atanh``."""
    rr, nn = _as_1d(r, "fisher_z_pool r"), _as_1d(n, "fisher_z_pool n")
    if rr.shape != nn.shape:
        raise ValueError(f"fisher_z_pool: {rr.size} correlations but {nn.size} group sizes")
    ok = np.isfinite(rr) & (nn > 3)
    if not ok.any():
        return float("nan")
    w = nn[ok] - 3
    z = np.arctanh(np.clip(rr[ok], -1 + 1e-12, 1 - 1e-12))
    return float(np.tanh(np.sum(w * z) / np.sum(w)))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's r of the average ranks (ties share their mean rank)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / den if den > 0 else float("nan")


def _group_spearman(df: pd.DataFrame, x: str, y: str, groups: Sequence[str]
                    ) -> pd.DataFrame:
    rows = []
    for key, g in df.groupby(list(groups), sort=True):
        gx, gy = g[x].to_numpy(np.float64), g[y].to_numpy(np.float64)
        ok = np.isfinite(gx) & np.isfinite(gy)
        gx, gy = gx[ok], gy[ok]
        n = int(ok.sum())
        rho = float("nan")
        if n >= 3 and np.ptp(gx) > 0 and np.ptp(gy) > 0:
            rho = _spearman(gx, gy)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(groups, key)), "n": n, "rho": rho})
    return pd.DataFrame(rows)


def pooled_spearman(df: pd.DataFrame, x: str, y: str, groups: Sequence[str], *,
                    seed_col: str = "seed", n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> dict[str, Any]:
    """Spearman's ρ of ``x`` and ``y`` within each group of ``groups`` (e.g. ``["layer",
    "phase"]``), pooled by :func:`fisher_z_pool`, with a percentile bootstrap CI that resamples
    the values of ``seed_col`` (every row of a resampled seed enters, as often as it is drawn).

    Returns ``{"rho": pooled, "low", "high", "n_groups", "n_points", "per_group": [...]}``
    (``per_group``: one record per group with ``n`` and ``rho``).  Rows with non-finite ``x``
    or ``y`` are dropped.
    """
    missing = [c for c in (x, y, seed_col, *groups) if c not in df.columns]
    if missing:
        raise ValueError(f"pooled_spearman: the table lacks the column(s) {missing}")
    per = _group_spearman(df, x, y, groups)
    pooled = fisher_z_pool(per["rho"], per["n"]) if len(per) else float("nan")
    seeds = np.asarray(sorted(df[seed_col].unique()))
    lo = hi = float("nan")
    if seeds.size >= 2 and np.isfinite(pooled):
        rng = np.random.default_rng(seed)
        by_seed = {s: g for s, g in df.groupby(seed_col)}
        boot = []
        for _ in range(n_boot):
            draw = rng.choice(seeds, size=seeds.size, replace=True)
            # a seed drawn twice enters twice; when the groups are per seed, each copy is a
            # group of its own (so a copy does not double a group's size and weight)
            parts = [by_seed[s] for s in draw]
            if seed_col in groups:
                parts = [p.assign(**{seed_col: i}) for i, p in enumerate(parts)]
            sample = pd.concat(parts, ignore_index=True)
            p = _group_spearman(sample, x, y, groups)
            boot.append(fisher_z_pool(p["rho"], p["n"]))
        b = np.asarray(boot)
        b = b[np.isfinite(b)]
        if b.size:
            alpha = (1 - level) / 2
            lo, hi = (float(v) for v in np.quantile(b, [alpha, 1 - alpha]))
    return {"rho": None if not np.isfinite(pooled) else pooled,
            "low": None if not np.isfinite(lo) else lo,
            "high": None if not np.isfinite(hi) else hi,
            "n_groups": int(np.isfinite(per["rho"]).sum()) if len(per) else 0,
            "n_points": int(per["n"].sum()) if len(per) else 0,
            "per_group": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                           for k, v in r.items()} for r in per.to_dict("records")]}
