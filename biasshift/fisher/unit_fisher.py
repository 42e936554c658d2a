r"""The unit Fisher of every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` unit, and Theorems 1-2.

:class:`UnitFisher` accumulates, over any number of batches, what the unit Fisher blocks of the
ELU paper (Clevert et al., ICLR 2016, Section 2) need, and gives

* :meth:`UnitFisher.matrix` — the **true** unit block of the Fisher: the mean over samples of
  the outer product of the per-sample gradient of ``ln p(y|x)`` restricted to the unit's
  ``(bias, weight[unit].flatten())``; for ``nn.Conv2d`` (and ``nn.Linear`` on ``(N, *, F)``
  inputs) the per-sample gradient is summed over positions first.  ``positions="pairs"`` gives
  the theorem block instead (below);
* :meth:`UnitFisher.moments`, :meth:`UnitFisher.gradient`, :meth:`UnitFisher.natural_gradient`
  and :meth:`UnitFisher.report` — the paper's quantities per unit.

Samples and positions
    The theorem quantities (``E_p(δ²)``, ``E_p(a)``, ``E_q(a)``, ``s``, ``k``, natural gradient,
    bias shifts, condition number) treat every **(sample, position) pair** of a conv unit as a
    sample, exactly as the paper's MLP formulas: ``F_pairs = E_pairs(δ² ã ãᵀ)``.  For
    ``nn.Linear`` on ``(N, F)`` inputs this is the true unit block.  For conv units it differs
    from :meth:`~UnitFisher.matrix` (which keeps the cross-position terms of the position-summed
    per-sample gradient).  The default gradient is that of the mean negative log-likelihood of
    the given targets over the accumulated samples — the parameter gradient an optimiser sees
    (summed over positions).

Fisher kinds (:mod:`biasshift.fisher.likelihood`)
    ``"empirical"`` uses the given targets, ``"mc"`` samples ``y`` from the model
    (``mc_samples`` per input, with ``generator``/``seed``), ``"exact"`` takes the expectation
    over ``y``.  The report's gradient always uses the **given** targets; the kinds change only
    the ``δ`` in ``F``.

One accumulate call
    Forward hooks (owned by a context manager, removed on exit and on exceptions) record the
    incoming vectors (unfolded patches for conv) and a gradient edge of each layer's output; one
    backward pass of the **summed** per-sample log-likelihood (``torch.autograd.grad`` with
    respect to those edges, not the parameters) gives ``δ`` for every unit of every layer; the
    ``"mc"``/``"exact"`` kinds backpropagate one more vector per replica (``mc_samples``, or the
    number of classes), and layers with several positions (conv) store ``δ`` per replica, so
    their factors grow by that factor (single-position layers store ``Σ_r δ_r²`` only).

Synchronisation and non-finite values
    ``accumulate`` does not synchronise with the host (``nonfinite="defer"``, the default):
    non-finite activations or ``δ`` and out-of-range targets are counted in device-side flags,
    non-finite entries are replaced by 0 before they enter any sum, and the next read
    (``matrix``, ``moments``, ``gradient``, ``natural_gradient``, ``report``) raises an error
    naming the layer and the first offending batch.  ``nonfinite="raise"`` checks every batch
    (one host sync per ``accumulate``) and raises before anything is added.

Memory
    Per layer the blocks are held as low-rank factors while those are smaller than the dense
    running sums ``units × (n+1)²``, and folded into dense sums when that is cheaper and fits
    ``dense_budget`` bytes (see :mod:`biasshift.fisher.storage`).  Blocks are built chunk by chunk
    on demand, chunk sizes chosen from ``memory_budget`` bytes.

Distributed (``torch.distributed``, DDP)
    Every reader (``matrix``, ``blocks``, ``moments``, ``gradient``, ``natural_gradient``,
    ``quantities``, ``report``) returns, when ``torch.distributed`` is initialised, the
    statistics of all ranks' accumulated samples together, the same on every rank: the running
    sums, counts and non-finite flags are all-reduced and the blocks either all-gathered as
    factors (while all ranks' factors together are smaller than the dense sums) or reduced as
    dense sums (:mod:`biasshift.distributed`). The combined statistics are cached until some
    rank accumulates again (each read costs one 8-byte all-reduce to check). ``sync=False``
    reads this rank's statistics, ``process_group=`` a sub-group's. ``accumulate`` never
    communicates; a DDP-wrapped model is unwrapped (its ``module.`` prefix dropped) so that
    its forward passes do not go through DDP's gradient reducer. ``n_samples`` is this rank's.

BatchNorm
    A BatchNorm layer in training mode (or without running statistics) makes samples interact,
    so per-sample gradients do not exist; such models are refused unless ``batchnorm="eval"``,
    which switches those layers to eval mode during ``accumulate`` (and restores them after).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from biasshift import distributed as _dist
from biasshift._names import unknown_name_error
from biasshift._torch import model_device
from biasshift.fisher.blocks import chunk_units, pair_gram, true_gram
from biasshift.fisher.capture import (
    Capture,
    LayerSelection,
    LayerSpec,
    delta_rows,
    resolve_layers,
)
from biasshift.fisher.likelihood import (
    FISHER_KINDS,
    Likelihood,
    make_likelihood,
    score_vectors,
)
from biasshift.fisher.report import SOLVERS, LayerResult, layer_quantities
from biasshift.fisher.storage import LayerStore
from biasshift.fisher.tables import to_host, wide_frame

__all__ = ["LayerMoments", "LayerQuantities", "NonFiniteError", "UnitFisher"]

POSITIONS = ("sum", "pairs")


class NonFiniteError(FloatingPointError, ValueError):
    """Non-finite activations or ``δ`` reached :class:`UnitFisher` (out-of-range targets alone
    raise a plain :class:`ValueError`)."""


@dataclass(frozen=True)
class LayerQuantities:
    """One layer's :meth:`UnitFisher.quantities`: ``tensors`` maps each quantity to a
    ``(units,)`` tensor on the device; the rest are the layer's settings.  ``bad`` flags the
    units with a singular damped block (``(units,)`` bool on the device; ``quantities()``
    raises for them unless called with ``check=False``)."""

    layer: str
    units: int
    n_samples: int
    n_pairs: int
    damping: float
    solver: str
    tensors: dict[str, Tensor]
    bad: Tensor | None = None
    _result: LayerResult | None = field(default=None, repr=False, compare=False)

    def raise_singular(self, bad: Any = None) -> None:
        """Raise :class:`~biasshift.theory.SingularFisherError` naming the flagged units
        (``bad``: the flags on the host, if already there)."""
        assert self._result is not None
        self._result.raise_singular(bad)


@dataclass(frozen=True)
class LayerMoments:
    r"""The moments of one layer's units over the accumulated (sample, position) pairs.

    ``E_p_a`` ``(units, n)`` (for groups of a conv layer each unit sees its group's inputs),
    ``E_p_delta2`` ``(units,)``, ``E_q_a = E_p(δ² a)/E_p(δ²)`` ``(units, n)`` (NaN for a unit
    with ``δ ≡ 0``), ``Cov_p_delta2_a = E_p(δ² a) − E_p(δ²)E_p(a)`` ``(units, n)``;
    ``n_samples`` inputs, ``n_pairs`` (sample, position) pairs.
    """

    layer: str
    E_p_a: Tensor
    E_p_delta2: Tensor
    E_q_a: Tensor
    Cov_p_delta2_a: Tensor
    n_samples: int
    n_pairs: int


_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


def _default_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


class UnitFisher:
    r"""Unit Fisher blocks of a model's ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` units
    (any type with a :class:`~biasshift.fisher.capture.LayerAdapter`; see the module
    docstring for the conventions).

    >>> uf = UnitFisher(model, layers=None, fisher="empirical")   # doctest: +SKIP
    >>> uf.accumulate(inputs, targets)                              # any number of batches
    >>> F = uf.matrix("features.3")       # (units, n+1, n+1); index 0 = bias
    >>> df = uf.report(damping=1e-4)      # one row per (layer, unit)

    Args:
        model: any module whose samples do not interact (see ``batchnorm``).  It runs in its
            current train/eval mode; its parameters' ``.grad`` are not touched.
        layers: ``None`` (every layer of a supported type), names/modules, or a predicate
            ``(name, module) -> bool``.
        fisher: ``"empirical"``, ``"mc"`` or ``"exact"``.
        likelihood: ``"categorical"`` (logits, default), ``"gaussian"`` (squared error) or
            ``"bernoulli"`` (logits), or a :class:`~biasshift.fisher.likelihood.Likelihood`.
        mc_samples: draws of ``y`` per input for ``fisher="mc"``.
        seed, generator: the random source of ``fisher="mc"`` (a ``torch.Generator`` on the
            model's device, or a seed for one; default: torch's global generator).
        dtype: accumulation dtype (default: float64 for float64 models, else float32).
        batchnorm: ``"refuse"`` (default) or ``"eval"``.
        memory_budget: bytes for the working set of a chunk of units (default 1 GiB).
        dense_budget: bytes all layers' dense running sums may take together (default 4 GiB; 0
            keeps factors only).
        nonfinite: ``"defer"`` (default, no host sync in ``accumulate``) or ``"raise"``.
        output_transform: maps the model's output to the likelihood's input (e.g.
            ``lambda out: out.logits``).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelection = None,
        fisher: str = "empirical",
        *,
        likelihood: str | Likelihood = "categorical",
        mc_samples: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        batchnorm: str = "refuse",
        memory_budget: int = 2**30,
        dense_budget: int = 4 * 2**30,
        nonfinite: str = "defer",
        output_transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if fisher not in FISHER_KINDS:
            raise unknown_name_error("Fisher kind", str(fisher), FISHER_KINDS)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if batchnorm not in ("refuse", "eval"):
            raise ValueError(f"batchnorm must be 'refuse' or 'eval', got {batchnorm!r}")
        if nonfinite not in ("defer", "raise"):
            raise ValueError(f"nonfinite must be 'defer' or 'raise', got {nonfinite!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype)
                                  or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        for name, val in (("memory_budget", memory_budget), ("dense_budget", dense_budget)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{name} must be a number of bytes (int >= 0), got {val!r}")
        model = _dist.unwrap_model(model)
        self.model = model
        self.fisher = fisher
        self.likelihood = make_likelihood(likelihood)
        self.mc_samples = mc_samples
        self.seed = seed
        self.generator = generator
        self.dtype = dtype or _default_dtype(model)
        self.batchnorm = batchnorm
        self.memory_budget = max(memory_budget, 1 << 20)
        self.dense_budget = dense_budget
        self.nonfinite = nonfinite
        self.output_transform = output_transform
        self.specs: dict[str, LayerSpec] = resolve_layers(model, layers)
        self._stores = {n: LayerStore(s, self.dtype) for n, s in self.specs.items()}
        self._version = 0  # bumped by every change of the statistics
        self._sync_view = False  # True for the combined statistics of all ranks
        self._sync_cache: tuple[Any, int, UnitFisher] | None = None
        self._reset_flags()

    # ------------------------------------------------------------------------------ basics
    @property
    def layers(self) -> list[str]:
        """Names of the tracked layers."""
        return list(self.specs)

    @property
    def n_samples(self) -> int:
        """Number of samples accumulated so far."""
        return self._n_samples

    def reset(self) -> None:
        """Forget everything accumulated (also non-finite flags)."""
        for st in self._stores.values():
            st.reset()
        self._reset_flags()
        self._version += 1

    def _reset_flags(self) -> None:
        self._n_samples = 0
        self._n_batches = 0
        self._bad_targets: Tensor | None = None
        self._first_bad_targets: Tensor | None = None
        self._checked = False

    def __repr__(self) -> str:
        return (f"UnitFisher(layers={self.layers}, fisher={self.fisher!r}, likelihood="
                f"{self.likelihood.name!r}, n_samples={self._n_samples}, dtype={self.dtype})")

    def _store(self, layer: str) -> LayerStore:
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a name (str), got {type(layer).__name__}")
        if layer not in self._stores:
            raise unknown_name_error("tracked layer", layer, self._stores)
        return self._stores[layer]

    # ------------------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def _batchnorm_guard(self) -> Iterator[None]:
        switched: list[nn.Module] = []
        try:
            for name, m in self.model.named_modules():
                if not isinstance(m, _BATCHNORM):
                    continue
                if m.training and self.batchnorm == "eval":
                    m.eval()
                    switched.append(m)
                if m.training or m.running_mean is None:
                    why = ("is in training mode" if m.training else
                           "has no running statistics (track_running_stats=False)")
                    fix = ("pass batchnorm='eval' to use its running statistics, or call "
                           "model.eval()" if m.training else "it cannot be switched to eval")
                    raise ValueError(
                        f"BatchNorm layer {name!r} {why}: it normalises with batch statistics, "
                        "so samples interact and per-sample gradients (hence the Fisher) are not "
                        f"defined; {fix}"
                    )
            yield
        finally:
            for m in switched:
                m.train()

    def capture(self) -> Capture:
        """The context manager that owns the forward hooks of one accumulate call."""
        return Capture(self.model, self.specs, self.dtype)

    def _forward(self, inputs: Any) -> Any:
        device = model_device(self.model)

        def move(x: Any) -> Any:
            return x.to(device, non_blocking=True) if isinstance(x, Tensor) and device else x

        if isinstance(inputs, Tensor):
            return self.model(move(inputs))
        if isinstance(inputs, (tuple, list)):
            return self.model(*[move(x) for x in inputs])
        if isinstance(inputs, Mapping):
            return self.model(**{k: move(v) for k, v in inputs.items()})
        raise TypeError(
            "inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
            f"inputs, got {type(inputs).__name__}"
        )

    def _get_generator(self, device: torch.device) -> torch.Generator | None:
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        g = self.generator
        if g is not None and torch.device(g.device).type != device.type:
            raise ValueError(
                f"the generator is on {g.device} but the model's output is on {device}; pass a "
                f"torch.Generator(device='{device}') or seed=..."
            )
        return g

    def accumulate(self, inputs: Any, targets: Tensor) -> None:
        """Add a batch: run the model, backpropagate, update every tracked layer's statistics.

        Args:
            inputs: the model's input (a tensor, a tuple of positional inputs or a dict).
            targets: ``(N,)`` class indices (categorical) or a tensor of the output's shape.

        Raises:
            TypeError, ValueError: targets of the wrong shape or dtype, an interacting
                BatchNorm, a layer that saw a different batch size; nothing is added then.
            NonFiniteError: with ``nonfinite="raise"``, a non-finite activation or ``δ``.
        """
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        if targets.ndim == 0:
            raise ValueError("targets must have a batch dimension (N, ...), got a 0-dim tensor")
        N = targets.shape[0]
        names = list(self.specs)
        with self._batchnorm_guard(), torch.enable_grad(), self.capture() as cap:
            out = self._forward(inputs)
            if self.output_transform is not None:
                out = self.output_transform(out)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"the model returned {type(out).__name__}, not a tensor; pass "
                    "output_transform=... to pick the likelihood's input"
                )
            if out.ndim == 0 or out.shape[0] != N:
                raise ValueError(
                    f"the model's output has shape {tuple(out.shape)} but targets hold {N} "
                    "samples; dim 0 of both must be the batch"
                )
            cap.check_after_forward(N)
            t = self.likelihood.validate(out, targets.to(out.device))
            if not out.requires_grad:
                raise RuntimeError("the model's output does not depend on the tracked layers")
            invalid = self.likelihood.invalid_targets(out, t)
            gen = self._get_generator(out.device) if self.fisher == "mc" else None
            given, reps = score_vectors(self.likelihood, self.fisher, out, t,
                                        mc_samples=self.mc_samples, generator=gen)
            edges = [cap.records[n].edge for n in names]
            n_back = 1 + (0 if reps is None else reps.shape[0])

            def backward(v: Tensor, i: int) -> tuple[Tensor, ...]:
                grads = torch.autograd.grad(out, edges, grad_outputs=v,
                                            retain_graph=i < n_back - 1, allow_unused=True)
                for n, gr in zip(names, grads):
                    if gr is None:
                        raise RuntimeError(
                            f"layer {n!r} does not influence the model's output; leave it out "
                            "(layers=[...])"
                        )
                return grads

            g_given = backward(given.to(out.dtype), 0)
            g_reps: list[tuple[Tensor, ...]] = []
            if reps is not None:
                for r in range(reps.shape[0]):
                    g_reps.append(backward(reps[r].to(out.dtype), r + 1))
            records = {n: cap.records[n] for n in names}

        batch: dict[str, tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]] = {}
        for i, n in enumerate(names):
            spec = self.specs[n]
            X = records[n].x
            assert X is not None
            d_given = delta_rows(spec, g_given[i]).to(self.dtype)
            if reps is None:
                D = d_given.unsqueeze(1)
            else:
                D = torch.stack([delta_rows(spec, gr[i]).to(self.dtype) for gr in g_reps], 1)
            flags = LayerStore.batch_flags(X, D, d_given, bad_x=records[n].bad_x)
            batch[n] = (X, D, d_given, flags)
        del g_given, g_reps, records

        if self.nonfinite == "raise":
            allflags = torch.stack([invalid] + [f for v in batch.values() for f in v[3]])
            if bool(allflags.any()):
                self._raise_nonfinite(
                    {n: (v[3][0], v[3][1]) for n, v in batch.items()}, invalid, now=True)

        # commit
        if self._bad_targets is None:
            self._bad_targets = torch.zeros((), dtype=torch.int64, device=invalid.device)
            self._first_bad_targets = torch.full((), -1, dtype=torch.int64, device=invalid.device)
        assert self._first_bad_targets is not None
        self._bad_targets += invalid.to(torch.int64)
        self._first_bad_targets = torch.where(
            (self._first_bad_targets < 0) & invalid,
            torch.full_like(self._first_bad_targets, self._n_batches), self._first_bad_targets)
        for n, (X, D, d_given, flags) in batch.items():
            self._stores[n].add(X, D, d_given, flags, budget=self.memory_budget // 2,
                                clean_x=True)
        del batch
        self._n_samples += N
        self._n_batches += 1
        self._checked = False
        self._version += 1
        self._maybe_fold()

    def _maybe_fold(self) -> None:
        used = sum(st.stored_bytes() for st in self._stores.values() if st.is_dense)
        for st in self._stores.values():
            if st.is_dense or not st.sources:
                continue
            dense_bytes = st.dense_numel() * st.itemsize
            if st.factor_numel() > st.dense_numel() and used + dense_bytes <= self.dense_budget:
                st.fold(self.memory_budget // 2)
                used += dense_bytes

    # ------------------------------------------------------------------------------ sync
    def _view(self, sync: bool | None, process_group: Any) -> UnitFisher:
        """``self``, or (with an active process group) the combined statistics of all ranks,
        cached until some rank's statistics change."""
        if self._sync_view:
            return self
        group = _dist.sync_group(sync, process_group)
        if group is None:
            return self
        cache = self._sync_cache
        fresh = cache is not None and cache[0] is group and cache[1] == self._version
        stale = _dist.all_reduce(torch.tensor([0 if fresh else 1], dtype=torch.int64), group,
                                 "max")
        if not int(stale) and cache is not None:
            return cache[2]
        view = _combined(self, group)
        self._sync_cache = (group, self._version, view)
        return view

    # ------------------------------------------------------------------------------ checks
    def _raise_nonfinite(self, flags: Mapping[str, tuple[Tensor, Tensor]], invalid: Tensor,
                         *, now: bool, first: Mapping[str, Tensor] | None = None,
                         first_targets: Tensor | None = None) -> None:
        lines = []
        any_nonfinite = False
        for n, (a, d) in flags.items():
            na, nd = int(a), int(d)
            if na or nd:
                what = " and ".join(
                    w for w, c in (("activations (the layer's inputs)", na), ("δ", nd)) if c)
                where = "" if now else (
                    f" in {max(na, nd)} of {self._n_batches} batches (first: batch "
                    f"{int(first[n]) if first else '?'})")
                lines.append(f"layer {n!r}: non-finite {what}{where}")
                any_nonfinite = True
        if int(invalid):
            where = "" if now else (
                f" in {int(invalid)} batch(es) (first: batch "
                f"{int(first_targets) if first_targets is not None else '?'})")
            lines.append(f"targets out of range for the {self.likelihood.name} likelihood{where}")
        zeroed = " (non-finite entries were zeroed)" if any_nonfinite else ""
        head = ("this batch was not added: " if now else
                f"the accumulated statistics are not usable{zeroed}: ")
        fix = ("check the inputs, targets and weights (a diverged model gives NaN/Inf)" if now
               else "call reset() and check the inputs, targets and weights; "
               "nonfinite='raise' stops at the offending batch")
        cls = NonFiniteError if any_nonfinite else ValueError
        raise cls(head + "; ".join(lines) + ". " + fix)

    def _check(self, store: LayerStore | None = None) -> None:
        if self._n_samples == 0:
            raise RuntimeError(
                "nothing accumulated yet: call accumulate(inputs, targets) before reading the "
                "unit Fisher (matrix, moments, gradient, natural_gradient, report)"
            )
        if self._checked:
            return
        assert self._bad_targets is not None
        stores = list(self._stores.items())
        flags = [self._bad_targets]
        for _, st in stores:
            assert st.bad_act is not None and st.bad_delta is not None
            flags += [st.bad_act, st.bad_delta]
        if bool(torch.stack(flags).any()):
            first = {n: st.first_bad for n, st in stores}
            self._raise_nonfinite(
                {n: (st.bad_act, st.bad_delta) for n, st in stores},  # type: ignore[misc]
                self._bad_targets, now=False, first=first,  # type: ignore[arg-type]
                first_targets=self._first_bad_targets)
        self._checked = True

    # ------------------------------------------------------------------------------ blocks
    def _unit_index(self, spec: LayerSpec, units: Any) -> Tensor | None:
        if units is None:
            return None
        if isinstance(units, slice):
            return torch.arange(spec.units)[units]
        idx = torch.as_tensor(units, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() and (int(idx.min()) < -spec.units or int(idx.max()) >= spec.units):
            raise IndexError(
                f"layer {spec.name!r} has {spec.units} units; got unit indices out of range "
                f"[{-spec.units}, {spec.units})"
            )
        return idx % spec.units

    def blocks(self, layer: str, *, positions: str = "sum", dtype: torch.dtype | None = None,
               memory_budget: int | None = None, sync: bool | None = None,
               process_group: Any = None) -> Iterator[tuple[slice, Tensor]]:
        """Iterate over a layer's unit blocks chunk by chunk: ``(units slice, (B, n1, n1))``.

        Never holds more than one chunk (sized from ``memory_budget``) at a time.
        """
        view = self._view(sync, process_group)
        if view is not self:
            yield from view.blocks(layer, positions=positions, dtype=dtype,
                                   memory_budget=memory_budget)
            return
        st = self._store(layer)
        self._check_positions(positions)
        self._check(st)
        dtype = dtype or self.dtype
        budget = memory_budget or self.memory_budget
        for j, sl in st.unit_chunks(None, budget // 2, torch.finfo(dtype).bits // 8):
            yield sl, st.blocks(j, sl, positions=positions, dtype=dtype, budget=budget // 2)

    @staticmethod
    def _check_positions(positions: str) -> None:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")

    def matrix(self, layer: str, units: int | slice | Sequence[int] | Tensor | None = None, *,
               positions: str = "sum", dtype: torch.dtype | None = None,
               sync: bool | None = None, process_group: Any = None,
               out: Tensor | None = None) -> Tensor:
        r"""The unit Fisher blocks of ``layer``: ``(units, n+1, n+1)``, index 0 = bias.

        ``positions="sum"`` (default): the true block, the mean over samples of
        ``g gᵀ`` with ``g`` the per-sample gradient of ``ln p(y|x)`` with respect to
        ``(bias, weight[unit].flatten())`` (for conv summed over positions; for the mc/exact
        kinds averaged over ``y``).  ``positions="pairs"``: the theorem block
        ``E_pairs(δ² ã ãᵀ)``.  Layers without bias give ``(units, n, n)``.  An int ``units``
        gives one ``(n+1, n+1)`` block; otherwise a slice, sequence or index tensor selects units.
        Under ``torch.distributed``: all ranks' samples (see the module docstring).

        Every chunk of units is written once into one output (the ``1/N`` folded into the
        factors): ``out``, a contiguous ``(units, n+1, n+1)`` tensor of ``dtype`` on the layer's
        device (all units only), is reused instead of a new allocation (whose first touch, for
        the paper's first layer 315 MB, costs about as much as the GEMM on a CPU).
        """
        view = self._view(sync, process_group)
        if view is not self:
            return view.matrix(layer, units, positions=positions, dtype=dtype, out=out)
        st = self._store(layer)
        self._check_positions(positions)
        self._check(st)
        spec = st.spec
        dtype = dtype or self.dtype
        budget = self.memory_budget // 2
        single = isinstance(units, int) and not isinstance(units, bool)
        idx = self._unit_index(spec, units)
        if out is not None:
            shape = (spec.units, spec.n1, spec.n1)
            if idx is not None or not isinstance(out, Tensor) or tuple(out.shape) != shape \
                    or out.dtype != dtype or out.device != st.device or not out.is_contiguous():
                raise ValueError(
                    f"matrix({layer!r}, out=...): out must be a contiguous {shape} tensor of "
                    f"{dtype} on {st.device} and units=None; got "
                    + (f"{tuple(out.shape)} {out.dtype} on {out.device}"
                       if isinstance(out, Tensor) else type(out).__name__)
                    + ("" if idx is None else f" with units={units!r}"))
        if idx is None:
            # one output, each chunk's blocks written into its slice (no concatenation pass)
            if out is None:
                out = torch.empty(spec.units, spec.n1, spec.n1, dtype=dtype, device=st.device)
            # the blocks go straight into the output, so a chunk's working set is only the
            # scaled factors (row-chunked inside the Gram products): one chunk per group,
            # unless dense sums of another dtype must be converted chunk by chunk
            per_unit = 3 * spec.n1**2 if (st.is_dense and dtype != st.dtype) else spec.n1
            for j, sl in st.unit_chunks(per_unit, budget, torch.finfo(dtype).bits // 8):
                st.blocks(j, sl, positions=positions, dtype=dtype, budget=budget, out=out[sl])
            return out
        device = st.device
        out = torch.empty(idx.numel(), spec.n1, spec.n1, dtype=dtype, device=device)
        upg = spec.units_per_group
        B = chunk_units(upg, 3 * spec.n1**2 * (torch.finfo(dtype).bits // 8), budget)
        groups = idx // upg
        for j in range(spec.groups):
            where = torch.nonzero(groups == j).flatten()
            for c0 in range(0, where.numel(), B):
                pos = where[c0:c0 + B]
                sel = idx[pos].to(device)
                out[pos.to(device)] = st.blocks(j, sel, positions=positions, dtype=dtype,
                                                budget=budget)
        return out[0] if single else out

    # ------------------------------------------------------------------------------ moments
    def moments(self, layer: str, dtype: torch.dtype = torch.float64, *,
                sync: bool | None = None, process_group: Any = None) -> LayerMoments:
        """``E_p(a)``, ``E_p(δ²)``, ``E_q(a)`` and ``Cov_p(δ², a)`` of a layer's units (over the
        accumulated (sample, position) pairs; see :class:`LayerMoments`)."""
        view = self._view(sync, process_group)
        if view is not self:
            return view.moments(layer, dtype)
        st = self._store(layer)
        self._check(st)
        spec = st.spec
        assert st.sum_a is not None and st.sum_w is not None and st.sum_wa is not None
        P = st.n_pairs
        lo = int(spec.has_bias)
        E_a = (st.sum_a[:, lo:].to(dtype) / P).repeat_interleave(spec.units_per_group, dim=0)
        E_d2 = st.sum_w.to(dtype) / P
        E_d2a = st.sum_wa[:, lo:].to(dtype) / P
        return LayerMoments(
            layer=layer, E_p_a=E_a, E_p_delta2=E_d2, E_q_a=E_d2a / E_d2.unsqueeze(-1),
            Cov_p_delta2_a=E_d2a - E_d2.unsqueeze(-1) * E_a, n_samples=st.n_samples, n_pairs=P,
        )

    def gradient(self, layer: str, dtype: torch.dtype = torch.float64, *,
                 sync: bool | None = None, process_group: Any = None) -> Tensor:
        """Mean gradient of the **negative** log-likelihood of the given targets over the
        accumulated samples, per unit ``(units, n+1)`` (bias first; ``(units, n)`` without)."""
        view = self._view(sync, process_group)
        if view is not self:
            return view.gradient(layer, dtype)
        st = self._store(layer)
        self._check(st)
        assert st.grad_sum is not None
        return -st.grad_sum.to(dtype) / st.n_samples

    def natural_gradient(self, layer: str, grad: Tensor | None = None, damping: float = 0.0, *,
                         dtype: torch.dtype = torch.float64, memory_budget: int | None = None,
                         solver: str = "auto", sync: bool | None = None,
                         process_group: Any = None) -> Tensor:
        r"""``(F + λI)⁻¹ grad`` per unit of ``layer`` with ``F`` the theorem (pair) block,
        chunked; Theorem 1's block formula for layers with bias.

        Args:
            grad: ``(units, n+1)`` (bias first); default :meth:`gradient`.
            damping: ``λ ≥ 0`` (the bias entry is damped too).
            solver: ``"auto"``, ``"cholesky"`` or ``"woodbury"`` (see
                :mod:`biasshift.fisher.report`).
        Raises:
            SingularFisherError: a singular block and no (or too little) damping.
        """
        view = self._view(sync, process_group)
        if view is not self:
            return view.natural_gradient(layer, grad, damping, dtype=dtype,
                                         memory_budget=memory_budget, solver=solver)
        st = self._store(layer)
        self._check(st)
        g = self._grad_for(st, grad, dtype)
        res = layer_quantities(st, g, None, damping=self._damping(damping), dtype=dtype,
                               budget=memory_budget or self.memory_budget, condition=False,
                               solver=self._solver(solver))
        return res.natural

    @staticmethod
    def _damping(damping: float) -> float:
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or \
                not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(
                f"damping must be a finite float >= 0 (F + damping*I), got {damping!r}")
        return float(damping)

    @staticmethod
    def _solver(solver: str) -> str:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        return solver

    def _grad_for(self, st: LayerStore, grad: Tensor | None, dtype: torch.dtype) -> Tensor:
        spec = st.spec
        if grad is None:
            return self.gradient(spec.name, dtype, sync=False)
        if not isinstance(grad, Tensor):
            raise TypeError(f"gradient for layer {spec.name!r} must be a tensor")
        if tuple(grad.shape) != (spec.units, spec.n1):
            what = "(units, n+1) with the bias first" if spec.has_bias else "(units, n)"
            raise ValueError(
                f"gradient for layer {spec.name!r} must be {what} = {(spec.units, spec.n1)}, got "
                f"{tuple(grad.shape)}"
            )
        return grad.to(device=st.device, dtype=dtype)

    # ------------------------------------------------------------------------------ report
    def quantities(
        self,
        damping: float = 0.0,
        gradients: Mapping[str, Tensor] | None = None,
        memory_budget: int | None = None,
        dtype: torch.dtype = torch.float64,
        *,
        layers: Sequence[str] | None = None,
        activation_means: Mapping[str, Tensor] | None = None,
        condition: bool = True,
        solver: str = "auto",
        sync: bool | None = None,
        process_group: Any = None,
        check: bool = True,
    ) -> dict[str, LayerQuantities]:
        r"""The paper's Theorem 1 and 2 quantities per layer, as tensors on the device (what
        :meth:`report` tabulates; one host synchronisation for the singular-block check of
        all layers, none with ``check=False``).

        Conventions: ``grad`` is the gradient ``(g₀, g)`` of the loss being minimised (default:
        :meth:`gradient`, the mean NLL of the given targets); directions and bias shifts are
        those of ``grad`` and ``F⁻¹grad`` (multiply by ``−lr`` for a step).  ``F`` is the
        theorem (pair) block, damped by ``λ``.

        Columns:
            ``layer, unit, n_samples, n_pairs, damping, solver``;
            ``E_p_delta2`` = ``c = E_p(δ²)``; ``norm_E_p_a`` = ``|E_p(a)|``; ``norm_E_q_a`` =
            ``|E_q(a)|`` (undamped ``b/c``; NaN for a unit with ``δ ≡ 0``);
            ``s`` = ``(c − bᵀA⁻¹b)⁻¹``; ``k`` (Theorem 2; ``s (c+λ)(1 − E_p(a)ᵀA⁻¹b)``);
            ``bias_shift_sgd`` = ``g₀ + E_p(a)ᵀg``;
            ``bias_shift_ng_uncorrected`` = ``E_p(a)ᵀA⁻¹g + c⁻¹g₀`` (``b = 0``);
            ``bias_shift_ng`` = ``Δw₀ + E_p(a)ᵀΔw`` for ``(Δw₀, Δw) = F⁻¹grad``;
            ``ng_mean_term`` = ``(E_p(a) − k E_q(a))ᵀA⁻¹g`` and ``ng_bias_term`` = ``k c⁻¹g₀``
            (Theorem 2: they sum to ``bias_shift_ng``); ``cos_grad_ng`` = cos(grad, F⁻¹grad);
            ``grad_norm``; ``cond_F`` = condition number of ``F + λI`` (with ``condition``).

        Args:
            damping: ``λ ≥ 0``.  ``0`` raises :class:`~biasshift.theory.SingularFisherError` for
                a singular block (e.g. a unit with ``δ ≡ 0``, or fewer samples than ``n + 1``).
            gradients: ``{layer: (units, n+1)}`` overriding the default gradient.
            memory_budget: bytes per chunk of units (default: the constructor's).
            dtype: computation dtype (float64 by default).
            layers: the layers to report (default: every tracked layer with a bias; layers
                without bias are skipped with a warning, naming one raises).
            activation_means: ``{layer: E_p(a)}`` (``(n,)`` or ``(units, n)``) overriding the
                accumulated incoming means (e.g. from a probe batch).
            condition: compute ``cond_F`` (an ``eigvalsh`` per unit: the most expensive part).
            solver: ``"auto"``, ``"cholesky"`` or ``"woodbury"``.
            sync, process_group: under ``torch.distributed``, all ranks' samples (default) or
                this rank's (``sync=False``); see the module docstring.
            check: raise :class:`~biasshift.theory.SingularFisherError` for singular blocks
                (one host synchronisation); ``False``: no host access, the flags are in each
                layer's ``bad`` (and ``raise_singular()`` raises for them).
        """
        view = self._view(sync, process_group)
        if view is not self:
            return view.quantities(damping, gradients, memory_budget, dtype, layers=layers,
                                   activation_means=activation_means, condition=condition,
                                   solver=solver, check=check)
        damping = self._damping(damping)
        solver = self._solver(solver)
        budget = memory_budget or self.memory_budget
        if layers is None:
            chosen = [n for n, s in self.specs.items() if s.has_bias]
            skipped = [n for n, s in self.specs.items() if not s.has_bias]
            if skipped:
                warnings.warn(
                    f"report(): layers without bias have no bias shift and are skipped: "
                    f"{', '.join(skipped)}", stacklevel=2)
            if not chosen:
                raise ValueError("report(): no tracked layer has a bias; the bias shift and "
                                 "Theorems 1-2 need one")
        else:
            chosen = list(layers)
            for n in chosen:
                st = self._store(n)
                if not st.spec.has_bias:
                    raise ValueError(
                        f"layer {n!r} has no bias: the bias shift, s and k (Theorems 1-2) are "
                        "defined for units with a bias; leave it out of layers=[...] (its Fisher "
                        "blocks are available from matrix() and natural_gradient())"
                    )
        for extra, what in ((gradients, "gradients"), (activation_means, "activation_means")):
            for n in extra or {}:
                if n not in chosen:
                    raise unknown_name_error(f"reported layer (in {what})", n, chosen)
        self._check()
        out: dict[str, LayerQuantities] = {}
        for n in chosen:
            st = self._stores[n]
            spec = st.spec
            g = self._grad_for(st, (gradients or {}).get(n), dtype)
            mom = self.moments(n, dtype, sync=False)
            E_p_a = mom.E_p_a
            if activation_means is not None and n in activation_means:
                E_p_a = self._means_for(spec, activation_means[n], dtype, st.device)
            res = layer_quantities(st, g, E_p_a, damping=damping, dtype=dtype, budget=budget,
                                   condition=condition, solver=solver, check=False)
            q = res.quantities
            cols: dict[str, Tensor] = {
                "E_p_delta2": mom.E_p_delta2,
                "norm_E_p_a": E_p_a.norm(dim=-1),
                "norm_E_q_a": mom.E_q_a.norm(dim=-1),
            }
            for key in ("s", "k", "bias_shift_sgd", "bias_shift_ng_uncorrected", "bias_shift_ng",
                        "ng_mean_term", "ng_bias_term", "cos_grad_ng"):
                cols[key] = q[key]
            cols["grad_norm"] = g.norm(dim=-1)
            if condition:
                cols["cond_F"] = q["cond_F"]
            out[n] = LayerQuantities(layer=n, units=spec.units, n_samples=st.n_samples,
                                     n_pairs=st.n_pairs, damping=damping, solver=res.solver,
                                     tensors=cols, bad=res.bad, _result=res)
        if check:
            flags = torch.cat([q.bad for q in out.values()]).cpu()  # the one check
            if bool(flags.any()):
                start = 0
                for q in out.values():
                    if bool(flags[start:start + q.units].any()):
                        q.raise_singular(flags[start:start + q.units])
                    start += q.units
        return out

    def report(
        self,
        damping: float = 0.0,
        gradients: Mapping[str, Tensor] | None = None,
        memory_budget: int | None = None,
        dtype: torch.dtype = torch.float64,
        *,
        layers: Sequence[str] | None = None,
        activation_means: Mapping[str, Tensor] | None = None,
        condition: bool = True,
        solver: str = "auto",
        sync: bool | None = None,
        process_group: Any = None,
    ) -> pd.DataFrame:
        """One row per (layer, unit): :meth:`quantities` as a table (one batched host transfer
        of every value and the singular-block flags, :mod:`biasshift.fisher.tables`; after the
        first read of the accumulated statistics, which checks them for non-finite values
        once).  Columns ``layer, unit, n_samples, n_pairs, damping,
        solver`` and the quantities (see :meth:`quantities`)."""
        res = self.quantities(damping, gradients, memory_budget, dtype, layers=layers,
                              activation_means=activation_means, condition=condition,
                              solver=solver, sync=sync, process_group=process_group,
                              check=False)
        parts = list(res.values())
        names = list(parts[0].tensors)
        columns = {k: torch.cat([p.tensors[k] for p in parts]) for k in names}
        columns["_bad"] = torch.cat([p.bad for p in parts])  # type: ignore[misc]
        host = to_host(columns)  # the one host transfer: values and singular flags together
        flags = host.pop("_bad") != 0
        if flags.any():
            start = 0
            for p in parts:
                if flags[start:start + p.units].any():
                    p.raise_singular(flags[start:start + p.units])
                start += p.units
        meta = [{"layer": p.layer, "units": p.units, "n_samples": p.n_samples,
                 "n_pairs": p.n_pairs, "damping": p.damping, "solver": p.solver} for p in parts]
        return wide_frame(meta, host, ["layer", "unit", "n_samples", "n_pairs", "damping",
                                       "solver", *names])

    @staticmethod
    def _means_for(spec: LayerSpec, means: Tensor, dtype: torch.dtype,
                   device: torch.device | None) -> Tensor:
        if not isinstance(means, Tensor):
            raise TypeError(f"activation_means[{spec.name!r}] must be a tensor")
        if tuple(means.shape) == (spec.n,):
            means = means.expand(spec.units, spec.n)
        if tuple(means.shape) != (spec.units, spec.n):
            raise ValueError(
                f"activation_means[{spec.name!r}] must be (n,) = ({spec.n},) or (units, n) = "
                f"{(spec.units, spec.n)}, got {tuple(means.shape)}"
            )
        return means.to(device=device, dtype=dtype)


def _combined(uf: UnitFisher, group: Any) -> UnitFisher:
    """A read-only :class:`UnitFisher` holding all ranks' statistics (see the module docstring).

    Collectives: one all-gather of every layer's counts and storage form, one all-reduce of
    the running sums, two of the non-finite flags; per layer then either one all-reduce of the
    dense block sums or, per stored factor shape, all-gathers of the factors' rows (in rank
    order), after one all-gather of the factor shapes.
    """
    import copy

    from biasshift.fisher.blocks import Source

    view = copy.copy(uf)
    view._sync_view = True
    view._sync_cache = None
    names = list(uf.specs)
    stores = [uf._stores[n] for n in names]
    dev = next((st.device for st in stores if st.device is not None), None) or \
        model_device(uf.model) or torch.device("cpu")
    dt = uf.dtype
    # per layer: samples, pairs, batches, multi, dense, factor numel (plus the model's counts)
    info = torch.tensor([[st.n_samples, st.n_pairs, st.n_batches, int(st.multi),
                          int(st.is_dense), st.factor_numel()] for st in stores]
                        + [[uf._n_samples, uf._n_batches, 0, 0, 0, 0]], dtype=torch.int64)
    every = torch.stack(_dist.all_gather(info, group))  # (ranks, layers + 1, 6)
    total = every.sum(0)
    view._n_samples, view._n_batches = int(total[-1, 0]), int(total[-1, 1])
    # the running sums and flags
    sums, flags, firsts = [], [], []
    for st in stores:
        U, n1, g = st.spec.units, st.spec.n1, st.spec.groups
        if st.sum_w is None:
            sums.append(torch.zeros(g * n1 + U + 2 * U * n1, dtype=dt, device=dev))
            flags.append(torch.zeros(2, dtype=torch.int64, device=dev))
            firsts.append(torch.full((1,), -1, dtype=torch.int64, device=dev))
            continue
        assert st.sum_a is not None and st.sum_wa is not None and st.grad_sum is not None
        assert st.bad_act is not None and st.bad_delta is not None and st.first_bad is not None
        sums.append(torch.cat([st.sum_a.reshape(-1), st.sum_w, st.sum_wa.reshape(-1),
                               st.grad_sum.reshape(-1)]).to(dev))
        flags.append(torch.stack([st.bad_act, st.bad_delta]).to(dev))
        firsts.append(st.first_bad.reshape(1).to(dev))
    bad_t = (uf._bad_targets if uf._bad_targets is not None
             else torch.zeros((), dtype=torch.int64)).reshape(1).to(dev)
    first_t = (uf._first_bad_targets if uf._first_bad_targets is not None
               else torch.full((), -1, dtype=torch.int64)).reshape(1).to(dev)
    sums_all = _dist.all_reduce(torch.cat(sums), group)
    flags_all = _dist.all_reduce(torch.cat([*flags, bad_t]), group)
    big = 2**62  # the earliest offending batch of any rank (its own batch index)
    firsts_t = torch.cat([*firsts, first_t])
    firsts_all = _dist.all_reduce(torch.where(firsts_t < 0, big, firsts_t), group, "min")
    firsts_all = torch.where(firsts_all == big, -1, firsts_all)
    view._bad_targets = flags_all[-1]
    view._first_bad_targets = firsts_all[-1]
    view._checked = False
    view._stores = {}
    start = 0
    shapes_needed = []
    for i, (n, st) in enumerate(zip(names, stores)):
        spec = st.spec
        U, n1, g = spec.units, spec.n1, spec.groups
        new = LayerStore(spec, dt)
        new._init_sums(dev)
        k = g * n1 + U + 2 * U * n1
        part = sums_all[start: start + k]
        start += k
        assert new.sum_a is not None and new.sum_w is not None
        assert new.sum_wa is not None and new.grad_sum is not None
        new.sum_a.copy_(part[: g * n1].view(g, n1))
        new.sum_w.copy_(part[g * n1: g * n1 + U])
        new.sum_wa.copy_(part[g * n1 + U: g * n1 + U + U * n1].view(U, n1))
        new.grad_sum.copy_(part[g * n1 + U + U * n1:].view(U, n1))
        new.bad_act, new.bad_delta = flags_all[2 * i], flags_all[2 * i + 1]
        new.first_bad = firsts_all[i]
        new.n_samples, new.n_pairs, new.n_batches = (int(total[i, 0]), int(total[i, 1]),
                                                     int(total[i, 2]))
        new.multi = bool(every[:, i, 3].any())
        factors = int(total[i, 5])
        dense = bool(every[:, i, 4].any()) or factors > new.dense_numel()
        if dense:
            budget = uf.memory_budget // 2
            pair = torch.zeros(U, n1, n1, dtype=dt, device=dev)
            true = torch.zeros_like(pair) if new.multi else None
            if st.dense_pair is not None:
                pair += st.dense_pair.to(dev)
                if true is not None:
                    true += (st.dense_true if st.dense_true is not None
                             else st.dense_pair).to(dev)
            elif st.sources:
                st.consolidate()
                for j, sl in st.unit_chunks(None, budget):
                    pair[sl] += pair_gram(st.sources, j, sl, dtype=dt, budget=budget).to(dev)
                    if true is not None:
                        true[sl] += true_gram(st.sources, j, sl, dtype=dt,
                                              budget=budget).to(dev)
            new.dense_pair = _dist.all_reduce(pair, group)
            new.dense_true = _dist.all_reduce(true, group) if true is not None else None
        else:
            st.consolidate()
            shapes_needed.append(n)
        view._stores[n] = new
    if shapes_needed:
        mine = {n: [(src.positions, src.replicas) for src in uf._stores[n].sources]
                for n in shapes_needed}
        keys_all = _dist.gather_object(mine, group)
        for n in shapes_needed:
            st, new = uf._stores[n], view._stores[n]
            spec = st.spec
            keys = sorted({k for per_rank in keys_all for k in per_rank[n]})
            by_key = {(src.positions, src.replicas): src for src in st.sources}
            for L, R in keys:
                src = by_key.get((L, R))
                X = src.X.to(dev) if src is not None else torch.zeros(
                    0, spec.groups, L, spec.n1, dtype=dt, device=dev)
                D = src.D.to(dev) if src is not None else torch.zeros(
                    0, R, L, spec.units, dtype=dt, device=dev)
                new.sources.append(Source(torch.cat(_dist.all_gather_rows(X, group)),
                                          torch.cat(_dist.all_gather_rows(D, group))))
    return view
