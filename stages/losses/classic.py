"""Classic re-balancing losses for stage-2 heads.

Every loss is a plain function ``(logits, labels, **stats) -> loss``:

* ``logits``: ``(N, C)`` float tensor of unnormalised class scores;
* ``labels``: ``(N,)`` int64 tensor of class indices in ``[0, C)``;
* ``stats``: per-class statistics of the **train** split (``class_counts``, ``weight``), as numpy
  arrays, sequences or tensors of shape ``(C,)``;
* the result is a scalar tensor: the mean over the batch of the per-sample loss (weighted per-sample
  losses are also divided by ``N``, as in eq. 8 of paper 003, not by the sum of the weights as
  ``torch.nn.functional.cross_entropy(weight=...)`` does).

Everything is computed in log space (``log_softmax``/``logsumexp``); priors, class-balanced weights
and margins are computed in float64 and cast to the logits' dtype and device.

Statistics given as numpy arrays or sequences are validated here (a wrong length, a negative or a
zero count raises :class:`~stages.errors.LongtailError`). Statistics given as tensors are trusted:
checking a value on the accelerator would synchronise it on every batch, so the heads validate
them once in ``fit`` and pass device tensors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from longtail.stages.errors import LongtailError

ArrayLike = np.ndarray | Sequence[float] | torch.Tensor

__all__ = [
    "balanced_softmax_loss",
    "class_balanced_weights",
    "cross_entropy",
    "focal_loss",
    "ldam_loss",
    "ldam_margins",
    "log_prior",
    "logit_adjusted_loss",
]


# ---------------------------------------------------------------------- validation helpers
def _check_counts(class_counts: ArrayLike, num_classes: int | None = None) -> np.ndarray:
    """Host-side validation of per-class train counts; returns them as float64 ``(C,)``."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise LongtailError(f"class_counts must be a non-empty 1-D array, got shape {counts.shape}")
    if num_classes is not None and counts.size != num_classes:
        raise LongtailError(f"class_counts has {counts.size} entries for {num_classes} classes (logits columns)")
    if not np.isfinite(counts).all():
        raise LongtailError("class_counts has NaN or infinite entries")
    bad = np.flatnonzero(counts <= 0)
    if bad.size:
        raise LongtailError(
            f"class_counts[{int(bad[0])}] = {counts[bad[0]]:g}: every class needs a positive train count "
            "(its log prior or its weight would be undefined)"
        )
    return counts


def _stat_tensor(value: ArrayLike, like: torch.Tensor, name: str, num_classes: int) -> torch.Tensor:
    """A ``(C,)`` statistic on the device of ``like``, in ``like``'s dtype."""
    if isinstance(value, torch.Tensor):
        out = value.to(device=like.device, dtype=like.dtype)
    else:
        arr = np.asarray(value, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise LongtailError(f"{name} has NaN or infinite entries")
        out = torch.as_tensor(arr, device=like.device).to(like.dtype)
    if out.shape != (num_classes,):
        raise LongtailError(f"{name} has shape {tuple(out.shape)}, expected ({num_classes},): one entry per class")
    return out


def _counts_tensor(class_counts: ArrayLike, like: torch.Tensor) -> torch.Tensor:
    """Counts as a float64 tensor on ``like``'s device (validated when they come from the host)."""
    if isinstance(class_counts, torch.Tensor):
        counts = class_counts.to(device=like.device, dtype=torch.float64)
        if counts.shape != (like.shape[-1],):
            raise LongtailError(
                f"class_counts has shape {tuple(counts.shape)}, expected ({like.shape[-1]},): one entry per class"
            )
        return counts
    return torch.as_tensor(_check_counts(class_counts, like.shape[-1]), device=like.device)


def _weighted_mean(
    per_sample: torch.Tensor, labels: torch.Tensor, weight: ArrayLike | None, num_classes: int
) -> torch.Tensor:
    """``mean_i weight[y_i] * loss_i`` (plain mean without weights); divides by ``N >= 1``."""
    if weight is None:
        return per_sample.mean()
    w = _stat_tensor(weight, per_sample, "weight", num_classes)
    return (w[labels] * per_sample).mean()


def _nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood ``-log p(y_i | x_i)``, shape ``(N,)``."""
    return -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)


# ---------------------------------------------------------------------- class statistics
def log_prior(class_counts: ArrayLike, like: torch.Tensor) -> torch.Tensor:
    """``log p_s(y) = log n_y - log sum_c n_c``, shape ``(C,)``, computed in float64.

    Cast to ``like``'s dtype and device. Written as a difference of logs, so there is no division;
    the one quantity that could make it undefined, a zero count, is rejected by the host-side
    validation (tensor counts are validated once by the caller).
    """
    cacheable = (isinstance(class_counts, torch.Tensor) and not class_counts.requires_grad
                 and not torch.is_inference_mode_enabled())
    if cacheable:  # the same counts tensor every batch of a fit: computed once (6 kernels a batch saved)
        key = (id(class_counts), class_counts._version, like.dtype, like.device, like.shape[-1])
        hit = _LOG_PRIOR_CACHE.get(key)
        if hit is not None and hit[0] is class_counts:  # the cache holds the tensor: its id is not reused
            return hit[1]
    counts = _counts_tensor(class_counts, like)
    out = (torch.log(counts) - torch.log(counts.sum())).to(like.dtype)
    if cacheable:
        if len(_LOG_PRIOR_CACHE) >= 8:
            _LOG_PRIOR_CACHE.pop(next(iter(_LOG_PRIOR_CACHE)))  # the oldest entry
        _LOG_PRIOR_CACHE[key] = (class_counts, out)
    return out


#: :func:`log_prior` of the last few count tensors: ``(id, version, dtype, device, C) -> (counts,
#: log prior)``; the tensor's version changes when it is modified in place, which misses the entry
_LOG_PRIOR_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def class_balanced_weights(class_counts: ArrayLike, beta: float) -> np.ndarray:
    """Class-balanced weights from effective numbers (Cui et al., CVPR 2019), float64 ``(C,)``.

    ``w_c ∝ (1 - beta) / (1 - beta^{n_c})``, the inverse of the effective number of samples
    ``E_{n_c} = (1 - beta^{n_c}) / (1 - beta)``; the same formula as paper 003 (Jamal et al.,
    Sec. 4.1, "w_y ≈ (1 - β)/(1 - β^{n_y})"). Normalised so that the weights sum to ``C`` (as Cui
    et al. do), so ``beta = 0`` gives all ones and ``beta -> 1`` approaches normalised inverse
    frequency ``1/n_c``; ``beta = 1`` is defined as that limit.

    ``1 - beta^n`` is computed as ``-expm1(n log beta)`` so that it stays accurate for ``beta`` close
    to 1, where the naive difference loses all its digits.
    """
    counts = _check_counts(class_counts)
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise LongtailError(f"beta = {beta!r} must lie in [0, 1]")
    if beta == 1.0:
        raw = 1.0 / counts  # guarded: counts > 0 (checked above)
    elif beta == 0.0:
        raw = np.ones_like(counts)  # (1 - 0) / (1 - 0^n) with n >= 1
    else:
        one_minus_beta_n = -np.expm1(counts * np.log(beta))  # > 0 for n > 0 and 0 < beta < 1
        raw = (1.0 - beta) / one_minus_beta_n  # guarded: the denominator is > 0 (line above)
    return raw * (counts.size / raw.sum())  # guarded: raw > 0, so the sum is > 0


def ldam_margins(class_counts: ArrayLike, max_margin: float = 0.5) -> np.ndarray:
    """Per-class LDAM margins (Cao et al., NeurIPS 2019, eq. 12), float64 ``(C,)``.

    ``Delta_c = K / n_c^{1/4}``, with ``K`` chosen so that the largest margin (the rarest class)
    equals ``max_margin``.
    """
    return _margins(_check_counts(class_counts), max_margin)


def _margins(counts, max_margin: float):
    """``K n_c^{-1/4}`` with the largest equal to ``max_margin``, for numpy arrays and tensors alike."""
    if not float(max_margin) > 0:
        raise LongtailError(f"max_margin = {max_margin!r} must be positive")
    raw = counts ** -0.25  # guarded: counts > 0 (validated on the host, or once by the caller)
    return raw * (float(max_margin) / raw.max())  # guarded: every raw entry is > 0


# ---------------------------------------------------------------------- losses
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: ArrayLike | None = None) -> torch.Tensor:
    """Softmax cross-entropy, optionally class-weighted.

    Paper 002 (Hong et al., CVPR 2021), eq. 1-2: ``L = -log softmax(f(x))[y]``. With ``weight``
    (``(C,)``), the per-sample loss is multiplied by ``weight[y]`` and averaged over the batch, the
    class-balanced loss of Cui et al. (CVPR 2019) and eq. 8 of paper 003 with ``epsilon = 0``.
    """
    if weight is None:  # the same log-softmax and mean, fused by torch (fewer kernels and autograd nodes)
        return F.cross_entropy(logits, labels)
    return _weighted_mean(_nll(F.log_softmax(logits, dim=1), labels), labels, weight, logits.shape[1])


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, class_counts: ArrayLike) -> torch.Tensor:
    """Balanced Softmax (Ren et al., NeurIPS 2020, Sec. 3.1).

    The softmax is re-weighted by the train counts, ``phi_y = n_y e^{f_y} / sum_c n_c e^{f_c}``, i.e.
    cross-entropy on ``logits + log p_s(y)``; at test time the raw logits estimate the balanced
    posterior.
    """
    return cross_entropy(logits + log_prior(class_counts, logits), labels)


def logit_adjusted_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_counts: ArrayLike, tau: float = 1.0
) -> torch.Tensor:
    """Logit-adjusted softmax cross-entropy (Menon et al., ICLR 2021, Sec. 5).

    ``L = -log( e^{f_y + tau log pi_y} / sum_c e^{f_c + tau log pi_c} )`` with ``pi`` the train
    prior; ``tau = 1`` is Balanced Softmax.
    """
    return cross_entropy(logits + float(tau) * log_prior(class_counts, logits), labels)


def focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, weight: ArrayLike | None = None
) -> torch.Tensor:
    """Softmax focal loss (Lin et al., ICCV 2017, eq. 4; with ``weight`` as ``alpha_t``, eq. 5).

    ``FL = -alpha_y (1 - p_y)^gamma log p_y``, with ``p`` the softmax: the usual multi-class form
    (Lin et al. use per-class sigmoids for detection). ``gamma = 0`` is cross-entropy. ``1 - p_y`` is
    computed as ``-expm1(log p_y)`` so it stays accurate when ``p_y`` is close to 1.
    """
    log_pt = -_nll(F.log_softmax(logits, dim=1), labels)
    one_minus_pt = (-torch.expm1(log_pt)).clamp_min(0.0)  # clamp: rounding may give -0.0 for p_y = 1
    per_sample = -(one_minus_pt ** float(gamma)) * log_pt
    return _weighted_mean(per_sample, labels, weight, logits.shape[1])


def ldam_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: ArrayLike,
    max_margin: float = 0.5,
    scale: float = 30.0,
    weight: ArrayLike | None = None,
) -> torch.Tensor:
    """Label-distribution-aware margin loss (Cao et al., NeurIPS 2019, eq. 13).

    ``L = -log( e^{s (z_y - Delta_y)} / (e^{s (z_y - Delta_y)} + sum_{c != y} e^{s z_c}) )`` with
    margins ``Delta_c ∝ n_c^{-1/4}`` (:func:`ldam_margins`, the largest equals ``max_margin``) and
    ``s = scale`` (Cao et al. apply it to a cosine classifier, ``z`` in ``[-1, 1]``). ``weight`` is
    the deferred re-weighting of their Sec. 3.3.
    """
    margins = _margins(_counts_tensor(class_counts, logits), max_margin).to(logits.dtype)
    adjusted = logits - F.one_hot(labels, logits.shape[1]).to(logits.dtype) * margins[labels].unsqueeze(1)
    return cross_entropy(float(scale) * adjusted, labels, weight=weight)
