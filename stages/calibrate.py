"""Post-hoc label-prior calibration: PC-Softmax (paper 002, Hong et al., CVPR 2021, Sec. 3.2).

A model trained with softmax cross-entropy on a long-tailed train split estimates the source
posterior ``p_s(y|x)``, entangled with the source prior ``p_s(y)``. Under label shift
(``p_s(x|y) = p_t(x|y)``), Theorem 1 (eq. 5-7) gives the target posterior by swapping the prior in
log space, the post-compensation of Definition 3.1 (eq. 4):

    f^PC(x)[y] = f(x)[y] - log p_s(y) + log p_t(y)

:func:`post_compensate` is that formula, reusable by other wrappers; :func:`validate_prior` is the
one place that checks a user-given prior; :class:`PostCompensatedSoftmax` (``+pc``) wraps a method.

Which prior do a method's logits carry? Not always the train prior: Balanced Softmax, logit
adjustment with ``tau = 1``, class-balanced re-training and LADE produce logits whose softmax is
already the balanced posterior. :func:`logit_prior` asks the method (its ``logit_prior()``, see
:mod:`stages.heads`) and falls back to the train prior, so ``+pc`` subtracts the prior that is really
there (paper 002, Sec. 4.3: ``log p_t - log p_u`` for Balanced Softmax) and never compensates twice.

:class:`TemperatureScaling` (``+ts``) is the post-hoc calibration baseline of Guo et al. (ICML
2017): one temperature fitted on the val split by negative log-likelihood.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from longtail.stages.base import FitContext, Method, Wrapper
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError

#: a prior whose sum is off by at most this much is renormalised with a warning
RENORMALISE_TOLERANCE = 1e-6
#: ... and silently below this (floating-point rounding of a sum of C floats)
ROUNDING_TOLERANCE = 1e-9


def validate_prior(
    prior: Sequence[float] | np.ndarray | torch.Tensor,
    num_classes: int,
    what: str,
    *,
    allow_zero: bool = True,
) -> np.ndarray:
    """Check a label prior and return it as float64 ``(C,)``, summing to 1.

    Raises :class:`LongtailError` (naming ``what`` and the offending value) when the prior is not a
    1-D sequence of ``num_classes`` finite numbers, has a negative entry, has a zero entry while
    ``allow_zero`` is false (a prior whose log is taken on the denominator side), or does not sum
    to 1. A sum within ``1e-6`` of 1 is renormalised, with a ``warnings.warn`` when it is off by
    more than floating-point rounding.
    """
    if isinstance(prior, torch.Tensor):
        prior = prior.detach().cpu().numpy()
    try:
        p = np.asarray(prior, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LongtailError(f"{what}: expected a list of {num_classes} numbers, got {prior!r}") from exc
    if p.ndim != 1:
        raise LongtailError(f"{what}: expected a flat list of {num_classes} numbers, got shape {p.shape}")
    if p.size != num_classes:
        raise LongtailError(f"{what}: has {p.size} entries, expected {num_classes} (one per class)")
    bad = np.flatnonzero(~np.isfinite(p))
    if bad.size:
        raise LongtailError(f"{what}[{int(bad[0])}] = {p[bad[0]]} is not a finite number")
    bad = np.flatnonzero(p < 0)
    if bad.size:
        raise LongtailError(f"{what}[{int(bad[0])}] = {p[bad[0]]:g} is negative (a prior is a probability)")
    if not allow_zero:
        bad = np.flatnonzero(p == 0)
        if bad.size:
            raise LongtailError(
                f"{what}[{int(bad[0])}] = 0: log 0 is undefined (a class with no train sample cannot be "
                "post-compensated)"
            )
    total = float(p.sum())
    if abs(total - 1.0) > RENORMALISE_TOLERANCE:
        raise LongtailError(f"{what} sums to {total:.9g}, not 1 (values: {p.tolist()})")
    if abs(total - 1.0) > ROUNDING_TOLERANCE:
        warnings.warn(f"{what} sums to {total:.9g}; renormalised to 1", stacklevel=2)
    return p / total  # guarded: |total - 1| <= 1e-6 here, so total > 0


def as_prior(prior: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """A prior that :func:`validate_prior` has accepted, as float64 ``(C,)`` normalised to sum to 1,
    exactly as :func:`validate_prior` returns it (without checking, or warning, again)."""
    if isinstance(prior, torch.Tensor):
        prior = prior.detach().cpu().numpy()
    p = np.asarray(prior, dtype=np.float64)
    return p / float(p.sum())  # guarded: validated, so the sum is within 1e-6 of 1


def prior_from_log(log_prior: np.ndarray) -> np.ndarray:
    """``exp(log_prior)`` normalised to sum to 1, float64 ``(C,)``: a prior known up to a constant
    in log space (``(1 - tau) log p_s``, ``log p / T``, ...). ``log_prior`` has a finite entry."""
    log_p = np.asarray(log_prior, dtype=np.float64)
    p = np.exp(log_p - log_p.max())  # max-shift before exp; the sum below is then >= 1
    return p / p.sum()


def post_compensate(
    logits: np.ndarray | torch.Tensor,
    source_prior: Sequence[float] | np.ndarray | torch.Tensor,
    target_prior: Sequence[float] | np.ndarray | torch.Tensor | None = None,
) -> np.ndarray | torch.Tensor:
    """Post-compensated logits (paper 002, Definition 3.1, eq. 4; Theorem 1, eq. 5-7).

    ``f^PC(x)[y] = f(x)[y] - log p_s(y) + log p_t(y)``, so that ``softmax(f^PC)`` estimates
    ``p_t(y|x)`` when ``softmax(f)`` estimates ``p_s(y|x)``.

    Args:
        logits: ``(N, C)`` numpy array or tensor.
        source_prior: ``(C,)`` the prior the logits are entangled with; every entry must be > 0.
        target_prior: ``(C,)`` the test-time prior; ``None`` is uniform. A zero entry gives ``-inf``
            logits for that class (its target posterior is exactly 0).

    Returns:
        ``(N, C)`` of the same type, dtype (and device) as ``logits``; the shift is computed in
        float64.
    """
    num_classes = int(logits.shape[-1])
    log_ps = np.log(validate_prior(source_prior, num_classes, "source prior", allow_zero=False))
    if target_prior is None:
        log_pt = np.full(num_classes, -np.log(num_classes))
    else:
        with np.errstate(divide="ignore"):  # log 0 = -inf is the intended value for a zero target entry
            log_pt = np.log(validate_prior(target_prior, num_classes, "target prior"))
    shift = log_pt - log_ps
    if isinstance(logits, torch.Tensor):
        return logits + torch.as_tensor(shift, device=logits.device).to(logits.dtype)
    z = np.asarray(logits)
    return (z.astype(np.float64) + shift).astype(z.dtype)


def logit_prior(method: Method) -> np.ndarray:
    """The label prior ``(C,)`` float64 that a fitted method's logits are calibrated to, checked.

    ``p_s`` of paper 002's eq. 4 ("the distribution which the model logits are entangled with"):
    what :func:`post_compensate` must subtract before it adds a target prior. Every method answers
    through :meth:`~longtail.stages.base.Method.logit_prior` (the train prior by default, as a
    softmax trained on the train split carries, Theorem 1; uniform for ``balanced-softmax``,
    ``logit-adjust`` with ``tau = 1``, ``crt`` and ``lade``; see each head).
    """
    return validate_prior(method.logit_prior(), method.num_classes_, f"method {method.name!r}: logit prior",
                          allow_zero=False)


class PostCompensatedSoftmax(Wrapper):
    """PC-Softmax (``<method>+pc``): the base's logits post-compensated to ``target_prior``.

    ``f^PC = f - log p_s + log p_t`` (eq. 4) where ``p_s`` is the prior the base's logits carry,
    :func:`logit_prior` of the base: the train prior for ``ce`` (Theorem 1), uniform for a base that
    already removed it (``balanced-softmax``, ``logit-adjust`` with ``tau = 1``, ``crt``, ``lade``),
    so that ``balanced-softmax+pc`` adds ``log p_t - log p_u`` as Sec. 4.3 does and never compensates
    twice. ``target_prior`` is a list of ``C`` probabilities or ``None`` for uniform (balanced
    evaluation). ``fit`` refits the base unless it is frozen (:meth:`Method.fit`); the priors are
    checked first, so a bad ``target_prior`` fails before minutes of fitting.
    """

    name = "pc"
    kind = "suffix"
    needs_full_split = False  # the own fit uses the train prior only (see Method.needs_full_split)

    def __init__(self, base: Method, target_prior: Sequence[float] | None = None):
        super().__init__(base)
        self.target_prior = target_prior

    def _owner(self) -> str:
        return f"method {self.base.name}+{self.name}"

    def _check_params(self, num_classes: int) -> None:
        if self.target_prior is not None:
            validate_prior(self.target_prior, num_classes, f"{self._owner()}: target_prior")

    def _validate(self, ctx: FitContext) -> None:
        validate_prior(ctx.source_prior, ctx.num_classes, f"{self._owner()}: train prior", allow_zero=False)

    def _fit(self, train: FeatureSet, val: FeatureSet | None, ctx: FitContext) -> None:
        # a base fitted elsewhere (a frozen, cached artifact) must also have a usable prior
        validate_prior(self.base.source_prior_, self.base.num_classes_, f"method {self.base.name}: source prior",
                       allow_zero=False)
        logit_prior(self.base)
        # validated by _check_params before the fit; uniform (num_classes >= 1) when not given
        self.target_prior_ = (np.full(ctx.num_classes, 1.0 / ctx.num_classes) if self.target_prior is None
                              else as_prior(self.target_prior))

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return post_compensate(logits, logit_prior(self.base), self.target_prior_)

    def logit_prior(self) -> np.ndarray:
        """The compensated logits carry the target prior."""
        self._check_fitted()
        return np.asarray(self.target_prior_, dtype=np.float64)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"target_prior": torch.as_tensor(self.target_prior_, dtype=torch.float64)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self.target_prior_ = state["target_prior"].numpy().astype(np.float64)
        except KeyError as exc:
            raise LongtailError(f"method +{self.name}: the saved state has no target_prior") from exc


# ---------------------------------------------------------------------- temperature scaling
#: the temperature is searched in [1/TEMPERATURE_BOUND, TEMPERATURE_BOUND]
TEMPERATURE_BOUND = 100.0


def _nll_derivatives(z: np.ndarray, z_true: np.ndarray, beta: float) -> tuple[float, float, float]:
    """Mean NLL of ``softmax(beta z)`` and its first two derivatives in ``beta`` (float64).

    ``NLL(beta) = mean_i logsumexp(beta z_i) - beta z_i[y_i]``; ``NLL' = mean_i E_p[z_i] - z_i[y_i]``
    and ``NLL'' = mean_i Var_p[z_i] >= 0`` with ``p = softmax(beta z_i)``: convex in ``beta``.
    """
    a = beta * z
    top = a.max(axis=1, keepdims=True)
    e = np.exp(a - top)
    total = e.sum(axis=1, keepdims=True)  # >= 1 after the max-shift
    p = e / total
    mean = (p * z).sum(axis=1)
    var = np.clip((p * z * z).sum(axis=1) - mean * mean, 0.0, None)  # clip: rounding below 0
    nll = float(np.mean(top[:, 0] + np.log(total[:, 0]) - beta * z_true))
    return nll, float(np.mean(mean - z_true)), float(np.mean(var))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, tol: float = 1e-10,
                    max_iter: int = 100) -> float:
    """The temperature ``T`` minimising the mean NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    A bounded 1-D search in log space: the NLL is convex in ``beta = 1/T``, so its derivative is
    increasing and has one root in ``[1/B, B]`` (``B = TEMPERATURE_BOUND``) or none. Newton steps on
    ``log beta``, kept inside a bracket that shrinks every step (bisection whenever Newton would leave
    it), until the bracket is narrower than ``tol`` or the derivative vanishes. When the NLL still
    falls at a bound (e.g. ``logits`` that separate every sample: the NLL decreases for ever as
    ``T -> 0``), that bound is returned with a warning.

    Args:
        logits: ``(N, C)`` finite logits of the labelled split (val).
        labels: ``(N,)`` class indices.

    Returns:
        ``T > 0`` as a float.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or not np.isfinite(z).all():
        raise LongtailError(f"temperature scaling: expected finite (N, C) logits with N >= 1, got shape {z.shape}")
    y = np.asarray(labels)
    if y.shape != (z.shape[0],) or y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= z.shape[1]:
        raise LongtailError(f"temperature scaling: expected ({z.shape[0]},) labels in [0, {z.shape[1]})")
    z_true = z[np.arange(z.shape[0]), y]
    lo, hi = -np.log(TEMPERATURE_BOUND), np.log(TEMPERATURE_BOUND)  # bracket on u = log beta
    if _nll_derivatives(z, z_true, np.exp(hi))[1] <= 0:
        warnings.warn(f"temperature scaling: the val NLL still decreases at T = 1/{TEMPERATURE_BOUND:g} "
                      "(the base separates the val split); T set to that bound", stacklevel=2)
        return float(1.0 / TEMPERATURE_BOUND)
    if _nll_derivatives(z, z_true, np.exp(lo))[1] >= 0:
        warnings.warn(f"temperature scaling: the val NLL still decreases at T = {TEMPERATURE_BOUND:g}; "
                      "T set to that bound", stacklevel=2)
        return float(TEMPERATURE_BOUND)
    u = 0.0  # T = 1: the base as it is
    for _ in range(max_iter):
        beta = np.exp(u)
        _, grad, hess = _nll_derivatives(z, z_true, beta)
        if grad == 0.0:
            break
        if grad > 0:
            hi = u
        else:
            lo = u
        # Newton on u: d/du = beta NLL', d2/du2 = beta NLL' + beta^2 NLL''
        g_u, h_u = beta * grad, beta * grad + beta * beta * hess
        newton = u - g_u / h_u if h_u > 0 else np.nan  # guards the division: not convex in u here
        new_u = newton if lo < newton < hi else 0.5 * (lo + hi)
        done = abs(new_u - u) < tol or hi - lo < tol
        u = new_u
        if done:
            break
    return float(np.exp(-u))


class TemperatureScaling(Wrapper):
    """Temperature scaling (``<method>+ts``, Guo et al., ICML 2017): the base's logits divided by one
    temperature ``T`` fitted on the **val** split by NLL (:func:`fit_temperature`).

    A post-hoc calibration baseline for paper 002's Sec. 6.5 metrics: ``T > 0`` keeps every argmax,
    so accuracy is unchanged. ``fit`` without a val split is an error (before the base is fitted).
    The logits after scaling carry the base's logit prior to the power ``1/T`` (renormalised), which
    is what a following ``+pc`` removes.
    """

    name = "ts"
    kind = "suffix"
    needs_full_split = False  # the own fit uses the val split only (see Method.needs_full_split)

    def _validate(self, ctx: FitContext) -> None:
        if ctx.val is None:
            raise LongtailError(
                f"method {self.base.name}+{self.name}: temperature scaling is fitted on the val split, "
                "and there is none (give the store a val split)"
            )

    def _fit(self, train: FeatureSet, val: FeatureSet | None, ctx: FitContext) -> None:
        self.temperature_ = fit_temperature(self.base.logits(val.features), val.require_labels())

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return (np.asarray(logits, dtype=np.float64) / self.temperature_).astype(np.float32)  # T > 0

    def logit_prior(self) -> np.ndarray:
        """``p^(1/T)`` renormalised, ``p`` the base's :func:`logit_prior`: the prior term ``log p`` of
        the base's logits, divided by ``T``."""
        self._check_fitted()
        return prior_from_log(np.log(logit_prior(self.base)) / self.temperature_)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"temperature": torch.tensor(self.temperature_, dtype=torch.float64)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self.temperature_ = float(state["temperature"])
        except KeyError as exc:
            raise LongtailError(f"method +{self.name}: the saved state has no temperature") from exc
