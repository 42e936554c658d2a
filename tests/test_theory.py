"""Section 2 of the ELU paper: every formula in biasshift.theory against dense float64 algebra.

Hypothesis draws the sizes and a seed; the samples come from a seeded torch generator, so every
example is reproducible.  Identities are checked to 1e-9 relative in float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from biasshift import theory

DT = torch.float64
RTOL = 1e-9


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-300))


def samples(seed: int, units: int, n: int, m: int, shared: bool = True):
    """Incoming activations a and δ² for ``units`` units: a with non-zero means, δ² > 0."""
    g = torch.Generator().manual_seed(seed)
    shape = (m, n) if shared else (units, m, n)
    mu = torch.randn(n, generator=g, dtype=DT) * 1.5
    a = torch.randn(shape, generator=g, dtype=DT) + mu
    # δ² correlated with the activations (Cov_p(δ², a) ≠ 0) and bounded away from 0
    base = a if not shared else a.expand(units, m, n)
    lin = torch.randn(units, 1, n, generator=g, dtype=DT)
    delta2 = 0.1 + torch.sigmoid((base * lin).sum(-1)) * torch.rand(units, m, generator=g,
                                                                     dtype=DT) * 2
    return a, delta2


def brute_fisher(a: torch.Tensor, delta2: torch.Tensor) -> torch.Tensor:
    """E_p(δ² ã ãᵀ) by an explicit sum of outer products."""
    units, m = delta2.shape
    a = a.expand(units, *a.shape[-2:]) if a.ndim == 2 else a
    at = torch.cat([torch.ones(units, m, 1, dtype=DT), a], dim=-1)
    return torch.einsum("um,umi,umj->uij", delta2, at, at) / m


sizes = st.tuples(
    st.integers(min_value=0, max_value=2**31 - 1),  # seed
    st.integers(min_value=1, max_value=4),          # units
    st.integers(min_value=1, max_value=7),          # n
    st.booleans(),                                  # shared activations
)


def draw(params):
    seed, units, n, shared = params
    m = 4 * (n + 1) + 5
    a, d2 = samples(seed, units, n, m, shared)
    g = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(units, n + 1, generator=g, dtype=DT)
    F = brute_fisher(a, d2)
    return a, d2, F, grad


@settings(max_examples=40, deadline=None)
@given(sizes)
def test_moments_assemble_the_fisher(params) -> None:
    a, d2, F, _ = draw(params)
    Ep_d2 = d2.mean(-1)
    F2 = theory.fisher_from_moments(Ep_d2, theory.E_q(a, d2), theory.E_q_outer(a, d2))
    close(F2, F)
    c, Eq, Eqaa = theory.moments_from_fisher(F)
    close(c, Ep_d2)
    close(Eq, theory.E_q(a, d2))
    close(Eqaa, theory.E_q_outer(a, d2))
    blk = theory.fisher_blocks(Ep_d2, Eq, Eqaa)
    sp = theory.split_fisher(F)
    close(blk.c, sp.c)
    close(blk.b, sp.b)
    close(blk.A, sp.A)
    # E_q(a) = E_p(a) + Cov_p(δ², a) / E_p(δ²)
    Ep_a = a.mean(-2).expand_as(Eq)
    close(theory.E_q_from_Cov(Ep_a, Ep_d2, theory.Cov_p(d2, a)), Eq)
    # Var_q by brute force
    units = d2.shape[0]
    aa = a.expand(units, *a.shape[-2:]) if a.ndim == 2 else a
    q = d2 / d2.sum(-1, keepdim=True)
    cen = aa - Eq.unsqueeze(1)
    close(theory.Var_q(a, d2), torch.einsum("um,umi,umj->uij", q, cen, cen))


@settings(max_examples=40, deadline=None)
@given(sizes, st.sampled_from([0.0, 1e-3, 0.7]))
def test_theorem1_natural_gradient_equals_dense_solve(params, damping: float) -> None:
    _, _, F, grad = draw(params)
    n1 = F.shape[-1]
    Fd = F + damping * torch.eye(n1, dtype=DT)
    ref = torch.linalg.solve(Fd, grad)
    close(theory.natural_gradient(F, grad, damping=damping), ref)
    # the correction term is what b ≠ 0 changes relative to (c⁻¹g₀, A⁻¹g)
    unc = torch.cat([(grad[:, 0] / Fd[:, 0, 0])[:, None],
                     torch.linalg.solve(Fd[:, 1:, 1:], grad[:, 1:])], dim=1)
    close(theory.uncorrected_update(F, grad, damping), unc)
    close(theory.natural_gradient_correction(F, grad, damping), ref - unc)
    # s = (c − bᵀA⁻¹b)⁻¹ = [F⁻¹]₀₀
    close(theory.s_from_fisher(F, damping), torch.linalg.inv(Fd)[:, 0, 0])


@settings(max_examples=40, deadline=None)
@given(sizes)
def test_theorem1_s_from_moments(params) -> None:
    a, d2, F, _ = draw(params)
    s = theory.s_from_moments(d2.mean(-1), theory.E_q(a, d2), theory.Var_q(a, d2))
    close(s, theory.s_from_fisher(F))


@settings(max_examples=40, deadline=None)
@given(sizes, st.sampled_from([0.0, 1e-3, 0.7]))
def test_theorem2_decomposition_equals_direct_bias_shift(params, damping: float) -> None:
    a, _, F, grad = draw(params)
    units = F.shape[0]
    Ep_a = a.mean(-2).expand(units, F.shape[-1] - 1)
    nat = torch.linalg.solve(F + damping * torch.eye(F.shape[-1], dtype=DT), grad)
    direct = nat[:, 0] + (Ep_a * nat[:, 1:]).sum(-1)
    t2 = theory.theorem2(F, grad, Ep_a, damping)
    close(t2.bias_shift, direct)
    close(t2.mean_term + t2.bias_term, direct)
    close(theory.bias_shift_natural(F, grad, Ep_a, damping), direct)
    close(theory.bias_shift(nat, Ep_a), direct)
    # uncorrected: E_p(a)ᵀA⁻¹g + c⁻¹g₀ (with the damped blocks)
    Fd = F + damping * torch.eye(F.shape[-1], dtype=DT)
    unc = (Ep_a * torch.linalg.solve(Fd[:, 1:, 1:], grad[:, 1:])).sum(-1) + grad[:, 0] / Fd[:, 0, 0]
    close(theory.bias_shift_uncorrected(F, grad, Ep_a, damping), unc)


@settings(max_examples=40, deadline=None)
@given(sizes)
def test_all_forms_of_k_agree(params) -> None:
    a, d2, F, _ = draw(params)
    units = F.shape[0]
    Ep_a = a.mean(-2).expand(units, F.shape[-1] - 1)
    Eq, Var, Eqaa = theory.E_q(a, d2), theory.Var_q(a, d2), theory.E_q_outer(a, d2)
    k1 = theory.k_from_moments(Ep_a, Eq, Var)
    close(theory.k_from_Cov(d2.mean(-1), theory.Cov_p(d2, a), Eq, Var), k1)
    close(theory.k_mixed(Ep_a, Eq, Eqaa), k1)
    close(theory.k_from_fisher(F, Ep_a), k1)
    close(theory.theorem2(F, torch.zeros(units, F.shape[-1], dtype=DT), Ep_a).k, k1)


def test_k_is_one_when_E_q_is_zero() -> None:
    # E_q(a) = 0: no correction (k = 1), whatever E_p(a) is.
    g = torch.Generator().manual_seed(3)
    n = 3
    A = torch.randn(n, n, generator=g, dtype=DT)
    Eqaa = (A @ A.T + torch.eye(n, dtype=DT))[None]
    Eq = torch.zeros(1, n, dtype=DT)
    Ep = torch.randn(1, n, generator=g, dtype=DT)
    close(theory.k_mixed(Ep, Eq, Eqaa), torch.ones(1, dtype=DT))
    close(theory.k_from_moments(Ep, Eq, Eqaa), torch.ones(1, dtype=DT))


@settings(max_examples=40, deadline=None)
@given(sizes)
def test_appendix_identities(params) -> None:
    a, _, F, _ = draw(params)
    # Sherman–Morrison: E(a)ᵀE(aaᵀ)⁻¹E(a) = 1 − 1/(1 + E(a)ᵀVar(a)⁻¹E(a)) < 1 (uniform weights)
    units = F.shape[0]
    ones = torch.ones(units, a.shape[-2], dtype=DT)
    E, Eaa, Var = theory.E_q(a, ones), theory.E_q_outer(a, ones), theory.Var_q(a, ones)
    lhs = theory.quadratic_form_second_moment(E, Eaa)
    close(lhs, theory.quadratic_form_sherman_morrison(E, Var))
    assert bool((lhs < 1).all())
    # block inverse
    for damping in (0.0, 0.3):
        Fd = F + damping * torch.eye(F.shape[-1], dtype=DT)
        close(theory.block_inverse(F, damping), torch.linalg.inv(Fd))


def test_condition_number_and_conventions() -> None:
    _, _, F, grad = draw((7, 2, 3, True))
    eig = torch.linalg.eigvalsh(F)
    close(theory.condition_number(F), eig[:, -1] / eig[:, 0])
    close(theory.condition_number(F, 0.5), (eig[:, -1] + 0.5) / (eig[:, 0] + 0.5))
    # the natural gradient of a descent direction is a descent direction (F is SPD)
    nat = theory.natural_gradient(F, grad)
    assert bool(((nat * grad).sum(-1) > 0).all())


def test_singular_fisher_without_damping_raises_with_eigenvalue_and_hint() -> None:
    # fewer samples than n + 1: the block is singular
    a, d2 = samples(0, 2, 5, 3)
    F = brute_fisher(a, d2)
    grad = torch.ones(2, 6, dtype=DT)
    with pytest.raises(theory.SingularFisherError) as err:
        theory.natural_gradient(F, grad)
    msg = str(err.value)
    assert "smallest eigenvalue" in msg and "damping" in msg
    assert err.value.smallest_eigenvalue < 1e-10
    assert isinstance(err.value, ValueError)
    assert isinstance(err.value, torch.linalg.LinAlgError)
    # damping makes it solvable, and equals the dense damped solve
    nat = theory.natural_gradient(F, grad, damping=1e-2)
    close(nat, torch.linalg.solve(F + 1e-2 * torch.eye(6, dtype=DT), grad))
    # a unit with δ ≡ 0 has F = 0
    with pytest.raises(theory.SingularFisherError):
        theory.s_from_fisher(torch.zeros(1, 3, 3, dtype=DT))


def test_bad_arguments() -> None:
    _, _, F, grad = draw((1, 2, 3, True))
    with pytest.raises(ValueError, match="damping"):
        theory.natural_gradient(F, grad, damping=-1.0)
    with pytest.raises(ValueError, match=r"\(units, n\+1\)"):
        theory.natural_gradient(F, grad[:, :-1])
    with pytest.raises(ValueError, match="units, n\\+1, n\\+1"):
        theory.natural_gradient(F[0], grad)
    with pytest.raises(ValueError, match="E_p_a"):
        theory.theorem2(F, grad, torch.zeros(2, 5, dtype=DT))
    with pytest.raises(ValueError, match="delta2"):
        theory.E_q(torch.zeros(4, 3), torch.zeros(4))


def test_float32_matches_float64_loosely() -> None:
    _, _, F, grad = draw((11, 3, 4, False))
    nat64 = theory.natural_gradient(F, grad)
    nat32 = theory.natural_gradient(F.float(), grad.float())
    torch.testing.assert_close(nat32.double(), nat64, rtol=1e-3, atol=1e-3)


def test_mixed_precision_inputs_are_promoted() -> None:
    """A float32 F (e.g. UnitFisher.matrix) with a float64 gradient works in float64."""
    torch.manual_seed(0)
    X = torch.randn(3, 40, 5, dtype=torch.float64)
    F64 = X.mT @ X / 40
    g = torch.randn(3, 5, dtype=torch.float64)
    E_p_a = torch.randn(3, 4, dtype=torch.float32)
    F32 = F64.float()
    out = theory.natural_gradient(F32, g, damping=1e-3)
    assert out.dtype == torch.float64
    ref = torch.linalg.solve(F32.double() + 1e-3 * torch.eye(5, dtype=torch.float64), g)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    t2 = theory.theorem2(F32, g, E_p_a)
    assert t2.bias_shift.dtype == torch.float64
