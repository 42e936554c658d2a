"""The paper's convolutional networks (Section 4.3-4.4) as builders with stable module names.

* :func:`cifar_conv11` — the 11-layer CIFAR-100 net of the activation comparison (Fig. 4, 5).
* :func:`cifar_conv18` — the "18-layer" CIFAR-10/100 net of Table 1 (its listed stacks hold 19
  convolutions; see its docstring).
* :func:`imagenet_conv15` — the 15-layer ImageNet net with 3-level spatial pyramid pooling (Fig. 6).

Stacks are written as the paper does, ``[layers × units × receptive field]``. Every network is an
:class:`torch.nn.Sequential` of stacks ``stack1``, ``stack2``, ... whose members are named
``conv1``, ``bn1`` (with ``batch_norm=True``), ``act1``, ``conv2``, ..., ``pool``, ``drop`` (and
``padJ`` before a 2x2 ``convJ``), so
modules are addressed as ``"stack3.act2"`` by monitors and in tidy results. Weights use He
initialisation (:func:`~biasshift.models.mlp.he_init_`: ``N(0, 2 / fan_in)``, zero biases), for
every activation, as in the paper.

Choices the paper leaves open (documented here so results can be compared):

* Convolutions have stride 1 and "same" padding, so they never change the spatial size: ``k // 2``
  zeros on each side for odd ``k``; for the even 2x2 kernels one zero row/column after the image
  (bottom/right), as :class:`torch.nn.Conv2d` does for ``padding="same"``, done by a
  :class:`torch.nn.ZeroPad2d` module ``padJ`` just before ``convJ``.
* Max pooling is 2x2 with stride 2. "After each stack" is impossible for 32x32 inputs and seven
  or eight stacks; as third-party reimplementations do, the CIFAR nets pool after the first five
  stacks (32 -> 16 -> 8 -> 4 -> 2 -> 1), so the later stacks act on 1x1 maps.
* Dropout follows the pooling of a stack ("the last layer of each stack"); a stack's ``drop``
  module exists even at rate 0 (an identity), so rates can be changed later in place
  (``net.stack2.drop.p = 0.2``) and module names do not depend on the rates.
* The CIFAR nets' last stack ``[1 × 100 × 1]`` is the classifier: its convolution (``num_classes``
  units, no activation, no batch norm) gives the logits map, which ``gap`` averages over space and
  ``flatten`` turns into ``(N, num_classes)`` logits (for 32x32 inputs the map is 1x1, so this is
  the same as flattening).
* ``batch_norm=True`` puts :class:`torch.nn.BatchNorm2d` between every convolution (except the
  logits convolution) and its activation, and drops that convolution's then redundant bias.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasshift.activations import make_activation
from biasshift.models.mlp import he_init_

__all__ = [
    "CIFAR11_DROPOUT",
    "CIFAR11_STACKS",
    "CIFAR18_DROPOUT",
    "CIFAR18_STACKS",
    "IMAGENET15_FC",
    "IMAGENET15_STACKS",
    "SpatialPyramidPool",
    "cifar_conv11",
    "cifar_conv18",
    "cifar_pooled_stacks",
    "imagenet_conv15",
    "paired_he_init_",
    "scaled_stacks",
]

#: A stack: ``(layers, units, receptive field)`` groups, as the paper lists them.
Stack = tuple[tuple[int, int, int], ...]

CIFAR11_STACKS: tuple[Stack, ...] = (
    ((1, 192, 5),),
    ((1, 192, 1), (1, 240, 3)),
    ((1, 240, 1), (1, 260, 2)),
    ((1, 260, 1), (1, 280, 2)),
    ((1, 280, 1), (1, 300, 2)),
    ((1, 300, 1),),
    ((1, 100, 1),),
)
CIFAR11_DROPOUT = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.0)

CIFAR18_STACKS: tuple[Stack, ...] = (
    ((1, 384, 3),),
    ((1, 384, 1), (1, 384, 2), (2, 640, 2)),
    ((1, 640, 1), (3, 768, 2)),
    ((1, 768, 1), (2, 896, 2)),
    ((1, 896, 3), (2, 1024, 2)),
    ((1, 1024, 1), (1, 1152, 2)),
    ((1, 1152, 1),),
    ((1, 100, 1),),
)
CIFAR18_DROPOUT = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.0, 0.0)

IMAGENET15_STACKS: tuple[Stack, ...] = (
    ((1, 96, 6),),
    ((3, 512, 3),),
    ((5, 768, 3),),
    ((3, 1024, 3),),
)
IMAGENET15_FC = (4096, 4096)

_CIFAR_POOLED_STACKS = 5


def cifar_pooled_stacks(input_size: int, stacks: int = _CIFAR_POOLED_STACKS) -> int:
    """How many leading stacks can be followed by a 2x2/2 max pooling for ``input_size`` inputs.

    Each pooling halves the map (floor), and a map must keep at least 1x1, so at most
    ``floor(log2(input_size))`` poolings fit; never more than the ``stacks`` the CIFAR nets
    pool after (5). 32x32 (CIFAR) -> 5 (32, 16, 8, 4, 2, 1); 28x28 (MNIST, Fashion-MNIST) -> 4
    (28, 14, 7, 3, 1); 8x8 (the digits) -> 3 (8, 4, 2, 1).
    """
    if isinstance(input_size, bool) or int(input_size) < 1:
        raise ValueError(f"cifar_pooled_stacks: input_size must be a positive int, got "
                         f"{input_size!r}")
    return min(int(stacks), int(input_size).bit_length() - 1)


def scaled_stacks(stacks: tuple[Stack, ...], width: float) -> tuple[Stack, ...]:
    """The stacks with every layer's unit count multiplied by ``width`` (rounded, at least 1).

    The classifier stack (the last) is replaced by the builders anyway (``num_classes``).
    ``width=1/8`` turns the 11-layer net's 192..300 units into 24..38.
    """
    if isinstance(width, bool) or not (isinstance(width, (int, float)) and 0 < width):
        raise ValueError(f"scaled_stacks: width must be a positive number, got {width!r}")
    return tuple(tuple((count, max(1, round(units * width)), kernel)
                       for count, units, kernel in stack) for stack in stacks)


def paired_he_init_(model: nn.Module, seed: int) -> nn.Module:
    """He initialisation drawn from a private generator, the same for every activation and BN.

    The paper's "the same run number shares initial weights across units": every convolution and
    linear weight, in ``named_modules`` order, is drawn from ``N(0, 2 / fan_in)`` with a CPU
    generator seeded with ``seed`` (one ``normal_`` per weight), biases are zero, and batch-norm
    scales one and shifts zero. The draws do not depend on the activation or on whether batch
    norm is present (torch's own ``reset_parameters`` draws a bias only when there is one, so
    the global stream cannot pair a BN net with its plain twin); two nets of the same shapes get
    identical weights, and a BN net differs from its plain twin only by the BN parameters (and
    the absent, zero-initialised conv biases). Works on CPU and CUDA models (drawn on the CPU).
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                fan_in = m.weight[0].numel()
                w = torch.empty(m.weight.shape, dtype=torch.float32)
                w.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model


class SpatialPyramidPool(nn.Module):
    """Spatial pyramid pooling (He et al., 2014): max pooling into ``l × l`` bins for each level.

    The bins of a level are those of :func:`torch.nn.functional.adaptive_max_pool2d` (bin ``i``
    of ``l`` spans rows ``floor(i H / l)`` to ``ceil((i + 1) H / l)``), so any input size gives
    the same ``C · Σ l²`` features, concatenated level by level, each level flattened
    channel-major (``(C, l, l)``). The default levels ``(1, 2, 4)`` give ``21 C`` features.
    """

    def __init__(self, levels: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        if not levels or any(int(l) < 1 for l in levels):
            raise ValueError(f"SpatialPyramidPool: levels must be positive ints, got {levels!r}")
        self.levels = tuple(int(l) for l in levels)

    def output_features(self, channels: int) -> int:
        """The number of features for ``channels`` input channels."""
        return channels * sum(l * l for l in self.levels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"SpatialPyramidPool: expected (N, C, H, W), got {tuple(x.shape)}")
        return torch.cat([F.adaptive_max_pool2d(x, l).flatten(1) for l in self.levels], dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def _rates(dropout: bool | Sequence[float], default: Sequence[float], what: str) -> list[float]:
    if isinstance(dropout, bool):
        return list(default) if dropout else [0.0] * len(default)
    rates = [float(r) for r in dropout]
    if len(rates) != len(default):
        raise ValueError(f"{what}: dropout needs {len(default)} rates (one per stack, paper: "
                         f"{tuple(default)}), got {len(rates)}")
    if any(not 0.0 <= r < 1.0 for r in rates):
        raise ValueError(f"{what}: dropout rates must be in [0, 1), got {tuple(rates)}")
    return rates


def _conv_stack(
    in_channels: int,
    stack: Stack,
    activation: str,
    act_kwargs: dict[str, float],
    *,
    batch_norm: bool,
    pool: bool,
    dropout: float | None,
    logits: bool = False,
    first_stride: int = 1,
    first_padding: int | str = "same",
) -> tuple[nn.Sequential, int]:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    j = 0
    for count, units, kernel in stack:
        for _ in range(count):
            j += 1
            norm = batch_norm and not logits
            stride, padding = (first_stride, first_padding) if j == 1 else (1, "same")
            if padding == "same":
                padding = kernel // 2
                if kernel % 2 == 0:  # "same" for an even kernel: the extra zeros after the image
                    layers[f"pad{j}"] = nn.ZeroPad2d((kernel // 2 - 1, kernel // 2,
                                                      kernel // 2 - 1, kernel // 2))
                    padding = 0
            layers[f"conv{j}"] = nn.Conv2d(channels, units, kernel, stride=stride,
                                           padding=padding, bias=not norm)
            if norm:
                layers[f"bn{j}"] = nn.BatchNorm2d(units)
            if not logits:
                layers[f"act{j}"] = make_activation(activation, **act_kwargs)
            channels = units
    if pool:
        layers["pool"] = nn.MaxPool2d(kernel_size=2, stride=2)
    if dropout is not None:
        layers["drop"] = nn.Dropout(p=dropout)
    return nn.Sequential(layers), channels


def _cifar_net(
    stacks: tuple[Stack, ...], default_rates: Sequence[float], what: str, activation: str,
    num_classes: int, batch_norm: bool, dropout: bool | Sequence[float], in_channels: int,
    act_kwargs: dict[str, float], width: float = 1.0,
    pooled_stacks: int = _CIFAR_POOLED_STACKS,
) -> nn.Sequential:
    rates = _rates(dropout, default_rates, what)
    if isinstance(pooled_stacks, bool) or not 0 <= int(pooled_stacks) <= len(stacks) - 1:
        raise ValueError(f"{what}: pooled_stacks must be in 0..{len(stacks) - 1}, got "
                         f"{pooled_stacks!r}; cifar_pooled_stacks(input_size) gives the most "
                         "the input allows")
    if width != 1.0:
        stacks = scaled_stacks(stacks, width)
    if rates[-1] != 0.0:
        raise ValueError(f"{what}: the last stack gives the logits; its dropout rate must be 0, "
                         f"got {rates[-1]}")
    if num_classes < 1:
        raise ValueError(f"{what}: num_classes must be >= 1, got {num_classes}")
    stacks = (*stacks[:-1], ((1, num_classes, 1),))
    net: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for k, (stack, rate) in enumerate(zip(stacks, rates), start=1):
        last = k == len(stacks)
        net[f"stack{k}"], channels = _conv_stack(
            channels, stack, activation, act_kwargs, batch_norm=batch_norm,
            pool=k <= pooled_stacks, dropout=None if last else rate, logits=last,
        )
    net["gap"] = nn.AdaptiveAvgPool2d(1)
    net["flatten"] = nn.Flatten()
    return he_init_(nn.Sequential(net))


def cifar_conv11(
    activation: str = "elu",
    num_classes: int = 100,
    batch_norm: bool = False,
    dropout: bool | Sequence[float] = True,
    *,
    in_channels: int = 3,
    width: float = 1.0,
    pooled_stacks: int = _CIFAR_POOLED_STACKS,
    **act_kwargs: float,
) -> nn.Sequential:
    """The 11-layer CIFAR-100 network of the activation comparison (Section 4.3, Fig. 4 and 5).

    Stacks ``[1×192×5], [1×192×1, 1×240×3], [1×240×1, 1×260×2], [1×260×1, 1×280×2],
    [1×280×1, 1×300×2], [1×300×1], [1×100×1]``; 2x2 max pooling (stride 2) after the first five
    stacks; dropout ``(0, .1, .2, .3, .4, .5, 0)`` after the last layer of each stack. The last
    stack is the classifier (``num_classes`` 1x1 convolutions, then global average pooling); see
    the module doc for padding and pooling choices.

    Args:
        activation: ``"elu"``, ``"relu"``, ``"lrelu"`` or ``"srelu"``; ``act_kwargs`` go to it.
        num_classes: the width of the last stack (100 in the paper).
        batch_norm: batch normalisation after every hidden convolution (the paper's BN variant).
        dropout: True for the paper's rates, False for none (rate 0 everywhere), or 7 rates.
        in_channels: 3 for RGB.
        width: a multiplier of every hidden layer's unit count (:func:`scaled_stacks`;
            ``1/8``: 24..38 units), for reduced-scale runs; 1 is the paper's net.
        pooled_stacks: how many leading stacks end with 2x2 max pooling (5 for 32x32 inputs;
            :func:`cifar_pooled_stacks` gives the most an input size allows, e.g. 4 at 28x28).

    Input ``(N, 3, H, W)`` with ``H, W >= 32`` (the paper: 32x32 crops; smaller inputs with
    fewer ``pooled_stacks``); output ``(N,
    num_classes)`` logits. 11 convolutions; 1,669,028 parameters for ``num_classes=100``
    (1,671,572 with ``batch_norm=True``: the biases move into BN, which adds a scale per unit).
    """
    return _cifar_net(CIFAR11_STACKS, CIFAR11_DROPOUT, "cifar_conv11", activation, num_classes,
                      batch_norm, dropout, in_channels, act_kwargs, width=width,
                      pooled_stacks=pooled_stacks)


def cifar_conv18(
    activation: str = "elu",
    num_classes: int = 100,
    batch_norm: bool = False,
    dropout: bool | Sequence[float] = True,
    *,
    in_channels: int = 3,
    **act_kwargs: float,
) -> nn.Sequential:
    """The CIFAR-10/100 network of Table 1 (Section 4.4), built as its stacks are listed.

    Stacks ``[1×384×3], [1×384×1, 1×384×2, 2×640×2], [1×640×1, 3×768×2], [1×768×1, 2×896×2],
    [1×896×3, 2×1024×2], [1×1024×1, 1×1152×2], [1×1152×1], [1×100×1]``. The paper calls it an
    "18 convolutional layers" net, but these stacks hold 1 + 4 + 4 + 3 + 3 + 2 + 1 + 1 = 19
    convolutions; we build what the stacks say. Pooling, padding and the classifier as for
    :func:`cifar_conv11` (pooling after the first five stacks); the initial dropout rates
    ``(0, .1, .2, .3, .4, .5, 0, 0)`` follow the last layer of each stack (the paper's fine-tuning
    raises them later; pass other rates, or set ``net.stackK.drop.p``).

    Input ``(N, 3, H, W)`` with ``H, W >= 32``; output ``(N, num_classes)`` logits.
    39,330,404 parameters for ``num_classes=100`` (39,344,612 with ``batch_norm=True``).
    """
    return _cifar_net(CIFAR18_STACKS, CIFAR18_DROPOUT, "cifar_conv18", activation, num_classes,
                      batch_norm, dropout, in_channels, act_kwargs)


def imagenet_conv15(
    activation: str = "elu",
    num_classes: int = 1000,
    batch_norm: bool = False,
    dropout: bool = True,
    *,
    in_channels: int = 3,
    spp_levels: Sequence[int] = (1, 2, 4),
    **act_kwargs: float,
) -> nn.Sequential:
    """The 15-layer ImageNet network (Section 4.5, Fig. 6) with spatial pyramid pooling.

    Stacks ``1×96×6, 3×512×3, 5×768×3, 3×1024×3`` of convolutions, each followed by 2x2 max
    pooling (stride 2); a 3-level spatial pyramid pooling (``spp``: 1x1, 2x2, 4x4 max-pooling
    bins, :class:`SpatialPyramidPool`); then ``classifier`` = ``fc1`` (4096) ``act1`` ``drop1``
    ``fc2`` (4096) ``act2`` ``drop2`` ``fc3`` (``num_classes`` logits), with 50% dropout on the
    two 4096-unit layers. 12 convolutions + 3 fully connected layers = 15.

    The paper gives no strides or padding. The 6x6 first layer uses stride 2 and padding 2 (224 ->
    112, then the four poolings give 56, 28, 14, 7); the 3x3 layers use padding 1. Thanks to the
    SPP, any input of at least 32x32 gives the same 21 · 1024 features (e.g. 192x192 -> 6x6 maps).
    ``batch_norm`` adds BN after every convolution (not the FC layers); ``dropout=False`` sets the
    two FC dropout rates to 0.

    Input ``(N, 3, H, W)``; output ``(N, num_classes)``. 164,867,528 parameters for
    ``num_classes=1000`` (164,876,072 with ``batch_norm=True``).
    """
    if num_classes < 1:
        raise ValueError(f"imagenet_conv15: num_classes must be >= 1, got {num_classes}")
    net: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for k, stack in enumerate(IMAGENET15_STACKS, start=1):
        net[f"stack{k}"], channels = _conv_stack(
            channels, stack, activation, act_kwargs, batch_norm=batch_norm, pool=True,
            dropout=None, first_stride=2 if k == 1 else 1, first_padding=2 if k == 1 else "same",
        )
    spp = SpatialPyramidPool(spp_levels)
    net["spp"] = spp
    rate = 0.5 if dropout else 0.0
    head: OrderedDict[str, nn.Module] = OrderedDict()
    width = spp.output_features(channels)
    for i, units in enumerate(IMAGENET15_FC, start=1):
        head[f"fc{i}"] = nn.Linear(width, units)
        head[f"act{i}"] = make_activation(activation, **act_kwargs)
        head[f"drop{i}"] = nn.Dropout(p=rate)
        width = units
    head[f"fc{len(IMAGENET15_FC) + 1}"] = nn.Linear(width, num_classes)
    net["classifier"] = nn.Sequential(head)
    return he_init_(nn.Sequential(net))
