r"""The unit natural gradient and the bias shift: Section 2 of the ELU paper as batched formulas.

Clevert, Unterthiner & Hochreiter, "Fast and Accurate Deep Network Learning by Exponential Linear
Units (ELUs)", ICLR 2016, Section 2 and the appendix, with the bias at index 0.

Notation
    Unit ``i`` of a layer has net input ``net = wᵀa + w₀`` (bias unit ``a₀ = 1``) and
    ``δ = ∂ ln p(y|x; w) / ∂net``, so ``∂ ln p / ∂w_j = δ a_j``.  With ``ã = (1, a)`` the *unit
    Fisher* is ``F = E_p(δ² ã ãᵀ)``.  Reweighting the samples by ``q(z) = δ²(z) p(z) / E_p(δ²)``::

        F = E_p(δ²) E_q(ã ãᵀ) = [[c, bᵀ], [b, A]],
        c = E_p(δ²),  b = E_p(δ²) E_q(a),  A = E_p(δ²) E_q(a aᵀ),
        E_q(a) = E_p(a) + E_p(δ²)⁻¹ Cov_p(δ², a).

    Theorem 1 (unit natural gradient ``F⁻¹(g₀, g)`` in block form)::

        s   = (c − bᵀA⁻¹b)⁻¹ = E_p(δ²)⁻¹ (1 + E_q(a)ᵀ Var_q(a)⁻¹ E_q(a)),
        Δw₀ = s (g₀ − bᵀA⁻¹g),
        Δw  = A⁻¹g − Δw₀ A⁻¹b.

    The bias shift of an update ``(Δw₀, Δw)`` is the change of the unit's mean net input,
    ``Δw₀ + E_p(a)ᵀΔw``.  Without the correction (``b = 0``, ``s = c⁻¹``) the natural gradient's
    bias shift would be ``E_p(a)ᵀA⁻¹g + c⁻¹g₀``.  Theorem 2: under the unit natural gradient it is::

        (E_p(a) − k E_q(a))ᵀ A⁻¹ g + k c⁻¹ g₀,
        k = 1 + (E_q(a) − E_p(a))ᵀ Var_q(a)⁻¹ E_q(a)
          = 1 + E_p(δ²)⁻¹ Cov_p(δ², a)ᵀ Var_q(a)⁻¹ E_q(a).

    Appendix: the block inverse of ``F``; Sherman–Morrison gives
    ``E(a)ᵀE(aaᵀ)⁻¹E(a) = 1 − 1/(1 + E(a)ᵀVar(a)⁻¹E(a))``; the mixed form
    ``(1 − E_pᵀE_q(aaᵀ)⁻¹E_q)(1 − E_qᵀE_q(aaᵀ)⁻¹E_q)⁻¹ = k``.

Conventions (all functions)
    * Every tensor has a leading *unit* dimension: ``F`` is ``(units, n+1, n+1)`` with index 0 the
      bias, ``grad`` is ``(units, n+1) = (g₀, g)``, activation moments are ``(units, n)``,
      ``E_p(δ²)`` is ``(units,)``.  Sample-based functions take ``a`` as ``(M, n)`` (shared by all
      units) or ``(units, M, n)`` and ``delta2 = δ²`` as ``(units, M)``; samples are equally
      weighted under ``p``.
    * ``grad`` is the gradient of the quantity being **minimised** (e.g. the mean negative
      log-likelihood).  Functions return the natural-gradient *direction* ``F⁻¹(g₀, g)`` and bias
      shifts of directions; an optimiser's step is ``−lr`` times the direction, and its bias
      shift is ``−lr`` times the value returned here.
    * ``damping = λ ≥ 0`` replaces ``F`` by ``F + λI``; the bias entry is damped too
      (``c → c + λ``, ``A → A + λI``, ``b`` unchanged).  Theorems 1 and 2 then hold exactly for the
      damped matrix, with ``E_q(a)`` read as ``b / (c + λ)`` and ``k = s (c + λ)(1 − E_p(a)ᵀA⁻¹b)``
      (which equals the paper's ``k`` when ``λ = 0``).
    * **Only the lower triangle of ``F`` is read** (Cholesky and ``eigvalsh`` convention): an
      ``F`` whose upper triangle differs would silently give the values of another matrix.  So
      every public function that takes ``F`` first checks it, with one host synchronisation:
      ``F`` must be a real floating-point tensor, finite (no NaN/inf), and symmetric to
      ``3.5e-4`` (``√eps`` of float32) of its largest entry per unit; otherwise a
      ``ValueError`` names the function, the units and the fix (symmetrise with
      ``(F + F.mT) / 2``).  Shapes must match exactly (nothing is broadcast) and ``damping``
      must be finite.
      :func:`natural_gradient_factors` skips the value checks with ``check=False``, so a caller
      that fills only the lower triangle (the optimiser) can pass such an ``F``.
    * Solves use a Cholesky factorisation.  A Fisher block that is not numerically positive
      definite (a Cholesky pivot below ``n·eps`` of its diagonal entry, Jacobi-scaled) raises
      :class:`SingularFisherError`, which gives the smallest eigenvalue and suggests ``damping``.
      Checking costs one host synchronisation per call (this module is not per-step code).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from biasshift._torch import scipy_blas_threads

__all__ = [
    "FACTOR_FORMS",
    "TRIANGLES",
    "Cov_p",
    "E_q",
    "E_q_from_Cov",
    "E_q_outer",
    "FisherBlocks",
    "NaturalGradientFactors",
    "SingularFisherError",
    "Solver",
    "Theorem2",
    "UnitQuantities",
    "Var_q",
    "apply_natural_gradient",
    "bias_shift",
    "bias_shift_natural",
    "bias_shift_uncorrected",
    "block_inverse",
    "cho_solve",
    "cholesky_ex",
    "cholesky_solver",
    "condition_number",
    "fisher_blocks",
    "fisher_from_moments",
    "k_from_Cov",
    "k_from_fisher",
    "k_from_moments",
    "k_mixed",
    "moments_from_fisher",
    "natural_gradient",
    "natural_gradient_correction",
    "natural_gradient_factors",
    "quadratic_form_second_moment",
    "quadratic_form_sherman_morrison",
    "raise_singular",
    "s_from_fisher",
    "s_from_moments",
    "split_fisher",
    "theorem2",
    "uncorrected_update",
    "unit_quantities",
]


class SingularFisherError(torch.linalg.LinAlgError, ValueError):
    """A unit Fisher block is singular (not numerically positive definite) and no damping helps.

    Attributes:
        units: indices (within the batch of blocks, or within the layer) of the singular blocks.
        smallest_eigenvalue: the smallest eigenvalue among those blocks (after damping).
        layer: the layer name when raised by :class:`biasshift.UnitFisher`, else ``None``.
    """

    def __init__(self, message: str, *, units: Sequence[int] = (),
                 smallest_eigenvalue: float = float("nan"), layer: str | None = None) -> None:
        super().__init__(message)
        self.units = list(units)
        self.smallest_eigenvalue = smallest_eigenvalue
        self.layer = layer


# --------------------------------------------------------------------------------------------
# Input checks (called at the entry of the public functions)
# --------------------------------------------------------------------------------------------

def _check_real(fn: str, name: str, x: object) -> None:
    """``x`` must be a real floating-point tensor (integer F fails in Cholesky, complex F is not
    a unit Fisher)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{fn}: {name} is complex ({x.dtype}); unit Fisher blocks, gradients and "
                        "moments are real: pass a real float32/float64 tensor")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}; pass a floating-point tensor, e.g. "
                        f"{name}.double()")


def _check_args(fn: str, dims: dict[str, int] | None = None, /,
                **args: tuple[Tensor | None, tuple[str, ...]]) -> dict[str, int]:
    """Check that each ``name=(tensor, pattern)`` is real and has exactly the shape ``pattern``.

    ``pattern`` names each dimension (``("units", "n")``); a name takes the size it first has
    (in ``dims`` or in an earlier argument), and every later use must agree: nothing is broadcast.
    ``None`` tensors are skipped. Returns the sizes bound.
    """
    dims = dict(dims or {})
    for name, (x, pattern) in args.items():
        if x is None:
            continue
        _check_real(fn, name, x)
        bound = dict(dims)
        ok = x.ndim == len(pattern)
        for sym, d in zip(pattern, x.shape if ok else (), strict=False):
            ok = ok and bound.setdefault(sym, d) == d
        if not ok:
            want = ", ".join(pattern)
            sizes = ", ".join(str(dims.get(sym, "?")) for sym in pattern)
            raise ValueError(
                f"{fn}: {name} must be ({want}) = ({sizes}) to match the other arguments, got "
                f"shape {tuple(x.shape)} (shapes are checked exactly, never broadcast)"
            )
        dims = bound
    return dims


def _check_fisher_input(fn: str, F: Tensor, damping: float = 0.0, *, grad: Tensor | None = None,
                        E_p_a: Tensor | None = None, bias: bool = True,
                        values: bool = True) -> None:
    """The entry check of every public function taking ``F``: types, exact shapes, a finite
    ``damping``, and (``values=True``, one host synchronisation) a finite, symmetric ``F``."""
    _check_real(fn, "F", F)
    m_min = 2 if bias else 1
    if F.ndim != 3 or F.shape[-1] != F.shape[-2] or F.shape[-1] < m_min:
        what = ("(units, n+1, n+1) with the bias at index 0 (m = n+1 >= 2)" if bias
                else "(units, m, m)")
        raise ValueError(f"{fn}: F must be a batch of unit Fisher blocks (units, m, m) = {what}, "
                         f"got shape {tuple(F.shape)}")
    _check_damping(damping)
    units, m = F.shape[0], F.shape[-1]
    _check_args(fn, {"units": units, "n+1": m, "n": m - 1, "m": m},
                grad=(grad, ("units", "n+1") if bias else ("units", "m")),
                E_p_a=(E_p_a, ("units", "n")))
    if values and F.numel():
        _check_fisher_values(fn, F)


def _check_fisher_values(fn: str, F: Tensor) -> None:
    """``F`` must be finite and symmetric (``|F − Fᵀ| ≤ 3.5e-4 · max|F|`` per unit, √eps of
    float32, so rounding in a float32 estimate passes): only its lower triangle is read, so an
    asymmetric ``F`` would silently give another matrix's values."""
    Fd = F.detach()
    finite = torch.isfinite(Fd).flatten(1).all(-1)
    asym = (Fd - Fd.mT).abs().flatten(1).amax(-1)
    scale = Fd.abs().flatten(1).amax(-1)
    # √eps of float32 (3.5e-4) even for float64: a float32 estimate cast to float64 passes
    rtol = math.sqrt(max(torch.finfo(F.dtype).eps, torch.finfo(torch.float32).eps))
    asymmetric = ~(asym <= rtol * scale)
    if not bool((~finite | asymmetric).any()):  # the one host synchronisation
        return

    def shown(mask: Tensor) -> str:
        idx = torch.nonzero(mask).flatten().tolist()
        return f"{len(idx)} unit(s) (unit " + ", ".join(map(str, idx[:10])) \
            + (" ...)" if len(idx) > 10 else ")")

    if not bool(finite.all()):
        raise ValueError(
            f"{fn}: F has NaN or inf entries in {shown(~finite)}; a unit Fisher is finite. "
            "Check the statistics it was estimated from (a diverging run, a NaN loss, an "
            "overflow in float16/float32) and skip or re-estimate those units."
        )
    worst = int(torch.argmax(torch.where(asymmetric, asym / scale.clamp_min(1e-300),
                                         torch.zeros_like(asym))))
    raise ValueError(
        f"{fn}: F is not symmetric in {shown(asymmetric)}: unit {worst} has max |F - F^T| = "
        f"{float(asym[worst]):.3g} against max |F| = {float(scale[worst]):.3g}. These functions "
        "read only the lower triangle of F, so the upper one would be ignored silently. Pass "
        "the full symmetric matrix, e.g. (F + F.mT) / 2, or (natural_gradient_factors) "
        "check=False when only the lower triangle is filled on purpose."
    )


def _check_moments(fn: str, E_p_delta2: Tensor, E_q_a: Tensor, E_q_aa: Tensor) -> None:
    _check_args(fn, E_p_delta2=(E_p_delta2, ("units",)), E_q_a=(E_q_a, ("units", "n")),
                E_q_aa=(E_q_aa, ("units", "n", "n")))


def _check_bias_shift(update: Tensor, E_p_a: Tensor) -> None:
    dims = _check_args("bias_shift", update=(update, ("units", "n+1")))
    _check_args("bias_shift", {"units": dims["units"], "n": dims["n+1"] - 1},
                E_p_a=(E_p_a, ("units", "n")))


# --------------------------------------------------------------------------------------------
# Moments from samples
# --------------------------------------------------------------------------------------------

def _weights(delta2: Tensor) -> Tensor:
    if delta2.ndim != 2:
        raise ValueError(f"delta2 must be (units, M), got shape {tuple(delta2.shape)}")
    return delta2


def _shared_or_batched(a: Tensor, units: int, m: int) -> Tensor:
    if a.ndim == 2 and a.shape[0] == m:
        return a
    if a.ndim == 3 and a.shape[0] == units and a.shape[1] == m:
        return a
    raise ValueError(
        f"a must be (M, n) shared by all units or (units, M, n); got shape {tuple(a.shape)} with "
        f"delta2 of shape ({units}, {m})"
    )


def E_q(a: Tensor, delta2: Tensor) -> Tensor:
    r"""``E_q(a) = E_p(δ² a) / E_p(δ²)``: the incoming mean under ``q(z) = δ² p(z) / E_p(δ²)``.

    Args:
        a: incoming activations ``(M, n)`` (shared) or ``(units, M, n)``.
        delta2: ``δ²`` per unit and sample, ``(units, M)``.
    Returns:
        ``(units, n)``.
    """
    _check_real("E_q", "a", a)
    _check_real("E_q", "delta2", delta2)
    w = _weights(delta2)
    a = _shared_or_batched(a, *w.shape)
    return torch.matmul(w.unsqueeze(-2), a).squeeze(-2) / w.sum(-1, keepdim=True)


def E_q_outer(a: Tensor, delta2: Tensor) -> Tensor:
    r"""``E_q(a aᵀ) = E_p(δ² a aᵀ) / E_p(δ²)``, shape ``(units, n, n)``."""
    _check_real("E_q_outer", "a", a)
    _check_real("E_q_outer", "delta2", delta2)
    w = _weights(delta2)
    a = _shared_or_batched(a, *w.shape)
    wa = w.unsqueeze(-1) * a
    return torch.matmul(a.mT, wa) / w.sum(-1)[:, None, None]


def Var_q(a: Tensor, delta2: Tensor) -> Tensor:
    r"""``Var_q(a) = E_q(a aᵀ) − E_q(a) E_q(a)ᵀ``, shape ``(units, n, n)``."""
    m = E_q(a, delta2)
    return E_q_outer(a, delta2) - m.unsqueeze(-1) * m.unsqueeze(-2)


def Cov_p(delta2: Tensor, a: Tensor) -> Tensor:
    r"""``Cov_p(δ², a) = E_p(δ² a) − E_p(δ²) E_p(a)``, shape ``(units, n)``."""
    _check_real("Cov_p", "a", a)
    _check_real("Cov_p", "delta2", delta2)
    w = _weights(delta2)
    a = _shared_or_batched(a, *w.shape)
    m = w.shape[1]
    e_wa = torch.matmul(w.unsqueeze(-2), a).squeeze(-2) / m
    e_a = a.mean(-2)
    return e_wa - w.mean(-1, keepdim=True) * e_a


def E_q_from_Cov(E_p_a: Tensor, E_p_delta2: Tensor, cov: Tensor) -> Tensor:
    r"""Section 2: ``E_q(a) = E_p(a) + E_p(δ²)⁻¹ Cov_p(δ², a)``."""
    _check_args("E_q_from_Cov", E_p_a=(E_p_a, ("units", "n")),
                E_p_delta2=(E_p_delta2, ("units",)), cov=(cov, ("units", "n")))
    return E_p_a + cov / E_p_delta2.unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# Blocks of F
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FisherBlocks:
    """``F = [[c, bᵀ], [b, A]]`` for a batch of units: ``c (units,)``, ``b (units, n)``,
    ``A (units, n, n)``."""

    c: Tensor
    b: Tensor
    A: Tensor


def fisher_blocks(E_p_delta2: Tensor, E_q_a: Tensor, E_q_aa: Tensor) -> FisherBlocks:
    r"""``c = E_p(δ²)``, ``b = E_p(δ²) E_q(a)``, ``A = E_p(δ²) E_q(a aᵀ)`` (Section 2)."""
    _check_moments("fisher_blocks", E_p_delta2, E_q_a, E_q_aa)
    return FisherBlocks(
        c=E_p_delta2, b=E_p_delta2.unsqueeze(-1) * E_q_a, A=E_p_delta2[:, None, None] * E_q_aa
    )


def fisher_from_moments(E_p_delta2: Tensor, E_q_a: Tensor, E_q_aa: Tensor) -> Tensor:
    r"""Assemble ``F = E_p(δ²) E_q(ã ãᵀ) = [[c, bᵀ], [b, A]]``, shape ``(units, n+1, n+1)``."""
    _check_moments("fisher_from_moments", E_p_delta2, E_q_a, E_q_aa)
    blk = fisher_blocks(E_p_delta2, E_q_a, E_q_aa)
    units, n = blk.b.shape
    F = blk.A.new_empty(units, n + 1, n + 1)
    F[:, 0, 0] = blk.c
    F[:, 0, 1:] = blk.b
    F[:, 1:, 0] = blk.b
    F[:, 1:, 1:] = blk.A
    return F


def _check_fisher(F: Tensor) -> None:
    if F.ndim != 3 or F.shape[-1] != F.shape[-2] or F.shape[-1] < 2:
        raise ValueError(
            "F must be a batch of unit Fisher blocks (units, n+1, n+1) with the bias at index 0, "
            f"got shape {tuple(F.shape)}"
        )


def split_fisher(F: Tensor, damping: float = 0.0) -> FisherBlocks:
    """Split ``F + λI`` into ``c + λ``, ``b`` and ``A + λI`` (index 0 is the bias)."""
    _check_real("split_fisher", "F", F)
    _check_fisher(F)
    _check_damping(damping)
    c = F[:, 0, 0]
    b = F[:, 1:, 0]
    A = F[:, 1:, 1:]
    if damping:
        c = c + damping
        A = A + damping * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return FisherBlocks(c=c, b=b, A=A)


def moments_from_fisher(F: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Invert :func:`fisher_from_moments`: ``(E_p(δ²), E_q(a), E_q(a aᵀ)) = (c, b/c, A/c)``."""
    blk = split_fisher(F)
    return blk.c, blk.b / blk.c.unsqueeze(-1), blk.A / blk.c[:, None, None]


# --------------------------------------------------------------------------------------------
# Solves
# --------------------------------------------------------------------------------------------

def _check_damping(damping: float) -> None:
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0 \
            or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite float >= 0 (F + damping*I), got {damping!r}")


#: bytes of blocks per ``cholesky_ex`` call on the CPU (see :func:`cholesky_ex`)
CHOLESKY_CHUNK_BYTES = 2**20


#: which triangle of the blocks :func:`cholesky_ex` may read
TRIANGLES = ("lower", "upper", "both")


def cholesky_ex(A: Tensor, *, triangle: str = "lower", overwrite: bool = False,
                clean: bool = True, layout: str = "column") -> tuple[Tensor, Tensor]:
    r"""``torch.linalg.cholesky_ex(A)`` for a batch ``A (..., n, n)``: the lower factor ``L``
    (column-major blocks, zeros above the diagonal, as torch's) and ``info`` (0, or the order
    of the first leading minor that is not positive definite), faster on the CPU.

    ``triangle`` says which part of each block holds the matrix: ``"lower"`` (torch's
    convention; the rest is not read), ``"upper"`` (row-major upper triangle, diagonal
    included) or ``"both"``.  On the CPU torch's ``cholesky_ex`` first copies the lower
    triangle of every block into a column-major output with a kernel that is slow for blocks of
    a few hundred rows (for 512² float32 blocks it costs more than LAPACK's ``potrf`` itself).
    Here:

    * ``"upper"``/``"both"`` (float32/float64): each block is factored by scipy's LAPACK
      ``?potrf`` in place in a copy of the batch (the row-major upper triangle is the
      column-major lower triangle of the same symmetric matrix), with the BLAS threads limited
      to torch's thread count; the same factorisation to rounding (another LAPACK build),
      1.5-2.7x faster than torch's for 128 blocks of 129²-786².  With ``overwrite`` a
      contiguous ``A`` is factored in its own memory (no copy of the batch; ``A`` is then
      garbage). ``clean=False`` leaves the factor's strictly upper triangle as it was (the
      matrix) instead of zeroing it, for callers that read only the lower triangle and the
      diagonal (:func:`cho_solve`, :func:`torch.linalg.solve_triangular`): it saves a pass
      over the batch;
    * ``"lower"``: torch's ``cholesky_ex`` on chunks of at most :data:`CHOLESKY_CHUNK_BYTES`,
      so that each chunk's copy stays in cache; bit for bit torch's result.  With
      ``layout="any"`` LAPACK factors the lower triangle in place as well (the row-major lower
      triangle is the column-major upper one: ``?potrf`` with ``uplo="U"``, whose ``U = Lᵀ``
      is ``L`` row by row), and ``L`` comes back **row-major** (1.7x faster than torch's for
      128 blocks of 786² float32; solves read either layout).

    ``layout``: ``"column"`` (default) returns torch's column-major blocks; ``"any"`` lets the
    CPU's LAPACK path return whichever layout it produced (check ``L.stride()``).

    Other devices (and batches without blocks) take torch's one batched call (an ``"upper"``
    batch mirrored first).
    """
    if triangle not in TRIANGLES:
        raise ValueError(f"cholesky_ex: triangle must be one of {TRIANGLES}, got {triangle!r}")
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"cholesky_ex: A must be a batch of square blocks (..., n, n), got "
                         f"shape {tuple(A.shape)}")
    cpu = A.device.type == "cpu" and A.ndim >= 3 and A.numel() > 0
    n = A.shape[-1]
    if layout not in ("column", "any"):
        raise ValueError(f"cholesky_ex: layout must be 'column' or 'any', got {layout!r}")
    if cpu and (triangle != "lower" or layout == "any") \
            and A.dtype in (torch.float32, torch.float64) and not A.requires_grad:
        out = _lapack_cholesky(A.reshape(-1, n, n), overwrite and A.is_contiguous(), clean,
                               read="lower" if triangle == "lower" else "upper")
        if out is not None:
            return out[0].reshape(A.shape), out[1].reshape(A.shape[:-2])
    if triangle == "upper":  # the fallbacks read the lower triangle
        A = A.triu() + A.triu(1).mT
    if not cpu:
        return torch.linalg.cholesky_ex(A)
    flat = A.reshape(-1, n, n)
    B = flat.shape[0]
    step = max(1, CHOLESKY_CHUNK_BYTES // max(1, n * n * A.element_size()))
    if step >= B:
        return torch.linalg.cholesky_ex(A)
    L = flat.new_empty(B, n, n).mT  # column-major blocks, LAPACK's layout (as torch's)
    info = torch.empty(B, dtype=torch.int32, device=A.device)
    for s in range(0, B, step):
        torch.linalg.cholesky_ex(flat[s:s + step], out=(L[s:s + step], info[s:s + step]))
    return L.reshape(A.shape), info.reshape(A.shape[:-2])


def _lapack_cholesky(flat: Tensor, overwrite: bool = False, clean: bool = True,
                     read: str = "upper") -> tuple[Tensor, Tensor] | None:
    """Lower Cholesky factors of the CPU blocks ``flat (B, n, n)`` by scipy's LAPACK, or
    ``None`` when scipy/threadpoolctl are missing.  ``read="upper"``: the row-major upper
    triangles are read and ``L`` is column-major; ``"lower"``: the row-major lower triangles
    are read and ``L`` is row-major.  The other triangle of ``L`` is zero with ``clean``, else
    whatever the blocks held there."""
    threads = scipy_blas_threads()
    if threads is None:  # pragma: no cover - scipy and threadpoolctl are dependencies
        return None
    from scipy.linalg import lapack
    potrf = lapack.spotrf if flat.dtype == torch.float32 else lapack.dpotrf
    buf = flat.detach() if overwrite else flat.detach().clone(
        memory_format=torch.contiguous_format)
    arr = np.from_dlpack(buf)  # the same memory (not a host transfer: the data are on the CPU)
    if not arr.flags.writeable:  # pragma: no cover - numpy < 1.25 exports read-only arrays
        return None
    info = np.zeros(buf.shape[0], dtype=np.int32)
    with threads:
        for i in range(arr.shape[0]):
            # arr[i].T is Fortran-ordered: its lower triangle is the row-major upper one (the
            # matrix), and L lands there, i.e. in the upper triangle of the row-major block
            block = arr[i].T
            c, info[i] = potrf(block, lower=int(read == "upper"), clean=0, overwrite_a=1)
            if c is not block and not np.shares_memory(c, block):  # pragma: no cover
                block[...] = c
    # LAPACK stops at a failed pivot: mark it like torch (info > 0); zero above L's diagonal
    # (a fast in-place pass over the row-major blocks)
    if read == "lower":  # uplo="U" on the transposed view: Lᵀ column by column = L row by row
        if clean:
            buf.tril_()
        return buf, torch.from_numpy(info)
    if clean:
        buf.triu_()
    return buf.mT, torch.from_numpy(info)


def cho_solve(rhs: Tensor, L: Tensor) -> Tensor:
    r"""``A⁻¹ rhs`` from the lower Cholesky factor ``L`` of ``A`` (``A = LLᵀ``), batched:
    ``rhs (..., n, r)``, ``L (..., n, n)``; only ``L``'s lower triangle is read.

    The same two triangular solves as :func:`torch.cholesky_solve` (``Ly = rhs``, then
    ``Lᵀx = y``; on the CPU the results are bit-identical), as two
    :func:`torch.linalg.solve_triangular` calls: on the CPU ``torch.cholesky_solve`` is 3-5x
    slower for batches of blocks (measured on (128, 129..786)² blocks with 2 right-hand sides).
    """
    y = torch.linalg.solve_triangular(L, rhs, upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)


class _Solver:
    """Applies ``(A + λI)⁻¹`` to ``(units, n, r)`` right-hand sides; ``bad`` flags singular
    units."""

    bad: Tensor

    def __call__(self, rhs: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class _Cholesky(_Solver):
    def __init__(self, A: Tensor) -> None:
        L, info = cholesky_ex(A)
        n = A.shape[-1]
        tol = n * torch.finfo(A.dtype).eps
        piv = L.diagonal(dim1=-2, dim2=-1).square()
        scaled = piv / A.diagonal(dim1=-2, dim2=-1)
        # ``~(x > tol)`` also flags NaN (e.g. a zero diagonal entry).
        self.bad = (info != 0) | ~(scaled.amin(-1) > tol)
        self.L = L

    def __call__(self, rhs: Tensor) -> Tensor:
        return cho_solve(rhs, self.L)


#: the public name of the solver interface (``solver(rhs)`` gives ``A⁻¹ rhs``, ``solver.bad``)
Solver = _Solver


def cholesky_solver(A: Tensor) -> _Solver:
    """A solver for the SPD batch ``A (units, n, n)``: ``solver(rhs)`` gives ``A⁻¹ rhs``.

    ``solver.bad`` (a bool tensor, no host sync) marks units whose ``A`` is not numerically
    positive definite: a failed factorisation, or a Cholesky pivot below ``n·eps`` of its diagonal
    entry (Jacobi-scaled, so the test does not depend on the units of the inputs).
    """
    return _Cholesky(A)


def _raise_singular(F: Tensor, bad: Tensor, damping: float, *, layer: str | None = None,
                    unit_offset: int = 0, what: str = "F") -> None:
    """Raise :class:`SingularFisherError` for the flagged blocks of ``F`` (already damped)."""
    idx = torch.nonzero(bad).flatten()
    sub = F[idx].to(torch.float64)
    if not bool(torch.isfinite(sub).all()):  # eigvalsh would fail while building the message
        where = f"layer {layer!r}: " if layer else ""
        units = [int(i) + unit_offset for i in idx.tolist()]
        raise SingularFisherError(
            f"{where}the unit Fisher block {what} of {len(units)} unit(s) (unit "
            f"{', '.join(map(str, units[:10]))}{' ...' if len(units) > 10 else ''}) has NaN or inf "
            "entries; check the statistics it was estimated from (a diverging run, a NaN loss).",
            units=units, layer=layer,
        )
    eig = torch.linalg.eigvalsh(sub)
    lam_min = float(eig[:, 0].min())
    lam_max = float(eig[:, -1].max())
    units = [int(i) + unit_offset for i in idx.tolist()]
    shown = ", ".join(str(u) for u in units[:10]) + (" ..." if len(units) > 10 else "")
    scale = float(sub.diagonal(dim1=-2, dim2=-1).mean())
    hint = max(scale, 1e-30) * 1e-4
    where = f"layer {layer!r}: " if layer else ""
    raise SingularFisherError(
        f"{where}the unit Fisher block {what} of {len(units)} unit(s) (unit {shown}) is singular "
        f"(not numerically positive definite): smallest eigenvalue {lam_min:.3e}, largest "
        f"{lam_max:.3e}, damping {damping:g}. Pass damping > 0 (F + damping*I), e.g. "
        f"damping={hint:.1e} (1e-4 of the mean diagonal entry), or accumulate more samples than "
        "the block has rows.",
        units=units, smallest_eigenvalue=lam_min, layer=layer,
    )


def raise_singular(F: Tensor, bad: Tensor, damping: float, *, layer: str | None = None,
                   unit_offset: int = 0, what: str = "F") -> None:
    """Raise :class:`SingularFisherError` for the blocks of ``F`` (already damped) flagged in
    ``bad``: the message names the units, the smallest and largest eigenvalue and a damping
    that helps (the public entry point for other modules)."""
    _raise_singular(F, bad, damping, layer=layer, unit_offset=unit_offset, what=what)


# --------------------------------------------------------------------------------------------
# The kernel: Theorem 1 and 2 quantities from (c, b, A⁻¹)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitQuantities:
    """Theorem 1 and 2 quantities of a batch of units (all ``(units,)`` unless stated).

    ``natural`` is ``F⁻¹(g₀, g)`` ``(units, n+1)``; ``uncorrected`` is ``(c⁻¹g₀, A⁻¹g)``
    ``(units, n+1)``; ``s``, ``k`` as in the theorems; ``E_q_a = b / c`` ``(units, n)``;
    ``bias_shift_sgd = g₀ + E_p(a)ᵀg``; ``bias_shift_uncorrected = E_p(a)ᵀA⁻¹g + c⁻¹g₀``;
    ``bias_shift_natural = Δw₀ + E_p(a)ᵀΔw``; Theorem 2's ``mean_term = (E_p(a) − k E_q(a))ᵀ
    A⁻¹g`` and ``bias_term = k c⁻¹ g₀`` (their sum equals ``bias_shift_natural``);
    ``cosine`` = cos(grad, natural); ``bad`` flags singular blocks (bool, not yet checked).
    Quantities that need ``E_p(a)`` are ``None`` when it was not given.
    """

    natural: Tensor
    uncorrected: Tensor
    s: Tensor
    E_q_a: Tensor
    cosine: Tensor
    bad: Tensor
    k: Tensor | None = None
    bias_shift_sgd: Tensor | None = None
    bias_shift_uncorrected: Tensor | None = None
    bias_shift_natural: Tensor | None = None
    mean_term: Tensor | None = None
    bias_term: Tensor | None = None


def _dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(-1)


def unit_quantities(c: Tensor, b: Tensor, solve_A: Callable[[Tensor], Tensor], grad: Tensor,
                    E_p_a: Tensor | None = None, bad: Tensor | None = None) -> UnitQuantities:
    r"""Theorem 1 and 2 for a batch of units from ``c``, ``b`` and a solver for ``A``.

    This is the shared kernel of every "from F" function here and of
    :class:`biasshift.UnitFisher` (which passes a Cholesky or a Woodbury solver).  Damping, if
    any, is already in ``c`` and ``solve_A``.  One batched solve with two right-hand sides
    ``A⁻¹[g, b]`` gives::

        s = (c − bᵀA⁻¹b)⁻¹,   Δw₀ = s (g₀ − bᵀA⁻¹g),   Δw = A⁻¹g − Δw₀ A⁻¹b,
        k = s c (1 − E_p(a)ᵀA⁻¹b),  mean_term = (E_p(a) − k b/c)ᵀA⁻¹g,  bias_term = k c⁻¹ g₀.

    No host synchronisation: singular blocks are flagged in the result's ``bad`` (the solver's
    flags or a Schur complement ``c − bᵀA⁻¹b`` that is not above ``n·eps·c``).
    """
    g0, g = grad[:, 0], grad[:, 1:]
    Y = solve_A(torch.stack([g, b], dim=-1))
    y_g, y_b = Y[..., 0], Y[..., 1]
    schur = c - _dot(b, y_b)
    n = b.shape[-1] + 1
    tol = n * torch.finfo(c.dtype).eps
    schur_bad = ~(schur > tol * c)
    bad = schur_bad if bad is None else (bad | schur_bad)
    s = 1.0 / schur
    dw0 = s * (g0 - _dot(b, y_g))
    dw = y_g - dw0.unsqueeze(-1) * y_b
    natural = torch.cat([dw0.unsqueeze(-1), dw], dim=-1)
    uncorrected = torch.cat([(g0 / c).unsqueeze(-1), y_g], dim=-1)
    E_q_a = b / c.unsqueeze(-1)
    cosine = _dot(grad, natural) / (grad.norm(dim=-1) * natural.norm(dim=-1))
    out = dict(natural=natural, uncorrected=uncorrected, s=s, E_q_a=E_q_a, cosine=cosine, bad=bad)
    if E_p_a is not None:
        k = s * c * (1 - _dot(E_p_a, y_b))
        out.update(
            k=k,
            bias_shift_sgd=g0 + _dot(E_p_a, g),
            bias_shift_uncorrected=_dot(E_p_a, y_g) + g0 / c,
            bias_shift_natural=dw0 + _dot(E_p_a, dw),
            mean_term=_dot(E_p_a, y_g) - k * _dot(E_q_a, y_g),
            bias_term=k * g0 / c,
        )
    return UnitQuantities(**out)


def _from_fisher(F: Tensor, grad: Tensor, E_p_a: Tensor | None, damping: float,
                 check: bool = True) -> UnitQuantities:
    _check_fisher(F)
    # mixed precision in, the wider precision out (e.g. a float32 F with a float64 gradient)
    dtype = torch.promote_types(F.dtype, grad.dtype)
    if E_p_a is not None:
        dtype = torch.promote_types(dtype, E_p_a.dtype)
        E_p_a = E_p_a.to(dtype)
    F, grad = F.to(dtype), grad.to(dtype)
    n1 = F.shape[-1]
    if grad.shape != F.shape[:-1]:
        raise ValueError(
            f"grad must be (units, n+1) = {tuple(F.shape[:-1])} to match F {tuple(F.shape)}, "
            f"got {tuple(grad.shape)}"
        )
    if E_p_a is not None and E_p_a.shape != (F.shape[0], n1 - 1):
        raise ValueError(
            f"E_p_a must be (units, n) = {(F.shape[0], n1 - 1)}, got {tuple(E_p_a.shape)}"
        )
    blk = split_fisher(F, damping)
    solver = cholesky_solver(blk.A)
    q = unit_quantities(blk.c, blk.b, solver, grad, E_p_a, bad=solver.bad)
    if check and bool(q.bad.any()):
        Fd = F + damping * torch.eye(n1, dtype=F.dtype, device=F.device) if damping else F
        _raise_singular(Fd, q.bad, damping)
    return q


# --------------------------------------------------------------------------------------------
# Public formulas: "from F"
# --------------------------------------------------------------------------------------------

def natural_gradient(F: Tensor, grad: Tensor, damping: float = 0.0) -> Tensor:
    r"""Theorem 1: the unit natural gradient ``(F + λI)⁻¹ (g₀, g)`` via the block formula.

    ``s = (c − bᵀA⁻¹b)⁻¹``, ``Δw₀ = s (g₀ − bᵀA⁻¹g)``, ``Δw = A⁻¹g − Δw₀ A⁻¹b``.

    Args:
        F: unit Fisher blocks ``(units, n+1, n+1)``, bias at index 0.
        grad: ``(units, n+1)`` gradient ``(g₀, g)`` of the loss being minimised.
        damping: ``λ ≥ 0``; the bias entry is damped too.
    Returns:
        The direction ``(Δw₀, Δw)``, ``(units, n+1)``.
    Raises:
        SingularFisherError: a block is singular (gives the smallest eigenvalue).
    """
    _check_fisher_input("natural_gradient", F, damping, grad=grad)
    return _from_fisher(F, grad, None, damping).natural


def uncorrected_update(F: Tensor, grad: Tensor, damping: float = 0.0) -> Tensor:
    r"""The natural gradient without the bias-shift correction (``b = 0``, ``s = c⁻¹``):
    ``(c⁻¹ g₀, A⁻¹ g)``."""
    _check_fisher_input("uncorrected_update", F, damping, grad=grad)
    return _from_fisher(F, grad, None, damping).uncorrected


def natural_gradient_correction(F: Tensor, grad: Tensor, damping: float = 0.0) -> Tensor:
    r"""Theorem 1's correction term: ``F⁻¹(g₀, g) − (c⁻¹g₀, A⁻¹g)``.

    Equals ``(s(g₀ − bᵀA⁻¹g) − c⁻¹g₀,  −Δw₀ A⁻¹b)``: what the interaction between the bias unit
    and the incoming units (``b ≠ 0``) changes in the update.
    """
    _check_fisher_input("natural_gradient_correction", F, damping, grad=grad)
    q = _from_fisher(F, grad, None, damping)
    return q.natural - q.uncorrected


def s_from_fisher(F: Tensor, damping: float = 0.0) -> Tensor:
    r"""Theorem 1: ``s = (c − bᵀA⁻¹b)⁻¹`` (the inverse Schur complement of ``A``), ``(units,)``."""
    _check_fisher_input("s_from_fisher", F, damping)
    zero = F.new_zeros(F.shape[:-1])
    return _from_fisher(F, zero, None, damping).s


def s_from_moments(E_p_delta2: Tensor, E_q_a: Tensor, Var_q_a: Tensor) -> Tensor:
    r"""Theorem 1: ``s = E_p(δ²)⁻¹ (1 + E_q(a)ᵀ Var_q(a)⁻¹ E_q(a))``."""
    _check_args("s_from_moments", E_p_delta2=(E_p_delta2, ("units",)),
                E_q_a=(E_q_a, ("units", "n")), Var_q_a=(Var_q_a, ("units", "n", "n")))
    x = _spd_solve(Var_q_a, E_q_a)
    return (1 + _dot(E_q_a, x)) / E_p_delta2


def k_from_fisher(F: Tensor, E_p_a: Tensor, damping: float = 0.0) -> Tensor:
    r"""Theorem 2's ``k`` from ``F``: ``k = s c (1 − E_p(a)ᵀ A⁻¹ b)``.

    With ``λ = 0`` this is the mixed form ``(1 − E_pᵀE_q(aaᵀ)⁻¹E_q)(1 − E_qᵀE_q(aaᵀ)⁻¹E_q)⁻¹``
    and equals ``1 + (E_q(a) − E_p(a))ᵀ Var_q(a)⁻¹ E_q(a)``.
    """
    _check_fisher_input("k_from_fisher", F, damping, E_p_a=E_p_a)
    zero = F.new_zeros(F.shape[:-1])
    q = _from_fisher(F, zero, E_p_a, damping)
    assert q.k is not None
    return q.k


def k_from_moments(E_p_a: Tensor, E_q_a: Tensor, Var_q_a: Tensor) -> Tensor:
    r"""Theorem 2: ``k = 1 + (E_q(a) − E_p(a))ᵀ Var_q(a)⁻¹ E_q(a)``."""
    _check_args("k_from_moments", E_p_a=(E_p_a, ("units", "n")), E_q_a=(E_q_a, ("units", "n")),
                Var_q_a=(Var_q_a, ("units", "n", "n")))
    return 1 + _dot(E_q_a - E_p_a, _spd_solve(Var_q_a, E_q_a))


def k_from_Cov(E_p_delta2: Tensor, Cov_p_delta2_a: Tensor, E_q_a: Tensor,
               Var_q_a: Tensor) -> Tensor:
    r"""Theorem 2: ``k = 1 + E_p(δ²)⁻¹ Cov_p(δ², a)ᵀ Var_q(a)⁻¹ E_q(a)``."""
    _check_args("k_from_Cov", E_p_delta2=(E_p_delta2, ("units",)),
                Cov_p_delta2_a=(Cov_p_delta2_a, ("units", "n")), E_q_a=(E_q_a, ("units", "n")),
                Var_q_a=(Var_q_a, ("units", "n", "n")))
    return 1 + _dot(Cov_p_delta2_a, _spd_solve(Var_q_a, E_q_a)) / E_p_delta2


def k_mixed(E_p_a: Tensor, E_q_a: Tensor, E_q_aa: Tensor) -> Tensor:
    r"""Appendix: ``k = (1 − E_p(a)ᵀE_q(aaᵀ)⁻¹E_q(a)) (1 − E_q(a)ᵀE_q(aaᵀ)⁻¹E_q(a))⁻¹``."""
    _check_args("k_mixed", E_p_a=(E_p_a, ("units", "n")), E_q_a=(E_q_a, ("units", "n")),
                E_q_aa=(E_q_aa, ("units", "n", "n")))
    x = _spd_solve(E_q_aa, E_q_a)
    return (1 - _dot(E_p_a, x)) / (1 - _dot(E_q_a, x))


def bias_shift(update: Tensor, E_p_a: Tensor) -> Tensor:
    r"""The bias shift (mean shift) of an update: ``Δw₀ + E_p(a)ᵀ Δw``.

    ``update`` is ``(units, n+1)`` with the bias at index 0; applied to the gradient itself it
    gives the plain-gradient (SGD direction) bias shift ``g₀ + E_p(a)ᵀ g``.
    """
    _check_bias_shift(update, E_p_a)
    return update[:, 0] + _dot(E_p_a, update[:, 1:])


def bias_shift_uncorrected(F: Tensor, grad: Tensor, E_p_a: Tensor,
                           damping: float = 0.0) -> Tensor:
    r"""Bias shift of the uncorrected natural gradient (``b = 0``): ``E_p(a)ᵀA⁻¹g + c⁻¹g₀``."""
    _check_fisher_input("bias_shift_uncorrected", F, damping, grad=grad, E_p_a=E_p_a)
    q = _from_fisher(F, grad, E_p_a, damping)
    assert q.bias_shift_uncorrected is not None
    return q.bias_shift_uncorrected


def bias_shift_natural(F: Tensor, grad: Tensor, E_p_a: Tensor, damping: float = 0.0) -> Tensor:
    r"""Bias shift of the unit natural gradient: ``Δw₀ + E_p(a)ᵀΔw``, ``(Δw₀, Δw) = F⁻¹grad``."""
    _check_fisher_input("bias_shift_natural", F, damping, grad=grad, E_p_a=E_p_a)
    q = _from_fisher(F, grad, E_p_a, damping)
    assert q.bias_shift_natural is not None
    return q.bias_shift_natural


@dataclass(frozen=True)
class Theorem2:
    r"""Theorem 2's decomposition of the natural gradient's bias shift, ``(units,)`` each.

    ``bias_shift = mean_term + bias_term`` with ``mean_term = (E_p(a) − k E_q(a))ᵀ A⁻¹ g``
    (the incoming mean corrected by ``−k E_q(a)``) and ``bias_term = k c⁻¹ g₀`` (the bias unit
    scaled by ``k``).  ``E_q_a`` is ``b / c`` (``b / (c + λ)`` with damping).
    """

    k: Tensor
    E_q_a: Tensor
    mean_term: Tensor
    bias_term: Tensor
    bias_shift: Tensor


def theorem2(F: Tensor, grad: Tensor, E_p_a: Tensor, damping: float = 0.0) -> Theorem2:
    r"""Theorem 2: the natural gradient's bias shift ``(E_p(a) − k E_q(a))ᵀA⁻¹g + k c⁻¹g₀``.

    ``bias_shift`` is that sum; compare it with :func:`bias_shift_natural` (the direct
    ``Δw₀ + E_p(a)ᵀΔw``) to check the theorem.
    """
    _check_fisher_input("theorem2", F, damping, grad=grad, E_p_a=E_p_a)
    q = _from_fisher(F, grad, E_p_a, damping)
    assert q.k is not None and q.mean_term is not None and q.bias_term is not None
    return Theorem2(k=q.k, E_q_a=q.E_q_a, mean_term=q.mean_term, bias_term=q.bias_term,
                    bias_shift=q.mean_term + q.bias_term)


def condition_number(F: Tensor, damping: float = 0.0) -> Tensor:
    """The 2-norm condition number ``λ_max / λ_min`` of ``F + λI`` per unit (``eigvalsh``)."""
    _check_fisher_input("condition_number", F, damping, bias=False)
    _check_damping(damping)
    if F.ndim != 3 or F.shape[-1] != F.shape[-2]:
        raise ValueError(f"F must be (units, m, m), got shape {tuple(F.shape)}")
    eig = torch.linalg.eigvalsh(F)
    return (eig[:, -1] + damping) / (eig[:, 0] + damping)


# --------------------------------------------------------------------------------------------
# Appendix
# --------------------------------------------------------------------------------------------

def _spd_solve(M: Tensor, v: Tensor) -> Tensor:
    """``M⁻¹ v`` for SPD ``M (units, n, n)`` and ``v (units, n)``; raises on singular ``M``."""
    solver = cholesky_solver(M)
    if bool(solver.bad.any()):
        _raise_singular(M, solver.bad, 0.0, what="(or its moment matrix)")
    return solver(v.unsqueeze(-1)).squeeze(-1)


def block_inverse(F: Tensor, damping: float = 0.0) -> Tensor:
    r"""Appendix: the inverse of ``[[c, bᵀ], [b, A]]`` by blocks (``s = (c − bᵀA⁻¹b)⁻¹``)::

        [[ s,          −s bᵀA⁻¹             ],
         [ −s A⁻¹b,    A⁻¹ + s A⁻¹b bᵀA⁻¹   ]]
    """
    _check_fisher_input("block_inverse", F, damping)
    blk = split_fisher(F, damping)
    solver = cholesky_solver(blk.A)
    n = blk.b.shape[-1]
    eye = torch.eye(n, dtype=F.dtype, device=F.device).expand(F.shape[0], n, n)
    Ainv = solver(eye)
    y_b = solver(blk.b.unsqueeze(-1)).squeeze(-1)
    schur = blk.c - _dot(blk.b, y_b)
    bad = solver.bad | ~(schur > (n + 1) * torch.finfo(F.dtype).eps * blk.c)
    if bool(bad.any()):
        Fd = F + damping * torch.eye(n + 1, dtype=F.dtype, device=F.device) if damping else F
        _raise_singular(Fd, bad, damping)
    s = 1.0 / schur
    out = torch.empty_like(F)
    out[:, 0, 0] = s
    out[:, 0, 1:] = -s.unsqueeze(-1) * y_b
    out[:, 1:, 0] = -s.unsqueeze(-1) * y_b
    out[:, 1:, 1:] = Ainv + s[:, None, None] * y_b.unsqueeze(-1) * y_b.unsqueeze(-2)
    return out


def quadratic_form_second_moment(E_a: Tensor, E_aa: Tensor) -> Tensor:
    r"""Appendix: ``E(a)ᵀ E(a aᵀ)⁻¹ E(a)`` (``< 1``)."""
    _check_args("quadratic_form_second_moment", E_a=(E_a, ("units", "n")),
                E_aa=(E_aa, ("units", "n", "n")))
    return _dot(E_a, _spd_solve(E_aa, E_a))


def quadratic_form_sherman_morrison(E_a: Tensor, Var_a: Tensor) -> Tensor:
    r"""Appendix (Sherman–Morrison): ``1 − 1 / (1 + E(a)ᵀ Var(a)⁻¹ E(a))``.

    Equals :func:`quadratic_form_second_moment` since ``E(aaᵀ) = Var(a) + E(a)E(a)ᵀ``.
    """
    _check_args("quadratic_form_sherman_morrison", E_a=(E_a, ("units", "n")),
                Var_a=(Var_a, ("units", "n", "n")))
    return 1 - 1 / (1 + _dot(E_a, _spd_solve(Var_a, E_a)))


# --------------------------------------------------------------------------------------------
# Theorem 1 in factored form: prepare once, apply to many gradients
# --------------------------------------------------------------------------------------------

FACTOR_FORMS = ("inverse", "cholesky")


@dataclass(frozen=True)
class NaturalGradientFactors:
    r"""Theorem 1's block form of ``(F + λI)⁻¹``, prepared for many gradients.

    With ``c = F₀₀ + λ``, ``b = F₁:,₀`` and ``A = F₁:,₁: + λI``::

        A⁻¹b,   s = (c − bᵀA⁻¹b)⁻¹,   and A⁻¹ itself (form "inverse") or L = chol(A)
        (form "cholesky"),

    so that :func:`apply_natural_gradient` gives ``Δw₀ = s (g₀ − (A⁻¹b)ᵀg)``,
    ``Δw = A⁻¹g − Δw₀ A⁻¹b`` with one batched vector-matrix product (``"inverse"``) or one
    batched Cholesky solve (:func:`cho_solve`, ``"cholesky"``) per call.  For blocks without a
    bias unit (``A_inv_b`` and ``s`` are ``None``) the direction is ``(A + λI)⁻¹ g``.

    Attributes:
        form: ``"inverse"`` (``factor`` is ``A⁻¹``) or ``"cholesky"`` (``factor`` is the lower
            Cholesky factor of ``A``), ``(units, n, n)``.
        factor: see ``form``.
        A_inv_b: ``A⁻¹b`` ``(units, n)``, or ``None`` without a bias unit.
        s: ``(c − bᵀA⁻¹b)⁻¹`` ``(units,)``, or ``None`` without a bias unit.
        bad: ``(units,)`` bool, blocks that are not numerically positive definite (a failed or
            near-zero Cholesky pivot, or a Schur complement ``c − bᵀA⁻¹b`` not above
            ``(n+1)·eps·c``).
    """

    form: str
    factor: Tensor
    A_inv_b: Tensor | None
    s: Tensor | None
    bad: Tensor

    @property
    def bias(self) -> bool:
        """Whether the blocks have a bias unit (index 0)."""
        return self.s is not None

    def solve_A(self, rhs: Tensor) -> Tensor:
        """``A⁻¹ rhs`` for ``rhs (units, n, r)``."""
        if self.form == "inverse":  # (rhsᵀ A⁻¹)ᵀ: A⁻¹ is symmetric and read by rows
            return torch.bmm(rhs.mT, self.factor).mT
        return cho_solve(rhs, self.factor)


def natural_gradient_factors(F: Tensor, damping: float = 0.0, *, bias: bool = True,
                             form: str = "inverse", check: bool = True,
                             overwrite: bool = False) -> NaturalGradientFactors:
    r"""Factor ``F + λI`` once for Theorem 1 (see :class:`NaturalGradientFactors`).

    Args:
        F: unit Fisher blocks ``(units, m, m)``: with ``bias=True`` ``m = n+1`` with the bias
            at index 0 (``m ≥ 2``); with ``bias=False`` the whole block is ``A`` (``m = n``).
            Only the lower triangle is read (the Cholesky factorisation's convention).
        damping: ``λ ≥ 0``; the bias entry is damped too (``c + λ``, ``A + λI``).
        bias: whether index 0 is a bias unit.
        form: ``"inverse"`` keeps ``A⁻¹`` (from ``cholesky_inverse``; each application is one
            batched vector-matrix product, the fast path on CPUs and GPUs alike) or
            ``"cholesky"`` keeps the factor (each application is a batched :func:`cho_solve`,
            two triangular solves; cheaper to refresh).
        check: raise :class:`SingularFisherError` when a block is singular (one host
            synchronisation); with ``False`` the caller inspects ``bad`` itself (the factors of
            the flagged blocks are those of the identity, ``A_inv_b``/``s`` are meaningless).
        overwrite: allow adding ``λ`` to ``F``'s diagonal in place (saves a copy of ``F``).
    Returns:
        The factors; ``apply_natural_gradient(factors, grad)`` equals
        ``natural_gradient(F, grad, damping)`` (with a bias) or ``(F + λI)⁻¹ grad`` (without).
    """
    _check_fisher_input("natural_gradient_factors", F, damping, bias=bias, values=check)
    if F.ndim != 3 or F.shape[-1] != F.shape[-2] or F.shape[-1] < (2 if bias else 1):
        raise ValueError(
            "F must be a batch of unit Fisher blocks (units, m, m)"
            + (" with the bias at index 0 (m = n+1 >= 2)" if bias else "")
            + f", got shape {tuple(F.shape)}"
        )
    _check_damping(damping)
    if form not in FACTOR_FORMS:
        raise ValueError(f"form must be one of {FACTOR_FORMS}, got {form!r}")
    if damping:
        F = F if overwrite else F.clone()
        F.diagonal(dim1=-2, dim2=-1).add_(damping)
    A = F[:, 1:, 1:] if bias else F
    chol = cholesky_solver(A)
    bad = chol.bad
    # singular blocks get the identity factor, so that every factor is finite and invertible
    L = chol.L.masked_fill_(bad[:, None, None], 0.0)
    L.diagonal(dim1=-2, dim2=-1).masked_fill_(bad.unsqueeze(-1), 1.0)
    factor = torch.cholesky_inverse(L) if form == "inverse" else L
    A_inv_b = s = None
    if bias:
        c, b = F[:, 0, 0], F[:, 1:, 0]
        if form == "inverse":  # bᵀA⁻¹ = (A⁻¹b)ᵀ: a vector-matrix product reads A⁻¹ by rows
            A_inv_b = torch.bmm(b.unsqueeze(1), factor).squeeze(1)
        else:
            A_inv_b = cho_solve(b.unsqueeze(-1), L).squeeze(-1)
        schur = c - _dot(b, A_inv_b)
        bad = bad | ~(schur > F.shape[-1] * torch.finfo(F.dtype).eps * c)
        s = 1.0 / schur
    if check and bool(bad.any()):
        _raise_singular(F, bad, damping)
    return NaturalGradientFactors(form=form, factor=factor, A_inv_b=A_inv_b, s=s, bad=bad)


def apply_natural_gradient(factors: NaturalGradientFactors, grad: Tensor) -> Tensor:
    r"""Theorem 1 with prepared factors: ``(F + λI)⁻¹ (g₀, g)`` for ``grad (units, m)``.

    ``Δw₀ = s (g₀ − (A⁻¹b)ᵀg)``, ``Δw = A⁻¹g − Δw₀ A⁻¹b`` (with a bias unit), else
    ``(A + λI)⁻¹ g``.  No host synchronisation.
    """
    _check_real("apply_natural_gradient", "grad", grad)
    m = factors.factor.shape[-1] + int(factors.bias)
    if grad.shape != (factors.factor.shape[0], m):
        raise ValueError(
            f"grad must be (units, {'n+1' if factors.bias else 'n'}) = "
            f"{(factors.factor.shape[0], m)}, got {tuple(grad.shape)}"
        )
    if not factors.bias:
        return factors.solve_A(grad.unsqueeze(-1)).squeeze(-1)
    assert factors.A_inv_b is not None and factors.s is not None
    g0, g = grad[:, 0], grad[:, 1:]
    y = factors.solve_A(g.unsqueeze(-1)).squeeze(-1)
    dw0 = factors.s * (g0 - _dot(factors.A_inv_b, g))
    dw = y - dw0.unsqueeze(-1) * factors.A_inv_b
    return torch.cat([dw0.unsqueeze(-1), dw], dim=-1)
