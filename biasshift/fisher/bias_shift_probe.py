r"""Measure the bias shift and the gradient/natural-gradient gap of one update, in any loop.

The ELU paper (Clevert et al., ICLR 2016, Section 2) argues that a unit's *bias shift* — the
change of its mean net input caused by an update, ``Δw₀ + E_p(a)ᵀΔw`` — slows learning, that the
unit natural gradient corrects it (Theorems 1 and 2), and that activations with means near zero
bring the plain gradient closer to the unit natural gradient.  :class:`BiasShiftProbe` measures
this on the update of **any** optimizer in **any** training loop::

    probe = BiasShiftProbe(model, probe_inputs, probe_targets, fisher="exact", damping=1e-3,
                           damping_mode="relative")
    loss.backward()
    with probe.measure() as m:          # reads every tracked layer's current .grad
        optimizer.step()                # the update whose effect is measured
    m.tensors                           # {layer: {quantity: (units,) tensor on the device}}
    m.frame()                           # tidy pandas: layer, unit, quantity, value

For every unit of every tracked ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layer with a bias
(the units of a conv layer are its output channels; every (sample, position) pair of the probe
is a sample of the unit, as in :class:`biasshift.UnitFisher`'s theorem blocks):

* ``g = (g₀, g)``: the unit's gradient as found in ``.grad`` on entering :meth:`measure`;
* ``F = E_pairs(δ² ã ãᵀ) = [[c, bᵀ], [b, A]]``: the unit Fisher on the fixed probe, of kind
  ``fisher`` (``"exact"``: the expectation over the model's predictive distribution;
  ``"empirical"``: the probe targets; ``"mc"``: samples from the probe's own generator), damped
  ``F + λI`` (the bias entry too);
* ``E_p(a)``: the unit's mean incoming vector on the probe.

Quantities (``QUANTITIES``; each a ``(units,)`` tensor)

=================================  ===========================================================
``mean_net``                       the unit's mean net input on the probe before the update
``E_p_delta2``                     ``c = E_p(δ²)``
``norm_E_p_a``, ``norm_E_q_a``     ``|E_p(a)|`` and ``|E_q(a)|`` (undamped ``b/c``; NaN for a
                                   unit with ``δ ≡ 0``)
``s``, ``k``                       Theorem 1's ``s`` and Theorem 2's ``k`` of ``F + λI``
                                   (``k = s (c+λ)(1 − E_p(a)ᵀ(A+λI)⁻¹b)``)
``k_undamped``                     the paper's ``k = 1 + (E_q(a) − E_p(a))ᵀVar_q(a)⁻¹E_q(a)`` of
                                   the undamped ``F``
``mean_scale_q``                   ``E_q(a)ᵀ Var_q(a)⁻¹ E_q(a)`` (undamped; Theorem 1's
                                   ``s = c⁻¹(1 + mean_scale_q)``): the scale-free distance of the
                                   δ²-weighted incoming mean from zero
``mean_scale_p``                   ``E_p(a)ᵀ Var_p(a)⁻¹ E_p(a)``: the same under ``p`` (equal for
                                   all units that share their inputs)
``damping``                        the ``λ`` used for the unit's block
``grad_norm``                      ``|(g₀, g)|``
``cos_grad_ng``                    cos(``g``, ``(F + λI)⁻¹g``)
``cos_ng_uncorrected``             cos(``(F + λI)⁻¹g``, ``F̃⁻¹g``) with ``F̃ = diag(c+λ, A+λI)``
                                   the block without the bias coupling (``b = 0``): how much
                                   Theorem 1's bias-shift correction turns the natural gradient;
                                   1 when ``E_q(a) = 0``
``bias_shift_sgd``                 ``g₀ + E_p(a)ᵀg`` — the bias shift of the direction ``g``
``bias_shift_ng``                  ``Δw₀ + E_p(a)ᵀΔw`` for ``(Δw₀, Δw) = (F + λI)⁻¹g``
``bias_shift_ng_uncorrected``      the same for ``F̃⁻¹g``: ``E_p(a)ᵀ(A+λI)⁻¹g + g₀/(c+λ)``
``ng_mean_term``, ``ng_bias_term`` Theorem 2's ``(E_p(a) − kE_q(a))ᵀ(A+λI)⁻¹g`` and
                                   ``k g₀/(c+λ)`` (they sum to ``bias_shift_ng``)
``step_bias_shift_first_order``    ``Δw₀ + E_p(a)ᵀΔw`` with the **actual** parameter change of
                                   the step (after minus before), whatever the optimizer
``step_bias_shift_measured``       the change of the unit's mean net input on the probe caused
                                   by the step (it also contains the other layers' updates)
``cond_F``                         condition number of ``F + λI`` (only with ``condition=True``)
=================================  ===========================================================

Damping
    ``damping_mode="absolute"``: ``λ = damping`` for every block.  ``damping_mode="relative"``
    (default): ``λ = damping × tr(F)/(n+1)``, the **mean diagonal entry of the unit's own
    block** (``E_p(δ² |ã|²)/(n+1)``), so that cosines and ``k`` are comparable across units,
    layers, activations and training time (the mean diagonal rather than ``E_p(δ²)`` because
    it follows the scale of the incoming activations, which set the eigenvalues of ``A``).
    A unit whose block is zero (a dead unit, ``δ ≡ 0``) is damped with ``damping`` times its
    layer's mean of those scales.

Undamped quantities
    ``k_undamped``, ``mean_scale_q`` and ``mean_scale_p`` need ``Var_q(a)`` / ``Var_p(a)`` to be
    invertible.  They are NaN where it is not numerically positive definite: always when a
    layer has no more probe pairs than inputs (the rank is at most the number of pairs minus
    one; the first layer of an MNIST net with a 512-sample probe), and for inputs that are
    constant on the probe (dead ReLUs of the previous layer, MNIST's border pixels).

Cost
    Float32 by default (``dtype=torch.float64`` for verification).  Per layer and group the
    probe's incoming rows are shared by all units.  With more pairs ``P`` than inputs ``n`` the
    blocks are built in parameter space, every unit's at once by a few GEMMs of the per-unit
    weights with the rows' outer products (upper column blocks only); with ``P ≤ n`` the solves
    run in sample space (Woodbury: one ``P × P`` Cholesky factor per unit from the shared
    ``X Xᵀ``, no block is built).  Theorem 1 and 2 come from **one** factorisation per unit of
    the centred, damped block ``c·Var_q(a) + λI`` (solves with the right-hand sides
    ``[g, E_q(a)]``, then Sherman–Morrison; see :meth:`BiasShiftProbe._theorems`), which also
    keeps float32 accurate when the incoming means are large; float32 solves are refined once
    with residuals computed in float64 from the rows (mixed-precision iterative refinement, a
    few GEMMs), so float32 results agree with float64 to about 1e-5 even for ill-conditioned
    blocks; the undamped quantities take one more factorisation of ``c·Var_q(a)`` per unit
    (parameter space only).  The exact categorical
    Fisher costs one backward pass of the probe per class.  ``analyses/bench_tracking.py
    --probe-sizes`` measures the cost against an SGD step.

Contract
    The probe never touches ``.grad``, the parameters, the global random generators (``"mc"``
    draws from the probe's own generator) or the training flags (the model is evaluated in eval
    mode, every submodule's flag restored), so a training trajectory is bit-identical with and
    without it.  Its forward/backward passes run with :func:`torch.autograd.grad` on the layer
    outputs, inside :class:`~biasshift.hooks.Trace`.  A measurement does not synchronise with
    the host until its results are read on the host: :meth:`Measurement.host` (used by
    :meth:`Measurement.frame`) moves every value and flag in **one** transfer; ``m.tensors``
    stays on the device.

Distributed (``torch.distributed``, DDP)
    When ``torch.distributed`` is initialised each rank passes its own probe shard and a
    measurement is that of all ranks' probe samples together, the same on every rank: the
    probe rows ``ã`` and weights ``δ²`` of every layer are all-gathered (rank order) and the
    mean net inputs' sums all-reduced (``P (n1 + units)`` numbers per layer and rank, see
    :mod:`biasshift.distributed`); the gradient is the rank's ``.grad`` (under DDP the same on
    every rank). ``sync=False`` measures on this rank's probe only, ``process_group=`` on a
    sub-group's. A DDP-wrapped model is unwrapped (the probe's passes never go through DDP).

Errors and non-finite values
    A singular block (possible only with ``damping=0`` or a block that is numerically
    indefinite) is NaN in ``m.tensors`` and raises :class:`~biasshift.theory.SingularFisherError`
    when read on the host.  Non-finite activations or ``δ`` on the probe (a diverged model) make
    every Fisher-based quantity NaN (``m.nonfinite`` is set); the measured ones stay as they are.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from biasshift import distributed as _dist
from biasshift._torch import Workspace
from biasshift.fisher.capture import LayerSelection, LayerSpec, delta_rows, incoming, resolve_layers
from biasshift.fisher.likelihood import FISHER_KINDS, Likelihood, make_likelihood, score_vectors
from biasshift.hooks import Trace, eval_mode
from biasshift.theory import SingularFisherError, cho_solve, cholesky_ex

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DAMPING_MODES", "FISHER_QUANTITIES", "QUANTITIES", "BiasShiftProbe", "Measurement"]

DAMPING_MODES = ("relative", "absolute")

#: quantities that come from the Fisher blocks (NaN when the probe's values are non-finite)
FISHER_QUANTITIES = (
    "E_p_delta2", "norm_E_p_a", "norm_E_q_a", "s", "k", "k_undamped", "mean_scale_q",
    "mean_scale_p", "damping", "grad_norm", "cos_grad_ng", "cos_ng_uncorrected",
    "bias_shift_sgd", "bias_shift_ng", "bias_shift_ng_uncorrected", "ng_mean_term",
    "ng_bias_term",
)
#: every quantity of a measurement, in table order (``cond_F`` is appended with ``condition``)
QUANTITIES = ("mean_net", *FISHER_QUANTITIES, "step_bias_shift_first_order",
              "step_bias_shift_measured")
#: the largest Khatri-Rao row chunk ``Z`` of :func:`_strip_gram` (bytes)
STRIP_BYTES = 2**24
_MEASURED = ("mean_net", "grad_norm", "bias_shift_sgd", "norm_E_p_a",
             "step_bias_shift_first_order", "step_bias_shift_measured")


def _dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(-1)


def _cos(x: Tensor, y: Tensor) -> Tensor:
    return _dot(x, y) / (x.norm(dim=-1) * y.norm(dim=-1))


def _refined(solve: Callable[[Tensor], Tensor], apply: Callable[[Tensor], Tensor],
             rhs: Tensor, Y: Tensor, steps: int) -> Tensor:
    """Mixed-precision iterative refinement of ``Y ≈ M⁻¹ rhs``: ``Y ← Y + solve(rhs − MY)``
    ``steps`` times, the residual (``apply``: ``V ↦ MV``) and ``Y`` in float64, the solves in
    ``rhs``'s dtype; returns float64 ``Y``."""
    rhs64, Y = rhs.to(torch.float64), Y.to(torch.float64)
    for _ in range(steps):
        Y = Y + solve((rhs64 - apply(Y)).to(rhs.dtype)).to(torch.float64)
    return Y


def _bad_pivots(diag: Tensor, L: Tensor, info: Tensor) -> Tensor:
    """Flags of :func:`biasshift.theory.cholesky_solver`: failed or near-zero (Jacobi-scaled)
    pivots, from the blocks' diagonals ``diag (B, n)`` and factors ``L``."""
    tol = diag.shape[-1] * torch.finfo(diag.dtype).eps
    scaled = L.diagonal(dim1=-2, dim2=-1).square() / diag
    return (info != 0) | ~(scaled.amin(-1) > tol)


class _CholeskySolve:
    """``(A + λI)⁻¹ rhs`` from a Cholesky factor (parameter space)."""

    def __init__(self, A: Tensor, overwrite: bool = False, triangle: str = "both") -> None:
        diag = A.diagonal(dim1=-2, dim2=-1).clone() if overwrite else \
            A.diagonal(dim1=-2, dim2=-1)
        # with overwrite A's memory becomes the factor's
        # only the lower triangle and the diagonal of L are read (cho_solve, _bad_pivots)
        self.L, info = cholesky_ex(A, triangle=triangle, overwrite=overwrite, clean=False)
        # the results of flagged units are replaced by NaN by the caller
        self.bad = _bad_pivots(diag, self.L, info)

    def __call__(self, rhs: Tensor) -> Tensor:
        return cho_solve(rhs, self.L)


class _CenteredWoodbury:
    r"""``M⁻¹ r`` for ``M = λI + ŨᵀŨ``, ``Ũ = diag(d)(X̃ − 1Ẽᵀ)`` (per-unit centred rows), in
    sample space: ``M⁻¹r = (r − Ũᵀ(λI_P + ŨŨᵀ)⁻¹Ũr)/λ``, with
    ``ŨŨᵀ = diag(d)(K − v1ᵀ − 1vᵀ + |Ẽ|²11ᵀ)diag(d)``, ``K = X̃X̃ᵀ`` shared, ``v = X̃Ẽ``."""

    def __init__(self, X: Tensor, K: Tensor, d: Tensor, Et: Tensor, lam: Tensor,
                 work: Workspace) -> None:
        self.X, self.d, self.Et, self.lam = X, d, Et, lam
        v = Et @ X.T  # (B, P)
        # C = diag(d)(K − v1ᵀ − 1vᵀ + |Ẽ|²11ᵀ)diag(d) = (ddᵀ)∘K − z dᵀ − d zᵀ with
        # z = d∘v − |Ẽ|²d/2, i.e. C_ij = d_i (d_j K_ij − z_j) − z_i d_j: one (B, P, P)
        # allocation and three simple passes (no full-size temporaries; a rank-2 baddbmm_
        # instead of the last two was slower)
        z = d * v - 0.5 * _dot(Et, Et).unsqueeze(-1) * d
        shape = (d.shape[0], K.shape[0], K.shape[1])
        C = work.empty("woodbury", shape, K.dtype, K.device)  # kept between measurements
        torch.addcmul(z.unsqueeze(-2).neg(), K, d.unsqueeze(-2), out=C)
        C.mul_(d.unsqueeze(-1))
        C.addcmul_(z.unsqueeze(-1), d.unsqueeze(-2), value=-1)
        C.diagonal(dim1=-2, dim2=-1).add_(lam.unsqueeze(-1))
        # C is a temporary; only L's lower triangle is read (cho_solve)
        self.L, info = cholesky_ex(C, triangle="both", overwrite=True, clean=False)
        self.bad = (info != 0) | ~(lam > 0)

    def __call__(self, rhs: Tensor) -> Tensor:
        B, n, r = rhs.shape
        P = self.X.shape[0]
        d = self.d.unsqueeze(-1)
        # X @ rhs for every unit as one GEMM with the shared X: (P, n) @ (n, B·r)
        Xr = (self.X @ rhs.permute(1, 0, 2).reshape(n, B * r)).reshape(P, B, r).transpose(0, 1)
        T = (Xr - torch.matmul(self.Et.unsqueeze(1), rhs)) * d
        Z = cho_solve(T, self.L) * d  # (B, P, r)
        XZ = (self.X.T @ Z.transpose(0, 1).reshape(P, B * r)).reshape(n, B, r).transpose(0, 1)
        back = XZ - self.Et.unsqueeze(-1) * Z.sum(1, keepdim=True)
        return (rhs - back) / self.lam[:, None, None]


def _strip_gram(X: Tensor, W: Tensor, budget: int, mirror: bool = True,
                out: Tensor | None = None) -> Tensor:
    r"""``A_u = Σ_p W_up x_p x_pᵀ`` for all units at once: ``(B, n, n)``.

    Per strip of ``h`` rows ``I = [i₀, i₁)`` of the upper triangle, one GEMM ``W @ Z`` with
    ``Z_p = x_pI ⊗ x_p[i₀:]`` (shared by all units) gives ``A[:, I, i₀:]``, in row chunks of at
    most ``min(budget, STRIP_BYTES)`` bytes (a ``Z`` that stays in the last-level cache: at
    2048 rows of 784 inputs, 16 MiB chunks made the Gram 1.2-1.9x faster than 256 MiB ones,
    which fault in fresh pages on every strip).  Strips of ``h = max(8, ⌈n/32⌉)`` rows
    compute ``(n + h)/(2n)`` of the full product (53 % for ``n = 128``), and their ``Z`` are
    built with long inner loops (measured, 128 units of 128² from 512 rows: 19 ms against
    23 ms for blocks of 32×32).
    ``mirror``: the blocks below the strips are their transposes; without it they are zero and
    the upper triangle holds the matrix (enough for ``cholesky_ex(triangle="upper")``).
    ``out``: a ``(units, n, n)`` tensor to write into (e.g. from a
    :class:`~biasshift._torch.Workspace`).
    """
    P, n = X.shape
    h = max(8, -(-n // 32))
    A = X.new_empty(W.shape[0], n, n) if out is None else out
    if not mirror:
        A.zero_()
    for i0 in range(0, n, h):
        i1 = min(n, i0 + h)
        hi, w = i1 - i0, n - i0
        rows = max(1, min(P, min(budget, STRIP_BYTES) // max(1, hi * w * X.element_size())))
        strip: Tensor | None = None
        for r0 in range(0, P, rows):
            Xi, Xj = X[r0:r0 + rows, i0:i1], X[r0:r0 + rows, i0:]
            Z = (Xi.unsqueeze(-1) * Xj.unsqueeze(-2)).reshape(Xi.shape[0], hi * w)
            if strip is None:
                strip = W[:, r0:r0 + rows] @ Z
            else:  # accumulated by the GEMM itself: no temporary per row chunk
                strip.addmm_(W[:, r0:r0 + rows], Z)
        assert strip is not None
        blk = strip.view(-1, hi, w)
        A[:, i0:i1, i0:] = blk
        if mirror and w > hi:
            A[:, i1:, i0:i1] = blk[:, :, hi:].mT
    return A


@dataclass
class _Layer:
    spec: LayerSpec
    bias: Tensor
    weight: Tensor
    offset: int  # first column of the layer's units in the measurement table


@dataclass
class Measurement:
    """The result of one :meth:`BiasShiftProbe.measure` block.

    ``tensors`` (``{layer: {quantity: (units,) tensor}}``) is filled when the block exits and
    stays on the model's device; :meth:`host` moves everything to the CPU in one transfer
    (cached), :meth:`frame` is a tidy table of it.
    """

    layers: list[str]
    units: list[int]
    quantities: tuple[str, ...]
    settings: dict[str, Any]
    values: Tensor | None = None  # (Q, U) float64 on the device
    _flags: Tensor | None = None  # (U + 1,): singular units, then the non-finite flag
    _host: Tensor | None = None
    _host_np: Any = None
    nonfinite: bool | None = None  # known after host()
    _probe: BiasShiftProbe | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        """Whether the measured step has finished (the ``with`` block was left)."""
        return self.values is not None

    def _need(self) -> Tensor:
        if self.values is None:
            raise RuntimeError("BiasShiftProbe: the measurement is not complete; read it after "
                               "the `with probe.measure() as m:` block has exited")
        return self.values

    @property
    def tensors(self) -> dict[str, dict[str, Tensor]]:
        """``{layer: {quantity: (units,) tensor}}`` on the model's device (no host sync)."""
        values = self._need()
        out: dict[str, dict[str, Tensor]] = {}
        start = 0
        for name, u in zip(self.layers, self.units):
            out[name] = {q: values[i, start:start + u] for i, q in enumerate(self.quantities)}
            start += u
        return out

    def host(self) -> Tensor:
        """Every value as a ``(quantities, units)`` float64 CPU tensor (units of all layers
        concatenated): the measurement's one host transfer.

        Raises:
            SingularFisherError: a singular unit block (``damping=0``).
        """
        if self._host is None:
            values = self._need()
            assert self._flags is not None
            # the one transfer; everything after it works on the host copy (numpy)
            both = torch.cat([values.reshape(-1), self._flags.to(values.dtype)]).cpu().numpy()
            Q, U = values.shape
            self._host_np = both[: Q * U].reshape(Q, U)
            self._host = torch.from_numpy(self._host_np)
            flags = both[Q * U:]
            self.nonfinite = bool(flags[-1] != 0)
            bad = flags[:-1] != 0
            if not self.nonfinite and bad.any():
                self._raise_singular(bad)
        return self._host

    def _raise_singular(self, bad: Any) -> None:
        import numpy as np

        start = 0
        for name, u in zip(self.layers, self.units):
            units = [int(i) for i in np.flatnonzero(bad[start:start + u])]
            if units:
                shown = ", ".join(str(i) for i in units[:10]) + (" ..." if len(units) > 10
                                                                 else "")
                raise SingularFisherError(
                    f"BiasShiftProbe: layer {name!r}: the unit Fisher block of {len(units)} "
                    f"unit(s) (unit {shown}) is singular (not numerically positive definite), "
                    f"damping {self.settings['damping']:g} ({self.settings['damping_mode']}). "
                    "Pass damping > 0 (F + damping*I; damping_mode='relative' scales it by each "
                    "block's mean diagonal, e.g. damping=1e-3), or use more probe samples than "
                    "the block has rows.", units=units, layer=name)
            start += u

    def frame(self) -> pd.DataFrame:
        """Tidy table ``layer, unit, quantity, value`` (the settings in ``.attrs``), built from
        :meth:`host` by :func:`biasshift.fisher.tables.long_frame`."""
        from biasshift.fisher.tables import long_frame

        self.host()
        df = long_frame(self.layers, self.units, self.quantities, self._host_np)
        df.attrs.update(self.settings)
        if self.nonfinite:
            df.attrs["nonfinite"] = True
        return df


class BiasShiftProbe:
    r"""Measures, on a fixed probe batch, the bias shift of an update and the gap between the
    gradient and the unit natural gradient (see the module docstring for every quantity).

    Args:
        model: the model being trained (any module whose probe samples do not interact:
            BatchNorm is used in eval mode, with its running statistics).
        probe_inputs: the probe batch ``(M, ...)`` (moved to the model's device).
        probe_targets: its targets (class indices ``(M,)`` for ``"categorical"``, a tensor of
            the output's shape for ``"gaussian"``/``"bernoulli"``); only ``fisher="empirical"``
            uses their values.
        fisher: ``"exact"`` (default), ``"empirical"`` or ``"mc"``.
        damping: ``λ ≥ 0`` (see ``damping_mode``).
        damping_mode: ``"relative"`` (default: ``λ × mean diagonal of each unit's block``) or
            ``"absolute"``.
        layers: ``None`` (every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` with a bias; those
            without one are skipped with a warning), names/modules, or a predicate.
        likelihood: ``"categorical"`` (default), ``"gaussian"``, ``"bernoulli"`` or a
            :class:`~biasshift.fisher.likelihood.Likelihood`.
        mc_samples, seed: draws per input and the seed of the probe's own generator (``"mc"``).
        dtype: computation dtype; default float32 (float64 for a float64 model).
        condition: also compute ``cond_F`` (an eigendecomposition per unit: slow).
        refine: steps of mixed-precision iterative refinement of every float32 solve (the
            residual in float64 from the probe's rows; see ``_theorems``); ignored in float64.
            Each step costs one more solve and two float64 GEMMs per layer. Measured on the
            8x128 ELU net (probe 512, relative damping 1e-3; median relative error against the
            float64 measurement): ``refine=0`` 2.6e-4 in ``bias_shift_ng`` and 6e-6 in
            ``1 - cos_grad_ng``, ``refine=1`` (default) 1.2e-5 and 6e-9, at about 1.25x the
            time of ``refine=0``. ``k`` and ``k_undamped`` (about 1e-3) are limited by the
            float32 inputs, not the solves.
        batch_size: probe samples per forward pass (default: the whole probe at once).
        memory_budget: bytes for the largest temporary of a layer's solves (chunks of units).
            The blocks of the largest chunk are kept between measurements (fresh pages cost
            about a pass over them on the CPU); :meth:`release_memory` frees them.
        sync, process_group: under ``torch.distributed``, measure on all ranks' probe shards
            together (default) or on this rank's (``sync=False``); see the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        probe_inputs: Tensor,
        probe_targets: Tensor,
        fisher: str = "exact",
        damping: float = 1e-3,
        damping_mode: str = "relative",
        *,
        layers: LayerSelection = None,
        likelihood: str | Likelihood = "categorical",
        mc_samples: int = 1,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        condition: bool = False,
        refine: int = 1,
        batch_size: int | None = None,
        memory_budget: int = 2**28,
        sync: bool | None = None,
        process_group: Any = None,
        _owner: str = "BiasShiftProbe",
    ) -> None:
        who = self._who = _owner
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
        if fisher not in FISHER_KINDS:
            raise ValueError(f"{who}: fisher must be one of {FISHER_KINDS}, got {fisher!r}")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"{who}: damping_mode must be one of {DAMPING_MODES}, got "
                             f"{damping_mode!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) \
                or not math.isfinite(damping) or damping < 0:
            raise ValueError(f"{who}: damping must be a finite number >= 0, got {damping!r}")
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise ValueError(f"{who}: refine must be an int >= 0 (refinement steps of the "
                             f"float32 solves), got {refine!r}")
        for name, val in (("mc_samples", mc_samples),) + (
                (("batch_size", batch_size),) if batch_size is not None else ()):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{who}: {name} must be a positive int, got {val!r}")
        if not isinstance(probe_inputs, Tensor) or not isinstance(probe_targets, Tensor):
            raise TypeError(f"{who}: probe_inputs and probe_targets must be tensors, got "
                            f"{type(probe_inputs).__name__} and {type(probe_targets).__name__}")
        if probe_inputs.ndim < 1 or probe_inputs.shape[0] == 0:
            raise ValueError(f"{who}: probe_inputs must be a non-empty batch (M, ...) with dim "
                             f"0 = samples, got shape {tuple(probe_inputs.shape)}")
        if probe_targets.ndim < 1 or probe_targets.shape[0] != probe_inputs.shape[0]:
            raise ValueError(f"{who}: probe_targets has shape {tuple(probe_targets.shape)}; "
                             f"it needs one target per probe input ({probe_inputs.shape[0]})")
        if dtype is not None and (not isinstance(dtype, torch.dtype)
                                  or not dtype.is_floating_point):
            raise TypeError(f"{who}: dtype must be a floating torch.dtype, got {dtype!r}")
        model = _dist.unwrap_model(model)
        self.model = model
        self.sync = sync
        self.process_group = process_group
        _dist.sync_group(sync, process_group)  # checks the arguments
        self.fisher = fisher
        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.likelihood = make_likelihood(likelihood)
        self.mc_samples = mc_samples
        self.seed = int(seed)
        self.condition = bool(condition)
        self.refine = refine
        self.memory_budget = max(int(memory_budget), 1 << 20)
        self._batched_backward = True  # see _fisher_grads
        # the blocks of a measurement, kept between measurements (fresh pages cost a pass)
        self._work = Workspace()
        params = [p for p in model.parameters() if p.is_floating_point()]
        device = params[0].device if params else probe_inputs.device
        if dtype is None:
            dtype = torch.float64 if params and params[0].dtype == torch.float64 \
                else torch.float32
        self.dtype = dtype
        self.device = device
        self.probe_inputs = probe_inputs.to(device)
        self.probe_targets = probe_targets.to(device)
        M = self.probe_inputs.shape[0]
        self.batch_size = batch_size or M
        self.generator: torch.Generator | None = None
        if fisher == "mc":
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        self._resolve(layers)
        self.quantities: tuple[str, ...] = QUANTITIES + (("cond_F",) if condition else ())
        self._dry_run()

    def release_memory(self) -> int:
        """Free the work blocks kept between measurements; returns the bytes freed (the next
        measurement allocates them again)."""
        freed = self._work.nbytes
        self._work.clear()
        return freed

    # ------------------------------------------------------------------------- set-up
    def _resolve(self, selection: LayerSelection) -> None:
        who = self._who
        specs = resolve_layers(self.model, selection)
        no_bias = [n for n, s in specs.items() if not s.has_bias]
        if no_bias:
            if selection is not None and not callable(selection):
                raise ValueError(
                    f"{who}: layer(s) {', '.join(no_bias)} have no bias; the bias shift and "
                    "Theorems 1-2 need one. Leave them out of layers=[...]")
            warnings.warn(f"{who}: layers without bias have no bias shift and are not "
                          f"tracked: {', '.join(no_bias)}", stacklevel=4)
        specs = {n: s for n, s in specs.items() if s.has_bias}
        if not specs:
            raise ValueError(f"{who}: the model has no nn.Linear/nn.Conv2d layer with a bias to "
                             "track")
        frozen = [n for n, s in specs.items()
                  if not (s.module.weight.requires_grad and s.module.bias.requires_grad)]
        if frozen:
            raise ValueError(
                f"{who}: layer(s) {', '.join(frozen)} have parameters that do not require grad "
                "(frozen); they get no update to track. Leave them out of layers=[...]")
        self.specs = specs
        self.layers = list(specs)
        self.units = [s.units for s in specs.values()]
        self._layers: dict[str, _Layer] = {}
        offset = 0
        for n, s in specs.items():
            self._layers[n] = _Layer(s, s.module.bias, s.module.weight, offset)
            offset += s.units

    def _dry_run(self) -> None:
        """One probe pass without grad: every layer is called once per forward, with the
        probe's batch, and the targets fit the output."""
        who = self._who
        calls: dict[str, int] = dict.fromkeys(self.layers, 0)

        def count(name: str, _m: nn.Module, _inp: tuple[Any, ...], out: Any) -> None:
            calls[name] += 1
            if not isinstance(out, Tensor):
                raise TypeError(f"{who}: layer {name!r} returned {type(out).__name__}, not a "
                                "tensor")

        M = self.probe_inputs.shape[0]
        self._targets: list[Tensor] = []
        with torch.no_grad(), eval_mode(self.model), Trace(self.model_layers(), forward=count):
            for start in range(0, M, self.batch_size):
                chunk = self.probe_inputs[start:start + self.batch_size]
                calls.update(dict.fromkeys(self.layers, 0))
                out = self.model(chunk)
                self._check_dry(calls, chunk, out)
                # the targets as the likelihood reads them (checked once, here)
                self._targets.append(self.likelihood.validate(
                    out, self.probe_targets[start:start + self.batch_size]))

    def _check_dry(self, calls: dict[str, int], chunk: Tensor, out: Any) -> None:
        who = self._who
        for n, c in calls.items():
            if c != 1:
                what = "not called" if c == 0 else f"called {c} times"
                raise RuntimeError(
                    f"{who}: layer {n!r} was {what} in one forward pass of the probe; track "
                    "layers that are used exactly once (layers=[...])")
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != chunk.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{who}: the model's output on a probe batch of shape {tuple(chunk.shape)} is "
                f"{got}; expected dim 0 = {chunk.shape[0]} samples")

    def model_layers(self) -> dict[str, nn.Module]:
        """``{name: module}`` of the tracked layers."""
        return {n: s.module for n, s in self.specs.items()}

    def settings(self) -> dict[str, Any]:
        """The probe's settings (for ``frame().attrs`` and provenance)."""
        return {"fisher": self.fisher, "damping": self.damping,
                "damping_mode": self.damping_mode, "probe_size": int(self.probe_inputs.shape[0]),
                "likelihood": self.likelihood.name, "dtype": str(self.dtype).replace("torch.", ""),
                "condition": self.condition, "refine": self.refine, "layers": list(self.layers)}

    # ------------------------------------------------------------------------- measuring
    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Measure the update made inside the block (see the module docstring).

        On entry: reads every tracked layer's ``.grad`` and parameters, and evaluates the probe
        (forward and Fisher backward passes).  On exit: the parameter change and the probe's
        mean net inputs after the update.  Nothing synchronises with the host.
        """
        m = Measurement(list(self.layers), list(self.units), self.quantities, self.settings(),
                        _probe=self)
        grads = self._read_grads()
        before = {n: (L.bias.detach().clone(), L.weight.detach().clone())
                  for n, L in self._layers.items()}
        state = self._evaluate(grads)
        yield m
        net_after = self._mean_net()
        rows = state["rows"]
        first, measured = [], []
        for n, L in self._layers.items():
            b0, w0 = before[n]
            u = L.spec.units
            db = (L.bias.detach().to(torch.float64) - b0.to(torch.float64)).reshape(u)
            dw = (L.weight.detach().to(torch.float64) - w0.to(torch.float64)).reshape(u, -1)
            first.append(db + _dot(state["E_p_a"][n].to(torch.float64), dw))
            measured.append(net_after[n] - state["net"][n])
        rows["step_bias_shift_first_order"] = torch.cat(first)
        rows["step_bias_shift_measured"] = torch.cat(measured)
        m.values = torch.stack([rows[q].to(torch.float64) for q in self.quantities])
        m._flags = state["flags"]

    def _read_grads(self) -> dict[str, Tensor]:
        grads = {}
        for n, L in self._layers.items():
            b, w = L.bias, L.weight
            if b.grad is None or w.grad is None:
                raise RuntimeError(
                    f"{self._who}: layer {n!r} has no gradient (p.grad is None): call "
                    "loss.backward() before `with probe.measure()`; does the loss depend on "
                    "the layer? Leave it out of layers=[...]")
            u = w.shape[0]
            grads[n] = torch.cat([b.grad.detach().reshape(u, 1).to(self.dtype),
                                  w.grad.detach().reshape(u, -1).to(self.dtype)], dim=1)
        return grads

    def _mean_net(self) -> dict[str, Tensor]:
        """Each unit's mean net input on the probe (float64), no grad, eval mode."""
        sums: dict[str, Tensor] = {}
        counts = dict.fromkeys(self.layers, 0)

        def hook(name: str, _m: nn.Module, _inp: tuple[Any, ...], out: Any) -> None:
            v = delta_rows(self.specs[name], out.detach())
            s = v.sum((0, 1), dtype=torch.float64)
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] += v.shape[0] * v.shape[1]

        with torch.no_grad(), eval_mode(self.model), Trace(self.model_layers(), forward=hook):
            for start in range(0, self.probe_inputs.shape[0], self.batch_size):
                self.model(self.probe_inputs[start:start + self.batch_size])
        group = _dist.sync_group(self.sync, self.process_group)
        if group is not None:
            return self._sync_means(sums, dict(counts), group)
        return {n: sums[n] / counts[n] for n in self.layers}

    def _sync_means(self, sums: dict[str, Tensor], counts: dict[str, int], group: Any
                    ) -> dict[str, Tensor]:
        """All ranks' mean net inputs from their float64 sums and counts (one all-reduce)."""
        flat = torch.cat([torch.cat([sums[n], sums[n].new_tensor([float(counts[n])])])
                          for n in self.layers])
        total = _dist.all_reduce(flat, group)
        out, start = {}, 0
        for n in self.layers:
            u = sums[n].numel()
            out[n] = total[start:start + u] / total[start + u]
            start += u + 1
        return out

    def _probe_pass(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Forward + Fisher backward passes over the probe: per layer the incoming rows
        ``X (P, groups, n1)``, the weights ``w = Σ_r δ_r² (P, units)`` and the mean net input
        before the update."""
        dtype = self.dtype
        Xs: dict[str, list[Tensor]] = {n: [] for n in self.layers}
        Ws: dict[str, list[Tensor]] = {n: [] for n in self.layers}
        sums: dict[str, Tensor] = {}
        count = 0
        edges: dict[str, Any] = {}
        for i_chunk, start in enumerate(range(0, self.probe_inputs.shape[0], self.batch_size)):
            x = self.probe_inputs[start:start + self.batch_size]
            tt = self._targets[i_chunk]
            edges.clear()

            def hook(name: str, _m: nn.Module, inputs: tuple[Any, ...], out: Any) -> Any:
                spec = self.specs[name]
                X = incoming(spec, inputs[0], dtype)  # (N, groups, L, n1): a copy
                Xs[name].append(X.transpose(1, 2).reshape(-1, spec.groups, spec.n1))
                v = delta_rows(spec, out.detach())
                s = v.sum((0, 1), dtype=torch.float64)
                sums[name] = s if name not in sums else sums[name] + s
                if out.requires_grad:
                    edges[name] = get_gradient_edge(out)
                    return None
                leaf = out.detach().requires_grad_()  # frozen upstream: differentiate here
                edges[name] = leaf
                return leaf.clone()

            with torch.enable_grad(), Trace(self.model_layers(), forward=hook):
                out = self.model(x)
                _, reps = score_vectors(self.likelihood, self.fisher, out, tt,
                                        mc_samples=self.mc_samples, generator=self.generator)
                if reps is None:  # empirical: the given targets' score
                    reps = self.likelihood.score(out, tt).unsqueeze(0)
                edge_list = [edges[n] for n in self.layers]
                R = reps.shape[0]
                w: list[Tensor | None] = [None] * len(self.layers)
                # bytes of one score vector's backward through the tracked layers (their
                # outputs' gradients and inputs), for the chunks of the batched backward
                rep_bytes = 2 * sum(Xs[n][-1].numel() * Xs[n][-1].element_size()
                                    for n in self.layers)
                per = max(1, min(R, self.memory_budget // max(1, rep_bytes)))
                for r0 in range(0, R, per):
                    r1 = min(R, r0 + per)
                    for i, (n, gr) in enumerate(zip(self.layers, self._fisher_grads(
                            out, edge_list, reps[r0:r1].to(out.dtype), retain=r1 < R))):
                        if gr is None:
                            raise RuntimeError(f"{self._who}: layer {n!r} does not influence "
                                               "the model's output; leave it out (layers=[...])")
                        # (r, N, ...) -> δ² summed over the score vectors r
                        d2 = delta_rows(self.specs[n], gr.flatten(0, 1)).to(dtype).square()
                        d2 = d2.unflatten(0, (r1 - r0, -1)).sum(0)
                        w[i] = d2 if w[i] is None else w[i].add_(d2)
            for i, n in enumerate(self.layers):
                wi = w[i]
                assert wi is not None
                Ws[n].append(wi.reshape(-1, wi.shape[-1]))
            count += x.shape[0]
        Xc = {n: torch.cat(v) if len(v) > 1 else v[0] for n, v in Xs.items()}
        Wc = {n: torch.cat(v) if len(v) > 1 else v[0] for n, v in Ws.items()}
        group = _dist.sync_group(self.sync, self.process_group)
        if group is not None:  # every rank's probe rows, in rank order
            nets = self._sync_means(sums, {n: Xc[n].shape[0] for n in self.layers}, group)
            Xc = {n: torch.cat(_dist.all_gather_rows(v, group)) for n, v in Xc.items()}
            Wc = {n: torch.cat(_dist.all_gather_rows(v, group)) for n, v in Wc.items()}
            return Xc, Wc, nets
        nets = {n: sums[n] / (Xc[n].shape[0]) for n in self.layers}
        return Xc, Wc, nets

    def _fisher_grads(self, out: Tensor, edges: list[Any], reps: Tensor, retain: bool
                      ) -> list[Tensor | None]:
        """The gradients ``(r, ...)`` at ``edges`` of ``out`` along each of the score vectors
        ``reps (r, *out.shape)``: one batched backward (``is_grads_batched``, torch's vmap over
        the backward graph) where the model's backward allows it, else one backward per score
        vector (the model is remembered, so the batched one is tried once)."""
        r = reps.shape[0]
        if r > 1 and self._batched_backward:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", UserWarning)  # vmap's slow fallback
                    got = torch.autograd.grad(out, edges, grad_outputs=reps,
                                              is_grads_batched=True, retain_graph=True,
                                              allow_unused=True)
                return list(got)
            except (RuntimeError, UserWarning, NotImplementedError):
                self._batched_backward = False  # an op without a batching rule: loop
        per_rep = []
        for k in range(r):
            per_rep.append(torch.autograd.grad(out, edges, grad_outputs=reps[k],
                                               retain_graph=retain or k < r - 1,
                                               allow_unused=True))
        return [None if g[0] is None else torch.stack(g) for g in zip(*per_rep)]

    def _evaluate(self, grads: dict[str, Tensor]) -> dict[str, Any]:
        with eval_mode(self.model):
            X, W, nets = self._probe_pass()
        finite = torch.stack([torch.isfinite(X[n].sum()) & torch.isfinite(W[n].sum())
                              for n in self.layers]).all()
        rows: dict[str, list[Tensor]] = {q: [] for q in self.quantities}
        E_p: dict[str, Tensor] = {}
        bads = []
        for n in self.layers:
            Xn = torch.nan_to_num(X[n], nan=0.0, posinf=0.0, neginf=0.0)
            Wn = torch.nan_to_num(W[n], nan=0.0, posinf=0.0, neginf=0.0)
            res, E_p_a, bad = self._layer(self.specs[n], Xn, Wn, grads[n])
            E_p[n] = E_p_a
            bads.append(bad)
            res["mean_net"] = nets[n]
            for q in self.quantities:
                if q in res:
                    rows[q].append(res[q])
        cat = {q: torch.cat(v) for q, v in rows.items() if v}
        nan = torch.tensor(float("nan"), dtype=self.dtype, device=self.device)
        bad_all = torch.cat(bads)
        for q in self.quantities:
            if q in cat and q not in _MEASURED:
                masked = torch.where(bad_all, nan, cat[q]) if q != "damping" else cat[q]
                cat[q] = torch.where(finite, masked, nan)
        flags = torch.cat([bad_all, (~finite).unsqueeze(0)])
        return {"rows": cat, "E_p_a": E_p, "net": nets, "flags": flags}

    # ------------------------------------------------------------------------- one layer
    def _layer(self, spec: LayerSpec, X: Tensor, w: Tensor, grad: Tensor
               ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Every Fisher quantity of one layer's units (see the module docstring)."""
        P = X.shape[0]
        n = spec.n
        n1 = spec.n1
        upg = spec.units_per_group
        W = (w / P).T.contiguous()  # (units, P): E_pairs weights
        out: dict[str, list[Tensor]] = {}
        E_p_units, bads = [], []
        # the damping scale of each unit: its block's mean diagonal
        sq = X.square().sum(-1)  # (P, groups)
        trace = torch.cat([W[j * upg:(j + 1) * upg] @ sq[:, j] for j in range(spec.groups)])
        scale = trace / n1
        if self.damping_mode == "relative":
            fallback = scale.mean().expand_as(scale)
            lam = self.damping * torch.where(scale > 0, scale, fallback)
        else:
            lam = torch.full_like(scale, self.damping)
        # sample space when the pairs are not more than the inputs: no Gram matrices to build,
        # and the undamped Var_q(a) (rank <= P - 1 < n) is singular anyway
        woodbury = P <= n and self.damping > 0
        for j in range(spec.groups):
            sl = slice(j * upg, (j + 1) * upg)
            Xa = X[:, j, 1:]
            Wj, g, lj = W[sl], grad[sl], lam[sl]
            B = Wj.shape[0]
            mu = Xa.mean(0)  # E_p(a), shared by the group's units
            Xc = Xa - mu  # centred rows: the covariances below lose no digits to the mean
            c = Wj.sum(-1)
            # Ẽ = E_q(a) − E_p(a) (0 for a unit with δ ≡ 0, whose E_q(a) is undefined)
            Et = torch.where(c.unsqueeze(-1) > 0, (Wj @ Xc) / c.unsqueeze(-1),
                             torch.zeros((), dtype=Xa.dtype, device=Xa.device))
            if woodbury:
                res = self._woodbury(Xa, Xc, Wj, c, Et, mu, g, lj)
            else:
                res = self._cholesky(Xc, Wj, c, Et, mu, g, lj)
            bads.append(res.pop("_bad"))
            res["mean_scale_p"] = self._mean_scale_p(Xc, mu, woodbury).expand(B)
            res["E_p_delta2"] = c
            res["norm_E_p_a"] = mu.norm().expand(B)
            res["norm_E_q_a"] = ((Wj @ Xa) / c.unsqueeze(-1)).norm(dim=-1)
            res["damping"] = lj
            res["grad_norm"] = g.norm(dim=-1)
            for k, v in res.items():
                out.setdefault(k, []).append(v)
            E_p_units.append(mu.expand(B, n))
        cat = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in out.items()}
        E = torch.cat(E_p_units) if len(E_p_units) > 1 else E_p_units[0]
        bad = torch.cat(bads) if len(bads) > 1 else bads[0]
        return cat, E, bad

    @staticmethod
    def _theorems(c: Tensor, lam: Tensor, Et: Tensor, mu: Tensor, g: Tensor,
                  solve_M: Callable[[Tensor], Tensor], bad: Tensor,
                  apply_M: Callable[[Tensor], Tensor] | None = None,
                  refine: int = 1) -> dict[str, Tensor]:
        r"""Theorems 1 and 2 from one solve with the centred, damped block.

        With ``E = E_q(a)`` (undamped), ``M = c·Var_q(a) + λI`` and ``A + λI = M + c E Eᵀ``
        (Sherman–Morrison), ``z = M⁻¹E``, ``y = M⁻¹g`` and ``m = c Eᵀz``::

            (A+λI)⁻¹b = c z / (1+m),   (A+λI)⁻¹g = y − c (Eᵀy) z / (1+m),
            c + λ − bᵀ(A+λI)⁻¹b = λ + c / (1+m)             (= 1/s, no cancellation),
            k = (c+λ)(1 + c Ẽᵀz) / (λ(1+m) + c),   Ẽ = E_q(a) − E_p(a),

        which are Theorem 1's ``s``, ``Δw₀ = s(g₀ − bᵀ(A+λI)⁻¹g)``, ``Δw = (A+λI)⁻¹(g − Δw₀b)``
        and Theorem 2's ``k = s(c+λ)(1 − E_p(a)ᵀ(A+λI)⁻¹b)`` rewritten so that the large
        incoming means of deep layers do not cancel in float32.

        With ``apply_M`` (``v ↦ Mv`` in float64 from the rows, given for float32 solves) the
        solves are refined: ``Y ← Y + M⁻¹(R − MY)`` ``refine`` times, the residual in float64
        (mixed-precision iterative refinement: each step multiplies the error of a float32
        factorisation by about ``cond(M)·eps``), and everything after the solves is
        computed in float64.
        """
        E = mu + Et
        g0, gv = g[:, 0], g[:, 1:]
        rhs = torch.stack([gv, E], dim=-1)
        Y = solve_M(rhs)
        if apply_M is not None:
            Y = _refined(solve_M, apply_M, rhs, Y, refine)
            c, lam, Et, mu, g = (t.to(torch.float64) for t in (c, lam, Et, mu, g))
            E = mu + Et
            g0, gv = g[:, 0], g[:, 1:]
        y, z = Y[..., 0], Y[..., 1]
        m = c * _dot(E, z)
        opm = 1 + m
        cp = c + lam
        yg = y - (c * _dot(E, y) / opm).unsqueeze(-1) * z  # (A+λI)⁻¹g
        yb = (c / opm).unsqueeze(-1) * z  # (A+λI)⁻¹b
        schur = lam + c / opm
        s = 1.0 / schur
        b = c.unsqueeze(-1) * E
        dw0 = s * (g0 - _dot(b, yg))
        dw = yg - dw0.unsqueeze(-1) * yb
        natural = torch.cat([dw0.unsqueeze(-1), dw], dim=-1)
        uncorrected = torch.cat([(g0 / cp).unsqueeze(-1), yg], dim=-1)
        k = cp * (1 + c * _dot(Et, z)) / (lam * opm + c)
        Eq_damped = b / cp.unsqueeze(-1)
        E_p = mu.expand_as(gv)
        bad = bad | ~(schur > 0) | ~torch.isfinite(schur)
        return {"s": s, "k": k, "cos_grad_ng": _cos(g, natural),
                "cos_ng_uncorrected": _cos(natural, uncorrected),
                "bias_shift_sgd": g0 + _dot(E_p, gv), "bias_shift_ng": dw0 + _dot(E_p, dw),
                "bias_shift_ng_uncorrected": g0 / cp + _dot(E_p, yg),
                "ng_mean_term": _dot(E_p - k.unsqueeze(-1) * Eq_damped, yg),
                "ng_bias_term": k * g0 / cp, "_bad": bad}

    def _apply_M(self, Xc: Tensor, W: Tensor, Et: Tensor, lam: Tensor
                 ) -> Callable[[Tensor], Tensor] | None:
        r"""``V ↦ M V`` in float64 for ``M = λI + Σ_p W_p (x̃_p − Ẽ)(x̃_p − Ẽ)ᵀ`` (per unit, from
        the rows: two GEMMs shared by the units), for refining float32 solves; ``None`` when
        computing in float64. The float64 copies are made at the first call (never with
        ``refine=0``, where only the algebra after the solves is float64)."""
        if self.dtype == torch.float64:
            return None
        P, n = Xc.shape
        f64: list[Tensor] = []

        def apply(V: Tensor) -> Tensor:
            if not f64:
                f64.extend(t.to(torch.float64) for t in (Xc, W, Et, lam))
            X64, W64, E64, lam64 = f64
            B, _, r = V.shape
            T = (X64 @ V.permute(1, 0, 2).reshape(n, B * r)).reshape(P, B, r).transpose(0, 1)
            T = (T - torch.matmul(E64.unsqueeze(1), V)) * W64.unsqueeze(-1)  # (B, P, r)
            back = (X64.T @ T.transpose(0, 1).reshape(P, B * r)).reshape(n, B, r)
            back = back.transpose(0, 1) - E64.unsqueeze(-1) * T.sum(1, keepdim=True)
            return back + lam64[:, None, None] * V

        return apply

    def _cholesky(self, Xc: Tensor, W: Tensor, c: Tensor, Et: Tensor, mu: Tensor, g: Tensor,
                  lam: Tensor) -> dict[str, Tensor]:
        n = Xc.shape[1]
        B = W.shape[0]
        # the chunk's blocks: the Gram (factored in place) and its damped copy, with cond_F
        # also the bordered block F
        blocks = 3 if self.condition else 2
        chunk = max(1, min(B, self.memory_budget // max(1, blocks * (n + 1) ** 2
                                                         * Xc.element_size())))
        parts: dict[str, list[Tensor]] = {}
        for u0 in range(0, B, chunk):
            s = slice(u0, u0 + chunk)
            e = Et[s]
            # M₀ = c·Var_q(a) = Σ_p W_p (a_p − E_q)(a_p − E_q)ᵀ from the centred rows
            # the upper block triangle is all the factorisations read (cond_F needs it all)
            full = self.condition
            B_s = W[s].shape[0]
            M0 = _strip_gram(Xc, W[s], self.memory_budget, mirror=full,
                             out=self._work.empty("gram", (B_s, n, n), Xc.dtype, Xc.device))
            M0.baddbmm_(e.unsqueeze(-1), (c[s].unsqueeze(-1) * e).unsqueeze(-2), alpha=-1)
            # damped: M₀ + λI (one copy; the factorisations work in place)
            Md = self._work.empty("damped", M0.shape, M0.dtype, M0.device).copy_(M0)
            Md.diagonal(dim1=-2, dim2=-1).add_(lam[s].unsqueeze(-1))
            # undamped: the paper's k and E_q(a)ᵀVar_q(a)⁻¹E_q(a) (NaN where singular)
            und = _CholeskySolve(M0, overwrite=True, triangle="both" if full else "upper")
            E = mu + e
            rhs0 = E.unsqueeze(-1)
            z0 = und(rhs0)
            cs, es = c[s], e
            apply0 = self._apply_M(Xc, W[s], e, torch.zeros_like(lam[s]))
            if apply0 is not None:  # refine the float32 solve (see _theorems)
                z0 = _refined(und, apply0, rhs0, z0, self.refine)
                cs, es, E = cs.to(torch.float64), es.to(torch.float64), E.to(torch.float64)
            z0 = z0.squeeze(-1)
            nan0 = torch.full_like(cs, float("nan"))
            msq = torch.where(und.bad, nan0, cs * _dot(E, z0))
            k0 = torch.where(und.bad, nan0, 1 + cs * _dot(es, z0))
            sol = _CholeskySolve(Md, overwrite=not full,  # cond_F needs Md
                                 triangle="both" if full else "upper")
            res = self._theorems(c[s], lam[s], e, mu, g[s], sol, sol.bad,
                                 self._apply_M(Xc, W[s], e, lam[s]), self.refine)
            res["k_undamped"] = k0
            res["mean_scale_q"] = msq
            if self.condition:
                cE = c[s].unsqueeze(-1) * E
                F = Md.new_empty(Md.shape[0], n + 1, n + 1)
                F[:, 0, 0] = c[s] + lam[s]
                F[:, 0, 1:] = cE
                F[:, 1:, 0] = cE
                F[:, 1:, 1:] = Md + cE.unsqueeze(-1) * E.unsqueeze(-2)
                eig = torch.linalg.eigvalsh(F)
                res["cond_F"] = eig[:, -1] / eig[:, 0]
            for k, v in res.items():
                parts.setdefault(k, []).append(v)
            del M0, Md
        return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}

    def _woodbury(self, Xa: Tensor, Xc: Tensor, W: Tensor, c: Tensor, Et: Tensor, mu: Tensor,
                  g: Tensor, lam: Tensor) -> dict[str, Tensor]:
        P = Xc.shape[0]
        K = Xc @ Xc.T  # shared by the group's units
        d = W.clamp_min(0).sqrt()
        B = W.shape[0]
        chunk = max(1, min(B, self.memory_budget // max(1, 4 * P * P * Xc.element_size())))
        parts: dict[str, list[Tensor]] = {}
        for u0 in range(0, B, chunk):
            s = slice(u0, u0 + chunk)
            sol = _CenteredWoodbury(Xc, K, d[s], Et[s], lam[s], self._work)
            res = self._theorems(c[s], lam[s], Et[s], mu, g[s], sol, sol.bad,
                                 self._apply_M(Xc, W[s], Et[s], lam[s]), self.refine)
            nan = torch.full_like(c[s], float("nan"))
            res["k_undamped"] = nan  # rank Var_q(a) <= P - 1 < n: singular
            res["mean_scale_q"] = nan
            if self.condition:
                Kt = Xa @ Xa.T + 1
                mu_max = torch.linalg.eigvalsh(d[s].unsqueeze(-1) * Kt * d[s].unsqueeze(-2))
                res["cond_F"] = (lam[s] + mu_max[:, -1]) / lam[s]
            for k, v in res.items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}

    @staticmethod
    def _mean_scale_p(Xc: Tensor, mu: Tensor, rank_deficient: bool) -> Tensor:
        """``E_p(a)ᵀ Var_p(a)⁻¹ E_p(a)`` from the centred rows (0-dim; NaN where ``Var_p(a)``
        is singular, always when there are fewer pairs than inputs)."""
        if rank_deficient:
            return torch.full((), float("nan"), dtype=Xc.dtype, device=Xc.device)
        V = (Xc.T @ Xc / Xc.shape[0]).unsqueeze(0)
        sol = _CholeskySolve(V)
        val = _dot(mu, sol(mu.reshape(1, -1, 1)).reshape(-1))
        return torch.where(sol.bad[0], torch.full_like(val, float("nan")), val)
