"""ActivationMonitor statistics against brute force from stored activations, on real model kinds:
an MLP, a CNN (channels are units, NCHW and channels-last), a Conv1d net, a Transformer-style
(N, T, F) model, a module reused in one forward, non-finite outputs, half precision and float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from _monitor_reference import assert_frame_matches, collect_outputs
from torch import nn

from biasshift import ActivationMonitor
from biasshift.activations import ELU, LReLU, SReLU
from biasshift.models import paper_mlp

BUFFERS = [0, 4096, 4 << 20]  # direct reduction, a buffer that fills mid-run, the default


def _run(model: nn.Module, inputs: list[torch.Tensor]):
    def run() -> None:
        for x in inputs:
            model(x)

    return run


def _check(model: nn.Module, inputs: list[torch.Tensor], unit_dims: dict[str, int], *,
           rtol: float = 2e-6, **kw) -> ActivationMonitor:
    monitor = ActivationMonitor(model, **kw)
    assert monitor.modules == list(unit_dims)
    with monitor:
        outputs = collect_outputs(model, unit_dims, _run(model, inputs))
    assert_frame_matches(monitor.stats(), outputs, rtol=rtol)
    return monitor


@pytest.mark.parametrize("buffer_bytes", BUFFERS)
def test_mlp(buffer_bytes: int, device: torch.device) -> None:
    torch.manual_seed(0)
    model = paper_mlp("elu", depth=3, width=16, in_features=12).to(device)
    inputs = [torch.randn(n, 12, device=device) * 3 for n in (64, 64, 17, 1, 64)]
    dims = {"act1": 1, "act2": 1, "act3": 1}
    _check(model, inputs, dims, buffer_bytes=buffer_bytes)
    _check(model, inputs, dims, buffer_bytes=buffer_bytes, compute_dtype=torch.float64,
           rtol=1e-12)


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), ELU(),
        nn.Conv2d(8, 6, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5), LReLU(),
    )


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("buffer_bytes", BUFFERS)
def test_cnn_channels_are_units(channels_last: bool, buffer_bytes: int,
                                device: torch.device) -> None:
    torch.manual_seed(1)
    model = _cnn().to(device)
    inputs = [torch.randn(n, 3, 10, 10, device=device) for n in (4, 7, 4)]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        out = model[:2](inputs[0])
        assert not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
    monitor = _check(model, inputs, {"1": 1, "3": 1, "7": 1}, buffer_bytes=buffer_bytes)
    df = monitor.stats()
    # every position of a channel is a sample: N * H * W per call
    assert (df[df.module == "1"]["count"] == 15 * 10 * 10).all()
    assert (df[df.module == "3"]["count"] == 15 * 8 * 8).all()


def test_conv1d_channels_are_units(device: torch.device) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(4, 6, 3), SReLU(), nn.AvgPool1d(2), nn.Tanh()).to(device)
    inputs = [torch.randn(5, 4, 11, device=device) for _ in range(3)]
    _check(model, inputs, {"1": 1, "3": 1})


class _SeqModel(nn.Module):
    """Linear -> GELU on (N, T, F), then a Transformer encoder layer with a module activation."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.back = nn.Linear(16, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0,
                                              activation=nn.ReLU(), batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(self.back(self.act(self.proj(x))))


@pytest.mark.parametrize("buffer_bytes", BUFFERS)
def test_transformer_style_features_are_units(buffer_bytes: int, device: torch.device) -> None:
    torch.manual_seed(3)
    model = _SeqModel().to(device)
    inputs = [torch.randn(n, t, 8, device=device) for n, t in ((3, 5), (2, 9), (4, 1))]
    monitor = _check(model, inputs, {"act": 2, "enc.activation": 2}, buffer_bytes=buffer_bytes)
    df = monitor.stats()
    assert (df[df.module == "act"]["count"] == 3 * 5 + 2 * 9 + 4).all()
    assert len(df[df.module == "enc.activation"]) == 12


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 7)
        self.act = ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x)) + 1.0))


def test_module_called_twice_counts_every_call(device: torch.device) -> None:
    torch.manual_seed(4)
    model = _Reused().to(device)
    inputs = [torch.randn(10, 5, device=device), torch.randn(3, 5, device=device)]
    monitor = _check(model, inputs, {"act": 1})
    assert (monitor.stats()["count"] == 2 * 13).all()


class _Poisoned(nn.Module):
    """An activation that emits NaN, +inf and -inf at fixed places."""

    biasshift_activation = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.elu(x).clone()
        y[::5, 0] = math.nan
        y[1::7, 1] = math.inf
        y[2::9, 1] = -math.inf
        y[:, 2] = math.nan  # a unit with no finite value at all
        return y


@pytest.mark.parametrize("buffer_bytes", [0, 4 << 20])
def test_nonfinite_values_are_counted_not_mixed_in(buffer_bytes: int,
                                                   device: torch.device) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), _Poisoned()).to(device)
    inputs = [torch.randn(n, 4, device=device) * 2 for n in (30, 31)]
    monitor = _check(model, inputs, {"1": 1}, buffer_bytes=buffer_bytes,
                     histogram=dict(bins=8, range=(-1.0, 3.0)))
    df = monitor.stats()
    assert df.loc[df.unit == 2, "nonfinite"].item() == 61
    assert df.loc[df.unit == 2, "count"].item() == 0
    assert math.isnan(df.loc[df.unit == 2, "mean"].item())
    assert df[df.unit != 2][["mean", "var", "min", "max"]].notna().all().all()
    h = monitor.histograms()
    totals = h.groupby("unit")["count"].sum()
    assert totals.tolist() == df.sort_values("unit")["count"].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype: torch.dtype, device: torch.device) -> None:
    if dtype == torch.float16 and device.type == "cpu":
        try:
            nn.Linear(2, 2).to(dtype)(torch.ones(1, 2, dtype=dtype))
        except RuntimeError:
            pytest.skip("float16 matmul unsupported on this CPU build")
    torch.manual_seed(6)
    model = paper_mlp("elu", depth=2, width=16, in_features=12).to(device, dtype)
    inputs = [torch.randn(32, 12, device=device, dtype=dtype) for _ in range(3)]
    monitor = _check(model, inputs, {"act1": 1, "act2": 1})
    assert monitor._acc["act1"].compute_dtype == torch.float32


def test_float64_model_is_reduced_in_float64(device: torch.device) -> None:
    torch.manual_seed(7)
    model = paper_mlp("lrelu", depth=2, width=8, in_features=6).to(device, torch.float64)
    inputs = [torch.randn(20, 6, device=device, dtype=torch.float64) + 1e4 for _ in range(3)]
    monitor = _check(model, inputs, {"act1": 1, "act2": 1}, rtol=1e-12)
    assert monitor._acc["act1"].compute_dtype == torch.float64


def test_switching_to_float64_outputs_upgrades_the_accumulator() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), ELU())
    x32 = [torch.randn(9, 3) for _ in range(2)]
    monitor = ActivationMonitor(model)
    with monitor:
        outputs = collect_outputs(model, {"1": 1}, _run(model, x32))
        model.double()
        x64 = [torch.randn(9, 3, dtype=torch.float64) for _ in range(2)]
        outputs64 = collect_outputs(model, {"1": 1}, _run(model, x64))
    import numpy as np

    assert monitor._acc["1"].compute_dtype == torch.float64
    assert_frame_matches(monitor.stats(), {"1": np.concatenate([outputs["1"], outputs64["1"]])},
                         rtol=2e-6)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "eval"])
def test_eval_no_grad_and_inference_mode(mode: str, device: torch.device) -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), ELU()).to(device)
    inputs = [torch.randn(16, 6, device=device) for _ in range(3)]
    if mode == "eval":
        model.eval()
    monitor = ActivationMonitor(model, buffer_bytes=1024)  # flushes inside the context too
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "eval": torch.enable_grad}[mode]
    with monitor, ctx():
        outputs = collect_outputs(model, {"2": 1}, _run(model, inputs))
    # statistics keep accumulating after leaving inference mode (no inference tensors inside)
    with monitor:
        more = collect_outputs(model, {"2": 1}, _run(model, inputs[:1]))
    import numpy as np

    assert_frame_matches(monitor.stats(), {"2": np.concatenate([outputs["2"], more["2"]])},
                         rtol=2e-6)
    assert model.training == (mode != "eval")


def test_training_with_backward_is_unaffected(device: torch.device) -> None:
    torch.manual_seed(10)
    model = paper_mlp("elu", depth=2, width=8, in_features=5).to(device)
    clone = paper_mlp("elu", depth=2, width=8, in_features=5).to(device)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(12, 5, device=device)
    with ActivationMonitor(model):
        model(x).square().sum().backward()
    clone(x).square().sum().backward()
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p.grad, q.grad)
