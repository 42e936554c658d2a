r"""Likelihoods ``p(y|x)`` on a model's output, and the three Fisher kinds.

Every likelihood gives the *score* at the output, ``∂ ln p(y|x) / ∂output``; backpropagating it
gives ``δ = ∂ ln p / ∂net`` for every unit.  The per-sample log-likelihood is summed over the
output's elements (never averaged), so ``δ`` is per sample.

=============  ===================================  ==============================================
name           output, targets                      ``ln p(y|x)`` and score
=============  ===================================  ==============================================
categorical    logits ``(N, C)``, class indices     ``log_softmax(z)[y]``;
               ``(N,)`` (integer dtype)             score ``e_y − softmax(z)``
gaussian       any ``(N, *)``, targets of the same  ``−½‖y − f‖² − (D/2) ln 2π`` (unit variance,
               shape (floating)                     i.e. squared error); score ``y − f``
bernoulli      logits ``(N, *)``, targets in        ``y ln σ(z) + (1 − y) ln(1 − σ(z))``;
               ``[0, 1]`` of the same shape         score ``y − σ(z)``
=============  ===================================  ==============================================

Fisher kinds (which ``y`` the score is taken at; the Fisher is ``E[score scoreᵀ]`` pulled back):

* ``"empirical"``: ``y`` = the given targets.
* ``"mc"``: ``y`` sampled from the model, ``mc_samples`` draws per input, each weighted
  ``1/mc_samples`` (categorical: ``torch.multinomial(softmax(z), S, replacement=True,
  generator=g)``; gaussian: ``f + randn``; bernoulli: ``bernoulli(σ(z))``).
* ``"exact"``: the expectation over ``y``, through a factorisation of the score covariance
  ``Σ(x) = Σ_r v_r v_rᵀ``: categorical ``v_r = √p_r (e_r − p)`` (``C`` backward passes);
  gaussian ``v_r = e_r``, bernoulli ``v_r = √(σ(1−σ))_r e_r`` (one backward pass per output
  element, so only for small outputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "FISHER_KINDS",
    "LIKELIHOODS",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "make_likelihood",
    "score_vectors",
]

FISHER_KINDS = ("empirical", "mc", "exact")


class Likelihood:
    """Base class: ``validate``, ``score``, ``sample``, ``exact_factors``."""

    name = "likelihood"

    def validate(self, output: Tensor, targets: Tensor) -> Tensor:
        """Check shapes and dtypes (host-side only); return the targets ready for ``score``."""
        raise NotImplementedError

    def invalid_targets(self, output: Tensor, targets: Tensor) -> Tensor:
        """A 0-dim bool tensor: some target is out of range (checked without a host sync)."""
        return torch.zeros((), dtype=torch.bool, device=output.device)

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        """``∂ ln p(y|x) / ∂output``, the shape of ``output``."""
        raise NotImplementedError

    def sample(self, output: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """``n`` draws ``y ~ p(·|x)`` per input, shape ``(n, *targets.shape)``."""
        raise NotImplementedError

    def exact_factors(self, output: Tensor) -> Tensor:
        """``v_r`` with ``Σ_r v_r v_rᵀ = Cov(score | x)`` per sample: ``(R, *output.shape)``."""
        raise NotImplementedError

    def _floating_targets(self, output: Tensor, targets: Tensor) -> Tensor:
        if targets.shape != output.shape:
            raise ValueError(
                f"the {self.name} likelihood needs targets of the output's shape "
                f"{tuple(output.shape)}, got {tuple(targets.shape)}"
            )
        if not targets.is_floating_point():
            raise TypeError(
                f"{self.name} targets must be floating point like the output ({output.dtype}), "
                f"got {targets.dtype}"
            )
        return targets.to(device=output.device, dtype=output.dtype)


class Categorical(Likelihood):
    """Categorical likelihood on logits ``(N, C)`` with class-index targets ``(N,)``."""

    name = "categorical"

    def validate(self, output: Tensor, targets: Tensor) -> Tensor:
        if output.ndim != 2:
            raise ValueError(
                f"the categorical likelihood needs logits of shape (N, C), got output of shape "
                f"{tuple(output.shape)}; use likelihood='gaussian' or 'bernoulli', or reshape "
                "the output with output_transform=..."
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            hint = " (one-hot targets: pass targets.argmax(1))" if targets.ndim == 2 else ""
            raise TypeError(
                f"categorical targets must be class indices of an integer dtype (int64), shape "
                f"(N,) = ({output.shape[0]},); got {targets.dtype} of shape "
                f"{tuple(targets.shape)}{hint}"
            )
        if targets.shape != (output.shape[0],):
            raise ValueError(
                f"categorical targets must have shape (N,) = ({output.shape[0]},) for logits of "
                f"shape {tuple(output.shape)}; got {tuple(targets.shape)}"
            )
        return targets.to(device=output.device, dtype=torch.int64)

    def invalid_targets(self, output: Tensor, targets: Tensor) -> Tensor:
        return ((targets < 0) | (targets >= output.shape[1])).any()

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        C = output.shape[1]
        s = -torch.softmax(output.detach(), dim=1)
        idx = targets.clamp(0, C - 1)[:, None]
        return s.scatter_add(1, idx, torch.ones_like(s[:, :1]))

    def sample(self, output: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        p = torch.softmax(output.detach(), dim=1)
        return torch.multinomial(p, n, replacement=True, generator=generator).T

    def exact_factors(self, output: Tensor) -> Tensor:
        p = torch.softmax(output.detach(), dim=1)
        C = p.shape[1]
        eye = torch.eye(C, dtype=p.dtype, device=p.device)
        return p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None])


class Gaussian(Likelihood):
    """Unit-variance Gaussian on the output: the squared error ``½‖y − f‖²`` per sample."""

    name = "gaussian"

    def validate(self, output: Tensor, targets: Tensor) -> Tensor:
        return self._floating_targets(output, targets)

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        return targets - output.detach()

    def sample(self, output: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        f = output.detach()
        eps = torch.randn((n, *f.shape), dtype=f.dtype, device=f.device, generator=generator)
        return f + eps

    def exact_factors(self, output: Tensor) -> Tensor:
        N = output.shape[0]
        D = output[0].numel()
        eye = torch.eye(D, dtype=output.dtype, device=output.device)
        return eye[:, None, :].expand(D, N, D).reshape(D, *output.shape)


class Bernoulli(Likelihood):
    """Independent Bernoulli outputs on logits; targets in ``[0, 1]`` of the output's shape."""

    name = "bernoulli"

    def validate(self, output: Tensor, targets: Tensor) -> Tensor:
        if targets.dtype == torch.bool or (not targets.is_floating_point()
                                           and not targets.is_complex()):
            if targets.shape != output.shape:
                raise ValueError(
                    f"the bernoulli likelihood needs targets of the output's shape "
                    f"{tuple(output.shape)}, got {tuple(targets.shape)}"
                )
            return targets.to(device=output.device, dtype=output.dtype)
        return self._floating_targets(output, targets)

    def invalid_targets(self, output: Tensor, targets: Tensor) -> Tensor:
        return ((targets < 0) | (targets > 1)).any()

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        return targets - torch.sigmoid(output.detach())

    def sample(self, output: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        p = torch.sigmoid(output.detach())
        return torch.bernoulli(p.expand(n, *p.shape), generator=generator)

    def exact_factors(self, output: Tensor) -> Tensor:
        p = torch.sigmoid(output.detach())
        sd = (p * (1 - p)).sqrt().reshape(p.shape[0], -1)
        D = sd.shape[1]
        eye = torch.eye(D, dtype=p.dtype, device=p.device)
        return (eye[:, None, :] * sd[None]).reshape(D, *output.shape)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "categorical": Categorical,
    "gaussian": Gaussian,
    "bernoulli": Bernoulli,
}


def make_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """A :class:`Likelihood` from its name (``categorical``, ``gaussian``, ``bernoulli``)."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood not in LIKELIHOODS:
        from biasshift._names import unknown_name_error

        raise unknown_name_error("likelihood", str(likelihood), LIKELIHOODS)
    return LIKELIHOODS[likelihood]()


def score_vectors(lik: Likelihood, kind: str, output: Tensor, targets: Tensor, *,
                  mc_samples: int = 1, generator: torch.Generator | None = None,
                  ) -> tuple[Tensor, Tensor | None]:
    """Output-space vectors to backpropagate: the given targets' score, and the Fisher replicas.

    Returns ``(given, replicas)``: ``given`` has the output's shape; ``replicas`` is
    ``(R, *output.shape)`` with ``Σ_r replica_r replica_rᵀ`` the per-sample Fisher at the output
    for ``kind`` (``None`` for ``"empirical"``, whose single replica is ``given``).
    """
    given = lik.score(output, targets)
    if kind == "empirical":
        return given, None
    if kind == "mc":
        ys = lik.sample(output, mc_samples, generator)
        reps = torch.stack([lik.score(output, y) for y in ys])
        return given, reps / math.sqrt(mc_samples)
    if kind == "exact":
        return given, lik.exact_factors(output)
    raise ValueError(f"unknown Fisher kind {kind!r}; choose one of {FISHER_KINDS}")
