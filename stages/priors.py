"""Deployment label-prior estimation from unlabelled target data (label shift: ``p_t(x|y) = p_s(x|y)``).

PC-Softmax (paper 002, eq. 4-7) needs the target prior ``p_t(y)``; in deployment it is unknown.
Two estimators, both from a classifier's outputs on the unlabelled target samples:

* :func:`em_prior`: the EM re-estimation of Saerens, Latinne & Decaestecker (Neural Computation
  2002). Needs posteriors calibrated to a known prior (the prior the classifier's logits carry:
  :func:`stages.calibrate.logit_prior`). Maximum likelihood of the target prior.
* :func:`bbse_prior`: black-box shift estimation (Lipton, Wang & Smola, ICML 2018). Needs only hard
  predictions, and a labelled split (val) to measure the classifier's confusion matrix on.

:func:`estimate_target_prior` runs either on a fitted method. Priors are float64; EM works in log
space.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import numpy as np

from longtail.stages.base import Method
from longtail.stages.calibrate import logit_prior, validate_prior
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import softmax

__all__ = ["PriorEstimate", "bbse_prior", "em_prior", "estimate_target_prior", "ESTIMATORS"]

#: the estimators :func:`estimate_target_prior` knows
ESTIMATORS = ("em", "bbse")
#: EM stops when no entry of the prior moves by more than this in one iteration
EM_TOL = 1e-8
#: ... or after this many iterations (with a warning)
EM_MAX_ITER = 10_000


class PriorEstimate(NamedTuple):
    """An estimated target prior.

    Attributes:
        prior: ``(C,)`` float64, non-negative, sums to 1.
        method: ``"em"`` or ``"bbse"``.
        iterations: EM iterations run (0 for BBSE, a closed form).
        converged: EM reached its tolerance within ``max_iter`` (always true for BBSE).
    """

    prior: np.ndarray
    method: str
    iterations: int
    converged: bool


def _check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise LongtailError(f"posteriors: expected a non-empty (N, C) array, got shape {p.shape}")
    if not np.isfinite(p).all() or p.min() < 0:
        raise LongtailError("posteriors: entries must be finite and non-negative")
    sums = p.sum(axis=1)
    # 1e-4 tolerates float32 softmax outputs; each row is renormalised below
    if np.abs(sums - 1.0).max() > 1e-4:
        i = int(np.argmax(np.abs(sums - 1.0)))
        raise LongtailError(f"posteriors: row {i} sums to {sums[i]:.6g}, not 1 (pass softmax probabilities)")
    return p / sums[:, None]  # guarded: every sum is within 1e-4 of 1


def em_prior(
    probs: np.ndarray,
    source_prior: Sequence[float] | np.ndarray,
    *,
    tol: float = EM_TOL,
    max_iter: int = EM_MAX_ITER,
) -> PriorEstimate:
    """EM estimate of the target prior (Saerens, Latinne & Decaestecker 2002).

    With ``p_s(y|x_i)`` the classifier's posteriors on the ``N`` unlabelled target samples and
    ``p_s(y)`` the prior they are calibrated to, iterate from ``p^(0) = p_s``:

    * E-step: ``q_i(y) ∝ p_s(y|x_i) p^(k)(y) / p_s(y)`` (Theorem 1 of paper 002: the posterior under
      the current prior), computed in log space and normalised with ``logsumexp``;
    * M-step: ``p^(k+1)(y) = (1/N) sum_i q_i(y)``;

    until ``max_y |p^(k+1)(y) - p^(k)(y)| < tol``. Each step does not decrease the likelihood of the
    target sample under the label-shift model, so EM converges to a (the, when the posteriors are
    not degenerate) maximum-likelihood prior. It is as good as the calibration of ``probs``.

    Args:
        probs: ``(N, C)`` source posteriors, rows summing to 1 (e.g. ``softmax(logits)``).
        source_prior: ``(C,)`` the prior ``probs`` are calibrated to; every entry > 0.
        tol: convergence tolerance on the largest change of a prior entry.
        max_iter: iteration cap; reaching it warns and returns ``converged = False``.

    Returns:
        :class:`PriorEstimate` with ``method = "em"``.
    """
    p = _check_probs(probs)
    n, c = p.shape
    log_ps = np.log(validate_prior(source_prior, c, "source prior", allow_zero=False))
    if not (np.isfinite(tol) and tol > 0):
        raise LongtailError(f"em: tol = {tol!r} must be a positive number")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise LongtailError(f"em: max_iter = {max_iter!r} must be a positive integer")
    with np.errstate(divide="ignore"):  # log 0 = -inf: a class no posterior gives any mass
        log_post = np.log(p)
    prior = np.exp(log_ps)
    log_ratio = np.zeros(c)  # log p^(k) - log p_s, 0 at k = 0
    for k in range(1, int(max_iter) + 1):
        a = log_post + log_ratio
        top = a.max(axis=1, keepdims=True)  # finite: each row has a positive posterior times a positive ratio
        q = np.exp(a - top)
        q /= q.sum(axis=1, keepdims=True)  # >= 1 after the max-shift
        new = q.mean(axis=0)
        new /= new.sum()  # rounding only
        change = float(np.abs(new - prior).max())
        prior = new
        with np.errstate(divide="ignore"):  # an entry that reached 0 stays 0 (log 0 = -inf)
            log_ratio = np.log(prior) - log_ps
        if change < tol:
            return PriorEstimate(prior, "em", k, True)
    warnings.warn(f"em: no convergence within {max_iter} iterations (last change {change:.3g} >= tol {tol:g})",
                  stacklevel=2)
    return PriorEstimate(prior, "em", int(max_iter), False)


def bbse_prior(
    val_pred: np.ndarray,
    val_labels: np.ndarray,
    target_pred: np.ndarray,
    num_classes: int,
) -> PriorEstimate:
    """Black-box shift estimation (Lipton et al., ICML 2018, Sec. 4-5).

    From hard predictions only:

    * ``C_hat[i, j] = P(pred = i, y = j)``, the joint confusion matrix on the labelled split (val);
    * ``mu_hat[i] = P(pred = i)`` on the unlabelled target split;
    * under label shift ``mu = C w`` with ``w(y) = p_t(y) / q(y)``, where ``q`` is the label
      distribution **of the labelled split** (``q(j) = sum_i C_hat[i, j]``), so
      ``w = solve(C_hat, mu_hat)``: least squares (``numpy.linalg.lstsq``), which is the exact solve
      when ``C_hat`` is invertible and the minimum-norm least-squares solution when it is singular
      (a class never predicted, or two classes confused alike);
    * ``w`` clipped at 0 (a negative weight is estimation noise), ``p_t = w * q`` renormalised.

    ``q`` is the val split's label distribution, not the train prior: Lipton et al.'s source
    distribution is the one the confusion matrix is measured on. The two coincide when val is drawn
    like train; on a balanced val split ``q`` is uniform.

    Args:
        val_pred, val_labels: ``(M,)`` predicted and true classes on the labelled split.
        target_pred: ``(N,)`` predicted classes on the unlabelled target split.
        num_classes: ``C``.

    Returns:
        :class:`PriorEstimate` with ``method = "bbse"``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise LongtailError(f"bbse: num_classes = {num_classes!r} must be a positive integer")
    c = int(num_classes)

    def check(arr, what, n=None):
        a = np.asarray(arr)
        if a.ndim != 1 or a.size == 0 or (n is not None and a.size != n):
            raise LongtailError(f"bbse: {what} must be a non-empty 1-D array" + (f" of length {n}" if n else ""))
        if a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= c:
            raise LongtailError(f"bbse: {what} must be class indices in [0, {c})")
        return a.astype(np.int64)

    vp = check(val_pred, "val predictions")
    vl = check(val_labels, "val labels", vp.size)
    tp = check(target_pred, "target predictions")
    joint = np.bincount(vp * c + vl, minlength=c * c).reshape(c, c).astype(np.float64) / vp.size  # M >= 1
    q = joint.sum(axis=0)  # the labelled split's label distribution
    mu = np.bincount(tp, minlength=c).astype(np.float64) / tp.size  # N >= 1
    w = np.linalg.lstsq(joint, mu, rcond=None)[0]
    w = np.clip(w, 0.0, None)
    p = w * q
    total = p.sum()
    if not total > 0:  # guards the division: every class weighted 0 (a degenerate confusion matrix)
        raise LongtailError("bbse: every estimated class weight is 0; the val confusion matrix is degenerate")
    return PriorEstimate(p / total, "bbse", 0, True)


def estimate_target_prior(
    method: Method,
    target_features: np.ndarray,
    *,
    how: str = "em",
    val: FeatureSet | None = None,
    tol: float = EM_TOL,
    max_iter: int = EM_MAX_ITER,
) -> PriorEstimate:
    """Estimate the label prior of unlabelled ``target_features`` ``(N, D)`` with a fitted method.

    ``how = "em"``: :func:`em_prior` on ``softmax(method.logits(target))`` with the prior those logits
    carry (:func:`~stages.calibrate.logit_prior`: the train prior for ``ce``, uniform for
    ``balanced-softmax`` or ``lade``). ``how = "bbse"``: :func:`bbse_prior` with the method's argmax
    predictions and the labelled ``val`` split (required). A target of another feature dimension than
    the method's raises :class:`LongtailError` (from :meth:`Method.logits`).
    """
    if how not in ESTIMATORS:
        raise LongtailError(f"prior estimation: unknown method {how!r} (known: {', '.join(ESTIMATORS)})")
    logits = method.logits(target_features)
    if how == "em":
        return em_prior(softmax(logits), logit_prior(method), tol=tol, max_iter=max_iter)
    if val is None:
        raise LongtailError("prior estimation: bbse needs a labelled val split for its confusion matrix")
    return bbse_prior(method.predict(val.features), val.require_labels(), logits.argmax(axis=1),
                      method.num_classes_)
