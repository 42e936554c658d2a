"""UnitNaturalGradient as users rely on it: stable with its defaults wherever SGD's learning
rates are used, SGD's momentum/weight decay/schedulers, per-group hyperparameters, the
standard state layout, divergence reported (never a silent 4e19), accurate factors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from biasshift.data import load_dataset
from biasshift.models import paper_mlp
from biasshift.optim import DivergenceError, UnitNaturalGradient
from biasshift.optim.block_solve import BlockFactors

F64 = torch.float64


def mixed_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ELU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def strided_convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ELU(),
                         nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 3 * 3, 10))


FAMILIES = {
    "mixed-mlp": mixed_mlp,
    "strided-conv": strided_convnet,
    "paper-8x128": lambda: paper_mlp("elu", in_features=64),
    # with a per-unit damping this one went from loss 1.95 to 3e4 in one step at lr 0.01
    "paper-8x128-relu": lambda: paper_mlp("relu", in_features=64),
}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits")
    return ds.train_x.float(), ds.train_y


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          steps: int = 150, every: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(1)
    losses = [full_loss(model, x, y)]
    for t in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (t + 1) % every == 0:
            losses.append(full_loss(model, x, y))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("lr", [0.01, 0.05, 0.1])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_defaults_are_stable_at_sgd_learning_rates(family: str, lr: float, digits) -> None:
    """150 mini-batch steps of 64 digits with the defaults, the full-batch loss after every
    step: all finite, none 10% above the first, no step raising it by more than a third, and the
    last at most half the first (a divergence would raise DivergenceError here).  With the
    block-model clip of earlier versions the 8x128 nets jumped 9-86x in one step; SGD at
    lr 0.1 takes the 8x128 ELU net to NaN."""
    x, y = digits
    x = x if family == "strided-conv" else x.flatten(1)
    torch.manual_seed(0)
    model = FAMILIES[family]()
    opt = UnitNaturalGradient(model, lr=lr)
    losses = torch.tensor(train(model, opt, x, y))
    assert torch.isfinite(losses).all(), losses
    assert losses.max() <= 1.1 * losses[0], losses
    assert (losses[1:] / losses[:-1]).max() <= 4 / 3, losses
    assert losses[-1] <= 0.5 * losses[0], losses


@pytest.mark.slow
def test_momentum_and_a_scheduler_stay_stable(digits) -> None:
    x, y = digits
    torch.manual_seed(0)
    model = mixed_mlp()
    opt = UnitNaturalGradient(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    losses = []
    for _ in range(3):
        losses += train(model, opt, x.flatten(1), y, steps=50, every=25)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.9**3)
    # the clip budgets the steady-state momentum step lr/(1 - mu): stable, and slower than
    # without momentum at the same lr (the clip takes back the momentum's 10x)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] <= 0.8 * losses[0], losses
    assert max(losses) < 1.5 * losses[0], losses


# ------------------------------------------------------------------------------ SGD idioms
def tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ELU(), nn.LayerNorm(5), nn.Linear(5, 3)).to(F64)


def batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_momentum_weight_decay_nesterov_are_sgds() -> None:
    """Every parameter takes SGD's momentum/weight-decay/Nesterov recursion, over its plain
    gradient (not preconditioned) or its natural direction (preconditioned; no clip here)."""
    lr, mu, wd = 0.1, 0.9, 1e-2
    model = tiny(1)
    opt = UnitNaturalGradient(model, modules=[model[0]], kl_clip=None, damping_mode="absolute",
                              update_every=1, inverse_every=1, ema=0.0, damping=1e-3, lr=lr,
                              momentum=mu, weight_decay=wd, nesterov=True)
    bufs: dict[str, torch.Tensor] = {}
    for t in range(3):
        x, y = batch(10 + t)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step(model, opt, x, y)
        grads = {n: p.grad for n, p in model.named_parameters()}
        # the natural direction of this step, from the factors the step used
        g0 = torch.cat([grads["0.bias"][:, None], grads["0.weight"]], 1)
        nat = opt.factors("0").apply(g0)
        directions = {n: grads[n] for n in grads}
        directions["0.bias"], directions["0.weight"] = nat[:, 0], nat[:, 1:]
        for n, p in model.named_parameters():
            d = directions[n] + wd * before[n]
            bufs[n] = d if t == 0 else mu * bufs[n] + d
            expected = before[n] - lr * (d + mu * bufs[n])
            assert torch.allclose(p, expected, rtol=1e-10, atol=1e-13), (t, n)


def test_per_group_hyperparameters_and_scheduler() -> None:
    model = tiny(2)
    groups = [{"params": [model[0].weight, model[0].bias], "damping": 1e-1,
               "damping_mode": "absolute"},
              {"params": list(model[2].parameters()) + list(model[3].parameters()),
               "damping": 1e-2, "kl_clip": None}]
    opt = UnitNaturalGradient(groups, modules=model, lr=0.1)
    assert opt.layers == ["0", "3"]
    for key in ("lr", "momentum", "damping", "damping_mode", "ema", "kl_clip", "update_every",
                "inverse_every", "weight_decay", "nesterov", "dampening"):
        assert key in opt.defaults and all(key in g for g in opt.param_groups), key
    step(model, opt, *batch(3))
    assert torch.all(opt.factors("0").damping == 0.1)  # absolute
    F3 = opt.fisher("3")
    rel = 1e-2 * F3.diagonal(dim1=-2, dim2=-1).mean()  # relative: rho * the layer's mean diagonal
    assert torch.allclose(opt.factors("3").damping, rel.expand(3), rtol=1e-12)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.5)
    step(model, opt, *batch(3))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    with pytest.raises(ValueError, match="damping_mode must be one of"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "damping_mode": "x"})


def test_relative_damping_step_equals_dense_solve() -> None:
    model = tiny(3)
    x, y = batch(4)
    before = torch.cat([model[3].bias.detach()[:, None], model[3].weight.detach()], 1)
    opt = UnitNaturalGradient(model, lr=0.2, damping=0.05, ema=0.0, kl_clip=None,
                              update_every=1)
    step(model, opt, x, y)
    Fu = opt.fisher("3")
    g = torch.cat([model[3].bias.grad[:, None], model[3].weight.grad], 1)
    lam = 0.05 * Fu.diagonal(dim1=-2, dim2=-1).mean().expand(Fu.shape[0])  # one λ per layer
    eye = torch.eye(Fu.shape[-1], dtype=F64)
    d = torch.linalg.solve(Fu + lam[:, None, None] * eye, g.unsqueeze(-1)).squeeze(-1)
    after = torch.cat([model[3].bias.detach()[:, None], model[3].weight.detach()], 1)
    assert torch.allclose(after, before - 0.2 * d, rtol=1e-10, atol=1e-13)


def test_kl_clip_bounds_the_quadratic_model_of_every_step() -> None:
    """``trust_region="units"``: ``lr² Σ gᵀ(F+λI)⁻¹g`` of the applied step is at most
    ``kl_clip`` (one group), with equality when the clip is active."""
    model = tiny(4)
    kl = 1e-4
    opt = UnitNaturalGradient(model, lr=10.0, kl_clip=kl, update_every=1, modules=[model[0]],
                              trust_region="units")
    x, y = batch(5)
    for t in range(4):
        before = model[0].weight.detach().clone(), model[0].bias.detach().clone()
        step(model, opt, x, y)
        dw = torch.cat([(model[0].bias - before[1])[:, None], model[0].weight - before[0]],
                       1).detach()
        L = opt.factors("0").factor  # F + λI = LLᵀ and dw = -lr ν (F + λI)⁻¹ g, so
        q = float((dw.unsqueeze(1) @ (L @ (L.mT @ dw.unsqueeze(-1)))).sum())  # lr²ν² gᵀ(F+λI)⁻¹g
        assert q <= kl * (1 + 1e-9), (t, q)
        assert q >= 0.999 * kl  # lr 10 is far outside the region: the clip is active


# ------------------------------------------------------------------------------ state
def test_state_dict_has_the_standard_layout_and_packed_blocks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), nn.ELU(), nn.Linear(16, 3))
    opt = UnitNaturalGradient(model, lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        step(model, opt, torch.randn(32, 40, generator=g), torch.randint(0, 3, (32,), generator=g))
    sd = opt.state_dict()
    assert set(sd) >= {"state", "param_groups"}
    assert all(isinstance(k, int) for k in sd["state"])
    entry = sd["state"][0]["unit_fisher"]  # the first layer's weight is parameter 0
    assert entry["fisher"].shape == (16, 41 * 42 // 2) and entry["factor"].shape == (16, 861)
    assert "momentum_buffer" in sd["state"][0]
    buf = io.BytesIO()
    torch.save(sd, buf)
    full = 2 * 4 * (16 * 41**2 + 3 * 17**2)  # the old layout: full EMA and factor blocks
    assert buf.tell() < 0.75 * full


# ------------------------------------------------------------------------------ divergence
def test_a_diverging_run_raises_naming_the_layer() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = UnitNaturalGradient(model, lr=1e4, kl_clip=None, damping=1e-6,
                              damping_mode="absolute", update_every=1, inverse_every=1)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DivergenceError, match=r"layer '\d'.*Try lr=") as info:
        for _ in range(50):
            step(model, opt, torch.randn(16, 6, generator=g) * 10,
                 torch.randint(0, 3, (16,), generator=g))
    assert info.value.layer in ("0", "2")
    for p in model.parameters():  # the non-finite steps never reached the parameters
        assert torch.isfinite(p).all()


def test_on_divergence_warn_and_closure_loss() -> None:
    model = tiny(6)
    opt = UnitNaturalGradient(model, lr=0.1, on_divergence="warn")
    x, y = batch(7)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss * float("nan")

    with pytest.warns(RuntimeWarning, match="the closure's loss is nan"):
        opt.step(closure)
    opt2 = UnitNaturalGradient(tiny(6), lr=0.1)
    with pytest.raises(DivergenceError, match="closure's loss"):
        opt2.step(lambda: torch.tensor(float("inf")))


# ------------------------------------------------------------------------------ accuracy
def test_cholesky_factors_are_accurate_where_theorem1_by_cancellation_is_not() -> None:
    """Blocks of positive-mean inputs (E_q(a) large against its spread): float32 Cholesky
    directions agree with float64 dense solves to cond·eps."""
    g = torch.Generator().manual_seed(0)
    U, N, n = 8, 256, 30
    a = 3.0 + 0.05 * torch.randn(U, N, n, generator=g, dtype=F64)
    at = torch.cat([torch.ones(U, N, 1, dtype=F64), a], -1)
    d2 = torch.rand(U, N, generator=g, dtype=F64)
    Fb = torch.einsum("un,uni,unj->uij", d2, at, at) / N
    grad = torch.randn(U, n + 1, generator=g, dtype=F64)
    lam = 1e-3 * Fb.diagonal(dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(n + 1, dtype=F64)
    truth = torch.linalg.solve(Fb + lam[:, None, None] * eye, grad.unsqueeze(-1)).squeeze(-1)
    cond = float(torch.linalg.cond(Fb + lam[:, None, None] * eye).max())
    f32 = BlockFactors.compute(Fb.float(), lam.float())
    err = float(((f32.apply(grad.float()).double() - truth).norm(dim=-1)
                 / truth.norm(dim=-1)).max())
    assert cond > 1e4  # the case the paper is about: far from zero mean
    assert err < 50 * cond * torch.finfo(torch.float32).eps, (err, cond)
    f64 = BlockFactors.compute(Fb, lam, form="inverse")
    assert torch.allclose(f64.apply(grad), truth, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["tpmv", "trsv", "torch"])
def test_block_factor_solves_against_dense_solves(dtype: torch.dtype, path: str,
                                                  monkeypatch) -> None:
    """``BlockFactors.apply``, through the per-unit BLAS paths (CPU, large layers; forced here
    for small blocks): the packed ``W = L⁻¹`` with two ``?tpmv`` and the two ``?trsv`` on
    ``L``; and through torch's batched solves, equals the dense solve of the damped blocks to
    ``cond · eps``; a unit that is not ok is solved with the identity; the factors are
    row-major and the input gradient is left alone."""
    from biasshift.optim import block_solve

    if path != "torch":
        monkeypatch.setattr(block_solve, "CHUNK_ABOVE_BYTES", 0)
    monkeypatch.setattr(block_solve, "PACKED_INVERSE", path == "tpmv")
    if path == "torch":
        monkeypatch.setattr(block_solve, "_blas_solve", lambda *a: None)
    g = torch.Generator().manual_seed(4)
    U, m = 6, 23
    X = torch.randn(U, m, m + 4, generator=g, dtype=torch.float64)
    F64 = X @ X.mT / m
    F64[3] = -torch.eye(m, dtype=torch.float64)  # not positive definite: not ok
    lam = torch.full((U,), 1e-2, dtype=torch.float64)
    bf = BlockFactors.compute(F64.to(dtype), lam.to(dtype))
    assert bf.factor.is_contiguous() and bf.ok.tolist() == [True, True, True, False, True, True]
    assert (bf.packed_inverse is not None) == (path == "tpmv")
    if path == "tpmv":  # W is L's inverse (lower triangles, row by row)
        i, j = torch.tril_indices(m, m)
        W = torch.zeros(U, m, m, dtype=torch.float64)
        W[:, i, j] = bf.packed_inverse.double()
        eye = torch.eye(m, dtype=torch.float64).expand(U, m, m)
        assert torch.allclose(W @ bf.factor.double().tril(), eye,
                              atol=1e3 * torch.finfo(dtype).eps)
        # rebuilt from the factor alone (a checkpoint keeps L): the same W bit for bit
        again = BlockFactors("cholesky", bf.factor.clone(), bf.damping, bf.ok)
        assert torch.equal(again.packed_inverse, bf.packed_inverse)
    grad = torch.randn(U, m, generator=g, dtype=torch.float64).to(dtype)
    before = grad.clone()
    got = bf.apply(grad).to(torch.float64)
    assert torch.equal(grad, before)
    want = torch.linalg.solve(F64 + 1e-2 * torch.eye(m, dtype=torch.float64),
                              grad.to(torch.float64).unsqueeze(-1)).squeeze(-1)
    want[3] = grad[3].to(torch.float64)  # the identity's factor
    cond = torch.linalg.cond(F64[[0, 1, 2, 4, 5]] + 1e-2 * torch.eye(m, dtype=torch.float64))
    tol = float(cond.max()) * torch.finfo(dtype).eps * 10
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(err.max()) < tol, (err, tol)


def test_packed_inverse_that_overflows_marks_the_unit_not_ok(monkeypatch) -> None:
    """A pivot so small that ``L⁻¹`` overflows in float32: the unit is not ok and is solved
    with the identity (factor and packed inverse both), the others are untouched."""
    from biasshift.optim import block_solve

    monkeypatch.setattr(block_solve, "CHUNK_ABOVE_BYTES", 0)
    monkeypatch.setattr(block_solve, "PACKED_INVERSE", True)
    L = (2.0 * torch.eye(4)).repeat(3, 1, 1).contiguous()
    L[1, 2, 2] = 1e-39
    f = BlockFactors("cholesky", L, torch.zeros(3), torch.ones(3, dtype=torch.bool))
    assert f.ok.tolist() == [True, False, True]
    assert torch.isfinite(f.packed_inverse).all() and torch.equal(f.factor[1], torch.eye(4))
    g = torch.ones(3, 4)
    assert torch.equal(f.apply(g), torch.tensor([[0.25] * 4, [1.0] * 4, [0.25] * 4]))
