"""UnitNaturalGradient against brute force: every step equals ``−lr · (F_u + λI)⁻¹ g_u`` per unit
with ``F_u`` built from torch.func per-sample gradients (or, for conv positions, from the Jacobian
of the layer's own forward), the EMA equals the hand-computed one, other parameters get exactly
SGD; state_dict, hooks, bad input, and the passes that must not count."""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from unit_fisher_reference import conv_pairs, log_lik, per_sample_grads, unit_grads

from biasshift import UnitFisher
from biasshift.optim import UnitNaturalGradient
from biasshift.theory import SingularFisherError

F64 = torch.float64
#: the settings under which a step is exactly ``-lr (F + damping I)^-1 g`` with the latest
#: statistics: no trust region, absolute damping, statistics on every step
EXACT = dict(kl_clip=None, damping_mode="absolute", update_every=1)


# ------------------------------------------------------------------------------ references
def reference_blocks(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per NG layer: the empirical unit blocks ``F (units, n1, n1)`` and the mean-NLL gradient
    ``g (units, n1)`` (bias first), independent of biasshift's capture code.

    Linear: outer products of torch.func per-sample gradients of ``ln p(y|x)``.  Conv2d: every
    (sample, position) pair is a row (``δ`` from autograd on the layer output, ``ã`` from the
    Jacobian of the layer's forward w.r.t. its weight), ``F = 1/N Σ_pairs δ² ã ãᵀ``.
    """
    grads = per_sample_grads(model, x, y)
    out = {}
    N = x.shape[0]
    for i, m in enumerate(model):
        name = str(i)
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        G = unit_grads(grads, name)  # (N, units, n1): per-sample ∂ ln p / ∂(bias, w_u)
        g = -G.mean(0)
        if isinstance(m, nn.Linear):
            Fu = torch.einsum("nui,nuj->uij", G, G) / N
        else:
            a, delta = conv_pairs(model, i, x, y)
            Fu = torch.einsum("pu,pui,puj->uij", delta.square(), a, a) / N
        out[name] = (Fu, g)
    return out


def solve(Fu: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(Fu.shape[-1], dtype=Fu.dtype, device=Fu.device)
    return torch.linalg.solve(Fu + damping * eye, g.unsqueeze(-1)).squeeze(-1)


def unit_params(m: nn.Module) -> torch.Tensor:
    W = m.weight.detach().reshape(m.weight.shape[0], -1)
    if m.bias is None:
        return W.clone()
    return torch.cat([m.bias.detach().unsqueeze(-1), W], dim=1)


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max() / y.abs().max())


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def mlp(seed: int = 0, *, inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 5), nn.ELU(), nn.Linear(5, 4, bias=False), nn.ReLU(inplace=inplace),
        nn.Linear(4, 3),
    ).to(F64)


def convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ELU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2, bias=False), nn.ELU(),
        nn.Flatten(), nn.Linear(16, 3),
    ).to(F64)


def batch(seed: int, n: int = 16, shape: tuple[int, ...] = (6,)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------------------ (1) one step
@pytest.mark.parametrize("form", ["inverse", "cholesky"])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_mlp_step_equals_dense_damped_solve(form: str, damping: float, device) -> None:
    model = mlp(inplace=True).to(device)
    x, y = (t.to(device) for t in batch(1))
    ref = reference_blocks(copy.deepcopy(model).cpu(), x.cpu(), y.cpu())
    before = {n: unit_params(model[int(n)]) for n in ref}
    lr = 0.3
    opt = UnitNaturalGradient(model, lr=lr, damping=damping, ema=0.0, inverse_every=1,
                              factor=form, **EXACT)
    assert opt.layers == ["0", "2", "4"]
    train_step(model, opt, x, y)
    for name, (Fu, g) in ref.items():
        expected = before[name].cpu() - lr * solve(Fu, g, damping)
        assert rel_err(unit_params(model[int(name)]).cpu(), expected) < 1e-10, name
        assert rel_err(opt.fisher(name).cpu(), Fu) < 1e-10, name


@pytest.mark.parametrize("form", ["inverse", "cholesky"])
def test_conv_step_equals_dense_damped_solve(form: str) -> None:
    model = convnet()
    x, y = batch(2, n=8, shape=(2, 6, 6))
    ref = reference_blocks(model, x, y)
    assert set(ref) == {"0", "2", "5"}
    before = {n: unit_params(model[int(n)]) for n in ref}
    lr, damping = 0.1, 1e-3
    opt = UnitNaturalGradient(model, lr=lr, damping=damping, ema=0.0, inverse_every=1,
                              factor=form, **EXACT)
    train_step(model, opt, x, y)
    for name, (Fu, g) in ref.items():
        expected = before[name] - lr * solve(Fu, g, damping)
        assert rel_err(unit_params(model[int(name)]), expected) < 1e-10, name
        assert rel_err(opt.fisher(name), Fu) < 1e-10, name


def test_conv_fisher_matches_unit_fisher_pairs() -> None:
    """Peer check: the optimiser's conv blocks are UnitFisher's (sample, position) pair blocks
    scaled from "mean over pairs" to "mean over samples"."""
    model = convnet(3)
    x, y = batch(3, n=8, shape=(2, 6, 6))
    uf = UnitFisher(model, layers=["0", "2"], dtype=F64)
    uf.accumulate(x, y)
    opt = UnitNaturalGradient(model, lr=0.1, ema=0.0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, positions in (("0", 36), ("2", 4)):
        pairs = uf.matrix(name, positions="pairs")
        assert rel_err(opt.fisher(name), pairs * positions) < 1e-10


# ------------------------------------------------------------------------------ (2) the EMA
def test_ema_over_batches_equals_hand_computed_ema() -> None:
    model = mlp(4)
    ema, lr, damping = 0.7, 0.05, 1e-3
    opt = UnitNaturalGradient(model, lr=lr, damping=damping, ema=ema, inverse_every=1, **EXACT)
    S: dict[str, torch.Tensor] = {}
    for t in range(4):
        x, y = batch(10 + t)
        ref = reference_blocks(model, x, y)
        before = {n: unit_params(model[int(n)]) for n in ref}
        train_step(model, opt, x, y)
        for name, (Fu, g) in ref.items():
            S[name] = ema * S.get(name, 0) + (1 - ema) * Fu
            F_hat = S[name] / (1 - ema ** (t + 1))  # Adam-style bias correction
            assert rel_err(opt.fisher(name), F_hat) < 1e-10, (t, name)
            expected = before[name] - lr * solve(F_hat, g, damping)
            assert rel_err(unit_params(model[int(name)]), expected) < 1e-10, (t, name)


def test_update_every_and_inverse_every() -> None:
    """Statistics on every step until the EMA holds 1/(1-ema) = 5 batches, then on every 2nd;
    factors refreshed on the first step with statistics, then
    when half of the EMA's weight is newer than the factors or ``inverse_every`` steps have
    passed (the schedule replayed by hand)."""
    model = mlp(5)
    ema, lr, damping = 0.8, 0.05, 1e-2
    opt = UnitNaturalGradient(model, lr=lr, damping=damping, ema=ema, update_every=2,
                              inverse_every=5, kl_clip=None, damping_mode="absolute")
    S, used = None, None  # EMA sum for layer "0"; the F̂ the factors were computed from
    updates, mass, mass_r, new_updates, since = 0, 0.0, 0.0, 0, 0
    refreshes = []
    for t in range(14):
        x, y = batch(20 + t)
        Fu, g = reference_blocks(model, x, y)["0"]
        before = unit_params(model[0])
        if updates < 5 or t % 2 == 0:  # update step (every step until 1/(1-ema) updates)
            S = ema * (0 if S is None else S) + (1 - ema) * Fu
            updates, mass, new_updates = updates + 1, ema * mass + 1 - ema, new_updates + 1
        F_hat = S / (1 - ema**updates)
        moved = 1 - ema**new_updates * mass_r / mass >= 0.5
        if used is None or (new_updates and (since >= 5 or moved)):
            used, mass_r, new_updates, since = F_hat, mass, 0, 0
            refreshes.append(t)
        since += 1
        train_step(model, opt, x, y)
        assert rel_err(opt.fisher("0"), F_hat) < 1e-10, t
        expected = before - lr * solve(used, g, damping)
        assert rel_err(unit_params(model[0]), expected) < 1e-10, t
    # fast at first (half the EMA's weight is new after 1, then 2 updates), then inverse_every
    assert refreshes == [0, 1, 3, 8, 13]


def test_wide_layer_updates_only_the_lower_triangle_but_exactly() -> None:
    """Blocks of >= 384 rows are updated by column blocks (lower triangle only); the blocks
    the optimiser reports and uses are still the full brute-force ones."""
    torch.manual_seed(24)
    model = nn.Sequential(nn.Linear(400, 3)).to(F64)
    ema, lr, damping = 0.6, 0.2, 1e-3
    opt = UnitNaturalGradient(model, lr=lr, damping=damping, ema=ema, inverse_every=1, **EXACT)
    S = 0
    for t in range(2):
        x, y = batch(32 + t, n=12, shape=(400,))
        Fu, g = reference_blocks(model, x, y)["0"]
        before = unit_params(model[0])
        train_step(model, opt, x, y)
        S = ema * S + (1 - ema) * Fu
        F_hat = S / (1 - ema ** (t + 1))
        assert rel_err(opt.fisher("0"), F_hat) < 1e-10
        # rank 12-24 blocks of 401 rows: the damped solve has cond ~1e4, so allow its rounding
        cond = float(torch.linalg.cond(F_hat + damping * torch.eye(401, dtype=F64)).max())
        err = rel_err(unit_params(model[0]), before - lr * solve(F_hat, g, damping))
        assert err < 1e-10 * max(1.0, cond / 1e3), (err, cond)
    stored = opt._layers[0].running.fisher
    assert stored[:, 0, 399].abs().max() == 0  # the strict upper blocks are never touched


def test_gradient_accumulation_pools_the_samples() -> None:
    model = mlp(6)
    x, y = batch(30, n=16)
    Fu = reference_blocks(model, x, y)["0"][0]
    opt = UnitNaturalGradient(model, lr=0.01, ema=0.0)
    opt.zero_grad()
    for half in (slice(0, 8), slice(8, 16)):  # each loss the mean over its micro-batch
        F.cross_entropy(model(x[half]), y[half]).backward()
    opt.step()
    assert rel_err(opt.fisher("0"), Fu) < 1e-10


def test_weight_sharing_counts_each_call_as_positions() -> None:
    torch.manual_seed(7)
    shared, head = nn.Linear(4, 4).to(F64), nn.Linear(4, 3).to(F64)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.head = shared, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    model = Twice()
    x, y = batch(31, n=10, shape=(4,))
    # brute force: δ of each call from autograd, ã of each call's input
    h1 = shared(x)
    z1 = torch.tanh(h1)
    h2 = shared(z1)
    ll = sum(log_lik("categorical", o, t) for o, t in zip(head(torch.tanh(h2)), y))
    d1, d2 = torch.autograd.grad(ll, [h1, h2])
    ones = torch.ones(10, 1, dtype=F64)
    a1, a2 = torch.cat([ones, x], 1), torch.cat([ones, z1.detach()], 1)
    Fu = (torch.einsum("nu,ni,nj->uij", d1**2, a1, a1)
          + torch.einsum("nu,ni,nj->uij", d2**2, a2, a2)) / 10
    opt = UnitNaturalGradient(model, lr=0.01, ema=0.0)
    train_step(model, opt, x, y)
    assert rel_err(opt.fisher("shared"), Fu) < 1e-10


# ------------------------------------------------------------------------------ (3) SGD
class Scaled(nn.Module):
    """A bare parameter outside any layer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_other_parameters_get_exactly_sgd() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.ELU(), Scaled(5), nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    opt = UnitNaturalGradient(model, lr=0.1, ema=0.5)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    assert opt.layers == ["0", "4"]
    for t in range(3):
        x, y = batch(40 + t)
        x = x.float()
        train_step(model, opt, x, y)
        train_step(twin, sgd, x, y)
        if t == 0:  # later steps differ in the inputs of the LayerNorm
            for name in ("1.weight", "1.bias", "3.scale"):
                a = dict(model.named_parameters())[name]
                b = dict(twin.named_parameters())[name]
                assert torch.equal(a, b), name
            assert not torch.equal(model[0].weight, twin[0].weight)


def test_modules_selection_leaves_other_layers_to_sgd() -> None:
    model = mlp(9)
    twin = copy.deepcopy(model)
    x, y = batch(50)
    Fu, g = reference_blocks(model, x, y)["2"]
    before = unit_params(model[2])
    opt = UnitNaturalGradient(model, lr=0.1, damping=1e-3, ema=0.0, modules=["2"], **EXACT)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    assert opt.layers == ["2"]
    train_step(model, opt, x, y)
    train_step(twin, sgd, x, y)
    for i in (0, 4):
        assert torch.equal(model[i].weight, twin[i].weight)
        assert torch.equal(model[i].bias, twin[i].bias)
    assert rel_err(unit_params(model[2]), before - 0.1 * solve(Fu, g, 1e-3)) < 1e-10
    # a submodule selects the layers inside it; a predicate works too
    assert UnitNaturalGradient(model, modules=model[2]).layers == ["2"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.ELU()), nn.Linear(3, 2))
    assert UnitNaturalGradient(nested, modules=nested[0]).layers == ["0.0"]
    assert UnitNaturalGradient(nested, modules=lambda n, m: m.out_features == 2).layers == ["1"]


def test_param_groups_lr_and_bias_not_owned() -> None:
    """Parameters with modules=: per-group learning rates; a layer whose bias is not given is
    preconditioned by its weight block alone and its bias is left untouched."""
    model = mlp(10)
    x, y = batch(60)
    ref = reference_blocks(model, x, y)
    b0, w0 = unit_params(model[0]), unit_params(model[4])
    bias4 = model[4].bias.detach().clone()
    groups = [{"params": [model[0].weight, model[0].bias], "lr": 0.2},
              {"params": [model[2].weight, model[4].weight], "lr": 0.05}]
    opt = UnitNaturalGradient(groups, damping=1e-3, ema=0.0, modules=model, **EXACT)
    assert opt.layers == ["0", "2", "4"]
    train_step(model, opt, x, y)
    Fu, g = ref["0"]
    assert rel_err(unit_params(model[0]), b0 - 0.2 * solve(Fu, g, 1e-3)) < 1e-10
    Fu, g = ref["4"]
    expected_w = w0[:, 1:] - 0.05 * solve(Fu[:, 1:, 1:], g[:, 1:], 1e-3)
    assert rel_err(model[4].weight.detach(), expected_w) < 1e-10
    assert torch.equal(model[4].bias.detach(), bias4)
    # the layers given as a list work the same way
    opt2 = UnitNaturalGradient([model[0].weight], modules=[model[0]])
    assert opt2.layers == ["0"]


# ------------------------------------------------------------------------------ what counts
def test_passes_that_must_not_count() -> None:
    """Eval-mode and no_grad forwards, forwards without backward, autograd.grad calls and a
    UnitFisher accumulation (before the backward pass or between backward and step) leave the
    step unchanged."""
    x, y = batch(70)
    xo, yo = batch(71)
    results = []
    for disturb in (False, True):
        model = mlp(11)
        opt = UnitNaturalGradient(model, lr=0.1, ema=0.5, inverse_every=1)
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if disturb:
                model.eval()
                torch.autograd.grad(model(xo).sum(), list(model.parameters()))  # eval mode
                model.train()
                with torch.no_grad():
                    model(xo)
                model(xo)  # a training forward that is never backpropagated
                # training forwards differentiated without accumulating into .grad
                torch.autograd.grad(F.cross_entropy(model(xo), yo), list(model.parameters()))
                UnitFisher(model, dtype=F64).accumulate(xo, yo)
            loss.backward()
            if disturb:  # between backward and step, as a tracking plug-in would
                UnitFisher(model, dtype=F64).accumulate(xo, yo)
                torch.autograd.grad(F.cross_entropy(model(xo), yo), list(model.parameters()))
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_inplace_activation_after_layer() -> None:
    a, b = mlp(12, inplace=False), mlp(12, inplace=True)
    oa = UnitNaturalGradient(a, lr=0.1, ema=0.0)
    ob = UnitNaturalGradient(b, lr=0.1, ema=0.0)
    x, y = batch(80)
    train_step(a, oa, x, y)
    train_step(b, ob, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


class _NaNGradForUnit0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[:, 0] = float("nan")
        return g


def test_nonfinite_batch_never_enters_the_fisher() -> None:
    model = mlp(13)
    opt = UnitNaturalGradient(model, lr=0.01, ema=0.5, update_every=1, on_divergence="warn")
    x, y = batch(90)
    train_step(model, opt, x, y)
    before = opt.fisher("0").clone()
    h = _NaNGradForUnit0.apply(model[0](x))
    out = model[4](model[3](model[2](model[1](h))))
    opt.zero_grad()
    F.cross_entropy(out, y).backward()
    # unit 0's direction is NaN: it is not moved, and that is reported at the next refresh
    # (here the refresh of layer "2" in the same step)
    with pytest.warns(RuntimeWarning, match="layer '0': a non-finite natural-gradient step at "
                      "step 1"):
        opt.step()
    assert torch.isfinite(model[0].weight).all()
    after = opt.fisher("0")
    assert torch.isfinite(after).all()
    assert torch.equal(after[0], before[0])  # unit 0 skipped this batch
    assert not torch.equal(after[1:], before[1:])  # the others took it


def test_step_without_statistics_is_sgd_and_warns() -> None:
    model = mlp(14)
    twin = copy.deepcopy(model)
    opt = UnitNaturalGradient(model, lr=0.1)
    x, y = batch(91)
    model.eval()  # eval-mode training step: nothing recorded
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with pytest.warns(RuntimeWarning, match="no training forward/backward pass of layer") as rec:
        opt.step()
    assert sorted(str(w.message).split("'")[1] for w in rec) == ["0", "2", "4"]
    model.train()
    F.cross_entropy(twin.eval()(x), y).backward()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.fisher("0") is None


def test_overflowed_fisher_falls_back_to_the_gradient_with_a_warning() -> None:
    model = mlp(23)
    lr, damping = 0.1, 1e-2
    opt = UnitNaturalGradient(model, lr=lr, damping=damping, ema=0.5, inverse_every=1, **EXACT,
                              on_divergence="warn")
    train_step(model, opt, *batch(95))
    running = opt._layers[0].running
    x, y = batch(96)
    ref = reference_blocks(model, x, y)["0"]
    S = running.fisher.clone()
    w = running.weight_sum.clone()
    before = unit_params(model[0])
    running.fisher[0, 0, 0] = float("inf")  # as after an overflow in a diverging run
    with pytest.warns(RuntimeWarning, match="layer '0'.*1 unit.*not finite"):
        train_step(model, opt, x, y)
    after = unit_params(model[0])
    F_hat = (0.5 * S + 0.5 * ref[0]) / (0.5 * w + 0.5)[:, None, None]
    g = ref[1]
    assert rel_err(after[0], before[0] - lr * g[0]) < 1e-10  # plain gradient
    assert rel_err(after[1:], before[1:] - lr * solve(F_hat[1:], g[1:], damping)) < 1e-10


# ------------------------------------------------------------------------------ (5) state
@pytest.mark.parametrize("packed", [False, True])
def test_state_dict_round_trip_is_bit_identical(packed: bool, monkeypatch) -> None:
    """A resumed run is bit-identical, also on the CPU's packed-inverse path (forced here for
    small layers): the state keeps ``L`` and the restored ``L⁻¹`` is rebuilt bit for bit."""
    if packed:
        from biasshift.optim import block_solve
        monkeypatch.setattr(block_solve, "CHUNK_ABOVE_BYTES", 0)
        monkeypatch.setattr(block_solve, "PACKED_INVERSE", True)
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(6, 16), nn.ELU(), nn.Linear(16, 16), nn.ELU(),
                          nn.Linear(16, 3))
    kw = dict(lr=0.02, damping=1e-2, ema=0.9, update_every=2, inverse_every=3)
    opt = UnitNaturalGradient(model, **kw)
    data = [tuple(t.float() if t.is_floating_point() else t for t in batch(100 + i))
            for i in range(10)]
    for x, y in data[:5]:
        train_step(model, opt, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    losses = [train_step(model, opt, x, y) for x, y in data[5:]]

    torch.manual_seed(99)
    fresh = nn.Sequential(nn.Linear(6, 16), nn.ELU(), nn.Linear(16, 16), nn.ELU(),
                          nn.Linear(16, 3))
    fresh.load_state_dict(saved["model"])
    opt2 = UnitNaturalGradient(fresh, lr=1.0, damping=1.0, ema=0.0)  # restored from the state
    opt2.load_state_dict(saved["opt"])
    assert (opt2.damping, opt2.ema, opt2.update_every, opt2.inverse_every) == (1e-2, 0.9, 2, 3)
    assert opt2.step_count == 5 and opt2.param_groups[0]["lr"] == 0.02
    losses2 = [train_step(fresh, opt2, x, y) for x, y in data[5:]]
    assert all(torch.equal(a, b) for a, b in zip(losses, losses2))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for name in opt.layers:
        assert torch.equal(opt.fisher(name), opt2.fisher(name))
        if packed:
            assert opt.factors(name).packed_inverse is not None
            assert torch.equal(opt.factors(name).packed_inverse,
                               opt2.factors(name).packed_inverse)


def test_trainer_resume_with_unit_natural_gradient(tmp_path) -> None:
    from biasshift.data import load_dataset
    from biasshift.train import Trainer

    ds = load_dataset("digits").subset(256, 64)

    def make(epochs: int, folder):
        return Trainer(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ELU(),
                                             nn.Linear(32, 10)),
                       ds, epochs=epochs, seed=3, probe_size=0, checkpoint_dir=folder,
                       optimizer=lambda m: UnitNaturalGradient(m, lr=0.003, damping=0.01,
                                                               inverse_every=3))

    full = make(2, tmp_path / "a").fit()
    make(1, tmp_path / "b").fit()
    resumed = make(2, tmp_path / "b").fit(resume=True)
    cols = ["epoch", "quantity", "value"]
    assert full[cols].equals(resumed[cols])
    train_loss = full.query("quantity == 'train_loss'").value
    assert train_loss.iloc[-1] < train_loss.iloc[0] - 0.05


def test_load_state_dict_checks_layers() -> None:
    opt = UnitNaturalGradient(mlp(16), lr=0.1)
    other = UnitNaturalGradient(convnet(), lr=0.1)
    with pytest.raises(ValueError, match="the state is for the layers"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="not a UnitNaturalGradient state"):
        opt.load_state_dict(torch.optim.SGD(mlp(16).parameters(), lr=0.1).state_dict())


# ------------------------------------------------------------------------------ (6) bad input
def test_bad_input_errors() -> None:
    model = mlp(17)
    with pytest.raises(ValueError, match="no Linear/Conv2d layer found in Sequential"):
        UnitNaturalGradient(nn.Sequential(nn.LayerNorm(3), Scaled(3)))
    with pytest.raises(ValueError, match=r"no Linear/Conv2d layer found.*pass the model"):
        UnitNaturalGradient(model.parameters())
    with pytest.raises(ValueError, match="no Linear/Conv2d layer found that owns"):
        UnitNaturalGradient(Scaled(3).parameters(), modules=model)
    for kw, match in [(dict(damping=-1e-3), "damping must be"),
                      (dict(damping=float("nan")), "damping must be"),
                      (dict(ema=1.0), r"ema must be in \[0, 1\)"),
                      (dict(ema=-0.1), r"ema must be in \[0, 1\)"),
                      (dict(lr=0.0), "lr must be"),
                      (dict(update_every=0), "update_every must be"),
                      (dict(inverse_every=1.5), "inverse_every must be"),
                      (dict(reduction="none"), "reduction must be"),
                      (dict(factor="lu"), "factor must be"),
                      (dict(dtype=torch.float16), "dtype must be"),
                      (dict(max_state_bytes=100), "more than max_state_bytes")]:
        with pytest.raises(ValueError, match=match):
            UnitNaturalGradient(model, **kw)
    with pytest.raises(KeyError, match="fc9"):
        UnitNaturalGradient(model, modules=["fc9"])
    with pytest.raises(ValueError, match="share one weight"):
        a = nn.Linear(3, 3)
        b = nn.Linear(3, 3)
        b.weight = a.weight
        UnitNaturalGradient(nn.Sequential(a, b))


def test_singular_block_without_damping_raises() -> None:
    model = mlp(18)
    opt = UnitNaturalGradient(model, lr=0.1, damping=0.0)
    x, y = batch(110, n=3)  # 3 samples, blocks of 7 rows: rank 3
    with pytest.raises(SingularFisherError, match=r"layer '0'.*smallest eigenvalue.*damping=") as e:
        train_step(model, opt, x, y)
    assert e.value.layer == "0"


def test_bad_forward_inputs() -> None:
    opt = UnitNaturalGradient(mlp(19), lr=0.1)
    with pytest.raises(ValueError, match=r"layer '0'.*a batch"):
        opt._layers[0].spec.module(torch.randn(6, dtype=F64))
    conv = convnet()
    opt2 = UnitNaturalGradient(conv, lr=0.1)  # keep it alive: its hooks go with it
    assert opt2.layers == ["0", "2", "5"]
    with pytest.raises(ValueError, match="layer '0': Conv2d input of shape"):
        conv[0](torch.randn(2, 6, 6, dtype=F64))


def test_input_modified_in_place_before_step_raises() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).to(F64)
    opt = UnitNaturalGradient(model, lr=0.1)
    x, y = batch(120, shape=(4,))
    F.cross_entropy(model(x), y).backward()
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step()


# ------------------------------------------------------------------------------ (7) hooks
def test_hooks_removed() -> None:
    model = mlp(20)
    counts = [(len(m._forward_hooks), m.weight._post_accumulate_grad_hooks)
              for m in model if isinstance(m, nn.Linear)]
    assert all(c == (0, None) for c in counts)
    with UnitNaturalGradient(model, lr=0.1) as opt:
        assert all(len(model[i]._forward_hooks) == 1 for i in (0, 2, 4))
        x, y = batch(130)
        train_step(model, opt, x, y)
    for i in (0, 2, 4):
        assert len(model[i]._forward_hooks) == 0
        assert not model[i].weight._post_accumulate_grad_hooks
    # a closed optimiser keeps its last factors (no warnings, no updates)
    F_before = opt.fisher("0").clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, opt, *batch(131))
    assert torch.equal(opt.fisher("0"), F_before)
    opt.close()  # idempotent
    # an optimiser dropped without close() leaves nothing recording on the model
    dropped = UnitNaturalGradient(model, lr=0.1)
    train_step(model, dropped, *batch(132))
    assert len(model[0]._forward_hooks) == 1
    del dropped
    gc.collect()
    assert len(model[0]._forward_hooks) == 0 and not model[0].weight._post_accumulate_grad_hooks


def test_closure_and_repr() -> None:
    model = mlp(21)
    opt = UnitNaturalGradient(model, lr=0.1)
    x, y = batch(140)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.ndim == 0 and opt.fisher("0") is not None
    assert "UnitNaturalGradient(lr=0.1" in repr(opt)
    with pytest.raises(KeyError, match="layer"):
        opt.fisher("nope")


# ------------------------------------------------------------------------------ (8) CUDA
@pytest.mark.cuda
def test_cuda_steps_do_not_synchronise() -> None:
    model = mlp(22).float().cuda()
    opt = UnitNaturalGradient(model, lr=0.05, damping=1e-2, ema=0.9, inverse_every=10)
    x, y = (t.cuda() for t in batch(150))
    x = x.float()
    train_step(model, opt, x, y)  # step 0 refreshes (one synchronisation allowed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # update steps without a refresh
            train_step(model, opt, x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(opt.fisher("0")).all()


def test_conv1d_step_equals_dense_damped_solve() -> None:
    """A Conv1d layer (a new adapter): every (sample, position) is a row, ``δ`` from autograd
    on the layer output and ``ã`` the input window of that position, built by hand."""
    torch.manual_seed(31)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.ELU(), nn.Flatten(),
                          nn.Linear(4 * 5, 3)).to(F64)
    g = torch.Generator().manual_seed(32)
    x = torch.randn(8, 2, 9, generator=g, dtype=F64)
    y = torch.randint(0, 3, (8,), generator=g)
    conv = model[0]
    out = conv(x)
    ll = sum(log_lik("categorical", o, t) for o, t in zip(model[1:](out), y))
    (delta,) = torch.autograd.grad(ll, [out])  # (N, units, L) = ∂ ln p / ∂net
    xp = F.pad(x, (1, 1))
    rows_a, rows_d = [], []
    for n in range(8):
        for pos in range(out.shape[-1]):
            window = xp[n, :, 2 * pos:2 * pos + 3].reshape(-1)
            rows_a.append(torch.cat([torch.ones(1, dtype=F64), window]))
            rows_d.append(delta[n, :, pos])
    A, D = torch.stack(rows_a), torch.stack(rows_d)  # (rows, n1), (rows, units)
    Fu = torch.einsum("ru,ri,rj->uij", D**2, A, A) / 8
    grad = -torch.einsum("ru,ri->ui", D, A) / 8
    before = unit_params(conv)
    lr, damping = 0.1, 1e-3
    opt = UnitNaturalGradient(model, lr=lr, damping=damping, ema=0.0, inverse_every=1, **EXACT)
    train_step(model, opt, x, y)
    assert rel_err(opt.fisher("0"), Fu) < 1e-10
    assert rel_err(unit_params(conv), before - lr * solve(Fu, grad, damping)) < 1e-10
