"""Cross-check UnitNaturalGradient against ASDL's unit-wise natural gradient (a peer library).

ASDL (package ``asdfghjkl``, import name ``asdl``) builds, with ``fisher_type="fisher_emp"`` and
``fisher_shape="unit_wise"``, one block per output unit of every ``nn.Linear`` over
``(weight[u], bias[u])`` (the bias last; ours puts it first), and preconditions each unit's
gradient by ``(F_u + λI)⁻¹`` with ``torch.inverse``.  What these tests establish:

* ASDL's step is unit-wise: for each layer it equals a dense solve of the per-unit empirical
  Fisher blocks ``F_u = (1/N) Σ_n g_nu g_nuᵀ`` (per-sample gradients of the per-sample loss,
  from ``torch.func``) plus ``λI`` with its ``damping`` λ, when ``data_size`` is the batch size
  and the loss function is mean-reduced (ASDL recomputes the loss with ``reduction="sum"`` and
  divides the Fisher and the gradient by ``data_size``; another ``data_size`` scales both).
* Its damping convention is ours with ``damping_mode="absolute"``: λ is added to the whole
  block's diagonal, the bias entry included.  So with ``ema=0``, ``kl_clip=None`` and
  refreshes every step the two optimisers take the same steps (to rounding).
* Its moving average is *not* bias-corrected: ASDL's ``ema_decay`` is the weight of the new
  batch (``1 − ema`` in our terms) and its first value is ``ema_decay · F₁``, so after ``k``
  updates its Fisher is ``(1 − ema^k)`` times our bias-corrected one.  With that correction
  added to its inversions, ASDL takes our steps with a moving average too: it is the whole
  difference.  The benchmark (``analyses/bench_optim_peer.py``) states it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from biasshift.optim import UnitNaturalGradient

# ASDL registers non-full module backward hooks (torch deprecates them; harmless here)
pytestmark = [pytest.mark.peer,
              pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")]


def _stub_nvtx() -> None:
    """ASDL calls ``torch.cuda.nvtx.range_push/range_pop`` (through ``nvtx.range``), which raise
    on CPU builds of torch: make them no-ops there."""
    if torch.cuda.is_available():
        return
    torch.cuda.nvtx.range_push = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.nvtx.range_pop = lambda *a, **k: None  # type: ignore[assignment]


asdl = pytest.importorskip("asdl")
_stub_nvtx()  # before ASDL's first call (its decorators only call nvtx when run)

DT = torch.float64
N = 16


def tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.ELU(), nn.Linear(4, 6), nn.Tanh(),
                         nn.Linear(6, 3)).to(DT)


def batch(seed: int, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 5, generator=g, dtype=DT) + 0.5  # positive-mean inputs, as after ELUs
    return x, torch.randint(0, 3, (n,), generator=g)


def asdl_maker(model: nn.Module, damping: float, n: int = N, **config: float | int):
    cfg = asdl.PreconditioningConfig(data_size=n, damping=damping, **config)
    return asdl.NaturalGradientMaker(model, cfg, fisher_type="fisher_emp",
                                     fisher_shape="unit_wise")


def asdl_direction(gm, model: nn.Module, x: torch.Tensor,
                   y: torch.Tensor) -> dict[str, torch.Tensor]:
    """ASDL's preconditioned gradient (left in ``.grad``) of the mean cross-entropy."""
    model.zero_grad(set_to_none=True)
    dummy_y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, dummy_y, y)
    gm.forward_and_backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def per_sample_unit_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          layer: str) -> torch.Tensor:
    """``(N, units, n_in + 1)``: each sample's ``(weight[u], bias[u])`` gradient (ASDL order)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), (None, 0, 0))(params, x, y)
    return torch.cat([g[layer + ".weight"], g[layer + ".bias"][..., None]], dim=-1)


@pytest.mark.parametrize("damping", [1e-4, 1e-2, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_asdl_unit_wise_step_is_dense_solve_of_empirical_unit_blocks(damping: float,
                                                                     seed: int) -> None:
    model = tiny(seed)
    x, y = batch(seed)
    d = asdl_direction(asdl_maker(model, damping), model, x, y)
    for layer in ("0", "2", "4"):
        G = per_sample_unit_grads(model, x, y, layer)
        blocks = torch.einsum("nui,nuj->uij", G, G) / N
        eye = torch.eye(blocks.shape[-1], dtype=DT)
        ref = torch.linalg.solve(blocks + damping * eye, G.mean(0)[..., None])[..., 0]
        scale = ref.abs().max()
        assert (d[layer + ".weight"] - ref[:, :-1]).abs().max() <= 1e-9 * scale, layer
        assert (d[layer + ".bias"] - ref[:, -1]).abs().max() <= 1e-9 * scale, layer
        # not the layer-wise (full-block) natural gradient: the unit structure matters
        Gf = G.reshape(N, -1)
        full = torch.linalg.solve(Gf.T @ Gf / N + damping * torch.eye(Gf.shape[1], dtype=DT),
                                  Gf.mean(0)).reshape_as(ref)
        assert (full - ref).abs().max() > 1e-3 * scale, layer


def test_asdl_damping_scales_with_data_size() -> None:
    """``data_size = k·N`` divides the Fisher and the gradient by ``k``: damping ``λ`` then acts
    as ``k·λ`` on the batch-mean Fisher, and the direction is ``(F + kλI)⁻¹ g``."""
    x, y = batch(3)
    k, lam = 4, 1e-2
    d_k = asdl_direction(asdl_maker(m := tiny(3), lam, n=k * N), m, x, y)
    d_1 = asdl_direction(asdl_maker(m := tiny(3), k * lam), m, x, y)
    for name in d_k:
        assert torch.allclose(d_k[name], d_1[name], rtol=1e-9, atol=1e-12), name


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_asdl_and_ours_take_the_same_steps_with_matched_settings(damping: float) -> None:
    """Five training steps on new batches: ASDL's direction + SGD vs UnitNaturalGradient with
    ``ema=0``, absolute damping, no KL clip and a refresh every step."""
    lr = 0.3
    theirs, ours = tiny(5), tiny(5)
    gm = asdl_maker(theirs, damping)  # ema_decay unset: a fresh Fisher every step
    sgd = torch.optim.SGD(theirs.parameters(), lr=lr)
    opt = UnitNaturalGradient(ours, lr=lr, damping=damping, damping_mode="absolute", ema=0.0,
                              kl_clip=None, update_every=1, inverse_every=1)
    start = _flat(ours)
    for step in range(5):
        x, y = batch(10 + step)
        asdl_direction(gm, theirs, x, y)
        sgd.step()
        loss = F.cross_entropy(ours(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        a, b = _flat(theirs), _flat(ours)
        moved = (b - start).abs().max()
        assert moved > 1e-3, "the steps must move the parameters for the check to mean anything"
        assert (a - b).abs().max() <= 1e-8 * moved, f"step {step}: {(a - b).abs().max():.3g}"


def test_asdl_moving_average_is_ours_without_bias_correction() -> None:
    """ASDL ``ema_decay = 1 − ema``: after ``k`` updates its unit Fisher is ``(1 − ema^k)``
    times our bias-corrected EMA (its first value is ``(1 − ema)·F₁``, ours ``F₁``)."""
    ema, damping = 0.8, 1e-2
    theirs, ours = tiny(7), tiny(7)
    gm = asdl_maker(theirs, damping, ema_decay=1 - ema)
    # lr 1e-30: the parameters stay put to rounding, so both see the same per-sample gradients
    opt = UnitNaturalGradient(ours, lr=1e-30, damping=damping, damping_mode="absolute", ema=ema,
                              kl_clip=None, update_every=1, inverse_every=1)
    layers = dict(zip(opt.layers, opt._layers))
    for k in range(1, 5):
        x, y = batch(20 + k)
        asdl_direction(gm, theirs, x, y)
        loss = F.cross_entropy(ours(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for name in ("0", "2", "4"):
            mine, _ = layers[name].fisher_hat()
            perm = torch.roll(torch.arange(mine.shape[-1]), -1)  # (bias, w) -> (w, bias)
            mine = mine[:, perm][:, :, perm]
            their = theirs.get_submodule(name).fisher.unit.data
            assert torch.allclose(their, (1 - ema**k) * mine, rtol=1e-9, atol=1e-14), (k, name)
            assert not torch.allclose(their, mine, rtol=1e-3), (k, name)


def bias_corrected(gm, ema: float):
    """ASDL inverting ``F / (1 − ema^k)`` (as ``bias_correct_asdl`` in bench_optim_peer.py)."""
    update_curvature, update_preconditioner = gm.update_curvature, gm.update_preconditioner
    updates = [0]

    def counted() -> None:
        update_curvature()
        updates[0] += 1

    def corrected() -> None:
        c = 1.0 / (1.0 - ema ** max(updates[0], 1))
        gm._scale_fisher(c)
        update_preconditioner()
        gm._scale_fisher(1.0 / c)

    gm.update_curvature, gm.update_preconditioner = counted, corrected
    return gm


def test_asdl_with_bias_correction_takes_our_steps_with_a_moving_average() -> None:
    """With the EMA's bias correction added, ASDL (``ema_decay = 1 − ema``) and ours (``ema``)
    take the same steps: the bias correction is the whole difference of their averages."""
    ema, damping, lr = 0.8, 1e-2, 0.3
    theirs, ours = tiny(9), tiny(9)
    gm = bias_corrected(asdl_maker(theirs, damping, ema_decay=1 - ema), ema)
    sgd = torch.optim.SGD(theirs.parameters(), lr=lr)
    opt = UnitNaturalGradient(ours, lr=lr, damping=damping, damping_mode="absolute", ema=ema,
                              kl_clip=None, update_every=1, inverse_every=1)
    plain = tiny(9)  # ASDL as shipped, for contrast
    gm_plain = asdl_maker(plain, damping, ema_decay=1 - ema)
    sgd_plain = torch.optim.SGD(plain.parameters(), lr=lr)
    start = _flat(ours)
    for step in range(5):
        x, y = batch(30 + step)
        asdl_direction(gm, theirs, x, y)
        sgd.step()
        asdl_direction(gm_plain, plain, x, y)
        sgd_plain.step()
        loss = F.cross_entropy(ours(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        a, b = _flat(theirs), _flat(ours)
        moved = (b - start).abs().max()
        assert (a - b).abs().max() <= 1e-8 * moved, f"step {step}: {(a - b).abs().max():.3g}"
    assert (_flat(plain) - _flat(ours)).abs().max() > 1e-2 * moved
