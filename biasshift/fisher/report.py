r"""Per-layer Theorem 1 and 2 quantities of a :class:`~biasshift.UnitFisher`, chunk by chunk.

The theorem Fisher of a unit is its *pair* block ``F = E_pairs(δ² ã ãᵀ)`` (for ``nn.Linear`` on
``(N, F)`` inputs this is the true unit block).  Units are processed in chunks sized from a
memory budget; per chunk one of two exact solvers applies ``(A + λI)⁻¹``:

* ``"cholesky"``: build the chunk's blocks (a δ²-weighted Gram matrix, or a slice of the dense
  running sums), damp, factor; cost per unit ``O(P·n² + n³)``;
* ``"woodbury"``: solve in sample space with the ``P × P`` Gram matrix of the pair rows shared by
  the group's units (:class:`~biasshift.fisher.blocks.WoodburySolver`); needs ``damping > 0``
  and ``P < n + 1``; cost per unit ``O(P³ + P·n)``.

``"auto"`` picks the cheaper by a flop estimate.  The condition number of the damped block is
exact either way: ``eigvalsh`` of the block, or — in the Woodbury case, where ``F + λI`` has
rank-deficient ``F`` — ``(λ + μ_max)/λ`` with ``μ_max`` the largest eigenvalue of the ``P × P``
matrix ``diag(d) X Xᵀ diag(d)``.  Singular blocks are flagged per unit on the device
(:attr:`LayerResult.bad`); :func:`layer_quantities` checks the flags with one host
synchronisation per layer, or none with ``check=False`` (then the caller checks them, e.g. in
its one batched host transfer, and raises through :meth:`LayerResult.raise_singular`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from biasshift.fisher.blocks import WoodburySolver, cholesky_cost, woodbury_cost
from biasshift.fisher.storage import LayerStore
from biasshift.theory import (
    UnitQuantities,
    cholesky_solver,
    raise_singular,
    split_fisher,
    unit_quantities,
)

__all__ = ["SOLVERS", "LayerResult", "choose_solver", "layer_quantities"]

SOLVERS = ("auto", "cholesky", "woodbury")


@dataclass
class LayerResult:
    """Per-unit results of one layer, tensors of shape ``(units,)`` unless stated.

    ``bad`` flags the units whose damped block is not numerically positive definite (their
    values are meaningless); :meth:`raise_singular` raises the
    :class:`~biasshift.theory.SingularFisherError` that names them (it rebuilds the blocks of
    the first chunk with a flagged unit for the message).
    """

    solver: str
    natural: Tensor  # (units, n1)
    quantities: dict[str, Tensor]
    bad: Tensor  # (units,) bool
    _blocks: Callable[[int, slice], Tensor] = field(repr=False)
    _chunks: list[tuple[int, slice]] = field(repr=False)
    _layer: str = ""
    _damping: float = 0.0

    def raise_singular(self, bad: Any = None) -> None:
        """Raise for the flagged units (``bad``: the flags on the host, if already there)."""
        flags = self.bad if bad is None else torch.as_tensor(bad, dtype=torch.bool)
        flags = flags.to("cpu")
        for j, sl in self._chunks:
            chunk = flags[sl]
            if bool(chunk.any()):
                raise_singular(self._blocks(j, sl), chunk, self._damping, layer=self._layer,
                               unit_offset=sl.start)
        raise AssertionError("LayerResult.raise_singular: no unit is flagged")


def choose_solver(store: LayerStore, damping: float, solver: str, condition: bool) -> str:
    """The solver for a layer: ``"cholesky"`` or ``"woodbury"`` (see the module docstring)."""
    spec = store.spec
    P, n1 = store.n_pairs, spec.n1
    possible = damping > 0 and not store.is_dense and P < n1
    if solver == "woodbury":
        if not possible:
            why = ("damping is 0" if not damping > 0 else
                   "the layer's blocks are held as dense sums" if store.is_dense else
                   f"the {P} stored pairs are not fewer than the block size {n1}")
            raise ValueError(
                f"layer {spec.name!r}: the Woodbury (sample-space) solve is not possible: {why}; "
                "use solver='cholesky' or 'auto'"
            )
        return "woodbury"
    if solver == "cholesky":
        return "cholesky"
    if solver != "auto":
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not possible:
        return "cholesky"
    w = woodbury_cost(spec.units, P, n1, spec.groups, condition)
    c = cholesky_cost(spec.units, P, n1, condition, have_dense=store.is_dense)
    return "woodbury" if w < c else "cholesky"


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def layer_quantities(store: LayerStore, grad: Tensor, E_p_a: Tensor | None, *, damping: float,
                     dtype: torch.dtype, budget: int, condition: bool = True,
                     solver: str = "auto", check: bool = True) -> LayerResult:
    """Natural gradient (and, given ``E_p_a``, Theorem 1/2 quantities) for all units of a layer.

    Args:
        store: the layer's accumulated statistics.
        grad: ``(units, n1)`` gradient of the loss (bias first when the layer has one).
        E_p_a: ``(units, n)`` incoming means, or ``None`` for the natural gradient only.
        damping: ``λ ≥ 0``.
        dtype: computation dtype.
        budget: bytes per chunk.
        condition: also compute ``cond(F + λI)``.
        solver: ``"auto"``, ``"cholesky"`` or ``"woodbury"``.
        check: raise :class:`~biasshift.theory.SingularFisherError` for a singular block (one
            host synchronisation for the layer); ``False`` leaves it to the caller
            (:attr:`LayerResult.bad`, :meth:`LayerResult.raise_singular`).
    """
    spec = store.spec
    which = choose_solver(store, damping, solver, condition)
    P = store.n_pairs
    n1 = spec.n1
    item = torch.finfo(dtype).bits // 8
    per_unit = 3 * n1**2 if which == "cholesky" else 4 * P * P + 8 * P + 6 * n1
    chunks = store.unit_chunks(per_unit, budget // 2, item)
    naturals: list[Tensor] = []
    bads: list[Tensor] = []
    cols: dict[str, list[Tensor]] = {}
    shared: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def keep(name: str, value: Tensor | None) -> None:
        if value is not None:
            cols.setdefault(name, []).append(value)

    for j, sl in chunks:
        g = grad[sl].to(dtype)
        ep = None if E_p_a is None else E_p_a[sl].to(dtype)
        if which == "cholesky":
            # the Cholesky factorisation and eigvalsh read the lower triangle only
            F = store.blocks(j, sl, positions="pairs", dtype=dtype, budget=budget // 2,
                             lower=True)
            if spec.has_bias:
                blk = split_fisher(F, damping)
                chol = cholesky_solver(blk.A)
                q: UnitQuantities | None = unit_quantities(blk.c, blk.b, chol, g, ep, bad=chol.bad)
                assert q is not None
                nat, bad = q.natural, q.bad
            else:
                if damping:
                    F = F + damping * torch.eye(n1, dtype=dtype, device=F.device)
                chol = cholesky_solver(F)
                q = None
                nat, bad = chol(g.unsqueeze(-1)).squeeze(-1), chol.bad
            if condition:
                Fd = F + damping * torch.eye(n1, dtype=dtype, device=F.device) \
                    if (spec.has_bias and damping) else F
                eig = torch.linalg.eigvalsh(Fd)
                keep("cond_F", eig[:, -1] / eig[:, 0])
            del F
        else:
            if j not in shared:
                shared.clear()
                X = store.pair_X(j, dtype)
                Xa = X[:, 1:] if spec.has_bias else X
                shared[j] = (X, Xa, Xa @ Xa.T)
            X, Xa, K = shared[j]
            w = store.pair_w(sl, dtype)
            d = (w / P).sqrt()
            wood = WoodburySolver(Xa, K, d, damping)
            if spec.has_bias:
                c = w.sum(-1) / P + damping
                b = torch.matmul(w, Xa) / P
                q = unit_quantities(c, b, wood, g, ep, bad=wood.bad)
                nat, bad = q.natural, q.bad
            else:
                q = None
                nat, bad = wood(g.unsqueeze(-1)).squeeze(-1), wood.bad
            if condition:
                Kt = K + 1 if spec.has_bias else K
                mu = torch.linalg.eigvalsh(d.unsqueeze(-1) * Kt * d.unsqueeze(-2))[:, -1]
                keep("cond_F", (damping + mu) / damping)
        naturals.append(nat)
        bads.append(bad)
        if q is not None:
            keep("s", q.s)
            keep("k", q.k)
            keep("cos_grad_ng", q.cosine)
            keep("bias_shift_sgd", q.bias_shift_sgd)
            keep("bias_shift_ng_uncorrected", q.bias_shift_uncorrected)
            keep("bias_shift_ng", q.bias_shift_natural)
            keep("ng_mean_term", q.mean_term)
            keep("ng_bias_term", q.bias_term)
        else:
            cosine = (g * nat).sum(-1) / (g.norm(dim=-1) * nat.norm(dim=-1))
            keep("cos_grad_ng", cosine)

    def damped_blocks(j: int, sl: slice) -> Tensor:
        F = store.blocks(j, sl, positions="pairs", dtype=dtype, budget=budget // 2)
        return F + damping * torch.eye(n1, dtype=dtype, device=F.device) if damping else F

    result = LayerResult(solver=which, natural=_cat(naturals),
                         quantities={k: _cat(v) for k, v in cols.items()}, bad=_cat(bads),
                         _blocks=damped_blocks, _chunks=list(chunks), _layer=spec.name,
                         _damping=damping)
    if check and bool(result.bad.any()):
        result.raise_singular()
    return result
