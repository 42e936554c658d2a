"""The GEMM-speed paths of the unit Fisher (issue 16): blocks written once into one output with
the mean's ``1/N`` folded into the factors, in-place accumulation, and the one-pass non-finite
flags.  Every result is checked against an independent computation (per-sample gradients by
``torch.func``, explicit outer products, ``isfinite``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from unit_fisher_reference import empirical_fisher, exact_categorical_fisher

from biasshift import UnitFisher
from biasshift.fisher.blocks import Source, WoodburySolver, pair_gram, true_gram
from biasshift.fisher.capture import nonfinite_flag

DT = torch.float64


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ELU(), nn.AvgPool2d(5), nn.Flatten(),
                         nn.Linear(4, 3)).double()


def lin_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), nn.ELU(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("net, shape", [(lin_net, (9, 6)), (conv_net, (7, 3, 5, 5))])
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_matrix_into_out_equals_per_sample_reference(net, shape, fisher) -> None:
    model = net()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g, dtype=DT)
    y = torch.randint(0, 3, (shape[0],), generator=g)
    # a tiny memory budget: many unit chunks, each written into its slice of the output
    uf = UnitFisher(model, layers=["0"], fisher=fisher, memory_budget=1)
    uf.accumulate(x[:4], y[:4])
    uf.accumulate(x[4:], y[4:])
    ref = (empirical_fisher(model, x, y, "0") if fisher == "empirical"
           else exact_categorical_fisher(model, x, "0"))
    out = torch.full_like(ref, float("nan"))  # stale contents must be overwritten
    got = uf.matrix("0", out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(uf.matrix("0"), ref, rtol=1e-10, atol=1e-12)


def test_matrix_out_is_checked() -> None:
    model = lin_net()
    uf = UnitFisher(model, layers=["0"])
    uf.accumulate(torch.randn(4, 6, dtype=DT), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"matrix\('0', out=...\).*\(5, 7, 7\)"):
        uf.matrix("0", out=torch.empty(5, 7, 6, dtype=DT))
    with pytest.raises(ValueError, match="float64"):
        uf.matrix("0", out=torch.empty(5, 7, 7, dtype=torch.float32))
    with pytest.raises(ValueError, match="units="):
        uf.matrix("0", [0, 1], out=torch.empty(5, 7, 7, dtype=DT))


def _brute_pair(X: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Σ_pairs (Σ_r δ_r²) ã ãᵀ by explicit outer products."""
    N, _, L, n1 = X.shape
    U = D.shape[-1]
    out = torch.zeros(U, n1, n1, dtype=X.dtype)
    for u in range(U):
        for i in range(N):
            for p in range(L):
                out[u] += D[i, :, p, u].square().sum() * torch.outer(X[i, 0, p], X[i, 0, p])
    return out


def _brute_true(X: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    N, n1 = X.shape[0], X.shape[-1]
    R, U = D.shape[1], D.shape[-1]
    out = torch.zeros(U, n1, n1, dtype=X.dtype)
    for u in range(U):
        for i in range(N):
            for r in range(R):
                gvec = (D[i, r, :, u, None] * X[i, 0]).sum(0)
                out[u] += torch.outer(gvec, gvec)
    return out


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 5), R=st.integers(1, 3), L=st.integers(1, 4), n1=st.integers(1, 6),
       U=st.integers(1, 4), scale=st.floats(1e-3, 10.0), budget=st.sampled_from([1, 10**9]),
       seed=st.integers(0, 2**16))
def test_grams_scale_out_and_accumulate(N, R, L, n1, U, scale, budget, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 1, L, n1, generator=g, dtype=DT)
    D = torch.randn(N, R, L, U, generator=g, dtype=DT)
    srcs = [Source(X, D), Source(X[: max(1, N - 1)], D[: max(1, N - 1)])]
    for fn, brute in ((pair_gram, _brute_pair), (true_gram, _brute_true)):
        ref = sum(brute(s.X, s.D) for s in srcs) * scale
        got = fn(srcs, 0, slice(None), dtype=DT, budget=budget, scale=scale)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        out = torch.full_like(ref, float("nan"))
        assert fn(srcs, 0, slice(None), dtype=DT, budget=budget, scale=scale,
                  out=out).data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        base = torch.randn(ref.shape, generator=g, dtype=DT)
        acc = base.clone()
        fn(srcs, 0, slice(None), dtype=DT, budget=budget, scale=scale, out=acc,
           accumulate=True)
        torch.testing.assert_close(acc, base + ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [pair_gram, true_gram])
@pytest.mark.parametrize("L", [1, 2])
def test_lower_grams_equal_the_full_grams_lower_triangle(fn, L, monkeypatch) -> None:
    """``lower=True`` computes the block lower triangle only (column blocks: 5/8 of the flops
    for n1 >= 384); it equals the full Gram there, also accumulated over chunks and sources
    and into ``out``; above it the result is zero (no ``out``) or untouched (``out``)."""
    import biasshift.fisher.blocks as blocks

    orig = blocks.column_blocks
    monkeypatch.setattr(blocks, "column_blocks", lambda n1, min_size=0: orig(n1, 8))
    g = torch.Generator().manual_seed(L)
    n1, U = 21, 3
    X = torch.randn(6, 1, L, n1, generator=g, dtype=DT)
    D = torch.randn(6, 2, L, U, generator=g, dtype=DT)
    srcs = [Source(X, D), Source(X[:4], D[:4])]
    full = fn(srcs, 0, slice(None), dtype=DT, budget=10**9, scale=0.5)
    for budget in (1, 10**9):
        low = fn(srcs, 0, slice(None), dtype=DT, budget=budget, scale=0.5, lower=True)
        cols = orig(n1, 8)
        assert len(cols) == 4
        mask = torch.zeros(n1, n1, dtype=torch.bool)
        for j0, j1 in cols:
            mask[j0:, j0:j1] = True
        assert mask[torch.ones(n1, n1).tril().bool()].all()  # covers the lower triangle
        torch.testing.assert_close(low[:, mask], full[:, mask], rtol=1e-12, atol=1e-12)
        assert torch.equal(low[:, ~mask], torch.zeros_like(low[:, ~mask]))
        out = torch.full_like(full, 7.0)
        fn(srcs, 0, slice(None), dtype=DT, budget=budget, scale=0.5, lower=True, out=out)
        torch.testing.assert_close(out[:, mask], full[:, mask], rtol=1e-12, atol=1e-12)
        assert bool((out[:, ~mask] == 7.0).all())


def test_report_with_lower_grams_equals_full_path() -> None:
    """``report()`` builds only the lower block triangle for its Cholesky solves (n1 >= 384
    here); every quantity equals the one from the full blocks (``matrix()`` + theory)."""
    from biasshift import theory

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(400, 4), nn.ELU(), nn.Linear(4, 3)).double()
    x = torch.randn(500, 400, dtype=DT)
    y = torch.randint(0, 3, (500,))
    uf = UnitFisher(model, layers=["0"])
    uf.accumulate(x, y)
    rep = uf.report(damping=1e-3, solver="cholesky", condition=True)
    F = uf.matrix("0", positions="pairs")
    g = uf.gradient("0")
    ref = theory.natural_gradient(F, g, 1e-3)
    nat = uf.natural_gradient("0", damping=1e-3, solver="cholesky")
    torch.testing.assert_close(nat, ref, rtol=1e-8, atol=1e-10)
    eig = torch.linalg.eigvalsh(F + 1e-3 * torch.eye(F.shape[-1], dtype=DT))
    torch.testing.assert_close(torch.as_tensor(rep["cond_F"].to_numpy().copy()),
                               eig[:, -1] / eig[:, 0], rtol=1e-8, atol=0)
    cos = (g * ref).sum(-1) / (g.norm(dim=-1) * ref.norm(dim=-1))
    torch.testing.assert_close(torch.as_tensor(rep["cos_grad_ng"].to_numpy().copy()), cos,
                               rtol=1e-8, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 50), where=st.integers(0, 49),
       value=st.sampled_from([0.0, 1e38, -3e38, math.inf, -math.inf, math.nan]),
       dtype=st.sampled_from([torch.float32, torch.float64]), strided=st.booleans())
def test_nonfinite_flag_equals_isfinite(n, where, value, dtype, strided) -> None:
    t = torch.randn(n, 3, dtype=dtype) * 1e30  # large finite entries: no false alarm
    if n:
        t[where % n, 1] = value
    if strided:
        t = t.T
    assert bool(nonfinite_flag(t)) == bool(~torch.isfinite(t).all())


def test_nonfinite_conv_input_is_flagged_zeroed_and_reset() -> None:
    model = conv_net()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 5, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    uf = UnitFisher(model, layers=["0"])
    bad = x.clone()
    bad[2, 1, 4, 4] = math.inf
    uf.accumulate(bad, y)
    st_ = uf._stores["0"]
    # nothing non-finite entered the stored factors or the running sums
    for t in (st_.sources[0].X, st_.sources[0].D, st_.sum_a, st_.sum_wa, st_.grad_sum):
        assert bool(torch.isfinite(t).all())
    with pytest.raises(FloatingPointError, match="non-finite activations"):
        uf.matrix("0")
    uf.reset()
    uf.accumulate(x, y)
    torch.testing.assert_close(uf.matrix("0"), empirical_fisher(model, x, y, "0"),
                               rtol=1e-10, atol=1e-12)


def test_woodbury_solver_against_dense_solve() -> None:
    g = torch.Generator().manual_seed(4)
    P, n, B, lam = 5, 9, 3, 0.3
    X = torch.randn(P, n, generator=g, dtype=DT)
    d = torch.rand(B, P, generator=g, dtype=DT)
    sol = WoodburySolver(X, X @ X.T, d, lam)
    rhs = torch.randn(B, n, 2, generator=g, dtype=DT)
    U = d.unsqueeze(-1) * X
    M = U.mT @ U + lam * torch.eye(n, dtype=DT)
    torch.testing.assert_close(sol(rhs), torch.linalg.solve(M, rhs), rtol=1e-10, atol=1e-12)
    assert not bool(sol.bad.any())
