"""Brute-force references for the unit Fisher tests (torch.func per-sample gradients).

Nothing here uses biasshift's capture, unfold or likelihood code: log-likelihoods are written out,
incoming patch vectors come from the Jacobian of the layer's own forward with respect to its
weight, and δ from autograd on the layer output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap


def log_lik(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """Summed per-sample log-likelihood of one sample (out without batch dim)."""
    if kind == "categorical":
        return torch.log_softmax(out, -1).gather(0, y.reshape(1))[0]
    if kind == "gaussian":
        return -0.5 * (y - out).square().sum()
    if kind == "bernoulli":
        return -F.binary_cross_entropy_with_logits(out, y, reduction="sum")
    raise ValueError(kind)


def per_sample_grads(model: nn.Module, x: Tensor, y: Tensor, kind: str = "categorical",
                     ) -> dict[str, Tensor]:
    """``∇_θ ln p(y_i|x_i)`` for every parameter, ``(N, *param.shape)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))[0]
        return log_lik(kind, out, yi)

    return vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)


def unit_grads(grads: dict[str, Tensor], layer: str) -> Tensor:
    """Per-sample unit gradients ``(N, units, n1)``: ``(bias, weight[unit].flatten())``."""
    W = grads[layer + ".weight"]
    N, U = W.shape[:2]
    parts = [W.reshape(N, U, -1)]
    if layer + ".bias" in grads:
        parts.insert(0, grads[layer + ".bias"].unsqueeze(-1))
    return torch.cat(parts, dim=-1)


def outer_mean(G: Tensor, weights: Tensor | None = None) -> Tensor:
    """``mean_i w_i G_i G_iᵀ`` per unit for ``G (N, units, n1)``."""
    if weights is None:
        return torch.einsum("nui,nuj->uij", G, G) / G.shape[0]
    return torch.einsum("n,nui,nuj->uij", weights, G, G) / G.shape[0]


def empirical_fisher(model: nn.Module, x: Tensor, y: Tensor, layer: str,
                     kind: str = "categorical") -> Tensor:
    return outer_mean(unit_grads(per_sample_grads(model, x, y, kind), layer))


def exact_categorical_fisher(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    """``mean_i Σ_y p(y|x_i) g_iy g_iyᵀ``."""
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    N, C = p.shape
    total = 0
    for c in range(C):
        y = torch.full((N,), c, dtype=torch.long, device=x.device)
        G = unit_grads(per_sample_grads(model, x, y), layer)
        total = total + outer_mean(G, p[:, c])
    return total


def output_jacobians(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    """``∂f(x_i)/∂(bias, weight[u])`` per sample: ``(N, D, units, n1)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),))[0].reshape(-1)

    J = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    W = J[layer + ".weight"]
    N, D, U = W.shape[:3]
    parts = [W.reshape(N, D, U, -1)]
    if layer + ".bias" in J:
        parts.insert(0, J[layer + ".bias"].unsqueeze(-1))
    return torch.cat(parts, -1)


def exact_gaussian_fisher(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    J = output_jacobians(model, x, layer)
    return torch.einsum("ndui,nduj->uij", J, J) / x.shape[0]


def exact_bernoulli_fisher(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    J = output_jacobians(model, x, layer)
    with torch.no_grad():
        s = torch.sigmoid(model(x)).reshape(x.shape[0], -1)
    return torch.einsum("nd,ndui,nduj->uij", s * (1 - s), J, J) / x.shape[0]


def conv_pairs(model: nn.Sequential, index: int, x: Tensor, y: Tensor,
               kind: str = "categorical") -> tuple[Tensor, Tensor]:
    """For conv layer ``model[index]``: incoming ``ã`` per unit and pair ``(N·L, units, n1)`` from
    the Jacobian of the layer's forward w.r.t. its weight, and ``δ`` per pair ``(N·L, units)``."""
    conv = model[index]
    assert isinstance(conv, nn.Conv2d)
    h = x
    for m in list(model)[:index]:
        h = m(h)
    h = h.detach()
    W = conv.weight.detach()

    def f(w: Tensor) -> Tensor:
        return conv._conv_forward(h, w, None)

    J = jacrev(f)(W)  # (N, U, H, W, U, Cg, kh, kw)
    N, U, Ho, Wo = J.shape[:4]
    idx = torch.arange(U, device=x.device)
    Jd = J[:, idx, :, :, idx]  # (U, N, H, W, Cg, kh, kw): unit u's own weight
    a = Jd.reshape(U, N, Ho * Wo, -1).permute(1, 2, 0, 3).reshape(N * Ho * Wo, U, -1)
    if conv.bias is not None:
        a = torch.cat([torch.ones_like(a[..., :1]), a], -1)
    # δ per position: autograd on the layer output
    z = conv(h).detach().requires_grad_()
    out = z
    for m in list(model)[index + 1:]:
        out = m(out)
    ll = sum(log_lik(kind, out[i], y[i]) for i in range(N))
    (dz,) = torch.autograd.grad(ll, z)
    delta = dz.permute(0, 2, 3, 1).reshape(N * Ho * Wo, U)
    return a, delta
