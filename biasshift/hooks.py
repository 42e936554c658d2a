"""The hook foundation: one context manager that owns module hooks, and ``eval_mode``.

Every part of biasshift that looks inside a model — the activation monitor, the probe
statistics, the unit Fisher's capture, :class:`~biasshift.BiasShiftProbe` and the optimizer's
running Fisher (:class:`~biasshift.optim.running_fisher.RunningLayerFisher`, for as long as the
optimizer lives) — does so through :class:`Trace` (modelled on baukit's ``nethook.Trace``): it
registers forward (and, if asked, forward-pre or full backward) hooks on selected modules, and
post-accumulate-grad hooks on selected parameters, on enter and removes every one of them on
exit, also when the body raises.  :func:`eval_mode` switches a model to evaluation mode for a
block and restores **every submodule's** own flag afterwards (a model may hold submodules that
were in eval mode already).

Neither synchronises with the host nor touches parameters, ``.grad`` or random generators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["Trace", "eval_mode", "training_flags"]

ForwardHook = Callable[[str, nn.Module, tuple[Any, ...], Any], Any]
PostAccumulateHook = Callable[[str, torch.Tensor], None]
ForwardPreHook = Callable[[str, nn.Module, tuple[Any, ...]], Any]
BackwardHook = Callable[[str, nn.Module, tuple[Any, ...], tuple[Any, ...]], Any]


class Trace:
    """Own forward/backward hooks on the given modules for the duration of a ``with`` block.

    Args:
        modules: ``{name: module}``; each callback receives the name first.
        forward: ``forward(name, module, inputs, output)``; a non-``None`` return value replaces
            the module's output (as with :meth:`torch.nn.Module.register_forward_hook`).
        forward_pre: ``forward_pre(name, module, inputs)``.
        backward: ``backward(name, module, grad_input, grad_output)`` (a full backward hook).
        post_accumulate: ``post_accumulate(name, param)`` after a backward pass has accumulated
            into ``param.grad``, for the parameters in ``params`` (``{name: parameter}``;
            :meth:`torch.Tensor.register_post_accumulate_grad_hook`).
        params: the parameters for ``post_accumulate``.
        always_call: register forward hooks with ``always_call=True`` (also run when the module
            raises).

    >>> with Trace({"fc": model.fc}, forward=lambda n, m, i, o: seen.append(o)):  # doctest: +SKIP
    ...     model(x)

    The handles are removed on exit (also on exceptions); :meth:`remove` does it early.  A
    ``Trace`` can be entered again after it was left.
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, forward: ForwardHook | None = None,
                 forward_pre: ForwardPreHook | None = None,
                 backward: BackwardHook | None = None,
                 post_accumulate: PostAccumulateHook | None = None,
                 params: Mapping[str, torch.Tensor] | None = None,
                 always_call: bool = False) -> None:
        for name, module in modules.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"Trace: {name!r} is a {type(module).__name__}, not an "
                                "nn.Module")
        if (post_accumulate is None) != (params is None):
            raise ValueError("Trace: post_accumulate and params go together")
        for name, p in (params or {}).items():
            if not isinstance(p, torch.Tensor) or not p.requires_grad or not p.is_leaf:
                raise TypeError(f"Trace: params[{name!r}] must be a leaf tensor that requires "
                                "grad (a parameter)")
        self.modules = dict(modules)
        self.params = dict(params or {})
        self.post_accumulate = post_accumulate
        self.forward = forward
        self.forward_pre = forward_pre
        self.backward = backward
        self.always_call = bool(always_call)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def active(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def add(self) -> Trace:
        """Register the hooks (what entering the ``with`` block does)."""
        if self._handles:
            raise RuntimeError("Trace: the hooks are registered already")
        try:
            for name, module in self.modules.items():
                if self.forward_pre is not None:
                    self._handles.append(module.register_forward_pre_hook(
                        _bind_pre(self.forward_pre, name)))
                if self.forward is not None:
                    self._handles.append(module.register_forward_hook(
                        _bind(self.forward, name), always_call=self.always_call))
                if self.backward is not None:
                    self._handles.append(module.register_full_backward_hook(
                        _bind_backward(self.backward, name)))
            if self.post_accumulate is not None:
                for name, p in self.params.items():
                    self._handles.append(p.register_post_accumulate_grad_hook(
                        _bind_post(self.post_accumulate, name)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook registered by this trace."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Trace:
        return self.add()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _bind(fn: ForwardHook, name: str) -> Callable[..., Any]:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        return fn(name, module, inputs, output)

    return hook


def _bind_pre(fn: ForwardPreHook, name: str) -> Callable[..., Any]:
    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> Any:
        return fn(name, module, inputs)

    return hook


def _bind_backward(fn: BackwardHook, name: str) -> Callable[..., Any]:
    def hook(module: nn.Module, grad_input: tuple[Any, ...], grad_output: tuple[Any, ...]) -> Any:
        return fn(name, module, grad_input, grad_output)

    return hook


def _bind_post(fn: PostAccumulateHook, name: str) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        fn(name, param)

    return hook


def training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    """Every submodule's ``training`` flag."""
    return {m: m.training for m in model.modules()}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block; every submodule's own flag is restored afterwards (also
    on exceptions), so submodules that were in eval mode before stay there."""
    flags = training_flags(model)
    try:
        model.eval()
        yield model
    finally:
        for m, training in flags.items():
            m.training = training
