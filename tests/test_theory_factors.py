"""Theorem 1 in factored form (``natural_gradient_factors`` / ``apply_natural_gradient``) against
dense float64 solves and against ``theory.natural_gradient``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from biasshift import theory

F64 = torch.float64


def spd_blocks(units: int, m: int, samples: int, seed: int, *, bias: bool = True,
               dtype: torch.dtype = F64) -> torch.Tensor:
    """Empirical-Fisher-like blocks ``mean δ² ã ãᵀ`` (rank ``min(samples, m)``)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(units, samples, m, generator=g, dtype=F64) + 0.5
    if bias:
        a[..., 0] = 1.0
    d2 = torch.rand(units, samples, generator=g, dtype=F64) + 0.1
    return (torch.einsum("usi,us,usj->uij", a, d2, a) / samples).to(dtype)


def dense(F: torch.Tensor, grad: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(F.shape[-1], dtype=F.dtype)
    return torch.linalg.solve(F + damping * eye, grad.unsqueeze(-1)).squeeze(-1)


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max() / y.abs().max())


@pytest.mark.parametrize("form", theory.FACTOR_FORMS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_factors_equal_dense_solve(form: str, bias: bool, damping: float) -> None:
    F = spd_blocks(5, 7, 40, seed=1, bias=bias)
    g = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(2))
    fac = theory.natural_gradient_factors(F, damping, bias=bias, form=form)
    out = theory.apply_natural_gradient(fac, g)
    assert fac.bias is bias and not bool(fac.bad.any())
    assert rel_err(out, dense(F, g, damping)) < 1e-10
    if bias:
        assert rel_err(out, theory.natural_gradient(F, g, damping)) < 1e-10
        # the stored pieces are Theorem 1's: s and A⁻¹b
        blk = theory.split_fisher(F, damping)
        A_inv_b = torch.linalg.solve(blk.A, blk.b.unsqueeze(-1)).squeeze(-1)
        assert rel_err(fac.A_inv_b, A_inv_b) < 1e-10
        assert rel_err(fac.s, theory.s_from_fisher(F, damping)) < 1e-10
    else:
        assert fac.A_inv_b is None and fac.s is None


def test_factors_reused_for_many_gradients() -> None:
    F = spd_blocks(3, 4, 20, seed=3)
    fac = theory.natural_gradient_factors(F, 1e-3)
    for seed in range(3):
        g = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
        assert rel_err(theory.apply_natural_gradient(fac, g), dense(F, g, 1e-3)) < 1e-10


@settings(max_examples=40, deadline=None)
@given(units=st.integers(1, 4), n1=st.integers(2, 6), extra=st.integers(0, 10),
       damping=st.sampled_from([0.0, 1e-6, 1e-2, 1.0]), seed=st.integers(0, 2**31 - 1),
       form=st.sampled_from(theory.FACTOR_FORMS), bias=st.booleans())
def test_factors_identity_hypothesis(units: int, n1: int, extra: int, damping: float, seed: int,
                                     form: str, bias: bool) -> None:
    F = spd_blocks(units, n1, n1 + 2 + extra, seed, bias=bias)
    g = torch.randn(units, n1, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    fac = theory.natural_gradient_factors(F, damping, bias=bias, form=form)
    out = theory.apply_natural_gradient(fac, g)
    cond = float(theory.condition_number(F, damping).max())
    assert rel_err(out, dense(F, g, damping)) < 1e-13 * max(cond, 1.0) + 1e-12


def test_only_the_lower_triangle_is_read() -> None:
    F = spd_blocks(3, 6, 30, seed=12)
    G = F.tril() + 7.0 * torch.randn(3, 6, 6, dtype=F64).triu(1)
    g = torch.randn(3, 6, dtype=F64)
    for form in theory.FACTOR_FORMS:
        a = theory.apply_natural_gradient(theory.natural_gradient_factors(F, 1e-3, form=form), g)
        # check=False (the optimiser's path, which fills only the lower triangle): G is read as F
        b = theory.apply_natural_gradient(
            theory.natural_gradient_factors(G, 1e-3, form=form, check=False), g)
        assert torch.equal(a, b)
        # by default an asymmetric F is refused rather than silently read as another matrix
        with pytest.raises(ValueError, match=r"not symmetric.*lower triangle"):
            theory.natural_gradient_factors(G, 1e-3, form=form)


def test_overwrite_damps_in_place() -> None:
    F = spd_blocks(2, 4, 20, seed=13)
    G = F.clone()
    theory.natural_gradient_factors(G, 0.5)
    assert torch.equal(G, F)
    theory.natural_gradient_factors(G, 0.5, overwrite=True)
    assert torch.allclose(G, F + 0.5 * torch.eye(4, dtype=F64))


def test_float32_close_to_float64() -> None:
    F = spd_blocks(4, 6, 30, seed=4)
    g = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(5))
    ref = dense(F, g, 1e-2)
    for form in theory.FACTOR_FORMS:
        fac = theory.natural_gradient_factors(F.float(), 1e-2, form=form)
        assert fac.factor.dtype == torch.float32
        assert rel_err(theory.apply_natural_gradient(fac, g.float()).double(), ref) < 1e-4


def test_singular_block_raises_with_eigenvalue() -> None:
    F = spd_blocks(3, 6, 3, seed=6)  # 3 samples, 6 rows: rank 3
    with pytest.raises(theory.SingularFisherError, match=r"smallest eigenvalue.*damping") as err:
        theory.natural_gradient_factors(F, 0.0)
    assert err.value.units == [0, 1, 2]
    assert abs(err.value.smallest_eigenvalue) < 1e-10
    # damping makes it regular
    fac = theory.natural_gradient_factors(F, 1e-3)
    assert not bool(fac.bad.any())


def test_unchecked_flags_only_the_singular_blocks() -> None:
    F = spd_blocks(3, 5, 30, seed=7)
    F[1] = spd_blocks(1, 5, 2, seed=8)[0]  # rank 2
    for form in theory.FACTOR_FORMS:
        fac = theory.natural_gradient_factors(F, 0.0, form=form, check=False)
        assert fac.bad.tolist() == [False, True, False]
        assert bool(torch.isfinite(fac.factor).all())
        g = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(9))
        out = theory.apply_natural_gradient(fac, g)
        keep = torch.tensor([0, 2])
        assert rel_err(out[keep], dense(F[keep], g[keep], 0.0)) < 1e-10
    # a zero Schur complement (c = bᵀA⁻¹b) is flagged too
    a = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(10))
    A = a.T @ a
    b = A[:, 0]
    G = torch.zeros(1, 4, 4, dtype=F64)
    G[0, 1:, 1:] = A
    G[0, 1:, 0] = G[0, 0, 1:] = b
    G[0, 0, 0] = A[0, 0]  # the bias column equals the first weight column
    assert theory.natural_gradient_factors(G, 0.0, check=False).bad.tolist() == [True]


def test_bad_arguments() -> None:
    F = spd_blocks(2, 4, 10, seed=11)
    with pytest.raises(ValueError, match="damping"):
        theory.natural_gradient_factors(F, -1.0)
    with pytest.raises(ValueError, match="form"):
        theory.natural_gradient_factors(F, form="lu")
    with pytest.raises(ValueError, match=r"\(units, m, m\)"):
        theory.natural_gradient_factors(F[0])
    with pytest.raises(ValueError, match="bias at index 0"):
        theory.natural_gradient_factors(torch.ones(2, 1, 1, dtype=F64))
    # a 1x1 block without a bias is fine
    fac = theory.natural_gradient_factors(torch.full((2, 1, 1), 4.0, dtype=F64), bias=False)
    out = theory.apply_natural_gradient(fac, torch.ones(2, 1, dtype=F64))
    assert torch.allclose(out, torch.full((2, 1), 0.25, dtype=F64))
    fac = theory.natural_gradient_factors(F)
    with pytest.raises(ValueError, match=r"grad must be \(units, n\+1\)"):
        theory.apply_natural_gradient(fac, torch.ones(2, 3, dtype=F64))


@settings(max_examples=25, deadline=None)
@given(units=st.integers(1, 6), m=st.integers(1, 40), r=st.integers(1, 3),
       seed=st.integers(0, 2**16), f32=st.booleans())
def test_cho_solve_equals_cholesky_solve_and_dense(units: int, m: int, r: int, seed: int,
                                                   f32: bool) -> None:
    """``cho_solve`` (two triangular solves) against ``torch.cholesky_solve`` and a dense LU
    solve; on the CPU it takes the same two triangular solves, so the results are identical."""
    dtype = torch.float32 if f32 else F64
    A = spd_blocks(units, m, 3 * m + 2, seed=seed, bias=False) + 1e-3 * torch.eye(m, dtype=F64)
    g = torch.Generator().manual_seed(seed + 1)
    rhs = torch.randn(units, m, r, generator=g, dtype=F64)
    L = torch.linalg.cholesky(A.to(dtype))
    # upper-triangle garbage must not be read (the factors of block_solve keep it arbitrary)
    Lg = L + torch.ones_like(L).triu(1) * 7.0
    x = theory.cho_solve(rhs.to(dtype), Lg)
    assert torch.equal(x, torch.cholesky_solve(rhs.to(dtype), L))
    ref = torch.linalg.solve(A, rhs)
    tol = 1e-4 if f32 else 1e-10
    assert rel_err(x.to(F64), ref) < tol * float(torch.linalg.cond(A).max())


@pytest.mark.parametrize("shape", [(3, 5), (40, 129), (6, 512), (2, 3, 150)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_chunked_cholesky_ex_is_bit_identical(shape: tuple[int, ...], dtype: torch.dtype,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``theory.cholesky_ex`` (chunks of the batch on the CPU) gives torch's factor and info bit
    for bit, in torch's column-major layout, including the failed pivots of indefinite
    blocks; a tiny chunk size forces many chunks."""
    monkeypatch.setattr(theory, "CHOLESKY_CHUNK_BYTES", 4096)
    *batch, m = shape
    g = torch.Generator().manual_seed(m)
    X = torch.randn(*batch, m, m + 3, generator=g, dtype=F64)
    A = (X @ X.mT / m).to(dtype)
    A.reshape(-1, m, m)[1, m // 2, m // 2] = -1.0  # one indefinite block
    L, info = theory.cholesky_ex(A)
    L0, info0 = torch.linalg.cholesky_ex(A)
    assert torch.equal(info, info0) and int(info.reshape(-1)[1]) > 0
    ok = info0 == 0
    assert torch.equal(L[ok], L0[ok])
    assert L.shape == L0.shape and L.stride() == L0.stride()


@pytest.mark.parametrize("shape", [(3, 5), (40, 129), (6, 512), (2, 3, 150)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_lapack_cholesky_of_symmetric_blocks(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """``cholesky_ex(A, triangle="both")`` (scipy's LAPACK on the CPU) against torch's: the same
    factor to rounding, zeros above the diagonal, torch's column-major layout, the same
    ``info`` for an indefinite block, and ``A`` left as it was."""
    *batch, m = shape
    g = torch.Generator().manual_seed(m)
    X = torch.randn(*batch, m, m + 3, generator=g, dtype=F64)
    A = (X @ X.mT / m).to(dtype)
    A.reshape(-1, m, m)[1, m // 2, m // 2] = -1.0  # one indefinite block
    before = A.clone()
    L, info = theory.cholesky_ex(A, triangle="both")
    L0, info0 = torch.linalg.cholesky_ex(A)
    assert torch.equal(A, before)
    assert torch.equal(info, info0) and int(info.reshape(-1)[1]) > 0
    ok = info0 == 0
    # as accurate as torch's factor: both against the float64 factor of the same blocks
    R = torch.linalg.cholesky(A[ok].to(F64))
    err, err0 = (float((x[ok].to(F64) - R).abs().max()) for x in (L, L0))
    assert err <= 4 * err0 + 100 * m * 2.3e-16 * float(R.abs().max()), (err, err0)
    assert torch.equal(L.triu(1), torch.zeros_like(L))
    assert L.shape == L0.shape and L.stride() == L0.stride()
    # solves with it: the two-triangular-solve path reads the layout as torch's factor
    rhs = torch.randn(*batch, m, 2, generator=g, dtype=F64).to(dtype)
    x = theory.cho_solve(rhs[ok], L[ok])
    ref = torch.linalg.solve(A[ok].to(F64), rhs[ok].to(F64))
    assert rel_err(x.to(F64), ref) < (1e-2 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("lapack", [True, False])
def test_cholesky_of_the_upper_triangle(dtype: torch.dtype, lapack: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``triangle="upper"`` reads only the row-major upper triangle (NaN below is never read),
    through LAPACK or, without it (``lapack=False``: scipy missing, or another device), mirrored
    into torch's path; ``"lower"`` reads only the lower one; a bad ``triangle`` is refused."""
    if not lapack:
        monkeypatch.setattr(theory, "_lapack_cholesky", lambda *a, **k: None)
    g = torch.Generator().manual_seed(5)
    m = 40
    X = torch.randn(3, m, m + 5, generator=g, dtype=F64)
    A = X @ X.mT / m + torch.eye(m, dtype=F64)
    R = torch.linalg.cholesky(A)
    up = A.triu() + torch.full_like(A, float("nan")).tril(-1)
    low = A.tril() + torch.full_like(A, float("nan")).triu(1)
    for tri, M in (("upper", up), ("lower", low)):
        L, info = theory.cholesky_ex(M.to(dtype), triangle=tri)
        assert int(info.max()) == 0
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert float((L.to(F64) - R).abs().max()) < tol * float(R.abs().max()), tri
        assert torch.equal(L.triu(1), torch.zeros_like(L))
    with pytest.raises(ValueError, match="triangle must be one of"):
        theory.cholesky_ex(A, triangle="full")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("triangle", ["upper", "both"])
def test_unclean_factor_has_the_same_lower_triangle_and_solves(dtype: torch.dtype,
                                                              triangle: str) -> None:
    """``clean=False`` (LAPACK path) skips zeroing above the diagonal: the lower triangle (the
    factor) and every solve through :func:`cho_solve` are bit for bit those of the clean one."""
    g = torch.Generator().manual_seed(9)
    m = 33
    X = torch.randn(4, m, m + 5, generator=g, dtype=F64)
    A = (X @ X.mT / m + torch.eye(m, dtype=F64)).to(dtype)
    L, info = theory.cholesky_ex(A, triangle=triangle)
    Lu, infou = theory.cholesky_ex(A, triangle=triangle, clean=False)
    assert torch.equal(info, infou)
    assert torch.equal(L, Lu.tril())
    assert not torch.equal(Lu.triu(1), torch.zeros_like(Lu))  # really left unclean
    rhs = torch.randn(4, m, 3, generator=g, dtype=F64).to(dtype)
    assert torch.equal(theory.cho_solve(rhs, L), theory.cho_solve(rhs, Lu))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("clean", [True, False])
def test_lapack_cholesky_of_the_lower_triangle_is_row_major(dtype: torch.dtype,
                                                            clean: bool) -> None:
    """``triangle="lower", layout="any"`` on the CPU: LAPACK reads only the lower triangle (NaN
    above is never read), returns row-major factors equal to torch's to rounding, the same
    ``info`` for an indefinite block, and leaves ``A`` alone unless ``overwrite``."""
    g = torch.Generator().manual_seed(11)
    m = 37
    X = torch.randn(4, m, m + 5, generator=g, dtype=F64)
    A = X @ X.mT / m + torch.eye(m, dtype=F64)
    A[2, 5, 5] = -1.0  # indefinite
    low = (A.tril() + torch.full_like(A, float("nan")).triu(1)).to(dtype)
    before = low.clone()
    L, info = theory.cholesky_ex(low, triangle="lower", layout="any", clean=clean)
    L0, info0 = torch.linalg.cholesky_ex(A.to(dtype))
    assert torch.equal(low.isnan(), before.isnan()) and torch.equal(low.nan_to_num(),
                                                                   before.nan_to_num())
    assert L.is_contiguous() and torch.equal(info, info0) and int(info[2]) > 0
    ok = info0 == 0
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float((L[ok].tril() - L0[ok]).abs().max()) < tol * float(L0[ok].abs().max())
    if clean:
        assert torch.equal(L.triu(1), torch.zeros_like(L))
    rhs = torch.randn(4, m, 2, generator=g, dtype=F64).to(dtype)
    x = theory.cho_solve(rhs[ok], L[ok])
    ref = torch.linalg.solve(A[ok], rhs[ok].to(F64))
    assert rel_err(x.to(F64), ref) < (1e-3 if dtype == torch.float32 else 1e-9)
    # overwrite: the factor in A's own memory
    own = low.clone()
    L2, _ = theory.cholesky_ex(own, triangle="lower", layout="any", overwrite=True, clean=clean)
    assert L2.data_ptr() == own.data_ptr() and torch.equal(L2[ok].tril(), L[ok].tril())
    with pytest.raises(ValueError, match="layout must be"):
        theory.cholesky_ex(A, layout="row")
