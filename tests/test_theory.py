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


# ------------------------------------------------------------------- input checks (issue 13)
FROM_F = {  # every public function taking F, called with valid other arguments
    "natural_gradient": lambda F, g, e, d=0.0: theory.natural_gradient(F, g, d),
    "uncorrected_update": lambda F, g, e, d=0.0: theory.uncorrected_update(F, g, d),
    "natural_gradient_correction":
        lambda F, g, e, d=0.0: theory.natural_gradient_correction(F, g, d),
    "s_from_fisher": lambda F, g, e, d=0.0: theory.s_from_fisher(F, d),
    "k_from_fisher": lambda F, g, e, d=0.0: theory.k_from_fisher(F, e, d),
    "bias_shift_uncorrected": lambda F, g, e, d=0.0: theory.bias_shift_uncorrected(F, g, e, d),
    "bias_shift_natural": lambda F, g, e, d=0.0: theory.bias_shift_natural(F, g, e, d),
    "theorem2": lambda F, g, e, d=0.0: theory.theorem2(F, g, e, d),
    "condition_number": lambda F, g, e, d=0.0: theory.condition_number(F, d),
    "block_inverse": lambda F, g, e, d=0.0: theory.block_inverse(F, d),
    "natural_gradient_factors": lambda F, g, e, d=0.0: theory.natural_gradient_factors(F, d),
}


def _valid(units: int = 3, n: int = 4):
    a, _, F, grad = draw((5, units, n, True))
    return F, grad, a.mean(0).expand(units, n).clone()


@pytest.mark.parametrize("fn", sorted(FROM_F))
def test_asymmetric_fisher_is_refused_not_read_as_its_lower_triangle(fn: str) -> None:
    F, grad, E_p_a = _valid()
    G = F.clone()
    G[1, 0, 3] += 95.6  # upper triangle only: the lower-triangle solvers would ignore it
    with pytest.raises(ValueError, match=rf"{fn}: F is not symmetric in 1 unit\(s\) \(unit 1\)"
                                         r".*lower triangle.*\(F \+ F\.mT\) / 2"):
        FROM_F[fn](G, grad, E_p_a)
    # the symmetric matrix passes, and natural_gradient equals the dense solve of it
    FROM_F[fn](F, grad, E_p_a)
    close(theory.natural_gradient(F, grad), torch.linalg.solve(F, grad))


def test_condition_number_of_the_issues_triangular_matrix_is_refused() -> None:
    M = torch.tensor([[[1.0, 100.0], [0.0, 1.0]]], dtype=DT)
    with pytest.raises(ValueError, match="condition_number: F is not symmetric"):
        theory.condition_number(M)
    S = torch.tensor([[[51.0, 50.0], [50.0, 51.0]]], dtype=DT)  # eigenvalues 1 and 101
    close(theory.condition_number(S), torch.tensor([101.0], dtype=DT))


@settings(max_examples=30, deadline=None)
@given(sizes)
def test_rounding_level_asymmetry_of_a_float32_estimate_is_accepted(params) -> None:
    """A Fisher estimated in float32 by einsum/bmm is symmetric only to rounding: no false alarm."""
    a, d2, _, grad = draw(params)
    units, m = d2.shape
    at = torch.cat([torch.ones(units, m, 1, dtype=DT), a.expand(units, *a.shape[-2:])], -1)
    x = (d2.sqrt().unsqueeze(-1) * at).float()
    F32 = torch.bmm(x.mT, x) / m
    noise = torch.randn(F32.shape, generator=torch.Generator().manual_seed(params[0])).triu(1)
    F32 = F32 + 3e-5 * F32.abs().amax((-2, -1), keepdim=True) * noise  # rounding-level asymmetry
    nat = theory.natural_gradient(F32.double(), grad, damping=1e-3)
    assert bool(torch.isfinite(nat).all())
    theory.natural_gradient_factors(F32, 1e-3)


@pytest.mark.parametrize("fn", sorted(FROM_F))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_fisher_gives_a_clear_error_not_a_linalg_error(fn: str, bad: float) -> None:
    F, grad, E_p_a = _valid()
    F[2, 1, 1] = bad
    with pytest.raises(ValueError, match=rf"{fn}: F has NaN or inf entries in 1 unit\(s\) "
                                         r"\(unit 2\)") as err:
        FROM_F[fn](F, grad, E_p_a)
    assert not isinstance(err.value, torch.linalg.LinAlgError)


@pytest.mark.parametrize("damping", [float("inf"), float("nan"), -1e-3, True])
def test_infinite_or_invalid_damping_is_refused(damping) -> None:
    F, grad, E_p_a = _valid()
    for fn, call in FROM_F.items():
        with pytest.raises(ValueError, match="damping must be a finite float >= 0"):
            call(F, grad, E_p_a, damping)
        assert fn


def test_raise_singular_on_a_nonfinite_block_names_it_instead_of_failing_in_eigvalsh() -> None:
    F, _, _ = _valid()
    F[0, 0, 0] = float("nan")
    with pytest.raises(theory.SingularFisherError, match=r"layer 'fc1'.*unit 7\).*NaN or inf"):
        theory._raise_singular(F, torch.tensor([True, False, False]), 0.0, layer="fc1",
                               unit_offset=7)


@pytest.mark.parametrize("fn", sorted(FROM_F))
def test_integer_and_complex_fisher_are_refused(fn: str) -> None:
    F, grad, E_p_a = _valid()
    with pytest.raises(TypeError, match=rf"{fn}: F has dtype torch.int64.*F\.double\(\)"):
        FROM_F[fn](F.round().long(), grad, E_p_a)
    with pytest.raises(TypeError, match=rf"{fn}: F is complex"):
        FROM_F[fn](F.to(torch.complex128), grad, E_p_a)


def test_grad_and_E_p_a_must_match_exactly_never_broadcast() -> None:
    F, grad, E_p_a = _valid(units=3, n=4)
    with pytest.raises(TypeError, match="theorem2: grad is complex"):
        theory.theorem2(F, grad.to(torch.complex128), E_p_a)
    with pytest.raises(ValueError, match=r"natural_gradient: grad must be \(units, n\+1\) = "
                                         r"\(3, 5\).*got shape \(1, 5\).*never broadcast"):
        theory.natural_gradient(F, grad[:1])
    for wrong in (E_p_a[0], E_p_a[:1], E_p_a[:, :3], E_p_a.unsqueeze(0)):
        with pytest.raises(ValueError, match=r"E_p_a must be \(units, n\) = \(3, 4\)"):
            theory.theorem2(F, grad, wrong)
        with pytest.raises(ValueError, match=r"bias_shift: E_p_a must be \(units, n\) = \(3, 4\)"):
            theory.bias_shift(grad, wrong)  # was silently broadcast
    Eq, Var = theory.E_q(torch.randn(20, 4, dtype=DT), torch.rand(3, 20, dtype=DT) + 0.1), None
    Var = torch.eye(4, dtype=DT).expand(3, 4, 4)
    with pytest.raises(ValueError, match=r"k_from_moments: E_q_a must be \(units, n\) = \(1, 4\)"):
        theory.k_from_moments(E_p_a[:1], Eq, Var)  # (1, n) against 3 units
    with pytest.raises(ValueError, match=r"k_mixed: E_q_aa must be \(units, n, n\) = \(3, 4, 4\)"):
        theory.k_mixed(E_p_a, Eq, Var[:, :3, :3])
    with pytest.raises(ValueError, match=r"s_from_moments: E_q_a must be \(units, n\)"):
        theory.s_from_moments(torch.ones(3, dtype=DT), Eq[0], Var)
    with pytest.raises(ValueError, match=r"fisher_from_moments: E_q_aa must be"):
        theory.fisher_from_moments(torch.ones(3, dtype=DT), Eq, Var[:2])
    with pytest.raises(ValueError, match=r"E_q_from_Cov: cov must be \(units, n\)"):
        theory.E_q_from_Cov(E_p_a, torch.ones(3, dtype=DT), Eq[0])
    with pytest.raises(TypeError, match=r"quadratic_form_second_moment: E_aa has dtype"):
        theory.quadratic_form_second_moment(Eq, Var.long())
    # valid moments still agree with each other (the checks changed nothing else)
    close(theory.k_from_moments(E_p_a, Eq, Var),
          1 + ((Eq - E_p_a) * Eq).sum(-1))
