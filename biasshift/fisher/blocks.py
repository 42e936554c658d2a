r"""Unit Fisher blocks from low-rank factors: chunked weighted Gram matrices and solves.

A tracked layer's factors are its incoming rows ``ã`` (``X``: ``(N, groups, L, n1)``) and the
backpropagated ``δ`` of every Fisher replica (``D``: ``(N, R, L, units)``; ``R`` = 1 for the
empirical Fisher, ``mc_samples`` or the number of classes otherwise, each replica already scaled
so that a sum over ``r`` is the expectation over ``y``).  Two Gram matrices per unit follow:

* the *pair* block (the paper's unit Fisher, every (sample, position) pair a sample)::

      Σ_pairs w ã ãᵀ,   w = Σ_r δ_r²      — a δ²-weighted Gram matrix;

* the *true* block (the Fisher of the layer's parameters; per-sample gradients are summed over
  positions)::

      Σ_i Σ_r g_ir g_irᵀ,   g_ir = Σ_p δ_irp ã_ip.

Both are batched over a chunk of units with one matmul each (no Python loop over units or
samples); the chunk size comes from a memory budget in bytes.  For ``L = 1`` they coincide.

:class:`WoodburySolver` solves ``(λI + UᵀU) x = v`` for ``U = diag(√(w/P)) X`` in sample space
(``P × P`` systems, one Gram matrix ``X Xᵀ`` shared by all units of a group) — far cheaper than
``(n+1)³`` per unit when the number of pairs ``P`` is below ``n + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from biasshift.theory import Solver

__all__ = [
    "Source",
    "WoodburySolver",
    "cholesky_cost",
    "chunk_units",
    "pair_gram",
    "true_gram",
    "woodbury_cost",
]


@dataclass
class Source:
    """One block of stored factors: ``X (N, groups, L, n1)`` and ``D (N, R, L, units)``."""

    X: Tensor
    D: Tensor

    @property
    def positions(self) -> int:
        return self.X.shape[2]

    @property
    def replicas(self) -> int:
        return self.D.shape[1]

    def numel(self) -> int:
        return self.X.numel() + self.D.numel()


def chunk_units(units: int, per_unit_bytes: int, budget: int) -> int:
    """How many units fit in ``budget`` bytes at ``per_unit_bytes`` each (at least 1)."""
    return int(max(1, min(units, budget // max(1, per_unit_bytes))))


def _rows_per_chunk(rows: int, per_row_bytes: int, budget: int) -> int:
    return int(max(1, min(rows, budget // max(1, per_row_bytes))))


def _select(D: Tensor, units: slice | Tensor) -> Tensor:
    return D[..., units]


def pair_gram(sources: Sequence[Source], group: int, units: slice | Tensor, *,
              dtype: torch.dtype, budget: int) -> Tensor:
    r"""``Σ_pairs w ã ãᵀ`` (``w = Σ_r δ_r²``) for the given units of ``group``: ``(B, n1, n1)``.

    ``units`` are layer unit indices (a slice or index tensor) inside ``group``.  Rows are
    processed in chunks so that the temporary ``w ã`` fits ``budget`` bytes.
    """
    out: Tensor | None = None
    item = torch.finfo(dtype).bits // 8
    for src in sources:
        N, _, L, n1 = src.X.shape
        M = N * L
        Xj = src.X[:, group].reshape(M, n1).to(dtype)
        w = _select(src.D, units).to(dtype).square().sum(1).reshape(M, -1).T  # (B, M)
        B = w.shape[0]
        rc = _rows_per_chunk(M, B * n1 * item, budget)
        for r0 in range(0, M, rc):
            Xr = Xj[r0:r0 + rc]
            part = torch.matmul(Xr.T, Xr.unsqueeze(0) * w[:, r0:r0 + rc, None])
            out = part if out is None else out.add_(part)
    assert out is not None, "no stored factors"
    return out


def true_gram(sources: Sequence[Source], group: int, units: slice | Tensor, *,
              dtype: torch.dtype, budget: int) -> Tensor:
    r"""``Σ_i Σ_r g_ir g_irᵀ`` with ``g_ir = Σ_p δ_irp ã_ip`` for the given units: ``(B, n1, n1)``.

    The position-summed per-sample gradients of a chunk of units come from one batched matmul
    ``(N, R·B, L) @ (N, L, n1)``; samples are processed in chunks that fit ``budget`` bytes.
    """
    out: Tensor | None = None
    item = torch.finfo(dtype).bits // 8
    for src in sources:
        N, _, L, n1 = src.X.shape
        R = src.D.shape[1]
        Dsel = _select(src.D, units)
        B = Dsel.shape[-1]
        if L == 1:
            # g_ir = δ_ir ã_i: the true block is the δ²-weighted Gram of the samples.
            part = pair_gram([Source(src.X, Dsel)], group, slice(None), dtype=dtype,
                             budget=budget)
            out = part if out is None else out.add_(part)
            continue
        nc = _rows_per_chunk(N, 2 * R * B * n1 * item + L * n1 * item, budget)
        for n0 in range(0, N, nc):
            Xc = src.X[n0:n0 + nc, group].to(dtype)  # (nc, L, n1)
            m = Xc.shape[0]
            Dc = Dsel[n0:n0 + nc].to(dtype).permute(0, 1, 3, 2).reshape(m, R * B, L)
            G = torch.bmm(Dc, Xc).reshape(m, R, B, n1).permute(2, 0, 1, 3).reshape(B, m * R, n1)
            part = torch.matmul(G.mT, G)
            out = part if out is None else out.add_(part)
    assert out is not None, "no stored factors"
    return out


class WoodburySolver(Solver):
    r"""``(λI + UᵀU)⁻¹`` for a chunk of units with ``U = diag(d) X`` (``X (P, n)`` shared).

    Woodbury: ``(λI + UᵀU)⁻¹ v = (v − Uᵀ (λI_P + U Uᵀ)⁻¹ U v) / λ`` with
    ``U Uᵀ = diag(d) K diag(d)``, ``K = X Xᵀ`` shared by all units of the group.  Cost per unit
    ``O(P³ + P·n)`` instead of ``O(n³)``.

    Args:
        X: ``(P, n)`` rows (one per (sample, position) pair).
        K: ``X Xᵀ`` ``(P, P)``.
        d: ``(B, P)`` per-unit row scales (``√(w / P)``).
        damping: ``λ > 0``.
    """

    def __init__(self, X: Tensor, K: Tensor, d: Tensor, damping: float) -> None:
        if not damping > 0:
            raise ValueError("the Woodbury solve needs damping > 0")
        self.X, self.d, self.lam = X, d, float(damping)
        C = d.unsqueeze(-1) * K * d.unsqueeze(-2)
        C.diagonal(dim1=-2, dim2=-1).add_(self.lam)
        self.L, info = torch.linalg.cholesky_ex(C)
        self.bad = info != 0

    def __call__(self, rhs: Tensor) -> Tensor:
        T = torch.matmul(self.X, rhs) * self.d.unsqueeze(-1)  # (B, P, r)
        Z = torch.cholesky_solve(T, self.L)
        return (rhs - torch.matmul(self.X.T, Z * self.d.unsqueeze(-1))) / self.lam


def woodbury_cost(units: int, pairs: int, n1: int, groups: int, condition: bool) -> float:
    """Flop estimate of the sample-space path for a layer (shared Gram, per-unit ``P³``)."""
    per_unit = pairs**3 / 3 + 2 * pairs**2 + 8 * pairs * n1
    if condition:
        per_unit += 4 * pairs**3
    return groups * 2.0 * pairs**2 * n1 + units * per_unit


def cholesky_cost(units: int, pairs: int, n1: int, condition: bool, *,
                  have_dense: bool) -> float:
    """Flop estimate of the parameter-space path (build each block, factor it)."""
    per_unit = n1**3 / 3 + 4 * n1**2
    if not have_dense:
        per_unit += 2.0 * pairs * n1**2
    if condition:
        per_unit += 4 * n1**3
    return units * per_unit
