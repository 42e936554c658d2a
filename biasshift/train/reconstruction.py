"""Reconstruction losses of the autoencoder (Fig. 3) and its collapse detection.

The paper's autoencoder (Section 4.1) follows the deep-autoencoder benchmark of Hinton &
Salakhutdinov (2006) and Martens (2010): logistic output units, trained on the canonical
Bernoulli cross-entropy, with the per-image *summed squared error* reported.  For an image
``x`` in [0, 1]^D and output logits ``z`` (reconstruction ``y = sigmoid(z)``):

=========  =========================================================================
``bce``    ``sum_d [ softplus(z_d) - x_d z_d ]`` = ``-sum_d [x_d log y_d + (1 - x_d) log(1 - y_d)]``
           (``binary_cross_entropy_with_logits`` summed per image: stable for any ``z``)
``sse``    ``sum_d (y_d - x_d)^2`` (the benchmark's reported error; also a training loss)
``mse``    ``(1/D) sum_d (y_d - x_d)^2`` (per-pixel mean; the gradient is ``1/D`` of ``sse``'s)
=========  =========================================================================

Each is averaged over the images of a batch.  Whatever the training loss, the per-image summed
squared error is also recorded (the trainer's ``train_sse`` / ``test_sse``).

Collapse
    A run whose output saturates gives the same reconstruction for every image: the logistic
    units sit at ``|z| > 15`` where their gradient ``y (1 - y)`` is below 3e-7, so training
    stops moving and the error is flat (for the summed squared error at lr 1e-2 with He
    initialisation, worse than predicting zeros).  :func:`collapse_statistics` measures, on a
    fixed set of images,

    * ``recon_var_ratio`` — the variance across images of the reconstruction, summed over
      pixels, divided by the same for the images themselves (1 for a perfect reconstruction,
      0 when every image gets the same output);
    * ``saturated_frac`` — the share of output units with ``|z| > 15`` (a diagnostic: a
      healthy ``bce`` net saturates its background pixels too, so this alone is no flag; NaN
      logits count as not saturated, and such an epoch has a NaN ``recon_var_ratio`` and the
      trainer's ``diverged`` row);

    and :class:`CollapseMonitor` logs them after every epoch (and before training) with
    ``collapsed`` = 1.0 when ``recon_var_ratio`` is below ``threshold`` (default 1e-3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasshift.train.plugins import Plugin

if TYPE_CHECKING:
    from biasshift.train.trainer import Trainer

__all__ = [
    "RECONSTRUCTION_LOSSES",
    "SATURATION_LOGIT",
    "CollapseMonitor",
    "collapse_statistics",
    "reconstruction",
    "reconstruction_loss",
    "summed_squared_error",
]

RECONSTRUCTION_LOSSES = ("sse", "mse", "bce")
#: |logit| beyond which a logistic output counts as saturated (sigmoid'(15) = 3.1e-7)
SATURATION_LOGIT = 15.0


def _check(loss: str, logits: bool) -> None:
    if loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"reconstruction loss {loss!r} is unknown; choose one of "
                         f"{', '.join(RECONSTRUCTION_LOSSES)}")
    if loss == "bce" and not logits:
        raise ValueError("reconstruction loss 'bce' needs the model's logits: build the model "
                         "without its output sigmoid (autoencoder(output='linear')) and pass "
                         "reconstruction_logits=True")


def reconstruction(out: Tensor, logits: bool) -> Tensor:
    """The reconstruction ``y``: ``sigmoid(out)`` when the model returns logits, else ``out``."""
    return torch.sigmoid(out) if logits else out


def summed_squared_error(out: Tensor, target: Tensor, logits: bool) -> Tensor:
    """Per-image summed squared error ``sum_d (y_d - x_d)^2``, shape ``(N,)``."""
    return (reconstruction(out, logits) - target).square().sum(dim=1)


def reconstruction_loss(out: Tensor, target: Tensor, loss: str = "sse", *,
                        logits: bool = False, reduction: str = "mean") -> Tensor:
    """The training loss ``loss`` (see the module table) of outputs ``out`` for ``target``.

    ``out`` and ``target`` are ``(N, D)``; ``logits`` says whether ``out`` holds logits
    (``bce`` requires it).  ``reduction="mean"``: averaged over the ``N`` images; ``"sum"``:
    summed over them (for whole-set evaluation in chunks).
    """
    _check(loss, logits)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reconstruction_loss: reduction must be 'mean' or 'sum', got "
                         f"{reduction!r}")
    if loss == "bce":
        total = F.binary_cross_entropy_with_logits(out, target, reduction="sum")
    else:
        total = F.mse_loss(reconstruction(out, logits), target, reduction="sum")
        if loss == "mse":
            total = total / out.shape[1]
    return total / out.shape[0] if reduction == "mean" else total


@torch.no_grad()
def collapse_statistics(model: nn.Module, x: Tensor, *, logits: bool,
                        batch_size: int = 4096) -> dict[str, Tensor]:
    """``recon_var_ratio`` and ``saturated_frac`` of ``model`` on images ``x`` (eval mode).

    The variances are across the images (float64 sums; ``x`` needs at least two images).  With
    ``logits=False`` the model returns probabilities and a unit counts as saturated when
    ``min(y, 1 - y) < sigmoid(-15)``.  Returns 0-dim float64 device tensors (no host sync).
    Every submodule's training flag is restored.
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"collapse_statistics needs at least two images, got x of shape "
                         f"{tuple(x.shape)}")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        target = x.reshape(n, -1).double()
        s1 = torch.zeros(target.shape[1], dtype=torch.float64, device=x.device)
        s2 = torch.zeros_like(s1)
        sat = torch.zeros((), dtype=torch.float64, device=x.device)
        edge = torch.sigmoid(torch.tensor(-SATURATION_LOGIT, dtype=torch.float64))
        for start in range(0, n, batch_size):
            out = model(x[start : start + batch_size]).reshape(-1, target.shape[1]).double()
            if logits:
                sat += (out.abs() > SATURATION_LOGIT).sum()
            else:
                sat += (torch.minimum(out, 1 - out) < edge).sum()
            y = reconstruction(out, logits)
            s1 += y.sum(0)
            s2 += y.square().sum(0)
    finally:
        for m, flag in modes.items():
            m.training = flag
    var_y = ((s2 - s1.square() / n) / (n - 1)).clamp_min(0).sum()
    var_x = target.var(dim=0).sum()
    return {"recon_var_ratio": var_y / var_x.clamp_min(1e-30),
            "saturated_frac": sat / target.numel()}


class CollapseMonitor(Plugin):
    """Logs ``recon_var_ratio``, ``saturated_frac`` and ``collapsed`` (0/1) each epoch.

    Args:
        images: how many test images (the first ones, the same in every run) are used.
        threshold: ``collapsed`` = 1 when ``recon_var_ratio < threshold``.
        logits: whether the model returns logits (see :func:`collapse_statistics`).

    The statistics are logged for epoch 0 (before training; not again on a resume) and after
    every epoch.  They are computed once per epoch, outside the hot loop; the plug-in is
    stateless and draws no random numbers.  The run is not stopped: a collapsed run is kept,
    flagged, so that the figure can draw it as such.
    """

    def __init__(self, images: int = 1000, threshold: float = 1e-3, *,
                 logits: bool = False) -> None:
        if images < 2:
            raise ValueError(f"CollapseMonitor: images must be >= 2, got {images}")
        if not threshold > 0:
            raise ValueError(f"CollapseMonitor: threshold must be > 0, got {threshold!r}")
        self.images, self.threshold, self.logits = int(images), float(threshold), bool(logits)

    def _log(self, trainer: Trainer) -> None:
        x = trainer.dataset.test_x[: self.images]
        stats = collapse_statistics(trainer.model, x, logits=self.logits,
                                    batch_size=trainer.eval_batch_size)
        for k, v in stats.items():
            trainer.log(k, v)
        trainer.log("collapsed", (stats["recon_var_ratio"] < self.threshold).double())

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.resumed_from is None and trainer.eval_initial:
            self._log(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        self._log(trainer)
