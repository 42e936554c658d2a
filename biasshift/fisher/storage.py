r"""Running statistics of one tracked layer: moment sums, low-rank factors or dense block sums.

Per layer (``U`` units in ``g`` groups, blocks of size ``n1``) a :class:`LayerStore` keeps, on
the device of the data:

* small running sums, always: ``Σ_pairs ã`` per group, ``Σ_pairs w`` and ``Σ_pairs w ã`` per unit
  (``w = Σ_r δ_r²``), and ``Σ_i Σ_p δ_given ã`` per unit (the gradient of the given targets'
  log-likelihood);
* the unit blocks, either as **factors** (every batch's ``X`` and ``D``, see
  :mod:`biasshift.fisher.blocks`) while those are smaller than the dense sums, or as **dense
  running sums** ``U × n1 × n1`` (pair blocks; for layers with several positions also the true
  blocks) once the factors grow larger and the dense sums fit the dense budget.  Folding is
  decided from shapes only (no host sync) and is exact: both forms give the same blocks.

Non-finite values are replaced by 0 before they enter any sum and counted per batch in
device-side flags; the owner raises when results are read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from biasshift.fisher.blocks import Source, chunk_units, pair_gram, true_gram
from biasshift.fisher.capture import LayerSpec, nonfinite_flag

__all__ = ["LayerStore"]


class LayerStore:
    """Running sums and factors of one layer (see the module docstring)."""

    def __init__(self, spec: LayerSpec, dtype: torch.dtype) -> None:
        self.spec = spec
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        self.n_samples = 0
        self.n_pairs = 0
        self.n_batches = 0
        self.multi = False  # some batch had more than one position per sample
        self.sources: list[Source] = []
        self.dense_pair: Tensor | None = None
        self.dense_true: Tensor | None = None
        self.sum_a: Tensor | None = None
        self.sum_w: Tensor | None = None
        self.sum_wa: Tensor | None = None
        self.grad_sum: Tensor | None = None
        self.bad_act: Tensor | None = None
        self.bad_delta: Tensor | None = None
        self.first_bad: Tensor | None = None

    # ----------------------------------------------------------------------------- sizes
    @property
    def device(self) -> torch.device | None:
        return None if self.sum_w is None else self.sum_w.device

    @property
    def is_dense(self) -> bool:
        return self.dense_pair is not None

    @property
    def itemsize(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def factor_numel(self) -> int:
        return sum(s.numel() for s in self.sources)

    def dense_numel(self, multi: bool | None = None) -> int:
        multi = self.multi if multi is None else multi
        return self.spec.units * self.spec.n1**2 * (2 if multi else 1)

    def stored_bytes(self) -> int:
        dense = sum(t.numel() for t in (self.dense_pair, self.dense_true) if t is not None)
        return (self.factor_numel() + dense) * self.itemsize

    # ----------------------------------------------------------------------------- add
    def _init_sums(self, device: torch.device) -> None:
        s, dt = self.spec, self.dtype
        self.sum_a = torch.zeros(s.groups, s.n1, dtype=dt, device=device)
        self.sum_w = torch.zeros(s.units, dtype=dt, device=device)
        self.sum_wa = torch.zeros(s.units, s.n1, dtype=dt, device=device)
        self.grad_sum = torch.zeros(s.units, s.n1, dtype=dt, device=device)
        self.bad_act = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_delta = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    @staticmethod
    def batch_flags(X: Tensor, D: Tensor, given: Tensor, *,
                    bad_x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """0-dim bool tensors: non-finite activations, non-finite δ (no host sync).

        ``bad_x``: the activations' flag when it is already known (:class:`Capture` computes
        it while it copies, and cleans, the rows); each flag is one reduction
        (:func:`~biasshift.fisher.capture.nonfinite_flag`), not a boolean tensor per entry.
        """
        bad_a = nonfinite_flag(X) if bad_x is None else bad_x
        return bad_a, nonfinite_flag(D) | nonfinite_flag(given)

    def add(self, X: Tensor, D: Tensor, given: Tensor, flags: tuple[Tensor, Tensor],
            *, budget: int, clean_x: bool = False) -> None:
        """Add a batch: ``X (N, g, L, n1)``, ``D (N, R, L, U)``, ``given (N, L, U)`` (all in
        ``self.dtype``, owned by the store; modified in place).  ``clean_x``: ``X`` holds no
        NaN/Inf already (e.g. from :func:`~biasshift.fisher.capture.incoming_checked`), so the
        zeroing pass over it is skipped."""
        s = self.spec
        N, g, L, n1 = X.shape
        if self.sum_w is None:
            self._init_sums(X.device)
        assert self.sum_a is not None and self.sum_w is not None and self.sum_wa is not None
        assert self.grad_sum is not None and self.bad_act is not None
        assert self.bad_delta is not None and self.first_bad is not None
        bad_a, bad_d = flags
        if not clean_x:
            torch.nan_to_num_(X, nan=0.0, posinf=0.0, neginf=0.0)
        for t in (D, given):
            torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
        self.bad_act += bad_a.to(torch.int64)
        self.bad_delta += bad_d.to(torch.int64)
        self.first_bad = torch.where((self.first_bad < 0) & (bad_a | bad_d),
                                     torch.full_like(self.first_bad, self.n_batches),
                                     self.first_bad)

        M, upg = N * L, s.units_per_group
        w = D.square().sum(1)  # (N, L, U)
        Xg = X.transpose(0, 1).reshape(g, M, n1)
        self.sum_a += Xg.sum(1)
        self.sum_w += w.sum((0, 1))
        # Σ w ã and Σ δ_given ã in one batched GEMM (one read of the rows, not two)
        wd = torch.cat([w.reshape(M, g, upg), given.reshape(M, g, upg)], 2).permute(1, 2, 0)
        both = torch.bmm(wd, Xg)  # (g, 2·upg, n1)
        self.sum_wa += both[:, :upg].reshape(s.units, n1)
        self.grad_sum += both[:, upg:].reshape(s.units, n1)

        if L > 1 and not self.multi:
            self.multi = True
            if self.dense_pair is not None:
                # earlier single-position batches: true block = pair block
                self.dense_true = self.dense_pair.clone()
        src = Source(X, w.sqrt().unsqueeze(1) if L == 1 else D)
        self.n_samples += N
        self.n_pairs += M
        self.n_batches += 1
        if self.dense_pair is not None:
            self._add_dense([src], budget)
        else:
            self.sources.append(src)

    # ----------------------------------------------------------------------------- dense
    def unit_chunks(self, per_unit_elems: int | None, budget: int,
                    itemsize: int | None = None) -> list[tuple[int, slice]]:
        """``(group, slice of layer units)`` chunks of ``per_unit_elems`` numbers per unit
        (default: three blocks) that fit ``budget`` bytes."""
        s = self.spec
        if per_unit_elems is None:
            per_unit_elems = 3 * s.n1**2
        per_unit = per_unit_elems * (itemsize or self.itemsize)
        B = chunk_units(s.units_per_group, per_unit, budget)
        out = []
        for j in range(s.groups):
            lo = j * s.units_per_group
            for u0 in range(lo, lo + s.units_per_group, B):
                out.append((j, slice(u0, min(u0 + B, lo + s.units_per_group))))
        return out

    def _add_dense(self, sources: list[Source], budget: int) -> None:
        assert self.dense_pair is not None
        for j, sl in self.unit_chunks(None, budget):
            pair_gram(sources, j, sl, dtype=self.dtype, budget=budget,
                      out=self.dense_pair[sl], accumulate=True)
            if self.dense_true is not None:
                true_gram(sources, j, sl, dtype=self.dtype, budget=budget,
                          out=self.dense_true[sl], accumulate=True)

    def fold(self, budget: int) -> None:
        """Turn the stored factors into dense running sums (exact) and drop the factors."""
        if self.is_dense or self.device is None:
            return
        s = self.spec
        self.consolidate()
        self.dense_pair = torch.zeros(s.units, s.n1, s.n1, dtype=self.dtype, device=self.device)
        if self.multi:
            self.dense_true = torch.zeros_like(self.dense_pair)
        sources, self.sources = self.sources, []
        self._add_dense(sources, budget)

    def consolidate(self) -> None:
        """Concatenate stored batches of equal shape (fewer, larger matmuls later)."""
        if len(self.sources) < 2:
            return
        by_shape: dict[tuple[int, int], list[Source]] = {}
        for src in self.sources:
            by_shape.setdefault((src.positions, src.replicas), []).append(src)
        self.sources = [
            Source(torch.cat([x.X for x in grp]), torch.cat([x.D for x in grp]))
            if len(grp) > 1 else grp[0]
            for grp in by_shape.values()
        ]

    # ----------------------------------------------------------------------------- read
    def blocks(self, group: int, units: slice | Tensor, *, positions: str, dtype: torch.dtype,
               budget: int, out: Tensor | None = None, lower: bool = False) -> Tensor:
        """Mean unit blocks for ``units`` (layer indices inside ``group``), ``(B, n1, n1)``.

        ``positions="pairs"``: ``Σ_pairs w ã ãᵀ / P``; ``"sum"``: ``Σ_i Σ_r g gᵀ / N``.  The
        ``1/P`` (``1/N``) is folded into the factors, and ``out`` (a preallocated ``(B, n1, n1)``
        tensor of ``dtype``) receives the blocks directly.  ``lower``: the block lower triangle
        is all the caller reads (a Cholesky factorisation): built from the stored rows, only it
        is computed (dense sums are returned in full).
        """
        if positions == "pairs" or not self.multi:
            denom = self.n_pairs if positions == "pairs" else self.n_samples
            if self.dense_pair is not None:
                return self._scaled(self.dense_pair[units], 1.0 / denom, dtype, out)
            self.consolidate()
            return pair_gram(self.sources, group, units, dtype=dtype, budget=budget, out=out,
                             scale=1.0 / denom, lower=lower)
        if self.dense_true is not None:
            return self._scaled(self.dense_true[units], 1.0 / self.n_samples, dtype, out)
        self.consolidate()
        return true_gram(self.sources, group, units, dtype=dtype, budget=budget, out=out,
                         scale=1.0 / self.n_samples, lower=lower)

    @staticmethod
    def _scaled(dense: Tensor, scale: float, dtype: torch.dtype, out: Tensor | None) -> Tensor:
        if out is None:
            return dense.to(dtype) * scale
        return torch.mul(dense.to(dtype), scale, out=out)

    def pair_X(self, group: int, dtype: torch.dtype) -> Tensor:
        """All stored pair rows ``ã`` of ``group``, ``(P, n1)``."""
        self.consolidate()
        xs = [src.X[:, group].reshape(-1, src.X.shape[-1]).to(dtype) for src in self.sources]
        return torch.cat(xs) if len(xs) > 1 else xs[0]

    def pair_w(self, units: slice | Tensor, dtype: torch.dtype) -> Tensor:
        """The units' pair weights ``w = Σ_r δ_r²``, ``(B, P)`` in the order of :meth:`pair_X`."""
        self.consolidate()
        ws = [src.D[..., units].to(dtype).square().sum(1).reshape(-1, src.D[..., units].shape[-1])
              .T for src in self.sources]
        return torch.cat(ws, dim=1) if len(ws) > 1 else ws[0]
