"""Losses of the DLSA Gaussian Mixture Flow Filter (paper 004, Xu et al., ECCV 2022, Sec. 3.3).

A flow ``g^{-1}`` maps a feature ``x`` to a latent ``z``; the latent density is a ``K``-component
Gaussian mixture with identity covariances, fixed centres ``mu_k`` and a uniform prior (eq. 2-3):

    P(z) = (1/K) sum_k N(z | mu_k, I),        P(k | x) = N(z | mu_k, I) / sum_k' N(z | mu_k', I)  (eq. 4)

and the filter is trained with ``L_total = L_MLE + lambda_bal L_bal + lambda_pure L_pure`` (eq. 11).
Every function here is a plain function of tensors (the filter keeps the state of the momentum
estimator, :class:`stages.dlsa.GaussianMixtureFlowFilter`); shapes: ``N`` samples, ``D`` latent
dimensions, ``K`` clusters, ``C`` classes. Everything is computed in log space (``logsumexp``,
``log_softmax``); the ``K``-vectors of the balancedness loss are computed in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from longtail.stages.errors import LongtailError

__all__ = [
    "balancedness_loss",
    "batch_cluster_posterior",
    "bias_corrected",
    "flow_class_weights",
    "gmm_component_log_density",
    "gmm_log_likelihood",
    "momentum_variance_ratio",
    "momentum_update",
    "purity_loss",
    "weighted_mle_loss",
]

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------- the latent mixture
def gmm_component_log_density(z: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``log N(z | mu_k, I)`` for every sample and component, ``(N, K)`` (eq. 2, identity covariance).

    ``-D/2 log(2 pi) - ||z - mu_k||^2 / 2`` with ``||z - mu||^2 = ||z||^2 - 2 z.mu + ||mu||^2`` (one
    matrix product, no ``(N, K, D)`` intermediate); clamped at 0 against rounding.

    Args:
        z: ``(N, D)`` latents.
        centres: ``(K, D)`` mixture centres ``mu_k``.
    """
    sq = (z * z).sum(1, keepdim=True) - 2.0 * z @ centres.T + (centres * centres).sum(1)
    return -0.5 * z.shape[1] * _LOG_2PI - 0.5 * sq.clamp_min(0.0)


def gmm_log_likelihood(
    z: torch.Tensor, logabsdet: torch.Tensor, centres: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood of ``x`` under the flow and the uniform-prior mixture, and the cluster posterior.

    Eq. 5 in log space: ``log L(theta; x) = logsumexp_k log N(g^{-1}(x) | mu_k, I) - log K +
    log |det J(g^{-1}(x))|`` (the uniform prior ``P(h = k) = 1/K`` of eq. 3); the posterior is eq. 4,
    ``log P(k | x) = log_softmax_k log N(z | mu_k, I)`` (the prior and the Jacobian cancel).

    Args:
        z: ``(N, D)`` latents ``g^{-1}(x)``.
        logabsdet: ``(N,)`` ``log |det J(g^{-1}(x))|``.
        centres: ``(K, D)``.

    Returns:
        ``(log_likelihood (N,), log_posterior (N, K))``.
    """
    comp = gmm_component_log_density(z, centres)
    log_lik = torch.logsumexp(comp, dim=1) - math.log(centres.shape[0]) + logabsdet
    return log_lik, F.log_softmax(comp, dim=1)


# ---------------------------------------------------------------------- maximum likelihood
def flow_class_weights(class_counts: np.ndarray | list, q: float = 2.0) -> np.ndarray:
    """Per-class sample weights of the weighted MLE, eq. 6: ``w(i) = n_i^-q / sum_j n_j^-q``.

    Computed in float64 as ``exp(-q log n_i - logsumexp_j(-q log n_j))``, which cannot overflow for
    large counts or large ``q``. Classes with a zero count (absent from the samples a filter is
    fitted on) get weight 0 and are left out of the normalising sum; they have no sample to weigh.

    Returns:
        ``(C,)`` float64, summing to 1 over the classes with a positive count.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or not np.isfinite(counts).all() or (counts < 0).any():
        raise LongtailError(f"flow class weights: class counts must be a 1-D list of counts >= 0, got {counts!r}")
    if not (math.isfinite(float(q)) and float(q) >= 0):
        raise LongtailError(f"flow class weights: q = {q!r} must be a number >= 0")
    present = counts > 0
    if not present.any():
        raise LongtailError("flow class weights: every class count is 0")
    log_w = np.full(counts.shape, -np.inf)
    log_w[present] = -float(q) * np.log(counts[present])  # log of a positive count only
    log_w -= np.logaddexp.reduce(log_w[present])
    return np.exp(log_w)


def weighted_mle_loss(
    log_likelihood: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """The class-weighted maximum-likelihood loss, eq. 7: ``L_MLE(B) = - sum_{x in B} w(y) log L(theta; x)``.

    ``reduction="sum"`` is eq. 7 as printed; ``"mean"`` divides it by ``|B|``, which makes it
    independent of the batch size like the batch averages of eq. 8-10 (the flow filter uses
    ``"mean"``; see :mod:`stages.dlsa` for why).

    Args:
        log_likelihood: ``(N,)`` ``log L(theta; x)`` (:func:`gmm_log_likelihood`).
        labels: ``(N,)`` int64 class indices.
        class_weights: ``(C,)`` tensor of ``w(i)`` (:func:`flow_class_weights`), trusted (validated once).
        reduction: ``"sum"`` or ``"mean"``.
    """
    w = class_weights.to(device=log_likelihood.device, dtype=log_likelihood.dtype)
    total = -(w[labels] * log_likelihood).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / log_likelihood.shape[0]  # a batch has >= 1 sample
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


# ---------------------------------------------------------------------- cluster balancedness
def batch_cluster_posterior(log_posterior: torch.Tensor) -> torch.Tensor:
    """The cluster posterior of a batch, eq. 8: ``P(h = k | B) = (1/|B|) sum_{x in B} P(h = k | x)``.

    Computed as ``exp(logsumexp_x log P(k | x) - log |B|)`` in float64, ``(K,)``; an unbiased
    estimate of ``P(h = k | X)`` for a batch drawn uniformly from ``X``.
    """
    lp = log_posterior.double()
    return torch.exp(torch.logsumexp(lp, dim=0) - math.log(lp.shape[0]))


def momentum_update(previous: torch.Tensor | float, batch_posterior: torch.Tensor, eta: float) -> torch.Tensor:
    """One step of the momentum estimator (Sec. 3.3): ``p~_t = eta p~_{t-1} + (1 - eta) P(h = k | B_t)``.

    ``p~_0 = 0``; the closed form is supplementary eq. 2, ``p~_t = sum_i (1 - eta) eta^{t-i} P(h | B_i)``.
    The caller detaches ``previous`` (only the current batch carries a gradient).
    """
    return float(eta) * previous + (1.0 - float(eta)) * batch_posterior


def bias_corrected(momentum: torch.Tensor, eta: float, step: int) -> torch.Tensor:
    """The bias-corrected momentum estimator ``p~_t / (1 - eta^t)`` (Sec. 3.3; supplementary eq. 3).

    Unbiased for ``P(h = k | X)`` when every ``P(h = k | B_i)`` is, with variance
    :func:`momentum_variance_ratio` times that of one batch (supplementary eq. 4).
    ``step = t >= 1`` and ``0 <= eta < 1``, so ``1 - eta^t > 0`` (the guard of the division).
    """
    if step < 1 or not 0.0 <= float(eta) < 1.0:
        raise LongtailError(f"momentum estimator: step = {step} must be >= 1 and eta = {eta} in [0, 1)")
    return momentum / (1.0 - float(eta) ** int(step))


def momentum_variance_ratio(eta: float, step: int) -> float:
    """Supplementary eq. 4: ``D[p~_t / (1 - eta^t)] / D[p^] = phi(1) / phi(t)``, ``phi(t) = (1 - eta^t) / (1 + eta^t)``.

    Equals ``(1 - eta)^2 / (1 - eta^t)^2 * (1 - eta^{2t}) / (1 - eta^2)`` for i.i.d. batches; 1 at
    ``t = 1`` and decreasing to ``(1 - eta) / (1 + eta)``.
    """
    eta, t = float(eta), int(step)
    if t < 1 or not 0.0 <= eta < 1.0:
        raise LongtailError(f"momentum estimator: step = {step} must be >= 1 and eta = {eta} in [0, 1)")
    phi = lambda s: (1.0 - eta**s) / (1.0 + eta**s)  # noqa: E731  (> 0 for s >= 1, eta < 1)
    return phi(1) / phi(t)


def balancedness_loss(posterior: torch.Tensor) -> torch.Tensor:
    """The cluster balancedness loss, eq. 9: ``L_bal = E_h[log P(h | X)] = sum_k p_k log p_k``.

    The negative entropy of the cluster posterior ``p`` (``(K,)``, e.g. :func:`bias_corrected`), which
    equals ``KL(p || uniform) - log K`` (supplementary eq. 1); minimal (``-log K``) for balanced
    clusters. ``0 log 0 = 0``: the log is taken of ``p`` clamped at the smallest normal number of
    its dtype (the only guard needed: ``p`` is a mean of softmax outputs, so it is > 0 unless it
    underflows).
    """
    return (posterior * torch.log(posterior.clamp_min(torch.finfo(posterior.dtype).tiny))).sum()


# ---------------------------------------------------------------------- purity
def purity_loss(log_posterior_i: torch.Tensor, log_posterior_j: torch.Tensor) -> torch.Tensor:
    """The purity loss, eq. 10, averaged over pairs: ``mean_pairs sum_k P(h = k | x_i) log P(h = k | x_j)``.

    ``x_i`` and ``x_j`` are samples of two different classes; minimising the loss raises the
    cross-entropy between their cluster posteriors, pushing them into different clusters. The mean
    over the pairs of a batch (eq. 10 is written for one pair) keeps it independent of the number
    of pairs.

    Args:
        log_posterior_i, log_posterior_j: ``(P, K)`` ``log P(h = k | x)`` of the two members of each pair.
    """
    return (log_posterior_i.exp() * log_posterior_j).sum(1).mean()
