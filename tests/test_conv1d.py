"""nn.Conv1d through its layer adapter: UnitFisher's blocks and moments against torch.func
per-sample gradients and Jacobians, and BiasShiftProbe's quantities against brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev
from unit_fisher_reference import empirical_fisher, log_lik

from biasshift import BiasShiftProbe, UnitFisher
from biasshift.fisher.capture import ADAPTERS, SUPPORTED_LAYERS, Conv1dAdapter, resolve_layers

DT = torch.float64
CASES = {
    "plain": {},
    "stride2-pad1-dil2-groups2": dict(stride=2, padding=1, dilation=2, groups=2),
    "same-reflect": dict(padding="same", padding_mode="reflect"),
    "no-bias": dict(bias=False, padding=1),
}


def net(seed: int = 0, **conv) -> nn.Sequential:
    torch.manual_seed(seed)
    c = nn.Conv1d(4, 6, 3, **conv)
    with torch.no_grad():
        h = c(torch.zeros(1, 4, 9))
    return nn.Sequential(c, nn.ELU(), nn.Flatten(), nn.Linear(h.numel(), 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 9, generator=g, dtype=DT) + 0.3,
            torch.randint(0, 3, (n,), generator=g))


def pairs(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """Incoming ã per pair and unit (N·L, U, n1) from the Jacobian of the conv w.r.t. its
    weight, and δ per pair (N·L, U) by autograd."""
    conv = model[0]
    W = conv.weight.detach()
    J = jacrev(lambda w: conv._conv_forward(x, w, None))(W)  # (N, U, L, U, Cg, k)
    N, U, L = J.shape[:3]
    idx = torch.arange(U)
    a = J[:, idx, :, idx].reshape(U, N, L, -1).permute(1, 2, 0, 3).reshape(N * L, U, -1)
    if conv.bias is not None:
        a = torch.cat([torch.ones_like(a[..., :1]), a], -1)
    z = conv(x).detach().requires_grad_()
    out = z
    for m in list(model)[1:]:
        out = m(out)
    ll = sum(log_lik("categorical", out[i], y[i]) for i in range(N))
    (dz,) = torch.autograd.grad(ll, z)
    return a, dz.permute(0, 2, 1).reshape(N * L, U)


def test_conv1d_is_one_registered_adapter() -> None:
    assert isinstance(ADAPTERS["conv1d"], Conv1dAdapter) and nn.Conv1d in SUPPORTED_LAYERS
    spec = resolve_layers(net(**CASES["stride2-pad1-dil2-groups2"]))["0"]
    assert (spec.kind, spec.units, spec.groups, spec.n, spec.n1) == ("conv1d", 6, 2, 6, 7)
    with pytest.raises(ValueError, match=r"Conv1d input of shape \(4, 9\).*\(N, C, L\)"):
        spec.adapter.check_input(spec, torch.zeros(4, 9))


@pytest.mark.parametrize("case", list(CASES))
def test_conv1d_true_blocks_equal_per_sample_gradient_outer_products(case: str) -> None:
    model = net(**CASES[case])
    x, y = data(1, 7)
    uf = UnitFisher(model)
    uf.accumulate(x[:3], y[:3])
    uf.accumulate(x[3:], y[3:])
    ref = empirical_fisher(model, x, y, "0")  # torch.func per-sample gradients
    torch.testing.assert_close(uf.matrix("0"), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["stride2-pad1-dil2-groups2", "same-reflect"])
def test_conv1d_pair_blocks_and_moments(case: str) -> None:
    model = net(**CASES[case])
    x, y = data(2, 5)
    uf = UnitFisher(model)
    uf.accumulate(x, y)
    a, delta = pairs(model, x, y)
    P = a.shape[0]
    ref = torch.einsum("pu,pui,puj->uij", delta**2, a, a) / P
    torch.testing.assert_close(uf.matrix("0", positions="pairs"), ref, rtol=1e-9, atol=1e-12)
    mom = uf.moments("0")
    torch.testing.assert_close(mom.E_p_a, a[..., 1:].mean(0), rtol=1e-9, atol=1e-12)


def test_bias_shift_probe_on_conv1d_matches_dense_solves() -> None:
    """The probe's natural-gradient quantities on a Conv1d layer against dense solves of the
    torch.func pair blocks (exact Fisher = Σ over classes, here: empirical with one target)."""
    model = net(**CASES["stride2-pad1-dil2-groups2"])
    x, y = data(3, 12)
    probe = BiasShiftProbe(model, x, y, fisher="empirical", damping=1e-2, condition=True)
    assert "0" in probe.layers
    torch.nn.functional.cross_entropy(model(x[:6]), y[:6]).backward()
    g = torch.cat([model[0].bias.grad[:, None], model[0].weight.grad.reshape(6, -1)], 1)
    with probe.measure() as m:
        pass
    t = m.tensors["0"]
    a, delta = pairs(model, x, y)
    Fb = torch.einsum("pu,pui,puj->uij", delta**2, a, a) / a.shape[0]
    lam = 1e-2 * Fb.diagonal(dim1=-2, dim2=-1).mean(-1)
    Fd = Fb + lam[:, None, None] * torch.eye(7, dtype=DT)
    nat = torch.linalg.solve(Fd, g.unsqueeze(-1)).squeeze(-1)
    E_p = a[..., 1:].mean(0)
    cos = (g * nat).sum(-1) / (g.norm(dim=-1) * nat.norm(dim=-1))
    torch.testing.assert_close(t["damping"], lam, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(t["cos_grad_ng"], cos, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(t["bias_shift_ng"], nat[:, 0] + (E_p * nat[:, 1:]).sum(-1),
                               rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(t["cond_F"], torch.linalg.cond(Fd), rtol=1e-8, atol=1e-8)
