"""UnitFisher against brute force: torch.func per-sample gradients, outer products, dense solves."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from unit_fisher_reference import (
    conv_pairs,
    empirical_fisher,
    exact_bernoulli_fisher,
    exact_categorical_fisher,
    exact_gaussian_fisher,
    per_sample_grads,
    unit_grads,
)

from biasshift import UnitFisher, theory
from biasshift.fisher import Categorical

DT = torch.float64


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol,
                               atol=rtol * max(scale, 1e-300))


def conv_net(seed: int = 0, *, bias: bool = True, classes: int = 3, **conv) -> nn.Sequential:
    torch.manual_seed(seed)
    c = nn.Conv2d(4, 6, 3, bias=bias, **conv)
    with torch.no_grad():
        h = c(torch.zeros(1, 4, 7, 7))
    return nn.Sequential(c, nn.ELU(), nn.Flatten(), nn.Linear(h.numel(), 5), nn.Tanh(),
                         nn.Linear(5, classes)).double()


def mlp(seed: int = 0, sizes=(6, 5, 4, 3), bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias or i == len(sizes) - 2))
        if i < len(sizes) - 2:
            layers.append(nn.ELU())
    return nn.Sequential(*layers).double()


def data(seed: int, n: int, shape, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=DT) + 0.3
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


CONV_CASES = {
    "stride2-pad1-dil2-groups2": dict(stride=2, padding=1, dilation=2, groups=2),
    "plain": {},
    "no-bias": dict(bias=False, padding=1),
    "same-reflect": dict(padding="same", padding_mode="reflect"),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matrix_equals_per_sample_gradient_outer_products(case: str) -> None:
    model = conv_net(**CONV_CASES[case])
    x, y = data(1, 9, (4, 7, 7))
    uf = UnitFisher(model)
    uf.accumulate(x[:4], y[:4])
    uf.accumulate(x[4:], y[4:])
    for layer in ("0", "3", "5"):
        ref = empirical_fisher(model, x, y, layer)
        F = uf.matrix(layer)
        assert F.shape == ref.shape
        close(F, ref)
    if "bias" in CONV_CASES[case]:
        assert uf.matrix("0").shape[-1] == 4 * 9  # no bias column


@pytest.mark.parametrize("case", ["stride2-pad1-dil2-groups2", "no-bias"])
def test_conv_pair_blocks_and_moments_treat_positions_as_samples(case: str) -> None:
    model = conv_net(**CONV_CASES[case])
    x, y = data(2, 5, (4, 7, 7))
    uf = UnitFisher(model)
    uf.accumulate(x, y)
    a, delta = conv_pairs(model, 0, x, y)  # (P, U, n1), (P, U)
    P = a.shape[0]
    ref = torch.einsum("pu,pui,puj->uij", delta**2, a, a) / P
    close(uf.matrix("0", positions="pairs"), ref)
    mom = uf.moments("0")
    assert mom.n_pairs == P and mom.n_samples == 5
    lo = 1 if model[0].bias is not None else 0
    close(mom.E_p_a, a[..., lo:].mean(0))
    close(mom.E_p_delta2, (delta**2).mean(0))
    w = delta**2
    close(mom.E_q_a, (w[..., None] * a[..., lo:]).sum(0) / w.sum(0)[:, None])
    close(mom.Cov_p_delta2_a,
          (w[..., None] * a[..., lo:]).mean(0) - w.mean(0)[:, None] * a[..., lo:].mean(0))


def test_linear_matrix_pairs_and_sum_coincide_and_match_brute_force() -> None:
    model = mlp()
    x, y = data(3, 11, (6,))
    uf = UnitFisher(model)
    uf.accumulate(x, y)
    for layer in ("0", "2", "4"):
        ref = empirical_fisher(model, x, y, layer)
        close(uf.matrix(layer), ref)
        close(uf.matrix(layer, positions="pairs"), ref)
    # unit selection: an int gives one block, a list keeps its order
    close(uf.matrix("2", 3), empirical_fisher(model, x, y, "2")[3])
    close(uf.matrix("2", [3, 0]), empirical_fisher(model, x, y, "2")[[3, 0]])
    close(uf.matrix("2", slice(1, 3)), empirical_fisher(model, x, y, "2")[1:3])


def test_linear_on_sequences_sums_positions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ELU(), nn.Flatten(), nn.Linear(15, 3)).double()
    x, y = data(4, 7, (3, 4))
    uf = UnitFisher(model)
    uf.accumulate(x, y)
    close(uf.matrix("0"), empirical_fisher(model, x, y, "0"))
    close(uf.matrix("3"), empirical_fisher(model, x, y, "3"))
    assert uf.moments("0").n_pairs == 21


def test_gradient_is_the_mean_nll_gradient() -> None:
    model = conv_net(**CONV_CASES["stride2-pad1-dil2-groups2"])
    x, y = data(5, 6, (4, 7, 7))
    uf = UnitFisher(model)
    uf.accumulate(x[:2], y[:2])
    uf.accumulate(x[2:], y[2:])
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for layer in ("0", "3"):
        m = model.get_submodule(layer)
        ref = torch.cat([m.bias.grad[:, None], m.weight.grad.reshape(m.weight.shape[0], -1)], 1)
        close(uf.gradient(layer), ref)


def test_exact_fisher_categorical() -> None:
    model = conv_net(**CONV_CASES["stride2-pad1-dil2-groups2"])
    x, y = data(6, 5, (4, 7, 7))
    uf = UnitFisher(model, fisher="exact")
    uf.accumulate(x, y)
    for layer in ("0", "5"):
        close(uf.matrix(layer), exact_categorical_fisher(model, x, layer))
    # the report's gradient still uses the given targets
    uf_e = UnitFisher(model)
    uf_e.accumulate(x, y)
    close(uf.gradient("3"), uf_e.gradient("3"))


def test_mc_fisher_replays_the_documented_sampler() -> None:
    model = mlp(1)
    x, y = data(7, 8, (6,))
    S = 3
    uf = UnitFisher(model, fisher="mc", mc_samples=S, seed=123)
    uf.accumulate(x[:5], y[:5])
    uf.accumulate(x[5:], y[5:])
    gen = torch.Generator().manual_seed(123)
    blocks = 0
    for xb in (x[:5], x[5:]):
        with torch.no_grad():
            ys = Categorical().sample(model(xb), S, gen)  # (S, N)
        for s in range(S):
            G = unit_grads(per_sample_grads(model, xb, ys[s]), "2")
            blocks = blocks + torch.einsum("nui,nuj->uij", G, G) / S
    close(uf.matrix("2"), blocks / 8)


def test_mc_fisher_converges_to_exact() -> None:
    # 4000 draws per input: the relative Frobenius error of the MC estimate is ~1/sqrt(4000)
    # times a constant of order 1; the stated tolerance is 6 %.
    model = mlp(2)
    x, y = data(8, 6, (6,))
    ex = UnitFisher(model, fisher="exact")
    ex.accumulate(x, y)
    mc = UnitFisher(model, fisher="mc", mc_samples=4000, seed=0)
    mc.accumulate(x, y)
    for layer in ("0", "2", "4"):
        E, M = ex.matrix(layer), mc.matrix(layer)
        rel = float((M - E).norm() / E.norm())
        assert rel < 0.06, (layer, rel)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_other_likelihoods(likelihood: str) -> None:
    model = mlp(3, sizes=(5, 4, 3))
    x, _ = data(9, 7, (5,))
    g = torch.Generator().manual_seed(1)
    y = torch.randn(7, 3, generator=g, dtype=DT)
    if likelihood == "bernoulli":
        y = (y > 0).to(DT)
    uf = UnitFisher(model, likelihood=likelihood)
    uf.accumulate(x, y)
    ex = UnitFisher(model, likelihood=likelihood, fisher="exact")
    ex.accumulate(x, y)
    exact_ref = exact_gaussian_fisher if likelihood == "gaussian" else exact_bernoulli_fisher
    for layer in ("0", "2"):
        close(uf.matrix(layer), empirical_fisher(model, x, y, layer, kind=likelihood))
        close(ex.matrix(layer), exact_ref(model, x, layer))


def test_in_place_activation_and_frozen_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ELU(inplace=True), nn.Linear(5, 4),
                          nn.ReLU(inplace=True), nn.Linear(4, 3)).double()
    model[0].requires_grad_(False)
    x, y = data(10, 9, (6,))
    uf = UnitFisher(model)
    uf.accumulate(x, y)
    model[0].requires_grad_(True)  # the reference differentiates every parameter
    for layer in ("0", "2", "4"):
        close(uf.matrix(layer), empirical_fisher(model, x, y, layer))


def test_batches_and_folding_give_the_same_statistics() -> None:
    model = conv_net(**CONV_CASES["stride2-pad1-dil2-groups2"])
    x, y = data(11, 40, (4, 7, 7))
    one = UnitFisher(model, dense_budget=0)
    one.accumulate(x, y)
    many = UnitFisher(model)  # folds into dense sums once the factors are larger
    for i in range(0, 40, 8):
        many.accumulate(x[i:i + 8], y[i:i + 8])
    assert not any(st.is_dense for st in one._stores.values())
    # conv: 396 factor numbers per sample vs 2·6·19² dense; Linear(5→3): 9 vs 3·6²;
    # Linear(54→5): 60 per sample vs 5·55², stays factored
    assert many._stores["0"].is_dense and many._stores["5"].is_dense
    assert not many._stores["3"].is_dense
    for layer in ("0", "3", "5"):
        for positions in ("sum", "pairs"):
            close(many.matrix(layer, positions=positions), one.matrix(layer, positions=positions))
        close(many.gradient(layer), one.gradient(layer))
    r1 = one.report(damping=1e-3)
    r2 = many.report(damping=1e-3)
    num = r1.select_dtypes("number").columns
    np.testing.assert_allclose(r2[num].to_numpy(), r1[num].to_numpy(), rtol=1e-8, atol=1e-12)


def _theory_reference(uf: UnitFisher, layer: str, damping: float):
    F = uf.matrix(layer, positions="pairs", dtype=DT)
    g = uf.gradient(layer)
    Ep = uf.moments(layer).E_p_a
    nat = torch.linalg.solve(F + damping * torch.eye(F.shape[-1], dtype=DT), g)
    t2 = theory.theorem2(F, g, Ep, damping)
    return F, g, Ep, nat, t2


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_report_matches_theory_on_the_pair_blocks(damping: float) -> None:
    model = conv_net(**CONV_CASES["stride2-pad1-dil2-groups2"])
    x, y = data(12, 70, (4, 7, 7))  # 70 samples > 55 rows of the Linear(54→5) blocks
    uf = UnitFisher(model)
    uf.accumulate(x, y)
    df = uf.report(damping=damping)
    assert set(df.layer) == {"0", "3", "5"}
    for layer in ("0", "3", "5"):
        F, g, Ep, nat, t2 = _theory_reference(uf, layer, damping)
        r = df[df.layer == layer]
        assert list(r.unit) == list(range(F.shape[0]))

        def col(c: str, r=r) -> torch.Tensor:
            return torch.tensor(r[c].to_numpy(), dtype=DT)

        close(col("k"), t2.k)
        close(col("bias_shift_ng"), nat[:, 0] + (Ep * nat[:, 1:]).sum(-1))
        close(col("ng_mean_term") + col("ng_bias_term"), col("bias_shift_ng"))
        close(col("bias_shift_sgd"), theory.bias_shift(g, Ep))
        close(col("bias_shift_ng_uncorrected"), theory.bias_shift_uncorrected(F, g, Ep, damping))
        close(col("s"), theory.s_from_fisher(F, damping))
        cos = (g * nat).sum(-1) / (g.norm(dim=-1) * nat.norm(dim=-1))
        close(col("cos_grad_ng"), cos)
        close(col("cond_F"), theory.condition_number(F, damping), rtol=1e-7)
        close(col("E_p_delta2"), F[:, 0, 0])
        close(col("norm_E_q_a"), (F[:, 1:, 0] / F[:, :1, 0]).norm(dim=-1))
        close(col("norm_E_p_a"), Ep.norm(dim=-1))
        close(uf.natural_gradient(layer, damping=damping), nat)


def test_woodbury_and_dense_paths_agree() -> None:
    # 6 samples: Linear(150→5) has 6 pairs < 151 rows, the conv layer 6·25 = 150 pairs > 37 rows
    model = conv_net()
    x, y = data(13, 6, (4, 7, 7))
    uf = UnitFisher(model)
    uf.accumulate(x, y)
    auto = uf.report(damping=1e-2)
    assert set(auto[auto.layer == "3"].solver) == {"woodbury"}
    assert set(auto[auto.layer == "0"].solver) == {"cholesky"}
    dense = uf.report(damping=1e-2, solver="cholesky")
    wood = uf.report(damping=1e-2, layers=["3"], solver="woodbury")
    num = [c for c in dense.select_dtypes("number").columns]
    d3 = dense[dense.layer == "3"][num].to_numpy()
    np.testing.assert_allclose(wood[num].to_numpy(), d3, rtol=1e-9, atol=1e-12)
    close(uf.natural_gradient("3", damping=1e-2, solver="woodbury"),
          uf.natural_gradient("3", damping=1e-2, solver="cholesky"))
    # a layer without bias goes through the same solvers
    nb = conv_net(bias=False)
    ufb = UnitFisher(nb, layers=["0"])
    ufb.accumulate(x[:2], y[:2])  # 2·25 = 50 pairs > 36 rows: the Cholesky path
    close(ufb.natural_gradient("0", damping=1e-2),
          torch.linalg.solve(ufb.matrix("0", positions="pairs") + 1e-2 * torch.eye(36, dtype=DT),
                             ufb.gradient("0")))


def test_report_gradient_and_mean_overrides() -> None:
    model = mlp(4)
    x, y = data(14, 30, (6,))
    uf = UnitFisher(model, layers=["2"])
    uf.accumulate(x, y)
    g = torch.randn(4, 6, dtype=DT)
    mean = torch.randn(5, dtype=DT)
    df = uf.report(gradients={"2": g}, activation_means={"2": mean})
    F = uf.matrix("2", positions="pairs")
    Ep = mean.expand(4, 5)
    close(torch.tensor(df.bias_shift_ng.to_numpy()), theory.bias_shift_natural(F, g, Ep))
    close(torch.tensor(df.bias_shift_sgd.to_numpy()), theory.bias_shift(g, Ep))
    close(torch.tensor(df.k.to_numpy()), theory.k_from_fisher(F, Ep))


def test_float32_model_accumulates_in_float32(device: torch.device) -> None:
    model = mlp(5).float().to(device)
    x, y = data(15, 20, (6,))
    uf = UnitFisher(model)
    uf.accumulate(x.float().to(device), y.to(device))
    assert uf.dtype == torch.float32
    F = uf.matrix("2")
    assert F.dtype == torch.float32 and F.device.type == device.type
    ref = empirical_fisher(model.double().cpu(), x, y, "2")
    torch.testing.assert_close(F.double().cpu(), ref, rtol=1e-4, atol=1e-6)
    df = uf.report(damping=1e-3)  # float64 report from float32 statistics
    assert np.isfinite(df.select_dtypes("number").to_numpy()).all()


def test_device_matches_brute_force(device: torch.device) -> None:
    model = conv_net(**CONV_CASES["stride2-pad1-dil2-groups2"]).to(device)
    x, y = data(16, 5, (4, 7, 7))
    x, y = x.to(device), y.to(device)
    uf = UnitFisher(model, fisher="exact")
    uf.accumulate(x, y)
    close(uf.matrix("0"), exact_categorical_fisher(model, x, "0"))
    r = uf.report(damping=1e-3)
    assert len(r) == 6 + 5 + 3


@pytest.mark.data
def test_paper_mlp_on_real_mnist(real_data_root) -> None:
    from biasshift.data import load_dataset
    from biasshift.models import paper_mlp

    ds = load_dataset("mnist", data_dir=real_data_root, download=False).subset(256, 16)
    torch.manual_seed(0)
    model = paper_mlp("elu", depth=2, width=16).double()
    x, y = ds.train_x.double(), ds.train_y
    uf = UnitFisher(model, layers=["fc2"])
    uf.accumulate(x, y)
    close(uf.matrix("fc2"), empirical_fisher(model, x, y, "fc2"))
    df = uf.report(damping=1e-4)
    assert len(df) == 16 and np.isfinite(df.k).all()


@pytest.mark.cuda
@pytest.mark.parametrize("fisher", ["empirical", "mc", "exact"])
def test_accumulate_does_not_synchronise_on_cuda(fisher: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    model = conv_net(**CONV_CASES["stride2-pad1-dil2-groups2"]).float().cuda()
    x, y = data(17, 16, (4, 7, 7))
    x, y = x.float().cuda(), y.cuda()
    uf = UnitFisher(model, fisher=fisher, seed=0 if fisher == "mc" else None)
    uf.accumulate(x, y)  # the first call creates the generator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # dense running sums after the first call
            uf.accumulate(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert uf._stores["0"].is_dense
    ref = UnitFisher(model.double().cpu(), fisher="exact") if fisher == "exact" else None
    if ref is not None:
        ref.accumulate(x.double().cpu(), y.cpu())
        torch.testing.assert_close(uf.matrix("0").double().cpu(), ref.matrix("0"),
                                   rtol=1e-4, atol=1e-7)
