"""probe_statistics and exact_median against numpy on stored activations."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from _monitor_reference import collect_outputs
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from biasshift import ProbeStatistics, probe_statistics
from biasshift.activations import ELU, SReLU
from biasshift.models import paper_mlp
from biasshift.monitor.probe import exact_median


def _check(model: nn.Module, probe, unit_dims: dict[str, int], **kw) -> ProbeStatistics:
    """probe_statistics equals numpy's nanmean / nanmedian of the same activations (eval)."""
    was = {n: m.training for n, m in model.named_modules()}

    def run() -> None:
        model.eval()
        with torch.no_grad():
            batches = probe.split(kw.get("batch_size") or len(probe)) if isinstance(
                probe, torch.Tensor) else [b[0] if isinstance(b, (tuple, list)) else b
                                           for b in probe]
            for x in batches:
                model(x)

    outputs = collect_outputs(model, unit_dims, run)
    for n, m in model.named_modules():
        m.training = was[n]
    res = probe_statistics(model, probe, list(unit_dims), **kw)
    assert res.modules == list(unit_dims)
    for name, v in outputs.items():
        v = np.where(np.isfinite(v), v, np.nan)
        mean = res.mean[name].double().cpu().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN units
            ref_mean = np.nanmean(v, axis=0)
            ref_median = np.nanmedian(v, axis=0)
        np.testing.assert_allclose(mean, ref_mean.astype(res.mean[name].cpu().numpy().dtype),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
        # medians are data values or exact midpoints: equal after rounding to the data dtype
        dt = res.median[name].cpu().numpy().dtype
        np.testing.assert_array_equal(res.median[name].cpu().numpy(), ref_median.astype(dt),
                                      err_msg=name)
        assert res.samples[name] == v.shape[0]
        np.testing.assert_array_equal(res.nonfinite[name].cpu().numpy(),
                                      (~np.isfinite(outputs[name])).sum(axis=0))
    return res


@pytest.mark.parametrize("n", [7, 8, 1, 2])  # odd and even counts
def test_mlp_odd_and_even_counts(n: int, device: torch.device) -> None:
    torch.manual_seed(0)
    model = paper_mlp("relu", depth=2, width=6, in_features=5).to(device)
    res = _check(model, torch.randn(n, 5, device=device), {"act1": 1, "act2": 1})
    assert res.mean["act1"].device.type == device.type


def test_even_count_median_is_the_average_of_the_middle_values() -> None:
    model = nn.Sequential(nn.Identity(), SReLU())
    x = torch.tensor([[4.0], [1.0], [3.0], [10.0]])
    res = probe_statistics(model, x, modules=["1"])
    assert res.median["1"].tolist() == [3.5]  # torch.median would give 3.0
    assert res.mean["1"].tolist() == [4.5]


def test_cnn_channels_and_chunks(device: torch.device) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), ELU(), nn.Conv2d(4, 3, 1), nn.ReLU()).to(device)
    res = _check(model, torch.randn(9, 2, 6, 6, device=device), {"1": 1, "3": 1}, batch_size=4)
    assert res.samples["1"] == 9 * 4 * 4


def test_sequence_model_features_are_units() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 4), nn.Tanh())
    _check(model, torch.randn(6, 7, 3), {"1": 2, "3": 2})


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.act = ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.b(self.act(self.a(x))))


def test_module_reused_twice_contributes_both_calls() -> None:
    torch.manual_seed(3)
    res = _check(_Reused(), torch.randn(5, 4), {"act": 1})
    assert res.samples["act"] == 10


class _Poison(nn.Module):
    biasshift_activation = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x).clone()
        y[::3, 0] = math.nan
        y[1::4, 1] = math.inf
        y[:, 2] = -math.inf
        return y


def test_nonfinite_values_are_left_out() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), _Poison())
    res = _check(model, torch.randn(12, 3), {"1": 1})
    assert res.nonfinite["1"].tolist() == [4, 3, 12, 0]
    assert math.isnan(res.mean["1"][2].item()) and math.isnan(res.median["1"][2].item())


def test_iterable_of_batches_probe() -> None:
    torch.manual_seed(5)
    model = paper_mlp("elu", depth=2, width=5, in_features=3)
    batches = [(torch.randn(4, 3), torch.zeros(4)), (torch.randn(3, 3), torch.zeros(3)),
               [torch.randn(1, 3)]]
    _check(model, batches, {"act1": 1, "act2": 1})
    gen = (torch.randn(2, 3) for _ in range(3))  # a generator of plain tensors
    assert probe_statistics(model, gen).samples["act1"] == 6
    with pytest.raises(TypeError, match="dict"):
        probe_statistics(model, [{"x": torch.randn(2, 3)}])


def test_every_training_flag_is_restored() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.ReLU())
    model.train()
    model[1].eval()  # e.g. a frozen batch norm
    before = {n: m.training for n, m in model.named_modules()}
    seen: list[bool] = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    probe_statistics(model, torch.randn(8, 3))
    assert seen == [False]  # the probe ran in eval mode ...
    assert {n: m.training for n, m in model.named_modules()} == before  # ... and restored
    with pytest.raises(ValueError):
        probe_statistics(model, torch.randn(8, 3), unit_dim=7)
    assert {n: m.training for n, m in model.named_modules()} == before  # also after an error
    assert not model[3]._forward_hooks


def test_median_of_means_against_numpy() -> None:
    torch.manual_seed(6)
    model = paper_mlp("elu", depth=3, width=7, in_features=4)
    res = probe_statistics(model, torch.randn(20, 4))
    all_means = np.concatenate([res.mean[n].numpy() for n in res.modules])
    assert res.median_of_means().item() == np.float32(np.median(all_means))
    assert res.median_of_means(["act2"]).item() == np.float32(np.median(res.mean["act2"]))
    layer = res.layer_median_of_means()
    for n in res.modules:
        assert layer[n].item() == np.float32(np.median(res.mean[n].numpy()))
    with pytest.raises(KeyError, match="act1"):
        res.median_of_means(["act9"])
    with pytest.raises(ValueError, match="no module"):
        res.median_of_means([])
    df = res.to_frame()
    assert list(df.columns) == ["module", "unit", "mean", "median", "samples", "nonfinite"]
    assert len(df) == 21


def test_bad_probes() -> None:
    model = paper_mlp("elu", depth=1, width=3, in_features=2)
    with pytest.raises(ValueError, match="empty"):
        probe_statistics(model, torch.empty(0, 2))
    with pytest.raises(ValueError, match="batch_size"):
        probe_statistics(model, torch.randn(3, 2), batch_size=0)
    with pytest.raises(ValueError, match="0-dim"):
        probe_statistics(model, torch.tensor(1.0))
    # an empty probe set says so (it used to report "module '1' was never called")
    with pytest.raises(ValueError, match=r"probe_statistics: the probe set is empty \(no batch"):
        probe_statistics(model, [])
    with pytest.raises(ValueError, match=r"the probe set is empty \(2 batch\(es\) of 0 inputs"):
        probe_statistics(model, [torch.empty(0, 2), (torch.empty(0, 2), torch.empty(0))])
    # a monitored module outside the forward is still named
    unused = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.ELU()))
    unused.forward = lambda x: unused[1](unused[0](x))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"module '2\.0' was never called"):
        probe_statistics(unused, torch.randn(4, 2))
    act = nn.ReLU()
    shared = nn.Sequential(nn.Linear(2, 3), act, nn.Linear(3, 4), act)
    with pytest.raises(ValueError, match=r"different unit counts.*\(5, 4\)"):
        probe_statistics(shared, torch.randn(5, 2))


# -- exact_median ----------------------------------------------------------------------------------
_vals = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_vals, min_size=3, max_size=3), min_size=1, max_size=20))
def test_exact_median_is_numpy_nanmedian(rows: list[list[float]]) -> None:
    v = np.asarray(rows, dtype=np.float32)
    got = exact_median(torch.from_numpy(v), dim=0).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(v.astype(np.float64), axis=0)  # exact midpoint
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    got_t = exact_median(torch.from_numpy(v.T.copy()).double(), dim=1).numpy()
    np.testing.assert_array_equal(got_t, ref)


def test_exact_median_edge_cases() -> None:
    big = torch.tensor([3e38, 3.2e38])
    assert exact_median(big).item() == pytest.approx(3.1e38, rel=1e-6)  # no overflow to inf
    assert exact_median(torch.tensor([1.7e308, 1.7e308], dtype=torch.float64)).item() == 1.7e308
    assert torch.isnan(exact_median(torch.empty(0, 2), 0)).all()
    assert exact_median(torch.empty(0, 2), 0).shape == (2,)
    assert math.isnan(exact_median(torch.tensor([math.nan, math.nan])).item())


@pytest.mark.parametrize("batch_size", [None, 5])
def test_streaming_means_equal_exact_means(batch_size: int | None) -> None:
    """medians=False keeps only float64 sums: the same means and counts, no medians."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), _Poison())
    probe = torch.randn(12, 3)
    full = probe_statistics(model, probe, ["1"], batch_size=batch_size)
    fast = probe_statistics(model, probe, ["1"], batch_size=batch_size, medians=False)
    assert fast.median == {}
    torch.testing.assert_close(fast.mean["1"], full.mean["1"], equal_nan=True, rtol=1e-7, atol=0)
    assert fast.mean["1"].dtype == full.mean["1"].dtype
    assert torch.equal(fast.nonfinite["1"], full.nonfinite["1"])
    assert fast.samples == full.samples
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), ELU())
    x = torch.randn(6, 2, 7, 7)
    full = probe_statistics(cnn, x, batch_size=batch_size)
    fast = probe_statistics(cnn, x, batch_size=batch_size, medians=False)
    torch.testing.assert_close(fast.mean["1"], full.mean["1"], rtol=1e-6, atol=1e-7)
    assert fast.samples["1"] == 6 * 25


@pytest.mark.parametrize("ndim", [0, 1])
@pytest.mark.parametrize("unit_dim", [None, 1, -1])
def test_0d_and_1d_outputs_get_a_hint_that_makes_sense(ndim: int, unit_dim) -> None:
    reduce = (lambda t: t.sum()) if ndim == 0 else (lambda t: t.sum(1))

    class Squeezed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return reduce(x)

    model = nn.Sequential(nn.Linear(2, 3), Squeezed(), nn.ReLU())
    with pytest.raises(ValueError) as err:
        probe_statistics(model, torch.randn(4, 2), modules=["2"], unit_dim=unit_dim)
    msg = str(err.value)
    assert f"output has {ndim} dimension(s)" in msg and "no unit_dim can help" in msg
    assert "--" not in msg and "[1, -1]" not in msg and "[1, 0]" not in msg  # the old, broken hint
    assert "(N, 1)" in msg


@pytest.mark.parametrize("ndim, dim, choices", [(2, 2, "choose 1 or -1"), (2, -2, "choose 1 or -1"),
                                                (4, 4, "choose 1..3 or -3..-1"),
                                                (3, 0, "choose 1..2 or -2..-1")])
def test_out_of_range_unit_dim_lists_valid_choices(ndim: int, dim: int, choices: str) -> None:
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    x = torch.randn((2, 3, 4, 5)[:ndim])
    with pytest.raises(ValueError, match=rf"unit_dim={dim} is out of range.*{ndim} dimensions "
                                         rf"\(dim 0 is the batch\); {re.escape(choices)}"):
        probe_statistics(model, x, modules=["1"], unit_dim=dim)


@pytest.mark.parametrize("lazy", ["linear", "conv"])
def test_uninitialised_lazy_layer_asks_for_a_forward_first(lazy: str) -> None:
    from biasshift import BiasShiftTracker, UnitFisher, UnitNaturalGradient
    from biasshift.fisher.capture import resolve_layers

    first = nn.LazyLinear(4) if lazy == "linear" else nn.LazyConv2d(4, 3)
    model = nn.Sequential(first, nn.ELU(), nn.Flatten(), nn.LazyLinear(3))
    match = (rf"layer '0' \({type(first).__name__}\) is not initialised yet.*Run one forward "
             r"pass, e\.g\. model\(x\[:1\]\)")
    for make in (lambda: UnitFisher(model), lambda: UnitNaturalGradient(model, lr=0.1),
                 lambda: resolve_layers(model)):
        with pytest.raises(ValueError, match=match):
            make()
    from biasshift.data import load_dataset
    from biasshift.train import Trainer

    ds = load_dataset("digits").subset(32, 8)
    model_d = nn.Sequential(nn.Flatten(), nn.LazyLinear(4), nn.ELU(), nn.Linear(4, 10)) \
        if lazy == "linear" else nn.Sequential(nn.LazyConv2d(4, 3), nn.ELU(), nn.Flatten(),
                                               nn.Linear(144, 10))
    tracker = BiasShiftTracker(schedule=[1], probe_size=16)
    trainer = Trainer(model_d, ds, epochs=1, plugins=[tracker], probe_size=0)
    with pytest.raises(ValueError, match=r"\(Lazy(Linear|Conv2d)\) is not initialised yet"):
        trainer.fit()
    # the activation monitor needs no weights: it works on the lazy model as it is
    x = torch.randn(2, 5) if lazy == "linear" else torch.randn(2, 1, 6, 6)
    stats = probe_statistics(model, x)
    assert stats.samples["1"] == (2 if lazy == "linear" else 2 * 4 * 4)
    # after that forward the layers are initialised and the Fisher accepts them
    assert resolve_layers(model)["0"].n == (5 if lazy == "linear" else 9)
