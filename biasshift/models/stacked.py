r"""Many runs as one model: ``K`` copies of a network as batched GEMMs and grouped convolutions.

A :class:`StackedSequential` holds ``K`` *members*, each a network of the same architecture
(:func:`~biasshift.models.paper_mlp`, :func:`~biasshift.models.autoencoder`, the conv nets of
:mod:`biasshift.models.conv` without spatial pyramid pooling, any ``nn.Sequential``, nested or
not, of the layers below) with its own weights and its own activation (ELU, ReLU, LReLU, SReLU,
each with its own parameters).  Its forward maps ``(K, N, ...)`` inputs (member ``k`` sees its own
batch) or shared ``(N, ...)`` inputs (every member sees the same batch, e.g. for evaluation) to
``(K, N, out)``.

Two layouts carry the members through the network:

* *member* layout ``(K, N, F...)``: member ``k`` is ``x[k]``; ``nn.Linear`` →
  :class:`StackedLinear`, weights ``(K, out, in)``, one ``baddbmm`` ``b_k + x_k W_kᵀ`` for all
  members (a batched GEMM instead of ``K`` small ones);
* *channel* layout ``(N, K·C, H, W)``: member ``k`` owns channels ``k·C .. (k+1)·C − 1``;
  ``nn.Conv1d/2d/3d`` → :class:`StackedConv`, weights ``(K, out, in/g, kh, kw)``, one grouped
  convolution with ``K·g`` groups (no group reads another's channels); ``nn.BatchNorm1d/2d/3d``
  → :class:`StackedBatchNorm` with ``(K, C)`` parameters and running statistics (batch norm is
  per channel, so per member); pooling and padding modules act per channel and are shared.

Element-wise modules (activations, dropout) work in either layout
(:class:`StackedElementwise`: members with equal modules share one call on their slice), and
``nn.Flatten`` turns the channel layout into ``(K, N, C·H·W)`` in the member's own
``(C, H, W)`` order.  The stack changes layout only where the next layer needs the other one
(a copy), so a conv net runs in the channel layout from its first convolution to its flatten.

Since member ``k``'s output depends only on its own weights and its own inputs, the gradient of
``Σ_k loss_k`` with respect to member ``k``'s weights is exactly the gradient of ``loss_k``:
training the stack is training ``K`` independent runs (equal to float32 rounding: a batched
GEMM or grouped convolution may sum in another order than an unbatched one).  Dropout draws
other masks than the single runs (one draw over the stack), so with dropout a member is an
equally distributed run, not the same run, unless each member draws from its own generator
(:meth:`StackedSequential.use_member_generators`, on the CPU, for ``nn.Dropout``), as
:class:`~biasshift.train.batched.BatchedTrainer` arranges: then its masks are its single
run's.

Which is faster is a property of the hardware: on this project's CPUs a stack of MLPs is 1.3–1.5x
faster per model step than one run, while grouped convolutions are slower than ``K`` ungrouped
ones (``analyses/bench_batched.py --nets conv``), so the runner stacks conv nets only when asked
(``--batch-runs K``) or on CUDA.

:meth:`StackedSequential.member` gives member ``k`` as an ordinary module of the original
architecture (the same module names, ``fc1``, ``stack2.conv1``, ...) whose parameters and
batch-norm statistics are **views** of the stack's storage: monitors,
:func:`~biasshift.monitor.probe_statistics`, ``UnitFisher``, ``BiasShiftProbe`` and checkpoints
see each member as its own model, always up to date.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch._prims_common as _prims_common
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StackedBatchNorm", "StackedConv", "StackedElementwise", "StackedLinear",
           "StackedSequential", "stackable"]

MEMBER = "member"
CHANNEL = "channel"

#: Modules that act on every channel alone and have no state: shared by all members, run in the
#: channel layout.
SPATIAL: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _channels_last(x: Tensor) -> torch.memory_format | None:
    """The channels-last format that torch's kernels would choose for ``x`` (4-d or 5-d with
    strides like it: :func:`torch._prims_common.suggest_memory_format`), else ``None``."""
    if x.ndim not in (4, 5):
        return None
    fmt = _prims_common.suggest_memory_format(x)
    return None if fmt == torch.contiguous_format else fmt


def to_channel(x: Tensor, K: int) -> Tensor:
    """Member layout ``(K, N, C, ...)`` to channel layout ``(N, K·C, ...)`` (a copy), in the
    memory format torch would suggest for one member's ``(N, C, ...)`` slice, so that the
    stack's convolutions see the format (and choose the kernels) of the single runs'."""
    shape = (x.shape[1], K * x.shape[2], *x.shape[3:])
    fmt = _channels_last(x[0])
    if fmt is None:
        return x.movedim(0, 1).reshape(shape)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    out.view(x.shape[1], K, *x.shape[2:]).copy_(x.movedim(0, 1))  # one copy
    return out


def to_member(x: Tensor, K: int) -> Tensor:
    """Channel layout ``(N, K·C, ...)`` to member layout ``(K, N, C, ...)`` (a view)."""
    return x.reshape(x.shape[0], K, x.shape[1] // K, *x.shape[2:]).movedim(1, 0)


class StackedLinear(nn.Module):
    """``K`` ``nn.Linear`` layers of one shape.

    The weights are held transposed, ``weight_t (K, in, out)`` (``weight_t[k] = W_kᵀ``), so that
    the forward ``b_k + x_k W_kᵀ`` is one ``baddbmm`` on contiguous operands and the backward's
    ``∇W_kᵀ = x_kᵀ ∇out_k`` is produced in the parameter's own layout (no transposing copy when
    it is accumulated into ``.grad``); ``bias (K, out)``.  :attr:`weight` is the ``(K, out, in)``
    view.
    """

    layout = MEMBER

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


class StackedConv(nn.Module):
    """``K`` ``nn.Conv1d/2d/3d`` layers of one configuration as one grouped convolution.

    ``weight (K, out, in/g, *kernel)``, ``bias (K, out)``; the forward on the channel layout
    ``(N, K·in, ...)`` is ``conv(x, weight.reshape(K·out, ...), groups=K·g)``: member ``k``'s
    output channels ``k·out ..`` read only its input channels ``k·in ..``.
    """

    layout = CHANNEL

    def __init__(self, layers: Sequence[nn.modules.conv._ConvNd]) -> None:
        super().__init__()
        first = layers[0]
        self.K = len(layers)
        self.dim = len(first.kernel_size)
        self.in_channels, self.out_channels = first.in_channels, first.out_channels
        self.stride, self.padding = first.stride, first.padding
        self.dilation, self.groups = first.dilation, first.groups
        self._conv = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).clone())
        has_bias = first.bias is not None
        self.bias = (nn.Parameter(torch.stack([m.bias.detach() for m in layers]).clone())  # type: ignore[union-attr]
                     if has_bias else None)

    def _flat(self) -> tuple[Tensor, Tensor | None]:
        w = self.weight.reshape(-1, *self.weight.shape[2:])
        return w, None if self.bias is None else self.bias.reshape(-1)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, K·in, ...)`` to ``(N, K·out, ...)``."""
        w, b = self._flat()
        return self._conv(x, w, b, self.stride, self.padding, self.dilation,
                          self.groups * self.K)

    def forward_shared(self, x: Tensor) -> Tensor:
        """One ``(N, in, ...)`` batch for every member to ``(N, K·out, ...)``: one convolution
        with all members' filters (``groups=1`` only; otherwise the input is repeated)."""
        if self.groups != 1:
            return self(x.repeat(1, self.K, *([1] * (x.ndim - 2))))
        w, b = self._flat()
        return self._conv(x, w, b, self.stride, self.padding, self.dilation, 1)

    def extra_repr(self) -> str:
        return (f"members={self.K}, {self.in_channels}, {self.out_channels}, "
                f"kernel_size={tuple(self.weight.shape[3:])}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


class StackedBatchNorm(nn.Module):
    """``K`` ``nn.BatchNorm1d/2d/3d`` layers as one over the ``K·C`` channels of the channel
    layout: parameters ``weight, bias (K, C)`` and buffers ``running_mean, running_var (K, C)``
    (views of them are the members' own); ``num_batches_tracked`` is one counter, since every
    member takes the same steps.  Training mode normalises with each channel's batch
    statistics (over the batch and the positions), as each member's own layer does."""

    layout = CHANNEL

    def __init__(self, layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__()
        first = layers[0]
        self.K = len(layers)
        self.num_features = first.num_features
        self.eps, self.momentum = first.eps, first.momentum
        self.affine, self.track_running_stats = first.affine, first.track_running_stats
        if self.affine:
            self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).clone())
            self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]).clone())
        else:
            self.weight = self.bias = None  # type: ignore[assignment]
        if self.track_running_stats:
            self.register_buffer("running_mean",
                                 torch.stack([m.running_mean for m in layers]).clone())  # type: ignore[misc]
            self.register_buffer("running_var",
                                 torch.stack([m.running_var for m in layers]).clone())  # type: ignore[misc]
            self.register_buffer("num_batches_tracked", first.num_batches_tracked.clone())  # type: ignore[union-attr]
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        """``(N, K·C, ...)`` to the same shape (as :class:`torch.nn.BatchNorm2d`'s forward)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average (a host read, as in torch's own)
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean.reshape(-1) if track and self.running_mean is not None else None,
            self.running_var.reshape(-1) if track and self.running_var is not None else None,
            None if self.weight is None else self.weight.reshape(-1),
            None if self.bias is None else self.bias.reshape(-1),
            use_batch, factor, self.eps)

    def extra_repr(self) -> str:
        return (f"members={self.K}, {self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class StackedFlatten(nn.Module):
    """``nn.Flatten()`` of every member: the channel layout ``(N, K·C, H, W)`` or the member
    layout ``(K, N, C, H, W)`` to ``(K, N, C·H·W)``, each member's features in its own
    ``(C, H, W)`` order (the member layout's result is a view when it can be)."""

    def __init__(self, K: int) -> None:
        super().__init__()
        self.K = K

    def forward(self, x: Tensor, layout: str = MEMBER) -> Tensor:
        if layout == CHANNEL:
            return x.reshape(x.shape[0], self.K, -1).transpose(0, 1)
        return x.flatten(2)


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
    """``K`` element-wise modules (activations, dropout): one call per run of equal members.

    ``members`` holds the ``K`` modules (member views share them).  All members equal: one
    call on the whole tensor; otherwise one call per contiguous run of equal members
    (``runs``, on ``torch.split`` parts along the members: dim 0 of the member layout, the
    channel dim 1 of the channel layout), joined by one ``torch.cat``.
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

    #: per-member random number generators for dropout (see :meth:`StackedSequential
    #: .use_member_generators`); ``None``: one draw over the stack from the global generator
    generators: list[torch.Generator] | None = None

    def forward(self, x: Tensor, layout: str = MEMBER) -> Tensor:
        if self.generators is not None and self.training and x.device.type == "cpu" \
                and all(type(m) is nn.Dropout for m in self.members):
            return self._member_dropout(x, layout)
        if len(self.groups) == 1:
            return self.members[0](x)
        # split (not slices): its backward is one cat, where every slice's backward would
        # fill a zero tensor of the whole input
        dim, per = (0, 1) if layout == MEMBER else (1, x.shape[1] // len(self.members))
        parts = x.split([(b - a) * per for a, b in self.runs], dim=dim)
        return torch.cat([self.members[a](p) for (a, _), p in zip(self.runs, parts)], dim=dim)

    def _member_dropout(self, x: Tensor, layout: str) -> Tensor:
        """``nn.Dropout`` with member ``k``'s mask drawn from ``generators[k]`` as torch's CPU
        kernel draws it in the single run (``bernoulli_(1 − p)`` on a tensor of the member's
        shape, divided by ``1 − p``), so that a member's masks are its single run's."""
        assert self.generators is not None
        K = len(self.members)
        dim = 0 if layout == MEMBER else 1
        shape = list(x.shape)
        if layout == MEMBER:
            shape = shape[1:]
        else:
            shape[1] //= K
        # the single run's mask is drawn into empty_like(its input): in the memory order of
        # its activation, which the stack's member slice has (see to_channel)
        fmt = (_channels_last(x) if layout != MEMBER else None) or torch.contiguous_format
        noise = []
        for m, g in zip(self.members, self.generators):
            p = float(m.p)  # type: ignore[arg-type]
            if p == 0.0:
                noise.append(torch.ones(shape, dtype=x.dtype))
            elif p == 1.0:
                noise.append(torch.zeros(shape, dtype=x.dtype))
            else:
                noise.append(torch.empty(shape, dtype=x.dtype, memory_format=fmt)
                             .bernoulli_(1.0 - p, generator=g).div_(1.0 - p))
        mask = torch.stack(noise) if layout == MEMBER else torch.cat(noise, dim=dim)
        return x * mask


def _why_not(name: str, m: nn.Module) -> str | None:
    """Why the leaf ``m`` cannot be stacked, or ``None``."""
    if isinstance(m, nn.Linear):
        return None
    if isinstance(m, _CONV):
        if m.padding_mode != "zeros":
            return (f"module {name!r} ({type(m).__name__}) pads with {m.padding_mode!r}; only "
                    "zero padding is stacked")
        return None
    if isinstance(m, _BN):
        return None
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            return f"module {name!r} is an nn.Flatten with other dims than (1, -1)"
        return None
    if any(True for _ in m.children()):
        return f"module {name!r} ({type(m).__name__}) is a container other than nn.Sequential"
    if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
        return (f"module {name!r} ({type(m).__name__}) has parameters or buffers (only "
                "nn.Linear, nn.Conv1d/2d/3d and nn.BatchNorm1d/2d/3d layers are stacked)")
    if isinstance(m, SPATIAL) or _elementwise(m):
        return None
    return (f"module {name!r} ({type(m).__name__}) is neither a stacked layer (nn.Linear, "
            "nn.Conv*d, nn.BatchNorm*d, nn.Flatten), a pooling or padding module nor an "
            "element-wise activation or dropout")


def stackable(model: nn.Module) -> str | None:
    """``None`` when :class:`StackedSequential` can stack copies of ``model``, else why not."""
    if not isinstance(model, nn.Sequential):
        return f"the model is a {type(model).__name__}, not an nn.Sequential"
    return _children_why(model, "")


def _children_why(seq: nn.Module, prefix: str) -> str | None:
    for name, m in seq.named_children():
        why = (_children_why(m, f"{prefix}{name}.") if type(m) is nn.Sequential
               else _why_not(prefix + name, m))
        if why is not None:
            return why
    return None


def _elementwise(m: nn.Module) -> bool:
    from biasshift.activations import ACTIVATIONS

    types = tuple(t for t in ACTIVATIONS.values() if isinstance(t, type))
    return isinstance(m, (*types, nn.ELU, nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh,
                          nn.Identity, nn.Softplus, nn.CELU, nn.SELU, nn.GELU, nn.Dropout,
                          nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout))


class _StackedContainer(nn.Module):
    """A nested ``nn.Sequential`` of the members (``layers`` keeps its module names)."""

    def __init__(self, layers: OrderedDict[str, nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)


def _stack_children(models: Sequence[nn.Module], where: str) -> OrderedDict[str, nn.Module]:
    names = [n for n, _ in models[0].named_children()]
    for i, m in enumerate(models[1:], start=1):
        other = [n for n, _ in m.named_children()]
        if other != names:
            raise ValueError(f"StackedSequential: member {i} has modules {other}{where}, "
                             f"member 0 {names}; members must share one architecture")
    K = len(models)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name in names:
        mods = [dict(m.named_children())[name] for m in models]
        first = mods[0]
        kinds = {type(x) for x in mods}
        if len(kinds) > 1 and not all(_elementwise(x) for x in mods):
            raise ValueError(f"StackedSequential: layer {name!r}{where} is "
                             f"{sorted(k.__name__ for k in kinds)} across members; members "
                             "must share one architecture")
        if type(first) is nn.Sequential:
            layers[name] = _StackedContainer(_stack_children(mods, f" in {name!r}{where}"))
            continue
        if isinstance(first, (nn.Linear, *_CONV, *_BN)):
            config = {_config(x) for x in mods}
            if len(config) > 1:
                raise ValueError(f"StackedSequential: layer {name!r}{where} has shapes "
                                 f"{sorted(map(str, config))} across members; members must "
                                 "share one architecture")
        if isinstance(first, nn.Linear):
            layers[name] = StackedLinear(mods)  # type: ignore[arg-type]
        elif isinstance(first, _CONV):
            layers[name] = StackedConv(mods)  # type: ignore[arg-type]
        elif isinstance(first, _BN):
            layers[name] = StackedBatchNorm(mods)  # type: ignore[arg-type]
        elif isinstance(first, nn.Flatten):
            layers[name] = StackedFlatten(K)
        elif isinstance(first, SPATIAL):
            if not all(_same_module(first, x) for x in mods[1:]):
                raise ValueError(f"StackedSequential: module {name!r}{where} "
                                 f"({type(first).__name__}) differs across members; members "
                                 "must share one architecture")
            layers[name] = copy.deepcopy(first)
        else:
            layers[name] = StackedElementwise([copy.deepcopy(x) for x in mods])
    return layers


def _config(m: nn.Module) -> tuple:
    if isinstance(m, nn.Linear):
        return (tuple(m.weight.shape), m.bias is not None)
    if isinstance(m, _CONV):
        return (type(m).__name__, tuple(m.weight.shape), m.bias is not None, m.stride,
                m.padding, m.dilation, m.groups)
    assert isinstance(m, _BN)
    return (type(m).__name__, m.num_features, m.eps, m.momentum, m.affine,
            m.track_running_stats)


class StackedSequential(nn.Module):
    """``K`` networks of one architecture as one module (see the module docstring).

    Args:
        models: the members, ``nn.Sequential`` (nested ones too) of ``nn.Linear``,
            ``nn.Conv1d/2d/3d``, ``nn.BatchNorm1d/2d/3d``, ``nn.Flatten``, pooling and padding
            modules and element-wise modules, with the same module names and layer shapes;
            their current weights and batch-norm statistics are copied (the members are left
            untouched).
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
        self.K = len(models)
        self.names = [n for n, _ in models[0].named_children()]
        self._templates = [copy.deepcopy(models[0])]  # structure for member views (not a child)
        self.layers = nn.ModuleDict(_stack_children(models, ""))
        # the leaves in execution order, by their dotted names in the members
        self._leaves: list[tuple[str, nn.Module]] = []

        def walk(layers: nn.ModuleDict, prefix: str) -> None:
            for name, layer in layers.items():
                if isinstance(layer, _StackedContainer):
                    walk(layer.layers, f"{prefix}{name}.")
                else:
                    self._leaves.append((prefix + name, layer))

        walk(self.layers, "")

    def _step(self, layer: nn.Module, x: Tensor, layout: str) -> tuple[Tensor, str]:
        """Apply one leaf in ``layout``; returns the output and its layout."""
        if isinstance(layer, StackedFlatten):
            return layer(x, layout), MEMBER
        if isinstance(layer, StackedElementwise):
            return layer(x, layout), layout
        need = getattr(layer, "layout", CHANNEL)  # pooling and padding: the channel layout
        if need != layout:
            x = to_channel(x, self.K) if need == CHANNEL else to_member(x, self.K)
        return layer(x), need

    def _run(self, x: Tensor, layout: str, start: int) -> Tensor:
        for _, layer in self._leaves[start:]:
            x, layout = self._step(layer, x, layout)
        return to_member(x, self.K) if layout == CHANNEL else x

    def forward(self, x: Tensor) -> Tensor:
        """Member ``k`` on its own batch ``x[k]``: ``(K, N, ...)`` to ``(K, N, out...)`` (a
        batch shared by all members goes through :meth:`forward_shared`)."""
        if x.shape[0] != self.K:
            raise ValueError(f"StackedSequential: input of shape {tuple(x.shape)}; dim 0 must "
                             f"be the {self.K} members (use forward_shared for one batch that "
                             "every member sees)")
        return self._run(x, MEMBER, 0)

    def forward_shared(self, x: Tensor) -> Tensor:
        """Every member on the same ``(N, ...)`` batch: ``(K, N, out...)``.

        Leading modules that are the same for every member (flatten, pooling, padding, an
        activation all members share) run once on the shared batch; the first ``nn.Linear``
        or ``groups=1`` convolution applies all members' weights to it in one GEMM or
        convolution (no copy of the batch per member)."""
        for i, (_, layer) in enumerate(self._leaves):
            if isinstance(layer, StackedFlatten):
                x = x.flatten(1)
            elif isinstance(layer, SPATIAL) or (isinstance(layer, StackedElementwise)
                                                and len(layer.groups) == 1):
                x = layer(x)
            elif isinstance(layer, StackedLinear):
                return self._run(layer(x), MEMBER, i + 1)
            elif isinstance(layer, StackedConv):
                return self._run(layer.forward_shared(x), CHANNEL, i + 1)
            else:  # members differ here: give each its copy of the batch
                return self._run(x.unsqueeze(0).expand(self.K, *x.shape), MEMBER, i)
        return x.unsqueeze(0).expand(self.K, *x.shape)

    def use_member_generators(self, generators: Sequence[torch.Generator] | None) -> None:
        """Draw member ``k``'s ``nn.Dropout`` masks from ``generators[k]`` (CPU), as its single
        run draws them from the global generator: seeded like the single run's, a member then
        trains on the single run's masks.  ``None`` restores one draw over the stack (the
        default; masks equally distributed, not the single runs').  Other dropout modules and
        non-CPU devices always take the one draw."""
        gens = None if generators is None else list(generators)
        if gens is not None and len(gens) != self.K:
            raise ValueError(f"use_member_generators: {len(gens)} generators for {self.K} "
                             "members")
        for m in self.modules():
            if isinstance(m, StackedElementwise):
                m.generators = gens

    @torch.no_grad()
    def member(self, k: int) -> nn.Module:
        """Member ``k`` as a module of the original architecture whose parameters (and
        batch-norm statistics) are views of the stack's storage (updated in place by every
        step of the stack), in the stack's training mode."""
        if not 0 <= k < self.K:
            raise IndexError(f"StackedSequential has {self.K} members; got member {k}")
        net = copy.deepcopy(self._templates[0]).train(self.training)
        for name, layer in self._leaves:
            m = net.get_submodule(name)
            if isinstance(layer, StackedLinear):
                m.weight = nn.Parameter(layer.weight_t.data[k].T, requires_grad=False)
                if layer.bias is not None:
                    m.bias = nn.Parameter(layer.bias.data[k], requires_grad=False)
            elif isinstance(layer, (StackedConv, StackedBatchNorm)):
                if layer.weight is not None:
                    m.weight = nn.Parameter(layer.weight.data[k], requires_grad=False)
                if layer.bias is not None:
                    m.bias = nn.Parameter(layer.bias.data[k], requires_grad=False)
                if isinstance(layer, StackedBatchNorm) and layer.running_mean is not None:
                    m.running_mean = layer.running_mean[k]
                    m.running_var = layer.running_var[k]
                    m.num_batches_tracked = layer.num_batches_tracked
            elif isinstance(layer, StackedElementwise):
                parent, _, child = name.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, child,
                        layer.members[k])
        return net

    def member_parameters(self, k: int) -> list[Tensor]:
        """Member ``k``'s slices of every stacked parameter (views)."""
        return [p.data[k] for p in self.parameters()]
