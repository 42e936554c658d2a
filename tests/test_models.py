"""The paper's conv nets: output shapes, layer structure against the paper's stacks, dropout rates,
He initialisation, parameter counts (computed here from the paper's listing) and the SPP layer."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from biasshift.activations import ACTIVATIONS, activation_names
from biasshift.models import (
    SpatialPyramidPool,
    cifar_conv11,
    cifar_conv18,
    count_parameters,
    imagenet_conv15,
)
from biasshift.monitor.selection import resolve_modules

# The paper's listings, (layers, units, receptive field) per stack, restated independently.
PAPER = {
    "cifar_conv11": (
        [[(1, 192, 5)], [(1, 192, 1), (1, 240, 3)], [(1, 240, 1), (1, 260, 2)],
         [(1, 260, 1), (1, 280, 2)], [(1, 280, 1), (1, 300, 2)], [(1, 300, 1)], [(1, 100, 1)]],
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.0],
    ),
    "cifar_conv18": (
        [[(1, 384, 3)], [(1, 384, 1), (1, 384, 2), (2, 640, 2)], [(1, 640, 1), (3, 768, 2)],
         [(1, 768, 1), (2, 896, 2)], [(1, 896, 3), (2, 1024, 2)], [(1, 1024, 1), (1, 1152, 2)],
         [(1, 1152, 1)], [(1, 100, 1)]],
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.0, 0.0],
    ),
}
IMAGENET_CONV = [[(1, 96, 6)], [(3, 512, 3)], [(5, 768, 3)], [(3, 1024, 3)]]
BUILDERS = {"cifar_conv11": cifar_conv11, "cifar_conv18": cifar_conv18}


def expand(stacks) -> list[list[tuple[int, int]]]:
    return [[(units, k) for count, units, k in stack for _ in range(count)] for stack in stacks]


def analytic_conv_params(stacks, in_ch: int, batch_norm: bool, logits_last: bool) -> int:
    total, c = 0, in_ch
    layers = [layer for stack in expand(stacks) for layer in stack]
    for idx, (units, k) in enumerate(layers):
        is_logits = logits_last and idx == len(layers) - 1
        total += c * units * k * k
        total += 2 * units if (batch_norm and not is_logits) else units  # BN (w, b) or conv bias
        c = units
    return total


def docstring_counts(fn) -> tuple[int, int]:
    doc = " ".join(fn.__doc__.split())
    m = re.search(r"([\d,]+) parameters for ``num_classes=\d+`` \(([\d,]+) with", doc)
    assert m, f"{fn.__name__}: no parameter count in the docstring"
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def stack_convs(net: nn.Module) -> list[list[nn.Conv2d]]:
    return [[m for m in stack.children() if isinstance(m, nn.Conv2d)]
            for name, stack in net.named_children() if name.startswith("stack")]


# ----------------------------------------------------------------------------------- CIFAR nets
@pytest.mark.parametrize("activation", activation_names())
@pytest.mark.parametrize("builder", ["cifar_conv11", "cifar_conv18"])
def test_cifar_output_shapes_for_every_activation(builder: str, activation: str):
    torch.manual_seed(0)
    # The 39M-parameter conv18 is checked on the meta device (shapes only, no memory, no FLOPs);
    # test_cifar_structure_matches_the_paper runs it for real once.
    device = "meta" if builder == "cifar_conv18" else "cpu"
    with torch.device(device):
        net = BUILDERS[builder](activation).eval()
        with torch.no_grad():
            out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert device == "meta" or torch.isfinite(out).all()
    acts = [m for m in net.modules() if isinstance(m, tuple(ACTIVATIONS.values()))]
    n_convs = sum(len(s) for s in stack_convs(net))
    assert len(acts) == n_convs - 1  # every conv but the logits conv
    assert all(type(a) is ACTIVATIONS[activation] for a in acts)
    # The monitors find exactly these units under stable names.
    assert list(resolve_modules(net)) == [n for n, m in net.named_modules() if m in acts]
    assert "stack1.act1" in resolve_modules(net)


@pytest.mark.parametrize("builder", ["cifar_conv11", "cifar_conv18"])
def test_cifar_structure_matches_the_paper(builder: str):
    stacks, rates = PAPER[builder]
    net = BUILDERS[builder]("elu")
    convs = stack_convs(net)
    assert [[(c.out_channels, c.kernel_size[0]) for c in s] for s in convs] == expand(stacks)
    assert sum(len(s) for s in convs) == {"cifar_conv11": 11, "cifar_conv18": 19}[builder]
    names = dict(net.named_modules())
    for k, rate in enumerate(rates, start=1):
        stack = names[f"stack{k}"]
        assert isinstance(getattr(stack, "pool", None), nn.MaxPool2d) == (k <= 5)
        if k < len(rates):
            assert stack.drop.p == rate
            assert list(stack.children())[-1] is stack.drop  # dropout ends the stack
        else:
            assert not hasattr(stack, "drop") and not hasattr(stack, "act1")  # logits stack
    # Spatial sizes after each stack for a 32x32 input: pooled five times, then 1x1.
    sizes = []
    hooks = [names[f"stack{k}"].register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
             for k in range(1, len(rates) + 1)]
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    for h in hooks:
        h.remove()
    assert sizes == [16, 8, 4, 2, 1] + [1] * (len(rates) - 5)
    # Every 2x2 conv is preceded by its bottom/right zero padding.
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (2, 2):
            pad = names[name.replace(".conv", ".pad")]
            assert isinstance(pad, nn.ZeroPad2d) and pad.padding == (0, 1, 0, 1)


@pytest.mark.parametrize("builder", ["cifar_conv11", "cifar_conv18"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_cifar_parameter_counts(builder: str, batch_norm: bool):
    stacks, _ = PAPER[builder]
    with torch.device("meta"):
        net = BUILDERS[builder]("relu", batch_norm=batch_norm)
    expected = analytic_conv_params(stacks, 3, batch_norm, logits_last=True)
    assert count_parameters(net) == expected
    assert docstring_counts(BUILDERS[builder])[int(batch_norm)] == expected
    with torch.device("meta"):
        ten = BUILDERS[builder]("relu", batch_norm=batch_norm, num_classes=10)
    stacks10 = [*stacks[:-1], [(1, 10, 1)]]
    assert count_parameters(ten) == analytic_conv_params(stacks10, 3, batch_norm, logits_last=True)


def test_cifar_dropout_options():
    net = cifar_conv11("elu", dropout=False)
    assert all(m.p == 0.0 for m in net.modules() if isinstance(m, nn.Dropout))
    rates = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0]
    net = cifar_conv11("elu", dropout=rates)
    assert [net.get_submodule(f"stack{k}.drop").p for k in range(1, 7)] == rates[:6]
    with pytest.raises(ValueError, match="needs 7 rates"):
        cifar_conv11("elu", dropout=[0.1] * 6)
    with pytest.raises(ValueError, match="last stack gives the logits"):
        cifar_conv11("elu", dropout=[0.1] * 7)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        cifar_conv18("elu", dropout=[0.0, 1.0, 0, 0, 0, 0, 0, 0])
    # Dropout is live in training mode and off in evaluation mode.
    net, x = cifar_conv11("elu"), torch.randn(2, 3, 32, 32)
    assert not torch.equal(net.train()(x), net(x))
    assert torch.equal(net.eval()(x), net(x))


def test_cifar_batch_norm_variant():
    net = cifar_conv11("lrelu", batch_norm=True, num_classes=10)
    for stack in list(net.children())[:-3]:
        for name, conv in stack.named_children():
            if isinstance(conv, nn.Conv2d):
                bn = getattr(stack, name.replace("conv", "bn"))
                assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
                assert conv.bias is None
    logits = net.stack7.conv1
    assert logits.bias is not None and not hasattr(net.stack7, "bn1")
    out = net.train()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_other_input_sizes_and_activation_parameters():
    net = cifar_conv11("lrelu", negative_slope=0.2).eval()
    assert net.stack2.act1.negative_slope == 0.2
    assert cifar_conv11("lrelu").stack2.act1.negative_slope == 0.1  # the paper's LReLU
    assert net(torch.randn(2, 3, 48, 40)).shape == (2, 100)  # global average pooling
    with pytest.raises(KeyError, match="unknown activation"):
        cifar_conv18("swish")


def test_he_initialisation():
    torch.manual_seed(0)
    net = cifar_conv11("elu")
    for m in list(net.modules()):
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().double()
            fan_in = w[0].numel()
            n = w.numel()
            # The sample std of n normal draws has relative error ~ 1/sqrt(2n): allow 6 of those.
            assert abs(w.std().item() / math.sqrt(2.0 / fan_in) - 1) < 6 / math.sqrt(2 * n)
            assert abs(w.mean().item()) < 6 * math.sqrt(2.0 / fan_in) / math.sqrt(n)
            assert torch.count_nonzero(m.bias) == 0


def test_cifar_forward_on_device(device: torch.device):
    torch.manual_seed(0)
    net = cifar_conv11("srelu").to(device).eval()
    out = net(torch.randn(2, 3, 32, 32, device=device))
    assert out.shape == (2, 100) and out.device.type == device.type


# ---------------------------------------------------------------------------------- ImageNet
@pytest.mark.parametrize("activation", activation_names())
def test_imagenet_shapes_for_every_activation_on_meta(activation: str):
    with torch.device("meta"):
        net = imagenet_conv15(activation)
        sizes = {}
        for k in range(1, 5):
            net.get_submodule(f"stack{k}").register_forward_hook(
                lambda m, i, o, k=k: sizes.__setitem__(k, tuple(o.shape[1:])))
        assert net(torch.empty(2, 3, 224, 224)).shape == (2, 1000)
        assert sizes == {1: (96, 56, 56), 2: (512, 28, 28), 3: (768, 14, 14), 4: (1024, 7, 7)}
        assert net(torch.empty(2, 3, 192, 192)).shape == (2, 1000)  # SPP: other sizes work
        assert sizes[4] == (1024, 6, 6)
        assert net.spp(torch.empty(2, 1024, 7, 7)).shape == (2, 21 * 1024)
    acts = [m for m in net.modules() if isinstance(m, tuple(ACTIVATIONS.values()))]
    assert len(acts) == 14 and all(type(a) is ACTIVATIONS[activation] for a in acts)
    convs = stack_convs(net)
    assert [[(c.out_channels, c.kernel_size[0]) for c in s] for s in convs] == expand(IMAGENET_CONV)
    first = convs[0][0]
    assert first.stride == (2, 2) and first.padding == (2, 2)
    head = net.classifier
    assert [type(m).__name__ for m in head] == ["Linear", type(acts[0]).__name__, "Dropout"] * 2 \
        + ["Linear"]
    assert head.fc1.in_features == 21 * 1024 and head.fc3.out_features == 1000
    assert head.drop1.p == head.drop2.p == 0.5
    assert all(isinstance(net.get_submodule(f"stack{k}.pool"), nn.MaxPool2d) for k in range(1, 5))
    with torch.device("meta"):
        assert imagenet_conv15(activation, dropout=False).classifier.drop2.p == 0.0


@pytest.mark.parametrize("batch_norm", [False, True])
def test_imagenet_parameter_counts(batch_norm: bool):
    with torch.device("meta"):
        net = imagenet_conv15("elu", batch_norm=batch_norm)
    conv = analytic_conv_params(IMAGENET_CONV, 3, batch_norm, logits_last=False)
    fc = (21 * 1024 + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * 1000
    assert count_parameters(net) == conv + fc
    assert docstring_counts(imagenet_conv15)[int(batch_norm)] == conv + fc


@pytest.mark.slow
def test_imagenet_real_forward_and_he_init():
    torch.manual_seed(0)
    net = imagenet_conv15("elu").eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    for m in (net.stack1.conv1, net.stack3.conv5, net.classifier.fc1, net.classifier.fc3):
        w = m.weight.detach()
        fan_in = w[0].numel()
        assert abs(w.double().std().item() / math.sqrt(2.0 / fan_in) - 1) < 0.02
        assert torch.count_nonzero(m.bias) == 0


# ---------------------------------------------------------------------------------------- SPP
def brute_force_spp(x: torch.Tensor, levels) -> torch.Tensor:
    n, c, h, w = x.shape
    feats = []
    for l in levels:
        level = torch.empty(n, c, l, l, dtype=x.dtype)
        for i in range(l):
            for j in range(l):
                r0, r1 = (i * h) // l, -((-(i + 1) * h) // l)
                c0, c1 = (j * w) // l, -((-(j + 1) * w) // l)
                level[:, :, i, j] = x[:, :, r0:r1, c0:c1].amax(dim=(2, 3))
        feats.append(level.flatten(1))
    return torch.cat(feats, dim=1)


@pytest.mark.parametrize("hw", [(7, 7), (6, 9), (13, 5), (3, 3)])
def test_spp_against_brute_force(hw):
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    spp = SpatialPyramidPool((1, 2, 4))
    assert torch.equal(spp(x), brute_force_spp(x, (1, 2, 4)))
    assert spp.output_features(4) == 84 and "levels=(1, 2, 4)" in repr(spp)
    assert torch.equal(SpatialPyramidPool((3,))(x), brute_force_spp(x, (3,)))
    with pytest.raises(ValueError, match="positive"):
        SpatialPyramidPool((0, 2))
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\)"):
        spp(torch.randn(4, 7, 7))
