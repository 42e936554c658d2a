"""The paper's fully connected networks (Section 4.1 and the appendix).

* :func:`paper_mlp` — the classifier of Fig. 2: 8 hidden layers of 128 units (appendix: 5 x 256).
* :func:`autoencoder` — the deep autoencoder of Fig. 3: encoder 784-1000-500-250-30, mirrored
  decoder.

Layers carry stable names (``fc1``, ``act1``, ..., ``out``) so that monitors, Fisher estimators and
tidy results refer to them the same way in every run. Weights use He initialisation
(He et al., 2015: N(0, 2 / fan_in), as the paper states), biases start at zero.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from biasshift.activations import make_activation

__all__ = ["autoencoder", "count_parameters", "he_init_", "mlp", "paper_mlp"]


def he_init_(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal initialisation of every Linear/Conv weight in place; zero biases.

    Uses ``std = sqrt(2 / fan_in)`` for every activation, as the paper does for all units.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    activation: str = "elu",
    *,
    flatten: bool = True,
    init: bool = True,
    batch_norm: bool = False,
    **act_kwargs: float,
) -> nn.Sequential:
    """A fully connected network ``in -> hidden[0] -> ... -> hidden[-1] -> out``.

    Modules are named ``flatten``, ``fc1``, ``act1``, ..., ``fcL``, ``actL``, ``out``; the output
    layer has no activation (logits).  ``batch_norm=True`` puts an ``nn.BatchNorm1d`` (``bn1``,
    ...; learned scale and shift, torch's defaults) after every hidden linear layer and before
    its activation, ``fc -> bn -> act``, the placement of Ioffe & Szegedy (2015) that the
    paper's batch-normalised networks (Fig. 5) use.  The linear layers keep their bias (made
    redundant by the normalisation's shift, but it is the bias whose shift is measured).
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if flatten:
        layers["flatten"] = nn.Flatten()
    width = in_features
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm1d(h)
        layers[f"act{i}"] = make_activation(activation, **act_kwargs)
        width = h
    layers["out"] = nn.Linear(width, out_features)
    net = nn.Sequential(layers)
    return he_init_(net) if init else net


def paper_mlp(
    activation: str = "elu", depth: int = 8, width: int = 128, in_features: int = 784,
    num_classes: int = 10, *, batch_norm: bool = False, **act_kwargs: float,
) -> nn.Sequential:
    """The Fig. 2 classifier (``depth=8, width=128``); the appendix uses ``depth=5, width=256``.
    ``batch_norm``: see :func:`mlp`."""
    return mlp(in_features, [width] * depth, num_classes, activation, batch_norm=batch_norm,
               **act_kwargs)


def autoencoder(
    activation: str = "elu",
    in_features: int = 784,
    encoder: Sequence[int] = (1000, 500, 250, 30),
    *,
    code_activation: bool = False,
    output: str = "sigmoid",
    init: str = "he",
    **act_kwargs: float,
) -> nn.Sequential:
    """The Fig. 3 autoencoder: encoder ``in-1000-500-250-30``, decoder ``30-250-500-1000-in``.

    The paper does not state the code or output layers; we follow Hinton & Salakhutdinov (2006) and
    Martens (2010), whose setup the paper adopts: a linear code layer (``code_activation=False``)
    and a logistic output layer (``output="sigmoid"``; ``"linear"`` for none) for pixels in [0, 1].
    Modules: ``flatten``, ``enc1..encK``/``eact1..``, ``dec1..decK``/``dact1..``, ``out``,
    ``out_act``; the output is flat ``(N, in_features)``.

    ``init="he"`` (default, the paper's) gives every layer He's initialisation;
    ``init="second-moment"`` then scales the weights fed by the activation so that they keep the
    second moment for that unit (:func:`biasshift.models.init_gain.second_moment_init_`).
    """
    if output not in ("sigmoid", "linear"):
        raise ValueError(f"autoencoder: output must be 'sigmoid' or 'linear', got {output!r}")
    if init not in ("he", "second-moment"):
        raise ValueError(f"autoencoder: init must be 'he' or 'second-moment', got {init!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = in_features
    for i, h in enumerate(encoder, start=1):
        layers[f"enc{i}"] = nn.Linear(width, h)
        if i < len(encoder) or code_activation:
            layers[f"eact{i}"] = make_activation(activation, **act_kwargs)
        width = h
    for i, h in enumerate(list(encoder[-2::-1]), start=1):
        layers[f"dec{i}"] = nn.Linear(width, h)
        layers[f"dact{i}"] = make_activation(activation, **act_kwargs)
        width = h
    layers["out"] = nn.Linear(width, in_features)
    if output == "sigmoid":
        layers["out_act"] = nn.Sigmoid()
    net = he_init_(nn.Sequential(layers))
    if init == "second-moment":
        from biasshift.models.init_gain import second_moment_init_

        second_moment_init_(net, activation, **act_kwargs)
    return net


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

