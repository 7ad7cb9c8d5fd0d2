"""Bias-corrected temperature scaling (BCTS; Alexandari, Kundaje & Shrikumar, ICML 2020).

EM's prior estimate (Saerens et al. 2002, :func:`stages.priors.em_prior`) is as good as the
calibration of the posteriors it re-weights. Alexandari et al. show that maximum likelihood with a
calibration that has **class-wise bias terms** is hard to beat at label-shift adaptation, and that
plain temperature scaling is not enough: a head trained on a long-tailed split is miscalibrated
class by class, not only in sharpness. BCTS fits, on a labelled held-out split (val, never test),

    q(y | x) = softmax(z(x) / T + b)[y]                                    (BCTS)

with one temperature ``T > 0`` and a bias ``b`` per class, by the mean negative log-likelihood.
The NLL is convex in ``(1/T, b)`` (a linear function of them inside a log-sum-exp), so Newton's
method with a backtracking line search finds the optimum; the bias is defined up to a constant,
which :func:`fit_bcts` fixes at ``sum(b) = 0``.

**Which prior do calibrated posteriors carry?** Not the train prior: ``q`` is calibrated to the
split it was fitted on. The stationarity condition of the bias, ``mean_val q(. | x) = mean_val
onehot(y)``, makes the mean calibrated posterior on val equal the val label frequencies: that mean
is the source prior EM must start from (Alexandari et al. take the source prior as the average of
the calibrated predictions on the held-out split, for this reason). :func:`calibrated_prior`
is it; ``+bcts`` answers it as its logit prior, so ``+pc`` and the label-shift protocols compensate
from it.

A class with no val sample would drive its bias to minus infinity: a weak ridge ``RIDGE * |b|^2 / 2``
keeps it finite (and negligible when every class has val samples).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from longtail.stages.base import FitContext, Wrapper
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import softmax

#: ``1/T`` stays in ``[1/BOUND, BOUND]``, as for temperature scaling
BOUND = 100.0
#: weak L2 penalty on the bias (keeps the bias of a class without val samples finite)
RIDGE = 1e-6
#: Newton stops when the gradient's largest entry is below this
GRAD_TOL = 1e-9


def _objective(z: np.ndarray, onehot: np.ndarray, a: float, b: np.ndarray):
    """Mean NLL of ``softmax(a z + b)`` plus the ridge and the gauge term ``(sum b)^2 / 2``, its
    gradient ``(C + 1,)`` and Hessian ``(C + 1, C + 1)`` in ``(a, b)`` (float64)."""
    n, c = z.shape
    s = a * z + b
    top = s.max(axis=1, keepdims=True)
    e = np.exp(s - top)
    tot = e.sum(axis=1, keepdims=True)  # >= 1 after the max-shift
    p = e / tot
    ez = (p * z).sum(axis=1)  # E_p[z_i]
    nll = float(np.mean(top[:, 0] + np.log(tot[:, 0]) - (onehot * s).sum(axis=1)))
    nll += 0.5 * RIDGE * float(b @ b) + 0.5 * float(b.sum()) ** 2
    grad = np.empty(c + 1)
    grad[0] = np.mean(ez - (onehot * z).sum(axis=1))
    grad[1:] = p.mean(axis=0) - onehot.mean(axis=0) + RIDGE * b + b.sum()
    hess = np.empty((c + 1, c + 1))
    hess[0, 0] = np.mean((p * z * z).sum(axis=1) - ez * ez)
    hess[0, 1:] = hess[1:, 0] = np.mean(p * z - p * ez[:, None], axis=0)
    hess[1:, 1:] = np.diag(p.mean(axis=0)) - (p.T @ p) / n + RIDGE * np.eye(c) + 1.0
    return nll, grad, hess


def fit_bcts(logits: np.ndarray, labels: np.ndarray, *, max_iter: int = 100) -> tuple[float, np.ndarray]:
    """``(T, b)`` minimising the mean NLL of ``softmax(logits / T + b)`` on a labelled split.

    Damped Newton from ``(T, b) = (1, 0)`` (the base as it is), each step halved until the objective
    does not increase and ``1/T`` stays in ``[1/BOUND, BOUND]``, until the largest gradient entry is
    below :data:`GRAD_TOL`. ``b`` sums to 0.

    Args:
        logits: ``(N, C)`` finite logits of the labelled split (val).
        labels: ``(N,)`` class indices.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or not np.isfinite(z).all():
        raise LongtailError(f"bias-corrected temperature scaling: expected finite (N, C) logits with N >= 1, "
                            f"got shape {z.shape}")
    y = np.asarray(labels)
    n, c = z.shape
    if y.shape != (n,) or y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= c:
        raise LongtailError(f"bias-corrected temperature scaling: expected ({n},) labels in [0, {c})")
    onehot = np.zeros((n, c))
    onehot[np.arange(n), y] = 1.0
    a, b = 1.0, np.zeros(c)
    f, g, h = _objective(z, onehot, a, b)
    for _ in range(max_iter):
        if np.abs(g).max() < GRAD_TOL:
            break
        try:
            step = -np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            step = -g
        t = 1.0
        while t > 1e-12:
            a_new = a + t * step[0]
            if 1.0 / BOUND <= a_new <= BOUND:
                f_new, g_new, h_new = _objective(z, onehot, a_new, b + t * step[1:])
                if f_new <= f + 1e-14 * abs(f):
                    break
            t *= 0.5
        else:
            break  # no descent left at float64 resolution
        a, b = a_new, b + t * step[1:]
        f, g, h = f_new, g_new, h_new
    else:
        warnings.warn(f"bias-corrected temperature scaling: no convergence in {max_iter} Newton steps "
                      f"(largest gradient entry {np.abs(g).max():.3g})", stacklevel=2)
    return float(1.0 / a), b - b.mean()


def bcts_logits(logits: np.ndarray, temperature: float, bias: np.ndarray) -> np.ndarray:
    """``logits / T + b`` in float64."""
    return np.asarray(logits, dtype=np.float64) / temperature + np.asarray(bias, dtype=np.float64)


def calibrated_prior(logits: np.ndarray, temperature: float, bias: np.ndarray) -> np.ndarray:
    """The mean calibrated posterior ``(C,)`` over a split's ``logits``: the prior the calibrated
    posteriors carry, when ``logits`` are those of the split BCTS was fitted on (see the module)."""
    prior = softmax(bcts_logits(logits, temperature, bias)).mean(axis=0)
    return prior / prior.sum()


class BiasCorrectedTemperatureScaling(Wrapper):
    """BCTS (``<method>+bcts``): the base's logits divided by a temperature and shifted by a bias per
    class, both fitted on the **val** split by NLL (:func:`fit_bcts`; Alexandari et al. 2020).

    Unlike ``+ts`` it can change the argmax (the bias moves the decision boundaries toward the val
    split's label distribution). Its logits carry :func:`calibrated_prior` on val, the val label
    frequencies up to the ridge, which is what a following ``+pc`` removes. ``fit`` without a val
    split is an error before the base is fitted.
    """

    name = "bcts"
    kind = "suffix"
    needs_full_split = False  # the own fit uses the val split only (see Method.needs_full_split)

    def _validate(self, ctx: FitContext) -> None:
        if ctx.val is None:
            raise LongtailError(
                f"method {self.base.name}+{self.name}: bias-corrected temperature scaling is fitted on the "
                "val split, and there is none (give the store a val split)"
            )

    def _fit(self, train: FeatureSet, val: FeatureSet | None, ctx: FitContext) -> None:
        z = self.base.logits(val.features)
        self.temperature_, self.bias_ = fit_bcts(z, val.require_labels())
        self.prior_ = calibrated_prior(z, self.temperature_, self.bias_)

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return bcts_logits(logits, self.temperature_, self.bias_).astype(np.float32)

    def logit_prior(self) -> np.ndarray:
        """The mean calibrated val posterior (the val label frequencies up to the ridge)."""
        self._check_fitted()
        return np.asarray(self.prior_, dtype=np.float64)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"temperature": torch.tensor(self.temperature_, dtype=torch.float64),
                "bias": torch.as_tensor(self.bias_, dtype=torch.float64),
                "prior": torch.as_tensor(self.prior_, dtype=torch.float64)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self.temperature_ = float(state["temperature"])
            self.bias_ = state["bias"].numpy().astype(np.float64)
            self.prior_ = state["prior"].numpy().astype(np.float64)
        except KeyError as exc:
            raise LongtailError(f"method +{self.name}: the saved state has no {exc.args[0]}") from exc
