"""LADE: the label-distribution disentangling losses of paper 002 (Hong et al., CVPR 2021, Sec. 3.3-3.4).

Same conventions as :mod:`stages.losses.classic`: plain functions ``(logits, labels, **stats) ->
loss``, ``logits`` ``(N, C)``, ``labels`` ``(N,)`` int64, ``class_counts`` the ``(C,)`` per-class
counts of the **train** split (the source prior ``p_s``); numpy or sequence counts are validated
here, tensor counts are trusted (the heads validate them once in ``fit``). Everything is computed in
log space (``logsumexp``, ``log_softmax``); the importance weights ``p_u(y)/p_s(y)`` enter as
``log p_u(y) - log p_s(y)``, never as a quotient.

Two choices follow the authors' reference code where it and the printed equations differ, as
issue 4 specifies:

* **Absent classes.** Eq. 16 sums over the classes present in the batch. The reference code sums
  over every class: a class without a sample in the batch contributes its second and third terms
  (its first term, a mean over no sample, is 0). Kept, so the regulariser also pins the logits of
  classes a batch happens to miss.
* **The importance weight of eq. 13** is ``p_u(y_i) / p_s(y_i)`` of each *sample's label*, as eq.
  12-14 derive it and the issue states it. (The reference code instead adds ``log p_u(c) - log
  p_s(c)`` of the *logit's class* to every row, a constant per class; the two agree when each
  sample's logit for ``c`` is negligible unless ``y_i = c``, i.e. on separable data, and differ
  where classes overlap, where only the per-sample weight makes the second term estimate
  ``E_{p_u(x)}[e^f]``.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longtail.stages.errors import LongtailError
from longtail.stages.losses.classic import ArrayLike, cross_entropy, log_prior

__all__ = ["lade_ce_loss", "lade_loss", "lader_loss", "lader_terms"]


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise LongtailError(f"lam = {lam!r} must be a non-negative number (eq. 9: lambda in R+)")
    return lam


def lader_terms(
    logits: torch.Tensor, labels: torch.Tensor, class_counts: ArrayLike, lam: float = 0.1
) -> torch.Tensor:
    """Per-class LADER terms ``L_LADER_c`` of paper 002, eq. 15, shape ``(C,)``.

    For each class ``c``, over the batch ``(x_i, y_i)``, ``i = 1..N``:

    * first term ``-(1/N_c) sum_i 1[y_i = c] f(x_i)[c]`` (eq. 11), 0 when ``N_c = 0``;
    * ``s_c = log((1/N) sum_i p_u(y_i)/p_s(y_i) e^{f(x_i)[c]})`` (eq. 12-13), computed as
      ``logsumexp_i(f(x_i)[c] + log p_u(y_i) - log p_s(y_i)) - log N``;
    * ``L_LADER_c = first + s_c + lam * s_c^2``.

    ``p_u`` is uniform (``1/C``), ``p_s`` the train prior of ``class_counts``.
    """
    lam = _check_lam(lam)
    n, num_classes = logits.shape
    log_ps = log_prior(class_counts, logits)  # (C,) log p_s, validated on the host
    log_w = -math.log(num_classes) - log_ps[labels]  # (N,) log p_u(y_i) - log p_s(y_i)
    one_hot = F.one_hot(labels, num_classes).to(logits.dtype)  # (N, C)
    n_c = one_hot.sum(dim=0)  # (C,) samples of each class in the batch
    # guards the division: an absent class has a zero sum, and its mean is defined as 0
    first = -(one_hot * logits).sum(dim=0) / n_c.clamp_min(1.0)
    s = torch.logsumexp(logits + log_w.unsqueeze(1), dim=0) - math.log(n)  # n >= 1: a batch
    return first + s + lam * s * s


def lader_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_counts: ArrayLike, lam: float = 0.1
) -> torch.Tensor:
    """LADER, paper 002, eq. 15-16: ``sum_c alpha_c L_LADER_c`` with ``alpha_c = p_s(c)`` (Sec. 3.3).

    The sum runs over every class, present in the batch or not (see the module docstring); ``lam``
    is the regularised Donsker-Varadhan weight ``lambda`` of eq. 9. Minimising it drives
    ``f(x)[y]`` towards ``log p_u(x|y) / p_u(x)`` (eq. 8, 10), which on separable data is ``log C``
    for the true class (eq. 21).
    """
    log_ps = log_prior(class_counts, logits)
    return (torch.exp(log_ps) * lader_terms(logits, labels, class_counts, lam)).sum()


def lade_ce_loss(logits: torch.Tensor, labels: torch.Tensor, class_counts: ArrayLike) -> torch.Tensor:
    """LADE-CE, paper 002, eq. 18: ``-log( p_s(y) e^{f(x)[y]} / sum_c p_s(c) e^{f(x)[c]} )``.

    Cross-entropy on ``logits + log p_s``: the source prior injected into the softmax (eq. 17 with
    ``p_t = p_s``), so that the raw logits are free of it. Equal to Balanced Softmax.
    """
    return cross_entropy(logits + log_prior(class_counts, logits), labels)


def lade_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: ArrayLike,
    alpha: float = 0.1,
    lam: float = 0.1,
) -> torch.Tensor:
    """LADE, paper 002, eq. 20: ``L_LADE-CE + alpha * L_LADER`` (eq. 18 and eq. 15-16).

    ``alpha = 0`` is Balanced Softmax (the paper's remark after eq. 20).
    """
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise LongtailError(f"alpha = {alpha!r} must be a non-negative number (eq. 20)")
    loss = lade_ce_loss(logits, labels, class_counts)
    if alpha == 0.0:
        return loss
    return loss + alpha * lader_loss(logits, labels, class_counts, lam)
