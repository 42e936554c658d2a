r"""Batched solves with the damped unit Fisher blocks ``(F_u + λ_u I)⁻¹ g_u`` of one layer.

Theorem 1 of the ELU paper (Clevert et al., ICLR 2016) writes the unit natural gradient in block
form, ``Δw₀ = s (g₀ − bᵀA⁻¹g)``, ``Δw = A⁻¹g − Δw₀ A⁻¹b`` with ``s = (c − bᵀA⁻¹b)⁻¹``.  It is the
same vector as ``F⁻¹ (g₀, g)`` with ``F = [[c, bᵀ], [b, A]]``.  An optimiser only needs that
vector, so :class:`BlockFactors` factors the *whole* damped block by Cholesky,
``F + λI = LLᵀ``, and applies it by two triangular solves.  This is backward stable: the relative
error of the direction is ``O(cond(F + λI) · eps)``.  Forming ``s`` by the subtraction
``c − bᵀA⁻¹b`` instead cancels catastrophically when the incoming mean ``E_q(a)`` is large
against its spread, which is the case the paper is about (Theorem 1: ``s⁻¹ = E_p(δ²) /
(1 + E_q(a)ᵀ Var_q(a)⁻¹ E_q(a))``).

Two forms:

* ``"cholesky"`` (the default) keeps ``L``.  Each application is a forward and a backward
  triangular solve, ``L⁻ᵀ(L⁻¹g)``.  On a CPU, for layers whose factors take more than
  :data:`CHUNK_ABOVE_BYTES` (the first layer of the paper's MLP: 128 factors of 786²), the
  block can also keep (opt-in, :data:`PACKED_INVERSE`; measured slower inside the optimiser,
  see there) ``W = L⁻¹`` (LAPACK ``?trtri`` at each refresh) as packed lower triangles,
  ``units · m(m+1)/2`` contiguous numbers, and applies it as two BLAS ``?tpmv`` products
  ``Wᵀ(Wg)`` back to back, so that the second reads ``W`` from cache and each step streams
  half of each block once, contiguously.  For 128 factors of 786² float32 that was 1.8x
  faster than two ``?trsv`` calls on the full-storage factor in an isolated microbenchmark,
  but inside the optimiser's step (``analyses/bench_optim.py``) it measured 41 ms against
  26 ms and the refresh doubled, so the ``?trsv`` path stays the default.  The computed
  inverse of a triangular matrix satisfies
  ``|WL − I| ≤ c_m·eps·|W||L|`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
  §8.3 and §14.2), so ``Wᵀ(Wg)`` has the forward error of the two solves, ``O(cond(F+λI) ·
  eps)``; measured, it agrees with the solves to within a factor 2 up to ``cond = 2e11``
  (float64) and its cost is one more ``m³/3`` per unit at each refresh (the Cholesky
  factorisation itself is ``m³/3``).  Smaller layers are solved in one batched call; off the
  CPU (or without scipy) the batched solves run in chunks whose factors fit in the last-level
  cache.
* ``"inverse"`` keeps ``P = (F + λI)⁻¹`` (from ``cholesky_inverse``).  Each application is one
  batched vector-matrix product, but it reads all ``m²`` entries of every block, and the
  refresh costs three times as much.  An explicit inverse is accurate only to
  ``cond · eps`` *relative to* ``‖P‖``, so a direction ``Pg`` can be off by ``cond² · eps``.
  With damping ``λ`` the condition number of a block is at most ``tr(F_u)/λ + 1``, since
  ``λ_max(F_u) ≤ tr(F_u)``.  So the form is safe in float64, and in float32 only for a damping
  that keeps ``(tr(F_u)/λ + 1)² · 6e-8`` small.

:func:`pack_tril`/:func:`unpack_tril` store the symmetric (or triangular) blocks in half the
space, for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from biasshift._torch import scipy_blas_threads
from biasshift.theory import cholesky_ex, cholesky_solver

__all__ = ["FORMS", "BlockFactors", "pack_tril", "unpack_tril"]

FORMS = ("cholesky", "inverse")

#: bytes of factors per CPU chunk of the triangular solves: the chunk fits in the last-level
#: cache, so the backward solve re-reads the factor from there.
CACHE_BYTES = 2**21
#: layers whose factors take fewer bytes are solved in one batched call (they stay in cache
#: between the two solves anyway, and one call saves the per-call overhead of a chunk loop)
CHUNK_ABOVE_BYTES = 2**25
#: whether factors built from now on keep the packed ``W = L⁻¹`` for the CPU's ``?tpmv`` path
#: (opt-in, off by default: in ``analyses/bench_optim.py`` on the 8x128 net it applied the
#: factors in 41 ms against 26 ms for the two ``?trsv`` on ``L`` and doubled the refresh,
#: although it was 1.8x faster in an isolated microbenchmark of the same shapes)
PACKED_INVERSE = False


@dataclass
class BlockFactors:
    r"""The factors of ``F_u + λ_u I`` for every unit ``u`` of a layer.

    Attributes:
        form: ``"cholesky"`` (``factor`` is the lower Cholesky factor ``L``) or ``"inverse"``
            (``factor`` is ``(F + λI)⁻¹``), ``(units, m, m)``.
        factor: see ``form``.
        damping: ``(units,)`` the ``λ_u`` that was added to each block's diagonal.
        ok: ``(units,)`` bool: the damped block is numerically positive definite and finite.
            The factor of a unit that is not ok is the identity's.
    """

    form: str
    factor: Tensor
    damping: Tensor
    ok: Tensor
    #: ``W = L⁻¹`` packed (row by row, ``(units, m(m+1)/2)``) where :func:`_packs` says the
    #: per-unit BLAS path pays; built from ``factor`` on construction (so a factor restored
    #: from a checkpoint gets the same ``W`` bit for bit), never saved.
    packed_inverse: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.form == "cholesky" and self.packed_inverse is None and PACKED_INVERSE \
                and _packs(self.factor):
            W, finite = _packed_tri_inverse(self.factor)
            if W is not None:
                bad = ~finite & self.ok
                if bool(bad.any()):  # a pivot so small that L⁻¹ overflows: not usable
                    self.ok = self.ok & finite
                    self.factor[bad] = torch.eye(self.factor.shape[-1], dtype=self.factor.dtype)
                    W[bad] = pack_tril(self.factor[bad][:1]).to(W.dtype)  # I's
                self.packed_inverse = W

    @classmethod
    def compute(cls, F: Tensor, damping: Tensor, form: str = "cholesky",
                overwrite: bool = False, strict: bool = False) -> BlockFactors:
        """Factor ``F + diag(damping)`` for ``F (units, m, m)``, ``damping (units,)``.

        Only the lower triangle of ``F`` is read.  With ``overwrite`` the damping is added to
        ``F``'s diagonal in place.  A block is not ok when its factorisation fails or is not
        finite; with ``strict`` (for undamped blocks) also when a Cholesky pivot falls below
        ``m · eps`` of its diagonal entry (:func:`biasshift.theory.cholesky_solver`), i.e. the
        block is singular to working precision.  No host synchronisation.
        """
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if F.ndim != 3 or F.shape[-1] != F.shape[-2] or damping.shape != F.shape[:1]:
            raise ValueError(f"F must be (units, m, m) with damping (units,), got "
                             f"{tuple(F.shape)} and {tuple(damping.shape)}")
        F = F if overwrite else F.clone()
        F.diagonal(dim1=-2, dim2=-1).add_(damping.unsqueeze(-1).to(F.dtype))
        finite = torch.isfinite(F.diagonal(dim1=-2, dim2=-1)).all(-1)
        if strict:
            chol = cholesky_solver(F)
            L, ok = chol.L, ~chol.bad & finite
        else:
            # F is ours (a clone or the caller's to overwrite): factored in its own memory,
            # row-major from the CPU's LAPACK
            L, info = cholesky_ex(F, overwrite=True, layout="any")
            ok = (info == 0) & finite & (L.diagonal(dim1=-2, dim2=-1) > 0).all(-1)
        # one memory layout (row-major) whatever the backend returned, so that a factor
        # restored from a checkpoint is applied by exactly the same kernels
        L = _row_major(L)
        L.masked_fill_(~ok[:, None, None], 0.0)  # one contiguous pass
        L.diagonal(dim1=-2, dim2=-1).masked_fill_(~ok.unsqueeze(-1), 1.0)
        factor = _column_major(torch.cholesky_inverse(L)) if form == "inverse" else L
        return cls(form=form, factor=factor, damping=damping, ok=ok)

    def apply(self, g: Tensor) -> Tensor:
        """``(F_u + λ_u I)⁻¹ g_u`` for ``g (units, m)`` (in the factors' dtype)."""
        L = self.factor
        g = g.to(L.dtype)
        if self.form == "inverse":  # P symmetric: (gᵀP)ᵀ reads P by rows
            return torch.bmm(g.unsqueeze(1), L).squeeze(1)
        U, m = L.shape[0], L.shape[-1]
        unit_bytes = m * m * L.element_size()
        if self.packed_inverse is not None and not g.requires_grad:
            out = _blas_tpmv(self.packed_inverse, g, m)
            if out is not None:
                return out
        if _packs(L) and not g.requires_grad:
            out = _blas_solve(L, g)
            if out is not None:
                return out
        rhs = g.unsqueeze(-1)
        step = U
        if L.device.type == "cpu" and U * unit_bytes > CHUNK_ABOVE_BYTES:
            step = max(1, CACHE_BYTES // unit_bytes)
        if step >= U:
            z = torch.linalg.solve_triangular(L, rhs, upper=False)
            return torch.linalg.solve_triangular(L.mT, z, upper=True).squeeze(-1)
        out = torch.empty_like(rhs)
        for u0 in range(0, U, step):
            Lc = L[u0:u0 + step]
            z = torch.linalg.solve_triangular(Lc, rhs[u0:u0 + step], upper=False)
            out[u0:u0 + step] = torch.linalg.solve_triangular(Lc.mT, z, upper=True)
        return out.squeeze(-1)

    def to(self, device: torch.device) -> BlockFactors:
        if self.factor.device == torch.device(device):
            return self
        return BlockFactors(self.form, self.factor.to(device), self.damping.to(device),
                            self.ok.to(device))


def _packs(L: Tensor) -> bool:
    """Whether the factors ``L (units, m, m)`` take the per-unit BLAS path: on the CPU, above
    :data:`CHUNK_ABOVE_BYTES`, float32/float64, contiguous and outside autograd."""
    return (L.device.type == "cpu" and L.ndim == 3
            and L.shape[0] * L.shape[-1] ** 2 * L.element_size() > CHUNK_ABOVE_BYTES
            and L.dtype in (torch.float32, torch.float64) and L.is_contiguous()
            and not L.requires_grad)


def _tril_flat(m: int) -> np.ndarray:
    """Flat (row-major) positions of the lower triangle of an ``m × m`` block, row by row."""
    i, j = np.tril_indices(m)
    return i * m + j


def _packed_tri_inverse(L: Tensor) -> tuple[Tensor | None, Tensor]:
    """``W_u = L_u⁻¹`` for row-major lower factors ``L (units, m, m)`` on the CPU, packed row
    by row, and ``(units,)`` whether each is finite; ``(None, ...)`` without scipy.  Per unit
    one LAPACK ``?trtri`` on a copy (the row-major lower triangle is the column-major upper
    one, ``Lᵀ``, whose inverse ``Wᵀ`` read row-major is ``W``).  Only ``L``'s lower triangle
    is read."""
    U, m = L.shape[0], L.shape[-1]
    threads = scipy_blas_threads()
    if threads is None:  # pragma: no cover - scipy and threadpoolctl are dependencies
        return None, torch.ones(U, dtype=torch.bool)
    from scipy.linalg import lapack

    trtri = lapack.strtri if L.dtype == torch.float32 else lapack.dtrtri
    flat = _tril_flat(m)
    A = np.from_dlpack(L.detach())
    W = torch.empty(U, flat.size, dtype=L.dtype)
    Wn = np.from_dlpack(W)
    tmp = np.empty((m, m), dtype=A.dtype, order="F")
    with threads:
        for u in range(U):
            tmp[...] = A[u].T  # Fortran order: the same bytes as A[u]
            inv, _info = trtri(tmp, lower=0, overwrite_c=1)  # diagonals > 0: info 0
            np.take(inv.T.reshape(-1), flat, out=Wn[u])  # inv.T is C-ordered: W
    return W, torch.isfinite(W).all(-1)


def _blas_tpmv(W: Tensor, g: Tensor, m: int) -> Tensor | None:
    """``W_uᵀ(W_u g_u)`` for packed lower ``W (units, m(m+1)/2)``: per unit two BLAS
    ``?tpmv`` calls on the same memory (row-major lower packed is column-major upper packed,
    ``U = Wᵀ``: ``Uᵀx = Wx``, then ``Ux = Wᵀx``), in place in one copy of ``g``."""
    threads = scipy_blas_threads()
    if threads is None:  # pragma: no cover
        return None
    from scipy.linalg import blas

    tpmv = blas.stpmv if W.dtype == torch.float32 else blas.dtpmv
    out = g.detach().to(W.dtype, copy=True).contiguous()
    A = np.from_dlpack(W)
    X = np.from_dlpack(out)
    with threads:
        for u in range(A.shape[0]):
            x = X[u]
            y = tpmv(m, A[u], x, lower=0, trans=1, overwrite_x=1)
            if y is not x and not np.shares_memory(y, x):  # pragma: no cover - f2py copied
                x[...] = y
            y = tpmv(m, A[u], x, lower=0, trans=0, overwrite_x=1)
            if y is not x and not np.shares_memory(y, x):  # pragma: no cover
                x[...] = y
    return out


def _blas_solve(L: Tensor, g: Tensor) -> Tensor | None:
    """``L⁻ᵀL⁻¹g_u`` for row-major lower factors ``L (units, m, m)`` on the CPU: per unit two
    BLAS ``?trsv`` calls on the same memory (the row-major lower triangle is the column-major
    upper one, ``U = Lᵀ``: ``Uᵀy = g``, then ``Ux = y``), in place in one copy of ``g``;
    ``None`` without scipy.  Only ``L``'s lower triangle is read."""
    threads = scipy_blas_threads()
    if threads is None:  # pragma: no cover - scipy and threadpoolctl are dependencies
        return None
    from scipy.linalg import blas

    trsv = blas.strsv if L.dtype == torch.float32 else blas.dtrsv
    out = g.detach().to(L.dtype, copy=True).contiguous()
    A = np.from_dlpack(L.detach())  # the same memory (the data are on the CPU)
    X = np.from_dlpack(out)
    with threads:
        for u in range(A.shape[0]):
            a, x = A[u].T, X[u]
            y = trsv(a, x, overwrite_x=1, lower=0, trans=1)
            if y is not x and not np.shares_memory(y, x):  # pragma: no cover - f2py copied
                x[...] = y
            y = trsv(a, x, overwrite_x=1, lower=0, trans=0)
            if y is not x and not np.shares_memory(y, x):  # pragma: no cover
                x[...] = y
    return out


def _row_major(M: Tensor) -> Tensor:
    """``M (units, m, m)`` contiguous (each block row by row)."""
    return M if M.is_contiguous() else M.contiguous()


def _column_major(M: Tensor) -> Tensor:
    """``M (units, m, m)`` with each block stored column by column (LAPACK's layout)."""
    m = M.shape[-1]
    if M.stride()[-2:] == (1, m) and M.mT.is_contiguous():
        return M
    return M.mT.contiguous().mT


def _tril_index(m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    i, j = torch.tril_indices(m, m, device=device)
    return i, j


def pack_tril(F: Tensor) -> Tensor:
    """The lower triangles of ``F (units, m, m)`` as ``(units, m(m+1)/2)`` (row by row)."""
    i, j = _tril_index(F.shape[-1], F.device)
    return F[:, i, j]


def unpack_tril(packed: Tensor, m: int, symmetric: bool, column_major: bool = False) -> Tensor:
    """Inverse of :func:`pack_tril`: the lower triangle, mirrored when ``symmetric``; stored
    column by column with ``column_major`` (the layout of :class:`BlockFactors`' inverses; its
    Cholesky factors are row-major)."""
    if packed.ndim != 2 or packed.shape[-1] != m * (m + 1) // 2:
        raise ValueError(f"packed blocks must be (units, {m * (m + 1) // 2}) for m = {m}, got "
                         f"{tuple(packed.shape)}")
    i, j = _tril_index(m, packed.device)
    buf = packed.new_zeros(packed.shape[0], m, m)
    out = buf.mT if column_major else buf
    out[:, i, j] = packed
    if symmetric:
        out[:, j, i] = packed
    return out
