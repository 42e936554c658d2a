"""bias-shift-mechanism (issue 11): the control units, paired initialisation, the loss curve,
the run-level statistics against scipy and brute force, and a tiny end-to-end run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from biasshift.activations import (
    CenteredReLU,
    ShiftedELU,
    is_activation_name,
    make_activation,
)
from biasshift.data import load_dataset
from biasshift.models import paper_mlp
from biasshift.reproduce.bias_shift_mechanism import (
    BSM_COLUMNS,
    BiasShiftMechanism,
    InputCentring,
    parse_arm,
    with_damped_mean_scale,
)
from biasshift.reproduce.bias_shift_mechanism_report import run_table, shift_of
from biasshift.reproduce.runner import resolve_settings, run_analysis
from biasshift.stats import (
    bootstrap_ci,
    cohens_dz,
    fisher_z_pool,
    paired_comparison,
    pooled_spearman,
    sign_flip_test,
    wilcoxon_exact,
)
from biasshift.train.loss_curve import LossCurve, steps_to_threshold
from biasshift.train.tracking import StepSchedule
from biasshift.train.trainer import Trainer


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("c", [-0.5, 0.5, 1.0])
def test_shifted_elu_moves_only_the_mean(c: float) -> None:
    x = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    f = make_activation(f"elu{c:+g}")
    assert isinstance(f, ShiftedELU) and f.shift == c
    y = f(x)
    ref = torch.where(x > 0, x, torch.exp(x) - 1) + c  # ELU by its definition, plus c
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g0,) = torch.autograd.grad(F.elu(x).sum(), x)
    torch.testing.assert_close(g, g0, rtol=0, atol=0)  # the same derivative as the ELU


def test_activation_names() -> None:
    for name in ("elu", "relu", "lrelu", "srelu", "elu+0.5", "elu-0.5", "elu+1", "crelu",
                 "ELU+2.25"):
        assert is_activation_name(name)
    for name in ("elu+", "elu*2", "relu+1", "celu", "elu+x"):
        assert not is_activation_name(name)
        with pytest.raises(KeyError, match="unknown activation"):
            make_activation(name)


def test_centered_relu_train_and_eval() -> None:
    torch.manual_seed(0)
    act = CenteredReLU(momentum=0.1)
    running = torch.zeros(5, dtype=torch.float64)
    for _ in range(4):
        x = torch.randn(32, 5, dtype=torch.float64) + 0.3
        y = act(x)
        r = x.clamp_min(0)
        m = r.mean(0)
        torch.testing.assert_close(y, r - m)
        torch.testing.assert_close(y.mean(0), torch.zeros(5, dtype=torch.float64))
        running = 0.9 * running + 0.1 * m
        torch.testing.assert_close(act.running_mean, running)
    act.eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(act(x), x.clamp_min(0) - running)
    torch.testing.assert_close(act.running_mean, running)  # eval mode does not update
    # samples do not interact in eval mode: one at a time gives the same
    torch.testing.assert_close(torch.cat([act(x[i:i + 1]) for i in range(7)]), act(x))


def test_centered_relu_gradient_flows_through_the_batch_mean() -> None:
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 3, dtype=torch.float64)

    def ref(x: torch.Tensor) -> torch.Tensor:
        r = x.clamp_min(0)
        return ((r - r.mean(0)) * w).sum()

    (g,) = torch.autograd.grad((CenteredReLU()(x) * w).sum(), x)
    (g_ref,) = torch.autograd.grad(ref(x), x)
    torch.testing.assert_close(g, g_ref)


def test_centered_relu_conv_layout_and_state() -> None:
    act = CenteredReLU()
    x = torch.randn(4, 3, 5, 5)
    y = act(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)
    fresh = CenteredReLU()
    fresh.load_state_dict(act.state_dict())  # the lazily sized buffer loads
    torch.testing.assert_close(fresh.running_mean, act.running_mean)
    with pytest.raises(ValueError, match="units"):
        act(torch.randn(4, 2))


def test_mlp_batch_norm_placement() -> None:
    net = paper_mlp("relu", depth=2, width=8, in_features=6, num_classes=3, batch_norm=True)
    names = [n for n, _ in net.named_children()]
    assert names == ["flatten", "fc1", "bn1", "act1", "fc2", "bn2", "act2", "out"]
    assert isinstance(net.bn1, nn.BatchNorm1d) and net.fc1.bias is not None


# ----------------------------------------------------------------------------- arms, pairing
def test_parse_arm() -> None:
    a = parse_arm("relu/bn")
    assert (a.activation, a.bn, a.ci, a.label, a.slug) == ("relu", True, False, "relu/bn",
                                                           "relu-bn")
    assert parse_arm("elu+0.5/ci").ci
    for bad in ("foo", "relu/xx", "relu/bn/bn"):
        with pytest.raises(ValueError):
            parse_arm(bad)


def _spec(analysis: BiasShiftMechanism, arm: str, seed: int):
    s = resolve_settings("bias-shift-mechanism", quick=True, seeds=seed + 1)
    s = type(s)(**{**s.__dict__, "options": {**s.options, "arms": (arm,), "ng_arms": ()}})
    return next(x for x in analysis.run_specs(s) if x.seed == seed)


def test_paired_initial_weights_across_arms() -> None:
    """Run r of every arm starts from the same weights of every linear layer (the trainer's
    init seed; BN, the centred ReLU and the input centring draw no random numbers)."""
    ds = load_dataset("digits")
    analysis = BiasShiftMechanism()
    arms = ["elu", "elu+1", "elu-0.5", "crelu", "relu", "srelu", "relu/bn", "elu/ci"]
    weights = {}
    for arm in arms:
        for seed in (0, 1):
            spec = _spec(analysis, arm, seed)
            tr = Trainer(lambda spec=spec: analysis.build_model(spec, ds), ds, epochs=1,
                         seed=seed, probe_size=0, progress=False)
            weights[arm, seed] = {n: m.weight.detach().clone()
                                  for n, m in tr.model.named_modules()
                                  if isinstance(m, nn.Linear)}
    for seed in (0, 1):
        ref = weights["elu", seed]
        for arm in arms:
            got = weights[arm, seed]
            assert list(got) == list(ref)
            for n in ref:
                assert torch.equal(got[n], ref[n]), (arm, seed, n)
    assert not torch.equal(weights["elu", 0]["fc1"], weights["elu", 1]["fc1"])


def test_input_centring_module() -> None:
    ds = load_dataset("digits")
    analysis = BiasShiftMechanism()
    model = analysis.build_model(_spec(analysis, "relu/ci", 0), ds)
    assert isinstance(model.centre, InputCentring)
    z = model.centre(ds.train_x)
    torch.testing.assert_close(z.mean(0), torch.zeros_like(z[0]), atol=1e-5, rtol=0)
    assert not list(model.centre.parameters())


def test_cuda_preset_is_chosen_on_cuda_only() -> None:
    from biasshift.reproduce.registry import get_analysis

    a = BiasShiftMechanism()
    assert a.preset_name(False, "cuda") == "cuda" and a.presets["cuda"].seeds > 5
    assert a.preset_name(False, "cpu") == "paper" and a.preset_name(True, "cuda") == "quick"
    assert get_analysis("activation-median").preset_name(False, "cuda") == "paper"
    p = a.presets["paper"]
    assert (p.dataset, p.epochs, p.seeds, p.lrs, p.model) == (
        "mnist", 15, 5, (0.01,), {"depth": 8, "width": 128})


def test_tolerant_tracker_records_singular_blocks_as_nan() -> None:
    """With damping 0 a dead input makes the next layer's blocks singular: the run goes on,
    the step is counted and the units' Fisher quantities are NaN."""
    from biasshift.reproduce.bias_shift_mechanism import TolerantTracker

    ds = load_dataset("digits")

    def model() -> nn.Module:
        net = paper_mlp("relu", depth=2, width=8, in_features=64)
        with torch.no_grad():
            net.fc1.bias[0] = -1e3  # unit 0 of layer 1 is dead: fc2's input 0 is constant
        return net

    trk = TolerantTracker(probe_size=200, schedule=[1, 2], damping=0.0)
    tr = Trainer(model, ds, epochs=1, seed=0, probe_size=0, plugins=[trk], progress=False)
    tr.fit()
    assert trk.singular_steps == 2 and trk.info()["singular_steps"] == 2
    f = trk.frame()
    cos = f[(f["layer"] == "fc2") & (f["quantity"] == "cos_grad_ng")]["value"]
    assert cos.isna().all()
    # the measured quantities are kept
    kept = f[(f["layer"] == "fc2") & (f["quantity"] == "step_bias_shift_measured")]["value"]
    assert len(kept) == 16 and np.isfinite(kept).all()


# ----------------------------------------------------------------------------- loss curve
def test_steps_to_threshold_interpolates_log_log() -> None:
    s = [1, 10, 100, 1000]
    v = [2.0, 1.0, 0.2, 0.02]
    steps, ok = steps_to_threshold(s, v, 0.1)
    # log-linear between (100, 0.2) and (1000, 0.02): 0.1 is at 10^(2 + log(2)/log(10))
    assert ok and math.isclose(steps, 10 ** (2 + math.log10(2)), rel_tol=1e-12)
    assert steps_to_threshold(s, v, 5.0) == (1.0, True)
    assert steps_to_threshold(s, v, 0.01) == (1000.0, False)  # censored
    assert steps_to_threshold(s, [2, float("nan"), 0.5, 0.05], 1.0)[1]
    with pytest.raises(ValueError):
        steps_to_threshold([1, 1], [1, 1], 0.5)


def test_loss_curve_matches_direct_evaluation_and_keeps_the_trajectory() -> None:
    ds = load_dataset("digits")

    def fit(plugins):
        tr = Trainer(lambda: paper_mlp("crelu", depth=2, width=16, in_features=64),
                     ds, epochs=2, seed=3, probe_size=0, plugins=plugins, progress=False)
        tr.fit()
        return tr

    curve = LossCurve(size=300, schedule=StepSchedule([1, 5, 23, 40], epoch_ends=True))
    with_it, without = fit([curve]), fit([])
    for p, q in zip(with_it.model.parameters(), without.model.parameters()):
        assert torch.equal(p, q)  # the trajectory is unchanged
    f = curve.frame()
    assert f["step"].tolist() == [1, 5, 23, 40, 46]  # + the epoch ends (23, 46)
    # the last value equals an independent evaluation of the final model on the subset
    model = with_it.model.eval()
    with torch.no_grad():
        ref = F.cross_entropy(model(curve.x), curve.y).item()
    assert math.isclose(f["loss"].iloc[-1], ref, rel_tol=1e-5)


# ----------------------------------------------------------------------------- statistics
def _sign_flip_brute(d: np.ndarray) -> float:
    obs = abs(d.mean())
    hits = 0
    pats = list(itertools.product([1, -1], repeat=len(d)))
    for signs in pats:
        hits += abs((np.array(signs) * d).mean()) >= obs - 1e-12
    return hits / len(pats)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=8))
def test_sign_flip_equals_brute_force(values: list[float]) -> None:
    d = np.asarray(values)
    assert sign_flip_test(d) == pytest.approx(_sign_flip_brute(d))


def test_sign_flip_against_scipy_permutation_test() -> None:
    from scipy.stats import permutation_test

    rng = np.random.default_rng(1)
    for n in (4, 6, 9):
        a, b = rng.normal(size=n), rng.normal(size=n) + 0.5
        res = permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                               n_resamples=10**6, alternative="two-sided")
        assert sign_flip_test(a - b) == pytest.approx(res.pvalue, rel=1e-9)
    assert sign_flip_test([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)  # the smallest with 5


def test_wilcoxon_exact_against_enumeration() -> None:
    d = np.array([0.3, -1.2, 2.5, 0.9, 1.7, -0.4])
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w_obs = ranks[d > 0].sum()
    dist = [sum(r for r, s in zip(ranks, signs) if s) for signs in
            itertools.product([0, 1], repeat=len(d))]
    mean = ranks.sum() / 2
    p = np.mean([abs(w - mean) >= abs(w_obs - mean) for w in dist])
    assert wilcoxon_exact(d) == pytest.approx(p)


def test_bootstrap_ci_coverage_and_edges() -> None:
    rng = np.random.default_rng(2)
    cover = 0
    for i in range(200):
        x = rng.normal(3.0, 1.0, size=20)
        _, lo, hi = bootstrap_ci(x, n_boot=1000, seed=i)
        cover += lo <= 3.0 <= hi
    assert 0.85 <= cover / 200 <= 0.99  # percentile bootstrap, n = 20: slightly below 95 %
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    est, lo, hi = bootstrap_ci([2.0, np.nan])
    assert est == 2.0 and math.isnan(lo)
    # the median statistic without an axis argument is supported too
    est, lo, hi = bootstrap_ci([1, 2, 3, 10], statistic=lambda v: float(np.median(v)))
    assert est == 2.5 and lo <= est <= hi


def test_paired_comparison_numbers() -> None:
    a = np.array([10.0, 12, 9, 14, 11])
    b = np.array([12.0, 15, 10, 15, 14])
    r = paired_comparison(a, b, n_boot=2000)
    d = a - b
    assert r.n == 5 and r.diff == pytest.approx(d.mean())
    assert r.d_z == pytest.approx(d.mean() / d.std(ddof=1)) == pytest.approx(cohens_dz(d))
    assert r.ratio == pytest.approx(a.mean() / b.mean())
    assert r.diff_low <= r.diff <= r.diff_high < 0
    assert r.p_sign_flip == pytest.approx(2 / 32) and r.a_wins == 5
    with pytest.raises(ValueError, match="seeds"):
        paired_comparison([1, 2], [1, 2, 3])


def test_fisher_z_pool_and_pooled_spearman() -> None:
    from scipy.stats import spearmanr

    r, n = np.array([0.5, -0.2, 0.9]), np.array([10, 20, 4])
    z = np.arctanh(r)
    w = n - 3
    assert fisher_z_pool(r, n) == pytest.approx(np.tanh((w * z).sum() / w.sum()))
    assert math.isnan(fisher_z_pool([0.3], [3]))
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(6):
        for layer in ("a", "b"):
            for _ in range(5):
                x = rng.normal()
                rows.append({"seed": seed, "layer": layer, "phase": "p", "x": x,
                             "y": (x if layer == "a" else -x) + 0.3 * rng.normal()})
    df = pd.DataFrame(rows)
    res = pooled_spearman(df, "x", "y", ["layer"], n_boot=200)
    per = {g["layer"]: g["rho"] for g in res["per_group"]}
    for layer, g in df.groupby("layer"):
        assert per[layer] == pytest.approx(spearmanr(g["x"], g["y"]).statistic)
    assert res["rho"] == pytest.approx(fisher_z_pool([per["a"], per["b"]], [30, 30]))
    assert res["low"] <= res["rho"] <= res["high"]
    assert res["n_groups"] == 2 and res["n_points"] == 60


def test_damped_mean_scale_against_a_dense_solve() -> None:
    """m = c/(1/s - λ) - 1 equals E_q(a)ᵀ(Var_q(a) + λ/c I)⁻¹E_q(a) of the probe's unit."""
    from biasshift import BiasShiftProbe

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ELU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        net[0].bias.add_(1.0)  # positive incoming means for the second layer
    x, y = torch.randn(200, 5, dtype=torch.float64), torch.randint(0, 3, (200,))
    F.cross_entropy(net(x), y).backward()
    probe = BiasShiftProbe(net, x, y, fisher="empirical", damping=1e-3)
    with probe.measure() as m:
        pass
    frame = m.frame().assign(run="r", step=1, epoch=1)
    out = with_damped_mean_scale(frame)
    got = out[(out["quantity"] == "mean_scale_q_damped") & (out["layer"] == "2")]
    got = got.sort_values("unit")["value"].to_numpy()
    # dense reference for layer "2": a = ELU outputs, δ = ∂(−log p(y))/∂net per sample
    h = nn.functional.elu(net[0](x)).detach()
    out_ = net[2](h)
    delta = (torch.softmax(out_, 1) - F.one_hot(y, 3)).detach()  # empirical Fisher's δ
    lam = frame[(frame["quantity"] == "damping") & (frame["layer"] == "2")]
    lam = lam.sort_values("unit")["value"].to_numpy()
    for u in range(3):
        w = delta[:, u] ** 2 / 200
        c = w.sum()
        Eq = (w[:, None] * h).sum(0) / c
        Var = ((w[:, None] * (h - Eq)).T @ (h - Eq)) / c
        ref = Eq @ torch.linalg.solve(Var + lam[u] / c * torch.eye(6, dtype=torch.float64), Eq)
        assert got[u] == pytest.approx(float(ref), rel=1e-6)


# ----------------------------------------------------------------------------- end to end
def test_tiny_end_to_end(tmp_path) -> None:
    s = resolve_settings(
        "bias-shift-mechanism", quick=True, epochs=2, seeds=2, out=tmp_path / "out",
        work_dir=tmp_path / "runs", jobs=1, threads=1,
        options={"arms": "elu-0.5,elu,elu+1,crelu,relu,relu/bn,elu/ci", "ng_arms": "elu,relu",
                 "track_probe": 70, "loss_size": 300, "n_boot": 50, "ung_epochs": 1})
    s = type(s)(**{**s.__dict__, "model": {"depth": 2, "width": 12}})
    res = run_analysis(s, progress=False)
    df = res.frame
    assert list(df.columns) == list(BSM_COLUMNS)
    csv = pd.read_csv(res.paths["csv"])
    assert list(csv.columns) == list(BSM_COLUMNS)
    assert {"loss_curve", "train_loss", "mean_scale_q_damped", "cos_ng_uncorrected",
            "cos_grad_ng", "step_bias_shift_measured",
            "step_bias_shift_first_order"} <= set(df["quantity"])
    assert set(df["arm"]) == {"elu-0.5", "elu", "elu+1", "crelu", "relu", "relu/bn", "elu/ci",
                              "elu/ung", "relu/ung"}
    rt = run_table(df, s)
    assert len(rt) == 2 * (7 + 2)  # SGD at ng_sgd_lr = --lr: the main arms serve
    assert {"steps_to_0.3", "loss_at_10", "mean_scale_q_damped"} <= set(rt.columns)
    record = json.loads(res.paths["json"].read_text())
    summ = record["summary"]
    assert {"dose_response", "centring", "natural_gradient", "correlations"} <= set(summ)
    assert record["settings"]["options"]["damping"] == 1e-3
    assert all(r["status"] == "finished" for r in record["runs"])
    assert shift_of("elu+1") == 1.0 and shift_of("elu") == 0.0 and shift_of("relu") is None
    # a second call reuses every run
    again = run_analysis(type(s)(**{**s.__dict__, "resume": True}), progress=False)
    assert all(o.reused for o in again.outcomes)
