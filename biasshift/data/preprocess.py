"""The paper's CIFAR preprocessing: global contrast normalisation, ZCA whitening, and the training
augmentation of 4-pixel zero padding, random 32x32 crops and horizontal flips (Section 4.3).

The paper preprocesses "as described in" Goodfellow et al. (2013, maxout networks), i.e. pylearn2's
``make_cifar10_gcn_whitened.py``: :func:`global_contrast_normalize` with ``scale=55`` (each image
minus its mean, scaled to Euclidean norm 55) followed by :class:`ZCA` with pylearn2's default
regulariser ``eps=0.1`` (pylearn2's ``filter_bias``) added to the covariance's diagonal.
:func:`gcn_zca` applies both to a dataset (the ZCA fitted on the training split only).

Everything runs on the data's device; :func:`pad_crop_flip` is vectorised over the batch (index
arithmetic, no Python loop over images) and drawn from a :class:`torch.Generator`, so the same seed
gives the same crops on every run.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from biasshift.data.base import ArrayDataset

__all__ = ["ZCA", "gcn_zca", "global_contrast_normalize", "pad_crop_flip"]

#: Bytes of temporaries a chunked preprocessing step may allocate at once.
MEMORY_BUDGET = 256 * 2**20


def _chunk_rows(row_bytes: int, budget: int = MEMORY_BUDGET) -> int:
    return max(1, budget // max(1, row_bytes))


def _require_finite(x: Tensor, what: str) -> None:
    # One host sync per call: preprocessing runs once per dataset, never per step.
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: the input holds NaN or Inf values ({tuple(x.shape)}); clean the "
                         "data first, they would poison every statistic computed from it")


def global_contrast_normalize(
    x: Tensor,
    scale: float = 55.0,
    eps: float = 1e-8,
    *,
    use_std: bool = False,
    sqrt_bias: float = 0.0,
    subtract_mean: bool = True,
) -> Tensor:
    r"""Global contrast normalisation per sample, pylearn2's convention (Goodfellow et al., 2013).

    Each sample ``x[i]`` (all its values, e.g. 3x32x32) is centred and rescaled:

    .. math::
        \tilde x = x - \bar x, \qquad
        d = \frac{1}{s}\sqrt{\lambda + \textstyle\sum_j \tilde x_j^2}\ \ \text{(norm)}
        \quad\text{or}\quad
        d = \frac{1}{s}\sqrt{\lambda + \operatorname{var}(\tilde x)}\ \ \text{(use\_std)},
        \qquad x' = \tilde x / d,

    with ``s = scale``, ``λ = sqrt_bias``, the variance with Bessel's correction (ddof 1, as in
    pylearn2 and Coates et al.), and ``d`` replaced by 1 where ``d < eps`` (a constant image stays
    zero instead of being blown up). The default (norm, ``scale=55``, ``sqrt_bias=0``) is the maxout
    and ELU papers' CIFAR setting: every non-constant image gets mean 0 and Euclidean norm 55.

    Args:
        x: ``(N, ...)`` samples; integer inputs are converted to float32.
        scale, eps, use_std, sqrt_bias, subtract_mean: as above (pylearn2's ``min_divisor`` is
            ``eps``).

    Returns:
        A new tensor of ``x``'s shape (and floating dtype) on ``x``'s device.

    Raises:
        ValueError: ``x`` has fewer than 2 dimensions or holds NaN/Inf.
    """
    if x.dim() < 2:
        raise ValueError(f"global_contrast_normalize: expected samples (N, ...), got shape "
                         f"{tuple(x.shape)}")
    _require_finite(x, "global_contrast_normalize")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    n = x.shape[0]
    flat = x.reshape(n, -1)
    d = flat.shape[1]
    out = torch.empty(flat.shape, dtype=dtype, device=x.device)
    step = _chunk_rows(4 * d * torch.finfo(dtype).bits // 8)
    for i in range(0, n, step):
        v = flat[i : i + step].to(dtype)
        if subtract_mean:
            v = v - v.mean(dim=1, keepdim=True)
        if use_std:
            spread = v.var(dim=1, correction=1 if d > 1 else 0, keepdim=True)
        else:
            spread = v.square().sum(dim=1, keepdim=True)
        div = torch.sqrt(spread + sqrt_bias) / scale
        div = torch.where(div < eps, torch.ones_like(div), div)
        out[i : i + step] = v / div
    return out.reshape(x.shape)


class ZCA:
    r"""ZCA whitening fitted on training data, pylearn2's convention (``preprocessing.ZCA``).

    :meth:`fit` centres the flattened samples ``X`` (``N × D``) with their mean ``μ`` and forms the
    regularised covariance ``C = (X − μ)ᵀ(X − μ)/N + ε I`` (biased, as pylearn2), with the
    eigendecomposition ``C = V Λ Vᵀ`` (float64 ``eigh``, on the data's device). The whitening
    matrix is the symmetric

    .. math:: P = C^{-1/2} = V \Lambda^{-1/2} V^\top, \qquad z = (x - \mu) P ,

    so whitened training data has covariance ``I − ε P²`` (identity up to the regulariser), and
    the inverse map is ``x = z P⁻¹ + μ`` with ``P⁻¹ = V Λ^{1/2} Vᵀ``. ``ε = 0.1`` is pylearn2's
    default ``filter_bias``, used by the maxout script the paper follows (on GCN-ed CIFAR with norm
    55 the mean pixel variance is about 1, so ε damps directions with less than a tenth of that).

    :meth:`transform` works in the input's floating dtype (float32 for training data) with ``P``
    cast once per dtype and device; fit in float64 for verification-grade results.

    Attributes (after :meth:`fit`): ``mean`` (D,), ``matrix`` P (D, D), ``inverse_matrix`` (D, D),
    ``eigenvalues`` Λ (D,) ascending, all float64; ``feature_shape`` the shape of one sample.
    """

    def __init__(self, eps: float = 0.1) -> None:
        if not eps >= 0:
            raise ValueError(f"ZCA: eps must be >= 0, got {eps!r}")
        self.eps = float(eps)
        self.mean: Tensor | None = None
        self.matrix: Tensor | None = None
        self.inverse_matrix: Tensor | None = None
        self.eigenvalues: Tensor | None = None
        self.feature_shape: tuple[int, ...] | None = None
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        state = f"D={math.prod(self.feature_shape)}" if self.feature_shape else "unfitted"
        return f"ZCA(eps={self.eps}, {state})"

    def fit(self, x: Tensor) -> ZCA:
        """Fit the mean and whitening matrix on the samples ``x`` ``(N, ...)``; returns ``self``.

        Raises:
            ValueError: fewer than 2 samples, NaN/Inf in ``x``, or a singular covariance with
                ``eps=0``.
        """
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError(f"ZCA.fit: expected at least 2 samples (N, ...), got shape "
                             f"{tuple(x.shape)}")
        _require_finite(x, "ZCA.fit")
        n = x.shape[0]
        flat = x.reshape(n, -1)
        d = flat.shape[1]
        f64 = dict(dtype=torch.float64, device=x.device)
        step = _chunk_rows(8 * d)
        mean = torch.zeros(d, **f64)
        for i in range(0, n, step):
            mean += flat[i : i + step].to(torch.float64).sum(dim=0)
        mean /= n
        cov = torch.zeros(d, d, **f64)
        for i in range(0, n, step):
            c = flat[i : i + step].to(torch.float64) - mean
            cov.addmm_(c.T, c)
        cov /= n
        cov.diagonal().add_(self.eps)
        evals, evecs = torch.linalg.eigh(cov)
        if not bool(evals.min() > 0):
            raise ValueError(
                f"ZCA.fit: the covariance of the {n} samples of dimension {d} is singular "
                f"(smallest eigenvalue {float(evals.min()):.3g} with eps={self.eps}); use eps > 0"
            )
        p = (evecs * evals.rsqrt()) @ evecs.T
        p_inv = (evecs * evals.sqrt()) @ evecs.T
        self.mean = mean
        self.matrix = (p + p.T) / 2  # exactly symmetric
        self.inverse_matrix = (p_inv + p_inv.T) / 2
        self.eigenvalues = evals
        self.feature_shape = tuple(x.shape[1:])
        self._cast.clear()
        return self

    def _params(self, x: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
        if self.matrix is None or self.feature_shape is None:
            raise RuntimeError(f"ZCA.{what}: call fit(training data) first")
        if tuple(x.shape[1:]) != self.feature_shape or x.dim() < 2:
            raise ValueError(
                f"ZCA.{what}: fitted on samples of shape {self.feature_shape}, got input of "
                f"shape {tuple(x.shape)} (expected (N, *{self.feature_shape}))"
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        key = (dtype, x.device)
        if key not in self._cast:
            assert self.mean is not None and self.inverse_matrix is not None
            self._cast[key] = (
                self.mean.to(device=x.device, dtype=dtype),
                self.matrix.to(device=x.device, dtype=dtype),
                self.inverse_matrix.to(device=x.device, dtype=dtype),
            )
        return self._cast[key]

    def _apply(self, x: Tensor, fn: str) -> Tensor:
        mean, p, p_inv = self._params(x, fn)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        out = torch.empty(flat.shape, dtype=mean.dtype, device=x.device)
        step = _chunk_rows(3 * flat.shape[1] * mean.element_size())
        for i in range(0, n, step):
            v = flat[i : i + step].to(mean.dtype)
            if fn == "transform":
                torch.mm(v - mean, p, out=out[i : i + step])
            else:
                torch.addmm(mean, v, p_inv, out=out[i : i + step])
        return out.reshape(x.shape)

    def transform(self, x: Tensor) -> Tensor:
        """Whiten ``x`` ``(N, ...)``: ``(x − μ) P`` per sample, in ``x``'s floating dtype."""
        return self._apply(x, "transform")

    def inverse_transform(self, z: Tensor) -> Tensor:
        """Undo :meth:`transform`: ``z P⁻¹ + μ``."""
        return self._apply(z, "inverse_transform")

    def fit_transform(self, x: Tensor) -> Tensor:
        return self.fit(x).transform(x)

    def state_dict(self) -> dict[str, Tensor]:
        """The fitted state as tensors (``eps``, ``mean``, ``matrix``, ``inverse_matrix``,
        ``eigenvalues``, ``feature_shape``), loadable with :meth:`load_state_dict`."""
        if self.matrix is None or self.feature_shape is None:
            raise RuntimeError("ZCA.state_dict: call fit(training data) first")
        assert self.mean is not None and self.inverse_matrix is not None
        assert self.eigenvalues is not None
        return {
            "eps": torch.tensor(self.eps, dtype=torch.float64),
            "mean": self.mean, "matrix": self.matrix, "inverse_matrix": self.inverse_matrix,
            "eigenvalues": self.eigenvalues,
            "feature_shape": torch.tensor(self.feature_shape, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> ZCA:
        """Restore a state from :meth:`state_dict` (on the device its tensors are on)."""
        missing = {"eps", "mean", "matrix", "inverse_matrix", "eigenvalues",
                   "feature_shape"} - set(state)
        if missing:
            raise KeyError(f"ZCA.load_state_dict: missing {sorted(missing)}")
        shape = tuple(int(s) for s in state["feature_shape"].tolist())
        d = math.prod(shape)
        if state["matrix"].shape != (d, d) or state["mean"].shape != (d,):
            raise ValueError(f"ZCA.load_state_dict: matrix {tuple(state['matrix'].shape)} and mean "
                             f"{tuple(state['mean'].shape)} do not fit samples of shape {shape}")
        self.eps = float(state["eps"])
        self.mean = state["mean"].to(torch.float64)
        self.matrix = state["matrix"].to(torch.float64)
        self.inverse_matrix = state["inverse_matrix"].to(torch.float64)
        self.eigenvalues = state["eigenvalues"].to(torch.float64)
        self.feature_shape = shape
        self._cast.clear()
        return self

    def to(self, device: torch.device | str) -> ZCA:
        """Move the fitted state to ``device`` (in place); returns ``self``."""
        for name in ("mean", "matrix", "inverse_matrix", "eigenvalues"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        self._cast.clear()
        return self


def gcn_zca(
    dataset: ArrayDataset, scale: float = 55.0, eps: float = 0.1, dtype: torch.dtype | None = None,
) -> tuple[ArrayDataset, ZCA]:
    """The paper's CIFAR preprocessing of a whole dataset: GCN (``scale``) then ZCA (``eps``).

    GCN is per image (no fitting); the ZCA is fitted on the GCN-ed training split only and applied
    to both splits, on the dataset's device. Inputs become ``dtype`` (default: the dataset's
    floating dtype, float32 for uint8 images). Returns the new dataset and the fitted :class:`ZCA`
    (keep its ``state_dict`` to preprocess other images the same way).
    """
    if dtype is None:
        dtype = dataset.train_x.dtype if dataset.train_x.is_floating_point() else torch.float32
    train = global_contrast_normalize(dataset.train_x.to(dtype), scale=scale)
    test = global_contrast_normalize(dataset.test_x.to(dtype), scale=scale)
    zca = ZCA(eps=eps).fit(train)
    return replace(dataset, train_x=zca.transform(train), test_x=zca.transform(test)), zca


def pad_crop_flip(
    x: Tensor,
    pad: int = 4,
    size: int | tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    *,
    flip: bool = True,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Random crops of the zero-padded images plus random horizontal flips, for a whole batch.

    Each image of ``x`` ``(N, C, H, W)`` is padded with ``pad`` zero pixels on every border; a
    ``size`` window (default ``(H, W)``: the paper's 32x32 crops of the 40x40 padded CIFAR image)
    is cut at a uniformly random offset ``(oy, ox)``, ``0 <= oy <= H + 2 pad - h`` (0..8 for
    CIFAR), and mirrored left-right with probability 1/2 when ``flip``. With ``pad=0`` and a
    smaller ``size`` it is the ImageNet-style random crop.

    Vectorised: one gather with per-image row/column indices, on ``x``'s device, no host sync.
    Randomness comes from ``generator`` (on its own device; default: the global generator of
    ``x``'s device) in a fixed order (row offsets, column offsets, flips), so a generator seeded
    the same way gives the same batch.

    Returns:
        The crops ``(N, C, h, w)``; with ``return_params`` also the offsets ``(N, 2)`` int64
        (row, column, in padded coordinates) and the flip flags ``(N,)`` bool.
    """
    if x.dim() != 4:
        raise ValueError(f"pad_crop_flip: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad_crop_flip: pad must be >= 0, got {pad}")
    n, c, height, width = x.shape
    h, w = (height, width) if size is None else (size, size) if isinstance(size, int) else size
    ph, pw = height + 2 * pad, width + 2 * pad
    if not (0 < h <= ph and 0 < w <= pw):
        raise ValueError(f"pad_crop_flip: crop size {(h, w)} does not fit the padded images "
                         f"{(ph, pw)} (input {(height, width)}, pad {pad})")
    dev = generator.device if generator is not None else x.device
    oy = torch.randint(0, ph - h + 1, (n,), generator=generator, device=dev).to(x.device)
    ox = torch.randint(0, pw - w + 1, (n,), generator=generator, device=dev).to(x.device)
    if flip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=dev).to(x.device).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=x.device)

    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h                                            # (N, h)
    cols = ox[:, None] + torch.where(flips[:, None], (w - 1) - ar_w, ar_w)  # (N, w)
    out = padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    if return_params:
        return out, torch.stack([oy, ox], dim=1), flips
    return out
