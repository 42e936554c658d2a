"""The paper's units against their closed forms, derivatives included, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from biasshift.activations import ACTIVATIONS, ELU, LReLU, ReLU, SReLU, make_activation

finite = st.floats(min_value=-30, max_value=30, allow_nan=False, width=64)


def _value_and_grad(module: torch.nn.Module, x: float) -> tuple[float, float]:
    t = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    y = module(t)
    (g,) = torch.autograd.grad(y.sum(), t)
    return float(y.detach()), float(g)


@settings(max_examples=200, deadline=None)
@given(x=finite, alpha=st.floats(min_value=0.1, max_value=3.0))
def test_elu_value_and_derivative(x: float, alpha: float) -> None:
    f, g = _value_and_grad(ELU(alpha), x)
    if x > 0:
        assert f == pytest.approx(x, rel=1e-15) and g == 1.0
    else:
        assert f == pytest.approx(alpha * math.expm1(x), rel=1e-12, abs=1e-300)
        # the paper's Eq. 15: f'(x) = f(x) + alpha for x <= 0
        assert g == pytest.approx(f + alpha, rel=1e-12, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(x=finite)
def test_relu_lrelu_srelu(x: float) -> None:
    f, g = _value_and_grad(ReLU(), x)
    assert (f, g) == ((x, 1.0) if x > 0 else (0.0, 0.0))
    f, g = _value_and_grad(LReLU(), x)
    assert f == pytest.approx(x if x > 0 else 0.1 * x, rel=1e-15)
    assert g == (1.0 if x > 0 else 0.1)
    f, g = _value_and_grad(SReLU(), x)
    assert f == max(-1.0, x)
    if x != -1.0:
        assert g == (1.0 if x > -1 else 0.0)


def test_elu_saturates_to_minus_alpha() -> None:
    y = ELU(2.0)(torch.tensor([-50.0, -1e4], dtype=torch.float64))
    assert torch.allclose(y, torch.tensor([-2.0, -2.0], dtype=torch.float64))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gradcheck_float64(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, dtype=torch.float64) * 3
    # keep clear of the kinks (0 for elu/relu/lrelu, -1 for srelu) where finite differences break
    x = torch.where((x.abs() < 1e-2) | ((x + 1).abs() < 1e-2), x + 0.1, x).requires_grad_()
    act = make_activation(name)
    assert torch.autograd.gradcheck(act, (x,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(act, (x,), eps=1e-6, atol=1e-7)


def test_factory_names_and_kwargs() -> None:
    assert isinstance(make_activation("ELU"), ELU)
    assert make_activation("lrelu", negative_slope=0.2).negative_slope == 0.2
    assert make_activation("elu", alpha=0.5).alpha == 0.5
    assert make_activation("srelu", shift=2.0)(torch.tensor(-5.0)) == -2.0
    assert make_activation("lrelu").negative_slope == 0.1  # the paper's default
    with pytest.raises(KeyError, match="choose one of elu, relu, lrelu, srelu"):
        make_activation("swish")
    with pytest.raises(TypeError, match="make_activation"):
        make_activation("relu", alpha=1.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ELU(alpha=0.0)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_devices_and_dtypes(name: str, device: torch.device) -> None:
    act = make_activation(name)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.linspace(-3, 3, 13, device=device, dtype=dtype)
        y = act(x)
        assert y.dtype == dtype and y.device.type == device.type
        ref = act(x.double())
        assert torch.allclose(y.double(), ref, atol=2e-2, rtol=1e-2)
