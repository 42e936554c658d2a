"""The network trust region of UnitNaturalGradient against brute force.

Every step is scaled so that the batch's exact empirical Fisher along the *whole* step,
``mean_x (g_xᵀ Δθ)²`` with ``g_x`` the per-sample loss gradient of every preconditioned
parameter (cross-unit and cross-layer terms included), and the block model
``lr² Σ gᵀ(F̂+λI)⁻¹g`` stay below ``kl_clip``.  ``g_x`` comes from torch.func per-sample
gradients here, never from the optimiser's hooks."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from unit_fisher_reference import per_sample_grads

import biasshift.optim.unit_natural_gradient as ung
from biasshift.optim import UnitNaturalGradient

F64 = torch.float64


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ELU(), nn.LayerNorm(5), nn.Linear(5, 4),
                         nn.Tanh(), nn.Linear(4, 3)).to(F64)


def convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ELU(),
                         nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 3)).to(F64)


def conv1d_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1, bias=False), nn.ELU(),
                         nn.Flatten(), nn.Linear(12, 3)).to(F64)


class Twice(nn.Module):
    """One Linear layer called twice in a pass (weight sharing)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.shared, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


MODELS = {
    "mlp": (mlp, (6,)),
    "conv2d": (convnet, (2, 6, 6)),
    "conv1d": (conv1d_net, (2, 8)),
    "shared": (lambda seed=0: Twice(seed).to(F64), (4,)),
}


def batch(seed: int, shape: tuple[int, ...], n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def loss_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the cross-entropy ``ℓ_x`` (minus those of ``ln p``)."""
    return {k: -v for k, v in per_sample_grads(model, x, y).items()}


# ------------------------------------------------------------------------------ products
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_products_are_per_sample_directional_derivatives(name: str,
                                                              reduction: str) -> None:
    """``step_products`` of a layer is ``∂ℓ_x/∂θ_layer · (db, dw)`` per sample, for a mean or a
    summed loss, a strided/grouped conv, Conv1d without bias and a layer called twice."""
    make, shape = MODELS[name]
    model = make(1)
    x, y = batch(2, shape)
    opt = UnitNaturalGradient(model, lr=0.1, reduction=reduction)
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    G = loss_grads(model, x, y)
    g = torch.Generator().manual_seed(3)
    for layer in opt._layers:
        batches = layer.running.take()
        dw = torch.randn(layer.weight.shape, generator=g, dtype=F64)
        db = None if layer.bias is None else torch.randn(layer.bias.shape, generator=g, dtype=F64)
        got = layer.running.step_products(batches, dw, db)
        assert got is not None and len(got) == 1
        ref = (G[layer.name + ".weight"] * dw).flatten(1).sum(1)
        if db is not None:
            ref = ref + (G[layer.name + ".bias"] * db).flatten(1).sum(1)
        torch.testing.assert_close(got[0], ref, rtol=1e-10, atol=1e-12)


def test_step_products_of_accumulated_passes() -> None:
    """Gradient accumulation: one product vector per backward pass, each the per-sample
    derivative of that micro-batch's samples."""
    model = mlp(4)
    x, y = batch(5, (6,), n=16)
    opt = UnitNaturalGradient(model, lr=0.1)
    for half in (slice(0, 10), slice(10, 16)):
        F.cross_entropy(model(x[half]), y[half]).backward()
    G = loss_grads(model, x, y)
    layer = opt._layers[1]
    dw, db = torch.ones_like(layer.weight), torch.ones_like(layer.bias)
    got = layer.running.step_products(layer.running.take(), dw, db)
    assert got is not None and [p.shape[0] for p in got] == [10, 6]
    ref = G[layer.name + ".weight"].flatten(1).sum(1) + G[layer.name + ".bias"].sum(1)
    torch.testing.assert_close(torch.cat(got), ref, rtol=1e-10, atol=1e-12)


def test_step_products_refuse_misaligned_calls() -> None:
    """A layer called on batches of different sizes in one pass cannot be lined up per
    sample: ``None`` (the step then falls back to the block model, see below)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3)).to(F64)
    lin = net[0]
    x = torch.randn(8, 4, dtype=F64)
    opt = UnitNaturalGradient(net, lr=0.1)
    (lin(x).sum() + lin(x[:5]).sum()).backward()
    assert opt._layers[0].running.step_products(
        opt._layers[0].running.take(), torch.ones_like(lin.weight), None) is None


# ------------------------------------------------------------------------------ the step
def take_step(model: nn.Module, opt: UnitNaturalGradient, x: torch.Tensor, y: torch.Tensor,
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One optimiser step on the mean cross-entropy; the parameters before it and the
    gradients it applied, by name."""
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
    opt.step()
    return before, grads


def applied_quadratics(model: nn.Module, opt: UnitNaturalGradient, x: torch.Tensor,
                       y: torch.Tensor, nu_tol: float = 1e-6) -> tuple[float, float, float]:
    """One step; returns the batch's empirical Fisher along the applied step of the
    preconditioned parameters ``mean_x (g_xᵀΔθ)²`` (reference per-sample gradients at the
    parameters the gradient was taken at), the block model of the applied step
    ``Σ Δθ_uᵀ (F̂+λI) Δθ_u`` (from the factors), and the step's scale ``ν``."""
    G = loss_grads(model, x, y)
    before, grads = take_step(model, opt, x, y)
    after = dict(model.named_parameters())
    s = torch.zeros(x.shape[0], dtype=F64)
    block = 0.0
    nus = []
    lr = opt.param_groups[0]["lr"]
    for name in opt.layers:
        dw = after[name + ".weight"].detach() - before[name + ".weight"]
        s = s + (G[name + ".weight"] * dw).flatten(1).sum(1)
        parts = [dw.reshape(dw.shape[0], -1)]
        gparts = [grads[name + ".weight"].reshape(dw.shape[0], -1)]
        if name + ".bias" in before:
            db = after[name + ".bias"].detach() - before[name + ".bias"]
            s = s + (G[name + ".bias"] * db).sum(1)
            parts.insert(0, db[:, None])
            gparts.insert(0, grads[name + ".bias"][:, None])
        step = torch.cat(parts, 1)
        L = opt.factors(name).factor
        block += float((step.unsqueeze(1) @ (L @ (L.mT @ step.unsqueeze(-1)))).sum())
        d = opt.factors(name).apply(torch.cat(gparts, 1))
        dd = float((d * d).sum())
        if dd > 0:  # a layer whose units all died (zero gradient) has no ν to read off
            nus.append(float(-(step * d).sum()) / (lr * dd))
        else:
            assert not step.any(), name  # and takes no step
    # one ν per param group (at extreme lr a unit that died takes its plain gradient, which the
    # ν read off here ignores: nu_tol)
    assert nus, "every preconditioned layer has a zero gradient"
    assert max(nus) - min(nus) < nu_tol * max(nus), nus
    return float(s.square().mean()), block, nus[0]


@pytest.mark.parametrize("name", ["mlp", "conv2d", "shared"])
def test_network_trust_region_bounds_the_batch_fisher_of_the_whole_step(name: str) -> None:
    """At an lr far outside the region every step has ``mean_x (g_xᵀΔθ)² ≤ κ`` and block model
    ``≤ κ``; on the first step (no history) the larger of the two equals ``κ``."""
    make, shape = MODELS[name]
    model = make(5)
    kl = 1e-3
    opt = UnitNaturalGradient(model, lr=50.0, kl_clip=kl, update_every=1)
    for t in range(5):
        x, y = batch(10 + t, shape)
        net, block, nu = applied_quadratics(model, opt, x, y)
        assert net <= kl * (1 + 1e-8) and block <= kl * (1 + 1e-8), (t, net, block)
        assert nu < 1
        if t == 0:
            assert max(net, block) == pytest.approx(kl, rel=1e-8)
            # the cross-unit terms are what binds: the block model alone would allow more
            assert block < net


def test_the_curvature_envelope_recursion() -> None:
    """``ν_t = sqrt(κ / (q_block · r̂_t))`` with ``r̂_t = max(1, q_net/q_block, γ r̂_{t−1})``,
    every quantity computed here from per-sample gradients and the factors."""
    model = mlp(6)
    kl = 1e-3
    opt = UnitNaturalGradient(model, lr=20.0, kl_clip=kl, update_every=1)
    rhat = 1.0
    for t in range(6):
        x, y = batch(20 + t, (6,), n=8 + 3 * t)  # batches of different sizes
        net, block, nu = applied_quadratics(model, opt, x, y)
        qb, qn = block / nu**2, net / nu**2  # the unscaled step's two models
        rhat = max(1.0, qn / qb, ung._RATIO_DECAY * rhat)
        assert nu == pytest.approx(min(1.0, math.sqrt(kl / (qb * rhat))), rel=1e-7), t


def test_misaligned_passes_fall_back_to_the_block_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3)).to(F64)
    lin = net[0]
    kl = 1e-4
    opt = UnitNaturalGradient(net, lr=10.0, kl_clip=kl, update_every=1)
    x = torch.randn(8, 4, dtype=F64)
    y = torch.randint(0, 3, (8,))
    for _ in range(2):
        before = torch.cat([lin.bias.detach()[:, None], lin.weight.detach()], 1)
        opt.zero_grad()
        (F.cross_entropy(lin(x), y) + F.cross_entropy(lin(x[:5]), y[:5])).backward()
        opt.step()
        step = torch.cat([lin.bias.detach()[:, None], lin.weight.detach()], 1) - before
        L = opt.factors("0").factor
        q = float((step.unsqueeze(1) @ (L @ (L.mT @ step.unsqueeze(-1)))).sum())
        assert q == pytest.approx(kl, rel=1e-8)  # the block model alone binds
    assert opt._curvature == {}


def test_units_trust_region_is_the_block_model_alone() -> None:
    model = mlp(7)
    kl = 1e-4
    opt = UnitNaturalGradient(model, lr=10.0, kl_clip=kl, update_every=1, trust_region="units")
    for t in range(3):
        net, block, _ = applied_quadratics(model, opt, *batch(30 + t, (6,)))
        assert block == pytest.approx(kl, rel=1e-8), t
        assert net > kl  # what the network region would have prevented


def test_sgd_parameters_and_unclipped_groups_are_not_scaled() -> None:
    """Parameters outside the layers (LayerNorm) take exactly lr·grad, and a group with
    ``kl_clip=None`` takes the unscaled natural step, whatever the other group's region."""
    model = mlp(8)
    groups = [{"params": list(model[0].parameters()) + list(model[2].parameters())},
              {"params": list(model[3].parameters()) + list(model[5].parameters()),
               "kl_clip": None}]
    opt = UnitNaturalGradient(groups, modules=model, lr=5.0, kl_clip=1e-4, update_every=1,
                              damping=1e-1)
    before, grads = take_step(model, opt, *batch(40, (6,)))
    now = dict(model.named_parameters())
    for k in ("2.weight", "2.bias"):
        torch.testing.assert_close(now[k].detach(), before[k] - 5.0 * grads[k], rtol=0,
                                   atol=1e-15)
    g = torch.cat([grads["5.bias"][:, None], grads["5.weight"]], 1)
    d = opt.factors("5").apply(g)
    step = torch.cat([now["5.bias"].detach()[:, None], now["5.weight"].detach()], 1) - \
        torch.cat([before["5.bias"][:, None], before["5.weight"]], 1)
    torch.testing.assert_close(step, -5.0 * d, rtol=1e-10, atol=1e-13)


def test_envelope_in_state_dict_and_old_states() -> None:
    """The envelope is checkpointed (a resumed run takes the same steps); a state saved
    before the network region existed resumes with the block model it was trained with."""
    model = mlp(9)
    opt = UnitNaturalGradient(model, lr=20.0, kl_clip=1e-3, update_every=1)
    for t in range(3):
        applied_quadratics(model, opt, *batch(50 + t, (6,)))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["opt"]["unit_natural_gradient"]["curvature"][0] > 1
    twin = mlp(0)
    twin.load_state_dict(saved["model"])
    opt2 = UnitNaturalGradient(twin, lr=1.0)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["trust_region"] == "network"
    for t in range(2):
        x, y = batch(60 + t, (6,))
        applied_quadratics(model, opt, x, y)
        applied_quadratics(twin, opt2, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    old = saved["opt"]
    del old["unit_natural_gradient"]["curvature"]
    for g in old["param_groups"]:
        del g["trust_region"]
    opt3 = UnitNaturalGradient(mlp(9), lr=1.0)
    opt3.load_state_dict(old)
    assert opt3.param_groups[0]["trust_region"] == "units" and opt3._curvature == {}


def test_bad_trust_region() -> None:
    with pytest.raises(ValueError, match="trust_region must be one of"):
        UnitNaturalGradient(mlp(), trust_region="layer")


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(1e-3, 1e3), kl=st.floats(1e-6, 1.0), seed=st.integers(0, 1000))
def test_the_region_holds_for_any_lr_and_kappa(lr: float, kl: float, seed: int) -> None:
    """Whatever ``lr`` and ``κ``: the applied step's batch Fisher and block model are at most
    ``κ``, or the step is the unscaled natural step (``ν = 1``) below the region."""
    model = mlp(seed % 7)
    opt = UnitNaturalGradient(model, lr=lr, kl_clip=kl, update_every=1)
    for t in range(2):
        net, block, nu = applied_quadratics(model, opt, *batch(seed + t, (6,)), nu_tol=1e-2)
        assert (net <= kl * (1 + 1e-7) and block <= kl * (1 + 1e-7)), (net, block, nu)
        assert nu <= 1 + 1e-12
