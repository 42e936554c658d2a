"""BiasShiftTracker: every recorded quantity against brute force, the no-trajectory-change
contract, bit-identical resume, bad input, non-finite values and devices."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from biasshift import theory
from biasshift.data import ArrayDataset, load_dataset
from biasshift.models import mlp
from biasshift.theory import SingularFisherError
from biasshift.train import Plugin, Trainer
from biasshift.train.tracking import (
    TRACKING_COLUMNS,
    UNIT_QUANTITIES,
    BiasShiftTracker,
    StepSchedule,
    summarize_tracking,
)


def _synthetic(n_train: int = 32, n_test: int = 8, shape=(1, 2, 3), classes: int = 3,
               seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(
        "synthetic",
        torch.rand(n_train, *shape, generator=g, dtype=torch.float64),
        torch.randint(0, classes, (n_train,), generator=g),
        torch.rand(n_test, *shape, generator=g, dtype=torch.float64),
        torch.randint(0, classes, (n_test,), generator=g),
        classes,
    )


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_dataset("digits").subset(192, 60)


def tiny_mlp() -> nn.Module:
    return mlp(6, [5, 4], 3, "elu").double()


def tiny_conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 2, padding=1), nn.ELU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 5, 4), nn.ReLU(), nn.Linear(4, 3)).double()


class Snapshots(Plugin):
    """Copies of the model before and after each tracked step, and the batch (read-only)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.before: dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}
        self.after: dict[int, nn.Module] = {}

    def on_before_step(self, trainer, step, x, y, loss) -> None:
        if step + 1 in self.steps:
            self.before[step + 1] = (copy.deepcopy(trainer.model), x.clone(), y.clone())

    def on_after_step(self, trainer, step, x, y, loss) -> None:
        if step + 1 in self.steps:
            self.after[step + 1] = copy.deepcopy(trainer.model)


# ------------------------------------------------------------------------- brute force
def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _forward_capture(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """Forward with hooks: each layer's input and output (the net inputs, kept in the graph)."""
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for n, m in _layers(model).items():
        def hook(mod, inp, out, n=n):
            ins[n], outs[n] = inp[0].detach(), out
        handles.append(m.register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, ins, outs


def _pairs(m: nn.Module, a: torch.Tensor, net: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Incoming rows ã (P, n+1) and a function of δ: net-shaped -> (P, units)."""
    if isinstance(m, nn.Conv2d):
        cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding,
                        stride=m.stride)  # (N, n, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = a.reshape(-1, a.shape[-1])
    return torch.cat([torch.ones(rows.shape[0], 1, dtype=rows.dtype), rows], 1), rows


def _unit_rows(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A net-shaped tensor as (pairs, units) in unfold order."""
    if isinstance(m, nn.Conv2d):
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


def brute_force(model_before: nn.Module, model_after: nn.Module, px: torch.Tensor,
                bx: torch.Tensor, by: torch.Tensor, lr: float, damping: float) -> dict:
    """Every tracked quantity of one step from first principles (exact categorical Fisher)."""
    mb = model_before.eval()
    # mini-batch gradient of the mean cross-entropy
    mb.zero_grad()
    F.cross_entropy(mb(bx), by).backward()
    # probe: nets, incoming vectors, δ per class
    out, ins, outs = _forward_capture(mb, px)
    logp = out.log_softmax(-1)
    p = logp.exp().detach()
    names = list(outs)
    deltas = [torch.autograd.grad(logp[:, r].sum(), [outs[n] for n in names],
                                  retain_graph=True) for r in range(logp.shape[1])]
    with torch.no_grad():
        _, _, outs_after = _forward_capture(model_after.eval(), px)
    res: dict[str, dict[str, torch.Tensor]] = {}
    for i, n in enumerate(names):
        m = _layers(mb)[n]
        at, a = _pairs(m, ins[n], outs[n])
        P = at.shape[0]
        L = P // px.shape[0]
        # w = Σ_r p_r δ_r² per pair and unit
        w = sum(p[:, r].repeat_interleave(L)[:, None] * _unit_rows(m, deltas[r][i]) ** 2
                for r in range(p.shape[1]))
        Fb = torch.einsum("pu,pi,pj->uij", w, at, at) / P
        units = Fb.shape[0]
        g = torch.cat([m.bias.grad[:, None], m.weight.grad.reshape(units, -1)], 1)
        E_p_a = a.mean(0).expand(units, -1)
        eye = torch.eye(Fb.shape[-1], dtype=Fb.dtype)
        nat = torch.linalg.solve(Fb + damping * eye, g.unsqueeze(-1)).squeeze(-1)  # dense
        t2 = theory.theorem2(Fb, g, E_p_a, damping)
        net_b = _unit_rows(m, outs[n].detach()).mean(0)
        net_a = _unit_rows(m, outs_after[n]).mean(0)
        ma = _layers(model_after)[n]
        db = ma.bias.detach() - m.bias.detach()
        dw = (ma.weight.detach() - m.weight.detach()).reshape(units, -1)
        sgd_dir = g[:, 0] + (E_p_a * g[:, 1:]).sum(-1)
        ng_dir = nat[:, 0] + (E_p_a * nat[:, 1:]).sum(-1)
        res[n] = {
            "mean_net": net_b,
            "E_p_delta2": Fb[:, 0, 0],
            "norm_E_p_a": E_p_a.norm(dim=-1),
            "norm_E_q_a": (Fb[:, 1:, 0] / Fb[:, 0, 0, None]).norm(dim=-1),
            "s": theory.s_from_fisher(Fb, damping),
            "k": theory.k_from_fisher(Fb, E_p_a, damping),
            "grad_norm": g.norm(dim=-1),
            "cos_grad_ng": (g * nat).sum(-1) / (g.norm(dim=-1) * nat.norm(dim=-1)),
            "bias_shift_sgd": sgd_dir,
            "bias_shift_ng": ng_dir,
            "bias_shift_ng_uncorrected": theory.bias_shift_uncorrected(Fb, g, E_p_a, damping),
            "ng_mean_term": t2.mean_term,
            "ng_bias_term": t2.bias_term,
            "step_bias_shift_sgd": -lr * sgd_dir,
            "step_bias_shift_ng": -lr * ng_dir,
            "step_bias_shift_first_order": db + (E_p_a * dw).sum(-1),
            "step_bias_shift_measured": net_a - net_b,
        }
        # Theorem 2's decomposition and the dense value agree (a check of the reference)
        torch.testing.assert_close(t2.bias_shift, ng_dir, rtol=1e-9, atol=1e-12)
    return res


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_every_quantity_matches_brute_force(arch: str) -> None:
    if arch == "mlp":
        ds, factory = _synthetic(shape=(1, 2, 3)), tiny_mlp
    else:
        ds, factory = _synthetic(shape=(1, 3, 4)), tiny_conv
    steps = {1, 3, 6}
    damping, lr = 1e-3, 0.3
    tracker = BiasShiftTracker(probe_size=20, schedule=sorted(steps), damping=damping,
                               condition=True)
    snaps = Snapshots(steps)
    t = Trainer(factory, ds, epochs=2, batch_size=8, lr=lr, seed=3, probe_size=0,
                plugins=[snaps, tracker])
    t.fit()
    assert tracker.tracked_steps == sorted(steps)
    df = tracker.frame()
    assert list(df.columns) == list(TRACKING_COLUMNS)
    assert set(df["quantity"]) == {*UNIT_QUANTITIES, "cond_F", "lr"}
    assert df.attrs["fisher"] == "exact" and df.attrs["damping"] == damping
    probe = tracker.probe_x.cpu()
    for s in sorted(steps):
        before, bx, by = snaps.before[s]
        ref = brute_force(before, snaps.after[s], probe, bx, by, lr, damping)
        got = df[df["step"] == s]
        assert (got["epoch"] == (s - 1) // 4 + 1).all()
        for layer, quantities in ref.items():
            for q, want in quantities.items():
                sel = got[(got["layer"] == layer) & (got["quantity"] == q)]
                assert sel["unit"].tolist() == list(range(want.numel())), (layer, q)
                np.testing.assert_allclose(sel["value"].to_numpy(), want.detach().numpy(),
                                           rtol=1e-8, atol=1e-13, err_msg=f"{s} {layer} {q}")
            lr_rows = got[(got["layer"] == layer) & (got["quantity"] == "lr")]
            assert lr_rows["value"].tolist() == [lr] and lr_rows["unit"].isna().all()
            cond = got[(got["layer"] == layer) & (got["quantity"] == "cond_F")]["value"]
            assert (cond >= 1).all()
        # inputs of the first layer are the data: measured == first-order prediction
        first = next(iter(ref))
        np.testing.assert_allclose(ref[first]["step_bias_shift_measured"].numpy(),
                                   ref[first]["step_bias_shift_first_order"].numpy(),
                                   rtol=1e-7, atol=1e-12)
    # plain SGD: the actual update is -lr g, so first order == the SGD prediction
    fo = df[df["quantity"] == "step_bias_shift_first_order"]["value"].to_numpy()
    sg = df[df["quantity"] == "step_bias_shift_sgd"]["value"].to_numpy()
    np.testing.assert_allclose(fo, sg, rtol=1e-9, atol=1e-14)


def test_probe_given_explicitly_and_empirical_fisher_uses_its_labels() -> None:
    ds = _synthetic()
    px, py = ds.train_x[:10], ds.train_y[:10]
    a = BiasShiftTracker(px, py, fisher="empirical", schedule=[2])
    b = BiasShiftTracker(px, (py + 1) % 3, fisher="empirical", schedule=[2])
    c = BiasShiftTracker(px, (py + 1) % 3, fisher="exact", schedule=[2])
    d = BiasShiftTracker(px, py, fisher="exact", schedule=[2])
    for tr in (a, b, c, d):
        Trainer(tiny_mlp, ds, epochs=1, batch_size=8, seed=1, probe_size=0,
                plugins=[tr]).fit()
    torch.testing.assert_close(a.probe_x, px)
    va, vb, vc, vd = (tr.values() for tr in (a, b, c, d))
    iq = UNIT_QUANTITIES.index("E_p_delta2")
    assert not torch.allclose(va[:, iq], vb[:, iq])  # the labels enter the empirical Fisher
    torch.testing.assert_close(vc, vd, rtol=0, atol=0)  # but not the exact one


def test_refine_reaches_the_probe_and_the_record() -> None:
    """``refine`` is the probe's (the same table as a probe given it directly) and recorded."""
    ds = _synthetic()
    px, py = ds.train_x[:10], ds.train_y[:10]
    tr = {r: BiasShiftTracker(px, py, schedule=[2], refine=r, dtype=torch.float32)
          for r in (0, 1)}
    for t in tr.values():
        Trainer(tiny_mlp, ds, epochs=1, batch_size=8, seed=1, probe_size=0, plugins=[t]).fit()
    assert tr[0].info()["refine"] == 0 and tr[1].info()["refine"] == 1
    assert tr[0]._probe.refine == 0 and tr[1]._probe.refine == 1
    assert tr[0].frame().attrs["refine"] == 0
    with pytest.raises(ValueError, match="refine must be an int"):
        Trainer(tiny_mlp, ds, epochs=1, batch_size=8, seed=1, probe_size=0,
                plugins=[BiasShiftTracker(px, py, schedule=[2], refine=-1)]).fit()


# ------------------------------------------------------------------------- the contract
class GradRecorder(Plugin):
    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []
        self.flags: list[bool] = []

    def on_before_step(self, trainer, step, x, y, loss) -> None:
        self.grads.append([p.grad.clone() for p in trainer.model.parameters()])
        self.losses.append(loss.detach().clone())
        self.flags.append(trainer.model.training)


def _dropout_mlp() -> nn.Module:
    return nn.Sequential(mlp(64, [16, 12], 10, "elu"), nn.Dropout(0.2))


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_tracking_does_not_change_the_trajectory(digits: ArrayDataset, fisher: str) -> None:
    def run(track: bool) -> tuple[Trainer, GradRecorder, BiasShiftTracker | None]:
        rec = GradRecorder()
        tr = BiasShiftTracker(probe_size=64, fisher=fisher) if track else None
        plugins = [tr, rec] if tr is not None else [rec]
        t = Trainer(_dropout_mlp, digits, epochs=2, batch_size=32, seed=5, plugins=plugins)
        t.fit()
        return t, rec, tr

    plain, rec0, _ = run(False)
    tracked, rec1, tracker = run(True)
    assert tracker is not None and len(tracker.tracked_steps) >= 8
    pd.testing.assert_frame_equal(plain.history, tracked.history, check_exact=True)
    assert all(torch.equal(a, b) for a, b in zip(rec0.losses, rec1.losses))
    for g0, g1 in zip(rec0.grads, rec1.grads):  # the tracker left .grad alone
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(rec1.flags)  # training mode restored after every tracked step
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(),
                                                 tracked.model.parameters()))


def test_tracking_does_not_feed_the_natural_gradient_optimizer(digits: ArrayDataset) -> None:
    """UnitNaturalGradient hooks the model; the tracker's probe and Fisher passes (eval mode,
    torch.autograd.grad) must not enter its running Fisher."""
    optim = pytest.importorskip("biasshift.optim")

    def run(track: bool) -> tuple[Trainer, GradRecorder]:
        rec = GradRecorder()
        plugins = [BiasShiftTracker(probe_size=64), rec] if track else [rec]
        t = Trainer(lambda: mlp(64, [16, 12], 10, "elu"), digits, epochs=2, batch_size=32,
                    seed=5, plugins=plugins, optimizer=lambda m: optim.UnitNaturalGradient(
                        m, lr=0.001, damping=1e-2, ema=0.9, inverse_every=2))
        t.fit()
        return t, rec

    (plain, rec0), (tracked, rec1) = run(False), run(True)
    pd.testing.assert_frame_equal(plain.history, tracked.history, check_exact=True)
    assert all(torch.equal(a, b) for a, b in zip(rec0.losses, rec1.losses))
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(),
                                                 tracked.model.parameters()))


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_resume_gives_the_same_table(digits: ArrayDataset, tmp_path, fisher: str) -> None:
    def make(epochs: int, ckpt) -> tuple[Trainer, BiasShiftTracker]:
        tr = BiasShiftTracker(probe_size=48, fisher=fisher, schedule=StepSchedule.log_spaced(4))
        t = Trainer(lambda: mlp(64, [16, 12], 10, "relu"), digits, epochs=epochs, batch_size=32,
                    seed=2, checkpoint_dir=ckpt, plugins=[tr])
        return t, tr

    full, tr_full = make(4, tmp_path / "full")
    h_full = full.fit()
    first, _ = make(2, tmp_path / "split")
    first.fit()
    second, tr_second = make(4, tmp_path / "split")
    h_split = second.fit(resume=True)
    assert second.resumed_from == 2
    pd.testing.assert_frame_equal(h_full, h_split, check_exact=True)
    pd.testing.assert_frame_equal(tr_full.frame(), tr_second.frame(), check_exact=True)
    assert tr_full.tracked_steps == [1, 2, 3, 6, 10, 12, 18, 24]


def test_state_dict_is_plain_and_checked(digits: ArrayDataset, tmp_path) -> None:
    tr = BiasShiftTracker(probe_size=32, schedule=[1, 3])
    Trainer(lambda: mlp(64, [8], 10, "elu"), digits, epochs=1, batch_size=64, plugins=[tr],
            probe_size=0).fit()
    state = tr.state_dict()
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    fresh = BiasShiftTracker(probe_size=32, schedule=[1, 3])
    fresh.load_state_dict(loaded)  # before a fit: takes the layout from the state
    fresh.run = tr.run
    pd.testing.assert_frame_equal(fresh.frame(), tr.frame(), check_exact=True)
    other = BiasShiftTracker(probe_size=32, damping=1e-2)
    other.layers, other.units = tr.layers, tr.units
    with pytest.raises(ValueError, match=r"damping: saved 0.0001, now 0.01"):
        other.load_state_dict(loaded)


# ------------------------------------------------------------------------- bad input
def test_probe_of_the_wrong_shape_or_labels_is_a_clear_error() -> None:
    ds = _synthetic()

    def fit(tracker: BiasShiftTracker) -> None:
        Trainer(tiny_mlp, ds, epochs=1, batch_size=8, probe_size=0, plugins=[tracker]).fit()

    with pytest.raises(ValueError, match=r"probe_x has shape \(4, 6\) but the model is trained "
                                         r"on inputs of shape \(N, 1, 2, 3\)"):
        fit(BiasShiftTracker(torch.rand(4, 6, dtype=torch.float64), torch.zeros(4).long()))
    with pytest.raises(ValueError, match=r"probe_y has shape \(3,\); expected \(4,\)"):
        fit(BiasShiftTracker(ds.train_x[:4], ds.train_y[:3]))
    with pytest.raises(ValueError, match=r"probe_y .* is needed"):
        fit(BiasShiftTracker(ds.train_x[:4]))
    with pytest.raises(TypeError, match="int64 class indices"):
        fit(BiasShiftTracker(ds.train_x[:4], ds.train_y[:4].float()))
    with pytest.raises(ValueError, match=r"classes 0..7; the data has 3 classes"):
        fit(BiasShiftTracker(ds.train_x[:4], torch.tensor([0, 1, 7, 2])))
    with pytest.raises(TypeError, match=r"dtype torch.float32"):
        fit(BiasShiftTracker(ds.train_x[:4].float(), ds.train_y[:4]))
    with pytest.raises(ValueError, match=r"probe_size=99 exceeds the 32 training samples"):
        fit(BiasShiftTracker(probe_size=99))
    with pytest.raises(ValueError, match="non-empty batch"):
        BiasShiftTracker(torch.zeros(0, 1, 2, 3))
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        BiasShiftTracker(damping=-1.0)
    with pytest.raises(ValueError, match="fisher must be one of"):
        BiasShiftTracker(fisher="true")


def test_layers_without_bias_or_support_are_refused_or_skipped() -> None:
    ds = _synthetic()
    no_bias = lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, 4, bias=False), nn.ELU(),  # noqa: E731
                                    nn.Linear(4, 3)).double()
    tr = BiasShiftTracker(probe_size=8, schedule=[1])
    with pytest.warns(UserWarning, match="layers without bias .* not tracked: 1"):
        Trainer(no_bias, ds, epochs=1, batch_size=8, probe_size=0, plugins=[tr]).fit()
    assert tr.layers == ["3"]
    with pytest.raises(ValueError, match=r"layer.s. 1 have no bias"):
        Trainer(no_bias, ds, epochs=1, batch_size=8, probe_size=0,
                plugins=[BiasShiftTracker(probe_size=8, layers=["1"])]).fit()
    only_bn = lambda: nn.Sequential(nn.Flatten(), nn.LayerNorm(6), nn.Linear(6, 3, bias=False)  # noqa: E731
                                    ).double()
    with pytest.raises(ValueError, match=r"no nn.Linear/nn.Conv2d layer with a bias"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(only_bn, ds, epochs=1, batch_size=8, probe_size=0,
                    plugins=[BiasShiftTracker(probe_size=8)]).fit()
    no_layers = lambda: nn.Sequential(nn.Flatten(), nn.LayerNorm(6)).double()  # noqa: E731
    with pytest.raises(ValueError, match="no layer selected"):
        Trainer(no_layers, ds, epochs=1, batch_size=8, probe_size=0,
                plugins=[BiasShiftTracker(probe_size=8)]).fit()


def test_singular_block_without_damping_is_a_clear_error() -> None:
    ds = _synthetic()

    def dead_unit() -> nn.Module:
        m = mlp(6, [5], 3, "relu").double()
        with torch.no_grad():
            m.fc1.bias[2] = -100.0  # never active: δ = 0, its block is singular
        return m

    with pytest.raises(SingularFisherError,
                       match=r"layer 'fc1'.*\(unit [0-9, ]*\b2\b.*damping 0.*Pass damping > 0"):
        Trainer(dead_unit, ds, epochs=1, batch_size=8, probe_size=0,
                plugins=[BiasShiftTracker(probe_size=16, damping=0.0, schedule=[1])]).fit()
    # with damping the same model is tracked; E_q(a) of the dead unit is undefined (NaN)
    tr = BiasShiftTracker(probe_size=16, damping=1e-3, schedule=[1])
    Trainer(dead_unit, ds, epochs=1, batch_size=8, probe_size=0, plugins=[tr]).fit()
    df = tr.frame()
    dead = df[(df["layer"] == "fc1") & (df["unit"] == 2)].set_index("quantity")["value"]
    assert dead["E_p_delta2"] == 0 and np.isnan(dead["norm_E_q_a"])
    assert np.isfinite(dead["cos_grad_ng"]) or dead["grad_norm"] == 0


def test_non_finite_model_records_nan_and_training_goes_on() -> None:
    ds = _synthetic()

    class Poison(Plugin):  # a test plug-in that breaks the contract on purpose
        def on_after_step(self, trainer, step, x, y, loss):
            if step == 1:
                with torch.no_grad():
                    trainer.model.fc2.weight[0, 0] = float("inf")

    tr = BiasShiftTracker(probe_size=16, schedule=[1, 3])
    t = Trainer(tiny_mlp, ds, epochs=1, batch_size=8, probe_size=0, plugins=[Poison(), tr])
    with pytest.warns(UserWarning, match="step 3: .*non-finite.*recorded as NaN"):
        t.fit()
    assert t.diverged and tr.tracked_steps == [1, 3]
    df = tr.frame()
    late = df[(df["step"] == 3) & (df["quantity"] == "cos_grad_ng")]["value"]
    assert late.isna().all()
    early = df[(df["step"] == 1) & (df["quantity"] == "cos_grad_ng")]["value"]
    assert np.isfinite(early).all()
    summ = summarize_tracking(df, quantities=["cos_grad_ng"])
    row = summ[(summ["step"] == 3) & (summ["layer"] == "all")].iloc[0]
    assert row["n"] == 0 and row["nonfinite"] == 12


# ------------------------------------------------------------------------- devices
def test_tracking_on_each_device_agrees_with_cpu(device: torch.device) -> None:
    ds = _synthetic()

    def run(dev: torch.device) -> pd.DataFrame:
        tr = BiasShiftTracker(probe_size=16, schedule=[1, 2, 4])
        Trainer(tiny_mlp, ds, epochs=1, batch_size=8, seed=4, probe_size=0, device=dev,
                plugins=[tr]).fit()
        return tr.frame()

    cpu, dev = run(torch.device("cpu")), run(device)
    pd.testing.assert_frame_equal(cpu.drop(columns="value"), dev.drop(columns="value"))
    np.testing.assert_allclose(dev["value"], cpu["value"], rtol=1e-6, atol=1e-9)


@pytest.mark.cuda
def test_untracked_steps_do_not_synchronise(digits: ArrayDataset) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tr = BiasShiftTracker(probe_size=32, schedule=[1])
    t = Trainer(lambda: mlp(64, [16], 10, "elu"), digits, epochs=1, device="cuda",
                plugins=[tr])
    t.fit()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t._train_epoch(2)  # steps 7..12 are not tracked
    finally:
        torch.cuda.set_sync_debug_mode("default")
