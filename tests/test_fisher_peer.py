"""Cross-check UnitFisher's blocks against curvlinops (a peer library, test-only dependency).

curvlinops builds the full empirical Fisher (``EFLinearOperator``) and the generalised
Gauss-Newton (``GGNLinearOperator``, which equals the exact Fisher for the categorical and
Gaussian likelihoods) of all parameters; we multiply it into a dense matrix, cut out each unit's
``(bias, weight[unit])`` block and compare.  Scaling: with ``reduction="sum"`` curvlinops gives
``Σ_n``; CrossEntropy's Hessian is the categorical Fisher, MSELoss(sum) = ``Σ (y − f)²`` has
Hessian ``2I``, i.e. twice the unit-variance Gaussian Fisher.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from biasshift import UnitFisher

curvlinops = pytest.importorskip("curvlinops")

pytestmark = [pytest.mark.peer,
              pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")]

DT = torch.float64


def dense(op) -> torch.Tensor:
    return op @ torch.eye(op.shape[1], dtype=DT)


def unit_indices(model: nn.Module, layer: str) -> torch.Tensor:
    """Indices of each unit's (bias, weight[unit].flatten()) in the flattened parameter list."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (start, p.shape)
        start += p.numel()
    w0, wshape = offsets[layer + ".weight"]
    units, n = wshape[0], int(torch.tensor(wshape[1:]).prod())
    rows = []
    for u in range(units):
        idx = list(range(w0 + u * n, w0 + (u + 1) * n))
        if layer + ".bias" in offsets:
            idx.insert(0, offsets[layer + ".bias"][0] + u)
        rows.append(idx)
    return torch.tensor(rows)


def unit_blocks(M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return M[idx[:, :, None], idx[:, None, :]]


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2), nn.ELU(), nn.Flatten(),
        nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 3),
    ).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(12, 2, 5, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


def test_empirical_and_exact_categorical_against_curvlinops() -> None:
    model, x, y = model_and_data()
    params = [p for p in model.parameters()]
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    N = x.shape[0]
    ef = dense(curvlinops.EFLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params,
                                           data, check_deterministic=False)) / N
    ggn = dense(curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params,
                                             data, check_deterministic=False)) / N
    emp, ex = UnitFisher(model), UnitFisher(model, fisher="exact")
    for xb, yb in data:
        emp.accumulate(xb, yb)
        ex.accumulate(xb, yb)
    for layer in ("0", "3", "5"):
        idx = unit_indices(model, layer)
        torch.testing.assert_close(emp.matrix(layer), unit_blocks(ef, idx), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ex.matrix(layer), unit_blocks(ggn, idx), rtol=1e-9, atol=1e-12)


def test_exact_gaussian_against_curvlinops_ggn() -> None:
    model, x, _ = model_and_data(3)
    g = torch.Generator().manual_seed(9)
    y = torch.randn(12, 3, generator=g, dtype=DT)
    params = [p for p in model.parameters()]
    ggn = dense(curvlinops.GGNLinearOperator(model, nn.MSELoss(reduction="sum"), params,
                                             [(x, y)], check_deterministic=False))
    ggn = ggn / (2 * x.shape[0])
    ef = dense(curvlinops.EFLinearOperator(model, nn.MSELoss(reduction="sum"), params, [(x, y)],
                                           check_deterministic=False)) / (4 * x.shape[0])
    ex = UnitFisher(model, fisher="exact", likelihood="gaussian")
    ex.accumulate(x, y)
    emp = UnitFisher(model, likelihood="gaussian")
    emp.accumulate(x, y)
    for layer in ("0", "3", "5"):
        idx = unit_indices(model, layer)
        torch.testing.assert_close(ex.matrix(layer), unit_blocks(ggn, idx), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(emp.matrix(layer), unit_blocks(ef, idx), rtol=1e-9, atol=1e-12)
