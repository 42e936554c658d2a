"""The hook foundation: :class:`biasshift.hooks.Trace` owns every kind of hook it registers
(forward, forward-pre, full backward, parameter post-accumulate-grad) and removes all of them on
exit, on exceptions and with :meth:`Trace.remove`; :func:`eval_mode` restores every flag."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from biasshift.hooks import Trace, eval_mode


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ELU(), nn.Linear(3, 2))


def hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def test_every_kind_of_hook_is_called_with_its_name_and_removed() -> None:
    model = net()
    seen: list[tuple[str, str]] = []
    mods = {"fc1": model[0], "fc2": model[2]}
    params = {"w1": model[0].weight, "b2": model[2].bias}
    trace = Trace(mods, forward=lambda n, m, i, o: seen.append(("fwd", n)),
                  forward_pre=lambda n, m, i: seen.append(("pre", n)),
                  backward=lambda n, m, gi, go: seen.append(("bwd", n)),
                  post_accumulate=lambda n, p: seen.append(("acc", n)), params=params)
    with trace:
        assert trace.active and hook_count(model) == 8
        model(torch.randn(5, 4)).sum().backward()
    assert not trace.active and hook_count(model) == 0
    assert [s for s in seen if s[0] == "pre"] == [("pre", "fc1"), ("pre", "fc2")]
    assert [s for s in seen if s[0] == "fwd"] == [("fwd", "fc1"), ("fwd", "fc2")]
    assert sorted(s for s in seen if s[0] == "bwd") == [("bwd", "fc1"), ("bwd", "fc2")]
    assert sorted(s for s in seen if s[0] == "acc") == [("acc", "b2"), ("acc", "w1")]
    # the post-accumulate hook runs after .grad holds the pass's gradient
    grads = {}
    with Trace({}, post_accumulate=lambda n, p: grads.setdefault(n, p.grad.clone()),
               params=params):
        model.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
    assert torch.equal(grads["w1"], model[0].weight.grad)
    # nothing stays behind; a trace can be entered again
    model(torch.randn(5, 4)).sum().backward()
    n_before = len(seen)
    with trace:
        model(torch.randn(2, 4))
    assert len(seen) == n_before + 4 and hook_count(model) == 0


def test_hooks_removed_when_the_body_raises_and_on_remove() -> None:
    model = net()
    trace = Trace({"fc1": model[0]}, forward=lambda *a: None,
                  post_accumulate=lambda *a: None, params={"w": model[0].weight})
    with pytest.raises(RuntimeError, match="boom"), trace:
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    trace.add()
    assert hook_count(model) == 2
    with pytest.raises(RuntimeError, match="registered already"):
        trace.add()
    trace.remove()
    assert hook_count(model) == 0


def test_bad_arguments() -> None:
    model = net()
    with pytest.raises(TypeError, match=r"not an nn\.Module"):
        Trace({"x": torch.zeros(1)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="go together"):
        Trace({}, post_accumulate=lambda *a: None)
    with pytest.raises(TypeError, match="leaf tensor that requires grad"):
        Trace({}, post_accumulate=lambda *a: None, params={"y": model[0].weight * 2})


def test_running_fisher_hooks_go_with_the_optimizer() -> None:
    """The optimizer's running Fisher registers its hooks through Trace; they are removed by
    detach() and when the optimizer is garbage-collected without it."""
    from biasshift.optim import UnitNaturalGradient

    model = net()
    opt = UnitNaturalGradient(model, lr=0.01)
    assert hook_count(model) > 0
    assert all(isinstance(t, Trace) for layer in opt._layers for t in layer.running._handles)
    del opt
    gc.collect()
    assert hook_count(model) == 0


def test_eval_mode_restores_every_flag() -> None:
    model = net()
    model[2].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[2].training
