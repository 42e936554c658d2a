"""``conv-activations``: the paper's conv protocol pieces, its statistics, and ``--quick`` end to
end (the digits, 16 small runs, well under two minutes on two cores)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import wilcoxon
from torch import nn

from biasshift.data import ArrayDataset, load_dataset
from biasshift.data.preprocess import gcn_zca
from biasshift.models.conv import (
    CIFAR11_DROPOUT,
    CIFAR11_STACKS,
    cifar_conv11,
    cifar_pooled_stacks,
    paired_he_init_,
    scaled_stacks,
)
from biasshift.reproduce import UsageError, get_analysis, resolve_settings, run_analysis
from biasshift.reproduce.conv_activations import CONV_COLUMNS, IterationTimer
from biasshift.reproduce.conv_stats import (
    mean_sd,
    paired_bootstrap_ci,
    scipy_wilcoxon_exact,
    smallest_p,
    wilcoxon_exact,
)
from biasshift.train import Plugin, Trainer
from biasshift.train.schedule import (
    PaperCifarSchedule,
    StepLearningRate,
    paper_cifar_schedule,
)

ANALYSIS = get_analysis("conv-activations")


def _tiny_dataset(n: int = 64, c: int = 1, size: int = 8, classes: int = 3,
                  name: str = "tiny") -> ArrayDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, c, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return ArrayDataset(name, x, y, x[: n // 2].clone(), y[: n // 2].clone(), classes)


def _spec(activation: str = "elu", bn: bool = False, seed: int = 0, dataset: str = "digits"):
    s = resolve_settings("conv-activations", quick=True, dataset=dataset, jobs=1, threads=1)
    return next(sp for sp in ANALYSIS.run_specs(s) if sp.activation == activation
                and sp.model["batch_norm"] == bn and sp.seed == seed)


# ----------------------------------------------------------------------------- schedule
def test_the_paper_schedule_at_full_length_is_the_papers() -> None:
    s = paper_cifar_schedule(165_000)
    assert s.boundaries == (35_000, 85_000, 135_000)
    assert s.rates == (0.01, 0.005, 0.0005, 0.00005)
    assert [s.rate(k) for k in (0, 34_999, 35_000, 84_999, 85_000, 134_999, 135_000, 164_999)] \
        == [0.01, 0.01, 0.005, 0.005, 0.0005, 0.0005, 0.00005, 0.00005]


@given(st.integers(4, 400_000))
@settings(max_examples=60, deadline=None)
def test_the_scaled_schedule_keeps_the_papers_fractions(total: int) -> None:
    s = paper_cifar_schedule(total)
    assert len(s.boundaries) == 3 and all(0 < b < total for b in s.boundaries)
    assert list(s.boundaries) == sorted(set(s.boundaries))  # every phase keeps a step
    for b, paper in zip(s.boundaries, (35_000, 85_000, 135_000)):
        assert abs(b - total * paper / 165_000) <= 2  # rounding, and the push for tiny runs


def test_the_schedule_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one more rate"):
        StepLearningRate([10], [0.1])
    with pytest.raises(ValueError, match="strictly increasing"):
        StepLearningRate([10, 10], [0.1, 0.01, 0.001])
    with pytest.raises(ValueError, match="total_steps"):
        paper_cifar_schedule(3)


class _LrLog(Plugin):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_step(self, trainer, step, x, y, loss) -> None:  # type: ignore[no-untyped-def]
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])


def test_the_trainer_steps_with_the_scaled_schedule_and_resumes_it(tmp_path) -> None:
    ds = _tiny_dataset()
    def model() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)  # noqa: E731
    log = _LrLog()
    sched = PaperCifarSchedule()
    Trainer(model, ds, batch_size=8, epochs=4, optimizer=opt, plugins=[sched, log],
            probe_size=0).fit()
    steps = 4 * 8
    assert sched.schedule is not None
    assert log.lrs == [paper_cifar_schedule(steps).rate(k) for k in range(steps)]
    # interrupted after 2 epochs and resumed: the same rates, the same weights
    log1, log2 = _LrLog(), _LrLog()
    Trainer(model, ds, batch_size=8, epochs=2, optimizer=opt, probe_size=0,
            plugins=[PaperCifarSchedule(), log1], checkpoint_dir=tmp_path).fit()
    # a 2-epoch trainer scales to its own length; resume with the full 4 epochs instead
    tr = Trainer(model, ds, batch_size=8, epochs=4, optimizer=opt, probe_size=0,
                 plugins=[PaperCifarSchedule(), log2], checkpoint_dir=tmp_path)
    tr.fit(resume=True)
    assert log2.lrs == log.lrs[16:]


# ----------------------------------------------------------------------------- the net
def test_pooling_follows_what_the_input_size_allows() -> None:
    assert [cifar_pooled_stacks(s) for s in (32, 28, 8, 64, 1)] == [5, 4, 3, 5, 0]
    for size, c in ((32, 3), (28, 1), (8, 1)):
        net = cifar_conv11("elu", num_classes=7, in_channels=c, width=0.125,
                           pooled_stacks=cifar_pooled_stacks(size))
        shapes: dict[int, tuple[int, ...]] = {}
        hooks = [getattr(net, f"stack{k}").register_forward_hook(
            lambda m, i, o, k=k, shapes=shapes: shapes.__setitem__(k, tuple(o.shape)))
            for k in range(1, 8)]
        out = net(torch.randn(2, c, size, size))
        for h in hooks:
            h.remove()
        assert out.shape == (2, 7)
        pools = cifar_pooled_stacks(size)
        assert shapes[pools][-1] == 1 and (pools == 0 or shapes[pools - 1][-1] > 1)
    with pytest.raises(ValueError, match="pooled_stacks"):
        cifar_conv11(pooled_stacks=7)


def test_the_width_multiplier_scales_every_hidden_layer() -> None:
    net = cifar_conv11("relu", num_classes=10, in_channels=1, width=0.125, pooled_stacks=4)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    want = [u for stack in scaled_stacks(CIFAR11_STACKS, 0.125)[:-1] for _, u, _ in stack]
    assert [c.out_channels for c in convs] == [*want, 10]
    assert want == [24, 24, 30, 30, 32, 32, 35, 35, 38, 38]
    assert len(convs) == 11


def test_dropout_follows_each_stack_at_the_papers_rates() -> None:
    ds = load_dataset("digits")
    net = ANALYSIS.build_model(_spec(), ds)
    rates = [getattr(net, f"stack{k}").drop.p for k in range(1, 7)]
    assert rates == list(CIFAR11_DROPOUT[:-1]) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert not hasattr(net.stack7, "drop")
    # the drop module is the last of its stack (after the pooling) and really drops in training
    for k in range(1, 7):
        assert list(getattr(net, f"stack{k}")._modules)[-1] == "drop"
    seen = {}
    net.stack6.drop.register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    net.train()
    net(torch.rand(400, 1, 8, 8))
    kept = (seen["o"] != 0) & (seen["i"] != 0)
    frac = 1 - kept.sum().item() / (seen["i"] != 0).sum().item()
    assert abs(frac - 0.5) < 0.06
    net.eval()
    net(torch.rand(4, 1, 8, 8))
    assert torch.equal(seen["i"], seen["o"])


def _weights(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_run_r_of_every_arm_starts_from_the_same_weights() -> None:
    ds = load_dataset("digits")
    nets = {(a, bn): ANALYSIS.build_model(_spec(a, bn), ds)
            for a in ("elu", "srelu", "lrelu", "relu") for bn in (False, True)}
    ref = _weights(nets[("elu", False)])
    for net in nets.values():
        assert all(torch.equal(w, r) for w, r in zip(_weights(net), ref, strict=True))
    # BN arms differ only in BN parameters (ones and zeros) and the dropped conv biases
    bn = nets[("relu", True)]
    for m in bn.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    assert all(m.bias is None for m in _weights_modules(bn)[:-1])
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias))
               for m in _weights_modules(nets[("relu", False)]))
    # another seed: other weights
    other = _weights(ANALYSIS.build_model(_spec("elu", False, seed=1), ds))
    assert not any(torch.equal(w, r) for w, r in zip(other, ref))


def _weights_modules(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_paired_init_is_he_normal() -> None:
    net = paired_he_init_(cifar_conv11("elu", num_classes=100), seed=3)
    conv = net.stack2.conv2  # 192 -> 240, 3x3: 414,720 weights
    fan_in = 192 * 9
    w = conv.weight.detach().double()
    assert abs(w.mean().item()) < 4 * math.sqrt(2 / fan_in) / math.sqrt(w.numel())
    assert w.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.01)


# ----------------------------------------------------------------------------- statistics
def _brute_force_p(d: np.ndarray) -> float:
    """Two-sided exact p by listing every sign pattern of the average ranks of |d|."""
    d = d[d != 0]
    a = np.abs(d)
    ranks = np.array([np.mean([j + 1 for j, v in enumerate(np.sort(a)) if v == x]) for x in a])
    w = ranks[d > 0].sum()
    null = np.array([sum(r for r, s in zip(ranks, signs) if s)
                     for signs in itertools.product((0, 1), repeat=len(d))])
    return min(1.0, 2 * min(np.mean(null <= w + 1e-9), np.mean(null >= w - 1e-9)))


def test_wilcoxon_matches_scipy_on_a_constructed_case() -> None:
    # ten paired "runs": arm x is better in 8 of them, no ties, no zeros
    x = np.array([28.6, 28.9, 28.4, 29.1, 28.7, 28.8, 28.5, 29.3, 28.2, 28.95])
    y = np.array([31.2, 31.9, 30.8, 31.5, 28.65, 31.7, 31.0, 29.0, 31.4, 31.6])
    w, p = wilcoxon_exact(x, y)
    ref = wilcoxon(x, y, alternative="two-sided", method="exact")
    assert p == pytest.approx(ref.pvalue, rel=1e-12)
    assert min(w, 55 - w) == ref.statistic
    assert p == pytest.approx(scipy_wilcoxon_exact(x, y), rel=1e-12)
    assert p == pytest.approx(_brute_force_p(x - y), rel=1e-12)


@given(st.lists(st.floats(-5, 5, allow_nan=False).filter(lambda v: abs(v) > 1e-3),
                min_size=1, max_size=12, unique=True))
@settings(max_examples=80, deadline=None)
def test_wilcoxon_agrees_with_scipy_without_ties(d: list[float]) -> None:
    a = np.abs(np.asarray(d))
    if len(set(a.tolist())) != len(a):
        return  # scipy's exact distribution assumes untied ranks
    _, p = wilcoxon_exact(d)
    assert p == pytest.approx(scipy_wilcoxon_exact(d), rel=1e-9, abs=1e-12)


@given(st.lists(st.integers(-4, 4), min_size=1, max_size=10))
@settings(max_examples=80, deadline=None)
def test_wilcoxon_is_exact_with_ties_and_zeros(d: list[int]) -> None:
    arr = np.asarray(d, dtype=float)
    _, p = wilcoxon_exact(arr)
    if not (arr != 0).any():
        assert p == 1.0
        return
    assert p == pytest.approx(_brute_force_p(arr), rel=1e-12)
    assert wilcoxon_exact(-arr)[1] == pytest.approx(p, rel=1e-12)  # two-sided: symmetric


def test_the_smallest_attainable_p_is_two_over_two_to_the_n() -> None:
    for n in range(1, 12):
        assert wilcoxon_exact(np.arange(1.0, n + 1))[1] == pytest.approx(smallest_p(n))
        assert smallest_p(n) == min(1.0, 2 / 2**n)
    assert smallest_p(6) == pytest.approx(0.03125)
    with pytest.raises(ValueError, match="same length"):
        wilcoxon_exact([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        wilcoxon_exact([1.0, math.nan])


def test_the_paired_bootstrap_ci() -> None:
    mean, lo, hi = paired_bootstrap_ci([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    # coverage of the mean difference for normal paired differences (n = 10): the percentile
    # bootstrap undercovers a little at small n, so [0.85, 0.99]
    rng = np.random.default_rng(0)
    hits = 0
    for k in range(200):
        d = rng.normal(0.3, 1.0, size=10)
        _, lo, hi = paired_bootstrap_ci(d, resamples=2000, seed=k)
        hits += lo <= 0.3 <= hi
    assert 0.85 <= hits / 200 <= 0.99
    assert mean_sd([1.0, 2.0, 3.0, math.inf]) == (2.0, 1.0, 3)


# ----------------------------------------------------------------------------- data
def test_cifar_runs_get_gcn_zca_and_crops_and_flips() -> None:
    ds = _tiny_dataset(n=96, c=3, size=8, classes=10, name="cifar10")  # 192-d ZCA: fast
    spec = _spec(dataset="digits")
    from dataclasses import replace

    spec = replace(spec, dataset="cifar10")
    prepared = ANALYSIS.prepare_dataset(spec, ds)
    ref = gcn_zca(ds)[0]
    assert torch.equal(prepared.train_x, ref.train_x) and torch.equal(prepared.test_x,
                                                                       ref.test_x)
    aug = ANALYSIS.augment(spec)
    assert aug is not None
    x = prepared.train_x[:16]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a1, a2 = aug(x, g1), aug(x, g2)
    assert a1.shape == x.shape and torch.equal(a1, a2) and not torch.equal(a1, x)
    # Fashion-MNIST and the digits: standardised, not augmented
    assert ANALYSIS.augment(_spec()) is None
    digits = ANALYSIS.prepare_dataset(_spec(), load_dataset("digits"))
    assert abs(digits.train_x.mean().item()) < 1e-5
    assert digits.train_x.std().item() == pytest.approx(1.0, rel=1e-4)


def test_the_trainer_augments_training_batches_only_and_resumes_exactly(tmp_path) -> None:
    ds = _tiny_dataset()
    seen_train: list[torch.Tensor] = []

    def aug(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        seen_train.append(x)
        return x + 0.1 * torch.randn(x.shape, generator=g)

    def model() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ELU(), nn.Linear(16, 3))
    full = Trainer(model, ds, batch_size=16, epochs=3, augment=aug, probe_size=0).fit()
    assert len(seen_train) == 3 * 4  # one call per training batch, none for evaluation
    Trainer(model, ds, batch_size=16, epochs=1, augment=aug, probe_size=0,
            checkpoint_dir=tmp_path).fit()
    resumed = Trainer(model, ds, batch_size=16, epochs=3, augment=aug, probe_size=0,
                      checkpoint_dir=tmp_path).fit(resume=True)
    assert np.array_equal(full["value"].to_numpy(), resumed["value"].to_numpy())
    plain = Trainer(model, ds, batch_size=16, epochs=3, probe_size=0).fit()
    assert not np.array_equal(full["value"].to_numpy(), plain["value"].to_numpy())
    with pytest.raises(TypeError, match="augment"):
        Trainer(model, ds, epochs=1, augment=3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- presets
def test_the_cuda_preset_is_the_papers_scale() -> None:
    p = ANALYSIS.presets["cuda"]
    assert p.dataset == "cifar100" and p.seeds == 10 and p.options["width"] == 1.0
    assert p.epochs * (50_000 // p.batch_size) == 165_000
    assert set(p.activations) == {"elu", "srelu", "lrelu", "relu"}
    assert tuple(p.options["bn"]) == (False, True)
    assert p.options["momentum"] == 0.9 and p.options["weight_decay"] == 5e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_selects_the_cuda_preset() -> None:
    s = resolve_settings("conv-activations", device="cuda")
    assert s.preset == "cuda" and s.seeds == 10 and s.dataset == "cifar100"


def test_the_arms_option_keeps_a_subset_of_the_runs() -> None:
    s = resolve_settings("conv-activations", quick=True, jobs=1, threads=1,
                         options={"arms": "elu,relu-bn"})
    runs = [sp.run for sp in ANALYSIS.run_specs(s)]
    assert runs == ["elu-lr0.01-seed0", "relu-bn-lr0.01-seed0", "elu-lr0.01-seed1",
                    "relu-bn-lr0.01-seed1"]


def test_bad_options_are_named() -> None:
    with pytest.raises(UsageError, match="width"):
        resolve_settings("conv-activations", quick=True, options={"width": "0"})
    with pytest.raises(UsageError, match="bn"):
        resolve_settings("conv-activations", quick=True, options={"bn": "on,on"})
    with pytest.raises(UsageError, match="schedule"):
        resolve_settings("conv-activations", quick=True, options={"schedule": "cosine"})
    with pytest.raises(UsageError, match="arms"):
        resolve_settings("conv-activations", quick=True, options={"arms": "gelu"})


# ----------------------------------------------------------------------------- end to end
def test_quick_end_to_end_and_reuse(tmp_path) -> None:
    s = resolve_settings("conv-activations", quick=True, out=tmp_path / "out",
                         work_dir=tmp_path / "runs", jobs=1, threads=1)
    res = run_analysis(s, progress=False)
    for k in ("csv", "png", "pdf", "json"):
        assert res.paths[k].is_file()
    df = res.frame
    assert tuple(df.columns) == CONV_COLUMNS
    assert df["run"].nunique() == 16 and set(df["batch_norm"]) == {0, 1}
    # the monitor (training batches) and the probe give per-layer medians, with and without BN
    for q in ("median_of_means", "train_median_of_means"):
        layers = set(df.loc[df["quantity"] == q, "layer"])
        assert "all" in layers and "stack2.act2" in layers and len(layers) == 11
        assert set(df.loc[df["quantity"] == q, "batch_norm"]) == {0, 1}
    t = df[df["quantity"] == "train_seconds_per_step"]["value"]
    assert len(t) == 16 * 2 and (t > 0).all()
    summary = json.loads(res.paths["json"].read_text())["summary"]
    assert len(summary["test_error"]) == 8
    assert len(summary["wilcoxon_pairs"]) == 28
    # 2 seeds: p >= 2/2^2 (ties between arms drop pairs and raise the floor)
    assert all(p["p_exact"] >= p["smallest_p"] >= 0.5 for p in summary["wilcoxon_pairs"])
    assert set(summary["bn_effect"]) == {"ELU", "SReLU", "LReLU", "ReLU"}
    assert "elu_over_relu" in summary["seconds_per_step"]
    fin = ANALYSIS.final_errors(df)
    elu = fin[(fin["activation"] == "elu") & (fin["batch_norm"] == 0)]["test_error"]
    assert summary["test_error"]["ELU"]["test_error_mean"] == pytest.approx(elu.mean())
    # the same command again reuses every run (nothing retrained) and gives the same table
    again = run_analysis(resolve_settings("conv-activations", quick=True, out=tmp_path / "o2",
                                          work_dir=tmp_path / "runs", jobs=1, threads=1,
                                          resume=True), progress=False)
    assert all(o.reused for o in again.outcomes)
    assert again.frame["value"].equals(df["value"])
    # an interrupted analysis is published from its finished runs only
    (tmp_path / "runs" / "relu-lr0.01-seed1" / "done.json").unlink()
    part = resolve_settings("conv-activations", quick=True, out=tmp_path / "o3",
                            work_dir=tmp_path / "runs", jobs=1, threads=1, resume=True,
                            options={"finished_only": "true"})
    assert len(ANALYSIS.run_specs(part)) == 15
    with pytest.raises(UsageError, match="finished_only"):
        resolve_settings("conv-activations", quick=True, work_dir=tmp_path / "none",
                         options={"finished_only": "true"})


def test_the_timer_measures_training_steps_only() -> None:
    ds = _tiny_dataset()
    tr = Trainer(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), ds, batch_size=8,
                 epochs=2, plugins=[IterationTimer()], probe_size=0)
    h = tr.fit()
    t = h[h["quantity"] == "train_seconds_per_step"]
    assert list(t["epoch"]) == [1, 2] and (t["value"] > 0).all()
    assert list(h[h["quantity"] == "step"]["value"]) == [8.0, 16.0]
