r"""Many runs as one model: ``K`` copies of a fully connected network trained as batched GEMMs.

A :class:`StackedSequential` holds ``K`` *members*, each a network of the same architecture
(:func:`~biasshift.models.paper_mlp`, :func:`~biasshift.models.autoencoder`, any
``nn.Sequential`` of ``nn.Linear``, ``nn.Flatten`` and element-wise modules) with its own
weights and its own activation (ELU, ReLU, LReLU, SReLU, each with its own parameters).  Its
forward maps ``(K, N, ...)`` inputs (member ``k`` sees its own batch) or shared ``(N, ...)``
inputs (every member sees the same batch, e.g. for evaluation) to ``(K, N, out)``:

* ``nn.Linear`` → :class:`StackedLinear`: weights ``(K, out, in)``, one ``baddbmm``
  ``b_k + x_k W_kᵀ`` for all members (a batched GEMM instead of ``K`` small ones);
* element-wise modules → :class:`StackedElementwise`: members with equal modules (same type, same
  constants, no parameters) share one call on their slice; others are applied per member.

Since member ``k``'s output depends only on its own weights and its own inputs, the gradient of
``Σ_k loss_k`` with respect to member ``k``'s weights is exactly the gradient of ``loss_k``:
training the stack is training ``K`` independent runs (equal to float32 rounding: a batched
GEMM may sum in another order than an unbatched one).

:meth:`StackedSequential.member` gives member ``k`` as an ordinary module of the original
architecture (the same module names, ``fc1``, ``act1``, ...) whose parameters are **views** of the
stack's storage: monitors, :func:`~biasshift.monitor.probe_statistics`, ``UnitFisher``,
``BiasShiftProbe`` and checkpoints see each member as its own model, always up to date.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["StackedElementwise", "StackedLinear", "StackedSequential", "stackable"]


class StackedLinear(nn.Module):
    """``K`` ``nn.Linear`` layers of one shape.

    The weights are held transposed, ``weight_t (K, in, out)`` (``weight_t[k] = W_kᵀ``), so that
    the forward ``b_k + x_k W_kᵀ`` is one ``baddbmm`` on contiguous operands and the backward's
    ``∇W_kᵀ = x_kᵀ ∇out_k`` is produced in the parameter's own layout (no transposing copy when
    it is accumulated into ``.grad``); ``bias (K, out)``.  :attr:`weight` is the ``(K, out, in)``
    view.
    """

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.in_features = layers[0].in_features
        self.out_features = layers[0].out_features
        self.weight_t = nn.Parameter(
            torch.stack([m.weight.detach().T for m in layers]).contiguous())
        has_bias = layers[0].bias is not None
        self.bias = (nn.Parameter(torch.stack([m.bias.detach() for m in layers]).clone())  # type: ignore[union-attr]
                     if has_bias else None)

    @property
    def weight(self) -> Tensor:
        """``(K, out, in)``: a view of :attr:`weight_t`."""
        return self.weight_t.mT

    def forward(self, x: Tensor) -> Tensor:
        """``(K, N, in)`` or shared ``(N, in)`` to ``(K, N, out)``."""
        if x.ndim == 2:  # every member sees the same batch: one (N, in) @ (in, K·out) GEMM
            K, n_in, n_out = self.weight_t.shape
            w = self.weight_t.permute(1, 0, 2).reshape(n_in, K * n_out)
            out = (x @ w).reshape(x.shape[0], K, n_out).transpose(0, 1)
            return out if self.bias is None else out + self.bias.unsqueeze(1)
        if self.bias is None:
            return torch.bmm(x, self.weight_t)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight_t)

    def extra_repr(self) -> str:
        return (f"members={self.weight_t.shape[0]}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """Equal element-wise modules: same type, no parameters or buffers, same attributes."""
    if type(a) is not type(b) or any(True for _ in a.parameters()) or \
            any(True for _ in a.buffers()) or any(True for _ in b.parameters()):
        return False
    skip = {"training", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
            "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_always_called", "_state_dict_hooks", "_state_dict_pre_hooks",
            "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_modules",
            "_parameters", "_buffers", "_non_persistent_buffers_set", "_is_full_backward_hook"}
    da = {k: v for k, v in vars(a).items() if k not in skip}
    db = {k: v for k, v in vars(b).items() if k not in skip}
    return da == db


class StackedElementwise(nn.Module):
    """``K`` element-wise modules (activations): one call per run of equal members.

    ``members`` holds the ``K`` modules (member views share them).  All members equal: one
    call on the whole ``(K, ...)`` tensor; otherwise one call per contiguous run of equal
    members (``runs``, on ``torch.split`` parts), joined by one ``torch.cat``.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(modules)
        groups: list[list[int]] = []
        for k, m in enumerate(modules):
            for g in groups:
                if _same_module(modules[g[0]], m):
                    g.append(k)
                    break
            else:
                groups.append([k])
        self.groups = groups
        # contiguous runs of equal members (the runner orders runs by activation): one call
        # per run, joined by one torch.cat
        runs: list[tuple[int, int]] = []
        for k, m in enumerate(modules):
            if runs and _same_module(modules[runs[-1][0]], m):
                runs[-1] = (runs[-1][0], k + 1)
            else:
                runs.append((k, k + 1))
        self.runs = runs

    def forward(self, x: Tensor) -> Tensor:
        if len(self.groups) == 1:
            return self.members[0](x)
        # split (not slices): its backward is one cat, where every slice's backward would
        # fill a zero tensor of the whole input
        parts = x.split([b - a for a, b in self.runs])
        return torch.cat([self.members[a](p) for (a, _), p in zip(self.runs, parts)])


def stackable(model: nn.Module) -> str | None:
    """``None`` when :class:`StackedSequential` can stack copies of ``model``, else why not."""
    if not isinstance(model, nn.Sequential):
        return f"the model is a {type(model).__name__}, not an nn.Sequential"
    for name, m in model.named_children():
        if isinstance(m, (nn.Linear, nn.Flatten)):
            if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1):
                return f"module {name!r} is an nn.Flatten with other dims than (1, -1)"
            continue
        if any(True for _ in m.children()):
            return f"module {name!r} ({type(m).__name__}) is a container"
        if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            return (f"module {name!r} ({type(m).__name__}) has parameters or buffers (only "
                    "nn.Linear layers are stacked)")
        if not _elementwise(m):
            return (f"module {name!r} ({type(m).__name__}) is neither nn.Linear, nn.Flatten nor "
                    "an element-wise activation")
    return None


def _elementwise(m: nn.Module) -> bool:
    from biasshift.activations import ACTIVATIONS

    types = tuple(t for t in ACTIVATIONS.values() if isinstance(t, type))
    return isinstance(m, (*types, nn.ELU, nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh,
                          nn.Identity, nn.Softplus, nn.CELU, nn.SELU, nn.GELU))


class StackedSequential(nn.Module):
    """``K`` networks of one architecture as one module (see the module docstring).

    Args:
        models: the members, ``nn.Sequential`` of ``nn.Linear``/``nn.Flatten``/element-wise
            modules with the same module names and layer shapes; their current weights are
            copied (the members are left untouched).
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(models) == 0:
            raise ValueError("StackedSequential: give at least one member model")
        for i, m in enumerate(models):
            why = stackable(m)
            if why is not None:
                raise TypeError(f"StackedSequential: member {i}: {why}; train it with the "
                                "single-run Trainer (--batch-runs 1)")
        names = [n for n, _ in models[0].named_children()]
        for i, m in enumerate(models[1:], start=1):
            other = [n for n, _ in m.named_children()]
            if other != names:
                raise ValueError(f"StackedSequential: member {i} has modules {other}, member 0 "
                                 f"{names}; members must share one architecture")
        self.K = len(models)
        self.names = names
        self._templates = [copy.deepcopy(models[0])]  # structure for member views (not a child)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name in names:
            mods = [dict(m.named_children())[name] for m in models]
            first = mods[0]
            if isinstance(first, nn.Linear):
                shapes = {(tuple(x.weight.shape), x.bias is not None) for x in mods}  # type: ignore[union-attr]
                if len(shapes) > 1:
                    raise ValueError(f"StackedSequential: layer {name!r} has shapes {shapes} "
                                     "across members; members must share one architecture")
                layers[name] = StackedLinear(mods)  # type: ignore[arg-type]
            elif isinstance(first, nn.Flatten):
                layers[name] = nn.Flatten(start_dim=2)
            else:
                layers[name] = StackedElementwise([copy.deepcopy(x) for x in mods])
        self.layers = nn.ModuleDict(layers)
        self._shared_flatten = nn.Flatten()

    def forward(self, x: Tensor) -> Tensor:
        """Member ``k`` on its own batch ``x[k]``: ``(K, N, ...)`` to ``(K, N, out)`` (a batch
        shared by all members goes through :meth:`forward_shared`)."""
        if x.shape[0] != self.K:
            raise ValueError(f"StackedSequential: input of shape {tuple(x.shape)}; dim 0 must "
                             f"be the {self.K} members (use forward_shared for one batch that "
                             "every member sees)")
        for layer in self.layers.values():
            x = layer(x)
        return x

    def forward_shared(self, x: Tensor) -> Tensor:
        """Every member on the same ``(N, ...)`` batch: ``(K, N, out)``."""
        names = list(self.layers)
        i = 0
        # leading shared modules up to the first Linear (Flatten or an element-wise module of
        # member 0 only when all members agree); the first Linear broadcasts to (K, N, out)
        while i < len(names) and not isinstance(self.layers[names[i]], StackedLinear):
            layer = self.layers[names[i]]
            if isinstance(layer, nn.Flatten):
                x = self._shared_flatten(x)
            else:
                x = layer(x.unsqueeze(0).expand(self.K, *x.shape))
                return self._rest(x, i + 1)
            i += 1
        return self._rest(x, i)

    def _rest(self, x: Tensor, start: int) -> Tensor:
        for name in list(self.layers)[start:]:
            x = self.layers[name](x)
        return x

    @torch.no_grad()
    def member(self, k: int) -> nn.Module:
        """Member ``k`` as a module of the original architecture whose parameters are views of
        the stack's storage (updated in place by every step of the stack)."""
        if not 0 <= k < self.K:
            raise IndexError(f"StackedSequential has {self.K} members; got member {k}")
        net = copy.deepcopy(self._templates[0])
        for name, m in net.named_children():
            layer = self.layers[name]
            if isinstance(layer, StackedLinear):
                assert isinstance(m, nn.Linear)
                m.weight = nn.Parameter(layer.weight_t.data[k].T, requires_grad=False)
                if layer.bias is not None:
                    m.bias = nn.Parameter(layer.bias.data[k], requires_grad=False)
            elif isinstance(layer, StackedElementwise):
                setattr(net, name, layer.members[k])
        return net

    def member_parameters(self, k: int) -> list[Tensor]:
        """Member ``k``'s slices of every stacked parameter (views)."""
        return [p.data[k] for p in self.parameters()]
