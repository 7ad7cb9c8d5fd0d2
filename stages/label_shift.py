"""Label-shift protocols on cached logits: shifted test sets and deployment-prior estimation.

For one fitted method, given its test logits and the prior its logits carry, every shifted test set
of paper 002 Sec. 4.3 (:func:`stages.shift.shifted_subsets`) is scored four ways:

* ``accuracy``: the method as it is;
* ``accuracy_true_prior``: PC-Softmax (eq. 4, Theorem 1) to the subset's true label prior;
* ``accuracy_em`` / ``accuracy_bbse``: PC-Softmax to the prior estimated from the subset's own
  (unlabelled) logits, by EM (Saerens et al. 2002) or by BBSE (Lipton et al. 2018, confusion matrix
  from the labelled val split);
* ``accuracy_em_bcts``: EM on posteriors first calibrated by bias-corrected temperature scaling on
  the val split (:mod:`stages.bcts`, Alexandari et al. 2020), started from the prior those
  calibrated posteriors carry (their mean on val), and PC-Softmax of the calibrated logits to it;

and the estimation error of each estimate is its total-variation distance to the true prior,
``0.5 * sum_y |p_hat(y) - p_t(y)|`` (0 = exact, 1 = disjoint supports).
"""

from __future__ import annotations

import warnings

import numpy as np

from longtail.stages.bcts import bcts_logits, calibrated_prior, fit_bcts
from longtail.stages.calibrate import post_compensate
from longtail.stages.evaluate import accuracy, softmax
from longtail.stages.priors import bbse_prior, em_prior
from longtail.stages.shift import RATIOS, shifted_subsets


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """``0.5 * ||p - q||_1`` of two distributions ``(C,)``."""
    return float(0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def positive_prior(prior: np.ndarray) -> np.ndarray:
    """A prior with its zero entries raised to 1e-12, renormalised: log 0 would make a class
    unreachable, and an estimated 0 is estimation noise."""
    p = np.maximum(np.asarray(prior, np.float64), 1e-12)
    return p / p.sum()  # the sum is >= C * 1e-12 > 0


class BCTSCalibration:
    """BCTS fitted once on a method's val logits (:func:`stages.bcts.fit_bcts`), applied to any
    logits of that method: the calibrated logits and the prior they carry."""

    def __init__(self, val_logits: np.ndarray, val_labels: np.ndarray):
        self.temperature, self.bias = fit_bcts(val_logits, val_labels)
        self.prior = calibrated_prior(val_logits, self.temperature, self.bias)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return bcts_logits(logits, self.temperature, self.bias)


def _em(logits: np.ndarray, logit_prior: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # a non-converged EM still returns its last (usable) iterate
        warnings.simplefilter("ignore")
        return em_prior(softmax(logits), logit_prior).prior


def estimate_prior(how: str, logits: np.ndarray, logit_prior: np.ndarray,
                   val_logits: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                   calibration: BCTSCalibration | None = None) -> np.ndarray:
    """Target prior ``(C,)`` from unlabelled ``logits`` ``(N, C)`` by ``"em"`` or ``"bbse"``.

    With ``calibration`` (BCTS fitted on val), EM runs on the calibrated posteriors from the prior
    they carry; BBSE uses hard predictions, which need no calibration."""
    if how == "em":
        if calibration is not None:
            return _em(calibration(logits), calibration.prior)
        return _em(logits, logit_prior)
    if val_logits is None or val_labels is None:
        raise ValueError("bbse needs the labelled val split's logits and labels")
    return bbse_prior(val_logits.argmax(axis=1), val_labels, logits.argmax(axis=1), logits.shape[1]).prior


def shifted_evaluation(
    logits: np.ndarray,
    labels: np.ndarray,
    class_counts: np.ndarray,
    logit_prior: np.ndarray,
    *,
    val_logits: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    ratios=RATIOS,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Scores of one method on every shifted test set.

    Args:
        logits: ``(N, C)`` test logits of a balanced test split; labels ``(N,)``.
        class_counts: ``(C,)`` train counts (they order the classes, head first).
        logit_prior: ``(C,)`` the prior the logits carry (:func:`stages.calibrate.logit_prior`).
        val_logits, val_labels: the labelled val split, for BCTS and BBSE (skipped when absent).

    Returns:
        ``{subset name: {"ratio", "accuracy", "accuracy_true_prior", "accuracy_em", "em_error",
        ["accuracy_em_bcts", "em_bcts_error", "accuracy_bbse", "bbse_error"]}}`` in Table 6's column
        order (the bracketed ones with a val split).
    """
    out: dict[str, dict[str, float]] = {}
    bcts = BCTSCalibration(val_logits, val_labels) if val_logits is not None and val_labels is not None else None
    for s in shifted_subsets(labels, class_counts, ratios=ratios, seed=seed):
        z, y = logits[s.indices], labels[s.indices]
        row = {"direction": s.direction, "ratio": float(s.ratio), "n": int(s.indices.size),
               "accuracy": accuracy(z, y),
               "accuracy_true_prior": accuracy(post_compensate(z, logit_prior, s.prior), y)}
        em = estimate_prior("em", z, logit_prior)
        row["accuracy_em"] = accuracy(post_compensate(z, logit_prior, positive_prior(em)), y)
        row["em_error"] = total_variation(em, s.prior)
        if bcts is not None:
            em_c = estimate_prior("em", z, logit_prior, calibration=bcts)
            row["accuracy_em_bcts"] = accuracy(post_compensate(bcts(z), bcts.prior, positive_prior(em_c)), y)
            row["em_bcts_error"] = total_variation(em_c, s.prior)
            bb = estimate_prior("bbse", z, logit_prior, val_logits, val_labels)
            row["accuracy_bbse"] = accuracy(post_compensate(z, logit_prior, positive_prior(bb)), y)
            row["bbse_error"] = total_variation(bb, s.prior)
        out[s.name] = row
    return out
