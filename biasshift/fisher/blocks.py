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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from biasshift.theory import Solver, cho_solve, cholesky_ex

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


def column_blocks(n1: int, min_size: int = 384) -> list[tuple[int, int]]:
    """Column blocks for updating only the block lower triangle of ``n1 × n1`` blocks.

    Blocks of at least ``n1/4`` columns (none below ``min_size`` columns): with four blocks the
    update costs 5/8 of the full ``BᵀB``.
    """
    if n1 < min_size:
        return [(0, n1)]
    width = -(-n1 // 4)
    return [(j, min(n1, j + width)) for j in range(0, n1, width)]


def chunk_units(units: int, per_unit_bytes: int, budget: int) -> int:
    """How many units fit in ``budget`` bytes at ``per_unit_bytes`` each (at least 1)."""
    return int(max(1, min(units, budget // max(1, per_unit_bytes))))


def _rows_per_chunk(rows: int, per_row_bytes: int, budget: int) -> int:
    return int(max(1, min(rows, budget // max(1, per_row_bytes))))


def _select(D: Tensor, units: slice | Tensor) -> Tensor:
    return D[..., units]


def _row_scales(D: Tensor, scale: float) -> Tensor:
    """``√(scale · Σ_r δ_r²)`` of selected units' ``D (N, R, L, B)`` as ``(B, N·L)``."""
    N, R, L, B = D.shape
    s = D[:, 0].abs() if R == 1 else D.square().sum(1).sqrt_()
    s = s.reshape(N * L, B).T
    return s if scale == 1.0 else s * math.sqrt(scale)


class _GramSink:
    """Where the Gram products of one call go: straight into ``out`` (overwritten by the first
    product, or added to with ``accumulate``), else into a tensor made by the first product;
    later products accumulate in place (``baddbmm_``): no temporary block, no extra pass.

    With ``lower`` only the block lower triangle is computed (column blocks ``j``: rows
    ``≥ j``, :func:`column_blocks`; 5/8 of the flops for
    ``n1 ≥ 384``), for consumers that read only the lower triangle (Cholesky, ``eigvalsh``);
    the blocks above it are zero (without ``out``) or left as they were in ``out``.
    """

    def __init__(self, out: Tensor | None, accumulate: bool, lower: bool = False) -> None:
        self.acc = out
        self.fresh = not accumulate
        self.lower = lower

    def add(self, A: Tensor) -> None:
        """``acc (+)= Aᵀ A`` for a batch ``A (B, M, n1)`` (any strides)."""
        n1 = A.shape[-1]
        cols = column_blocks(n1) if self.lower else [(0, n1)]
        if len(cols) == 1:
            if self.acc is None:
                self.acc = torch.bmm(A.mT, A)
            elif self.fresh:
                torch.bmm(A.mT, A, out=self.acc)
            else:
                self.acc.baddbmm_(A.mT, A)
            self.fresh = False
            return
        if self.acc is None:
            self.acc = A.new_zeros(A.shape[0], n1, n1)
        for j0, j1 in cols:  # beta=0: the first product overwrites (whatever was there)
            self.acc[:, j0:, j0:j1].baddbmm_(A[:, :, j0:].mT, A[:, :, j0:j1],
                                             beta=0.0 if self.fresh else 1.0)
        self.fresh = False

    def result(self) -> Tensor:
        assert self.acc is not None and not self.fresh, "no stored factors"
        return self.acc


def pair_gram(sources: Sequence[Source], group: int, units: slice | Tensor, *,
              dtype: torch.dtype, budget: int, out: Tensor | None = None,
              scale: float = 1.0, accumulate: bool = False, lower: bool = False) -> Tensor:
    r"""``scale · Σ_pairs w ã ãᵀ`` (``w = Σ_r δ_r²``) for the given units of ``group``:
    ``(B, n1, n1)``.

    ``units`` are layer unit indices (a slice or index tensor) inside ``group``.  Each chunk of
    rows is one batched GEMM ``Sᵀ S`` with ``S = diag(√(scale·w)) X`` (the scale, e.g. ``1/P``
    for a mean, folded into the small factor), written straight into ``out`` when given (a
    preallocated ``(B, n1, n1)`` view, e.g. a slice of the whole layer's result; with
    ``accumulate`` added to it) and accumulated in place after that: no full-size temporary, no
    division pass.  Rows are processed in chunks so that the temporary ``S`` fits ``budget``
    bytes.  ``lower``: only the block lower triangle (see :class:`_GramSink`).
    """
    item = torch.finfo(dtype).bits // 8
    sink = _GramSink(out, accumulate, lower)
    for src in sources:
        N, _, L, n1 = src.X.shape
        M = N * L
        Xj = src.X[:, group].reshape(M, n1).to(dtype)
        s = _row_scales(_select(src.D, units).to(dtype), scale)  # (B, M)
        B = s.shape[0]
        rc = _rows_per_chunk(M, B * n1 * item, budget)
        for r0 in range(0, M, rc):
            sink.add(Xj[r0:r0 + rc].unsqueeze(0) * s[:, r0:r0 + rc, None])
    return sink.result()


def true_gram(sources: Sequence[Source], group: int, units: slice | Tensor, *,
              dtype: torch.dtype, budget: int, out: Tensor | None = None,
              scale: float = 1.0, accumulate: bool = False, lower: bool = False) -> Tensor:
    r"""``scale · Σ_i Σ_r g_ir g_irᵀ`` with ``g_ir = Σ_p δ_irp ã_ip`` for the given units:
    ``(B, n1, n1)``.

    The position-summed per-sample gradients of a chunk of units come from one batched matmul
    ``(N, R·B, L) @ (N, L, n1)`` (``δ`` pre-scaled by ``√scale``); their Gram matrices are one
    more batched GEMM over a strided view of that product (no copy), written into ``out`` as
    in :func:`pair_gram`.  Samples are processed in chunks that fit ``budget`` bytes.
    ``lower``: only the block lower triangle (see :class:`_GramSink`).
    """
    item = torch.finfo(dtype).bits // 8
    sink = _GramSink(out, accumulate, lower)
    root = math.sqrt(scale)
    for src in sources:
        N, _, L, n1 = src.X.shape
        R = src.D.shape[1]
        Dsel = _select(src.D, units)
        B = Dsel.shape[-1]
        if L == 1:
            # g_ir = δ_ir ã_i: the true block is the δ²-weighted Gram of the samples.
            Xj = src.X[:, group].reshape(N, n1).to(dtype)
            s = _row_scales(Dsel.to(dtype), scale)
            rc = _rows_per_chunk(N, B * n1 * item, budget)
            for r0 in range(0, N, rc):
                sink.add(Xj[r0:r0 + rc].unsqueeze(0) * s[:, r0:r0 + rc, None])
            continue
        nc = _rows_per_chunk(N, 2 * R * B * n1 * item + L * n1 * item, budget)
        for n0 in range(0, N, nc):
            Xc = src.X[n0:n0 + nc, group].to(dtype)  # (nc, L, n1)
            m = Xc.shape[0]
            Dc = Dsel[n0:n0 + nc].to(dtype).permute(0, 1, 3, 2).reshape(m, R * B, L)
            if root != 1.0:
                Dc = Dc * root
            # (m, R·B, n1) viewed as (B, m·R, n1): a strided view, no copy
            G = torch.bmm(Dc, Xc).reshape(m, R, B, n1).permute(2, 0, 1, 3).reshape(B, m * R, n1)
            sink.add(G)
    return sink.result()


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
        C = torch.mul(K, d.unsqueeze(-1))  # one (B, P, P) allocation, scaled in place
        C.mul_(d.unsqueeze(-2))
        C.diagonal(dim1=-2, dim2=-1).add_(self.lam)
        self.L, info = cholesky_ex(C)
        self.bad = info != 0

    def __call__(self, rhs: Tensor) -> Tensor:
        T = torch.matmul(self.X, rhs) * self.d.unsqueeze(-1)  # (B, P, r)
        Z = cho_solve(T, self.L)
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
