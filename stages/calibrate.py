"""Post-hoc label-prior calibration: PC-Softmax (paper 002, Hong et al., CVPR 2021, Sec. 3.2).

A model trained with softmax cross-entropy on a long-tailed train split estimates the source
posterior ``p_s(y|x)``, entangled with the source prior ``p_s(y)``. Under label shift
(``p_s(x|y) = p_t(x|y)``), Theorem 1 (eq. 5-7) gives the target posterior by swapping the prior in
log space, the post-compensation of Definition 3.1 (eq. 4):

    f^PC(x)[y] = f(x)[y] - log p_s(y) + log p_t(y)

:func:`post_compensate` is that formula, reusable by other wrappers; :func:`validate_prior` is the
one place that checks a user-given prior; :class:`PostCompensatedSoftmax` (``+pc``) wraps a method.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from stages.base import Method, Wrapper, register
from stages.data import FeatureSet
from stages.errors import LongtailError

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


@register("pc", kind="suffix")
class PostCompensatedSoftmax(Wrapper):
    """PC-Softmax (``<method>+pc``): the base's logits post-compensated to ``target_prior``.

    ``p_s`` is the base's train prior (``base.source_prior_``), ``target_prior`` a list of ``C``
    probabilities or ``None`` for uniform (balanced evaluation). ``fit`` fits the base unless it is
    already fitted (:meth:`Wrapper.fit`); the priors are checked first, so a bad ``target_prior``
    fails before minutes of fitting. Exact (Theorem 1) for a base whose softmax estimates
    ``p_s(y|x)`` (``ce`` and the other heads trained on the source distribution); a base that already
    removes the prior (``balanced-softmax``, ``logit-adjust``) would be compensated twice.
    """

    def __init__(self, base: Method, target_prior: Sequence[float] | None = None):
        super().__init__(base)
        self.target_prior = target_prior

    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "PostCompensatedSoftmax":
        if isinstance(train, FeatureSet):  # Method.fit raises the TypeError otherwise
            train.check_train()  # the same message as every method for a class without a sample
            self._target(train.num_classes)
            validate_prior(train.prior, train.num_classes, f"{train.source or 'features'}: train prior",
                           allow_zero=False)
        return super().fit(train, val)

    def _target(self, num_classes: int) -> np.ndarray:
        if self.target_prior is None:
            return np.full(num_classes, 1.0 / num_classes)  # num_classes >= 1 (FeatureSet)
        return validate_prior(self.target_prior, num_classes, f"method {self.base.name}+{self.name}: target_prior")

    def _fit(self, train: FeatureSet, val: FeatureSet | None) -> None:
        # a base fitted elsewhere (a cached artifact) must also have a usable prior
        validate_prior(self.base.source_prior_, self.base.num_classes_, f"method {self.base.name}: source prior",
                       allow_zero=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fit() has already warned about a renormalised target
            self.target_prior_ = self._target(train.num_classes)

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return post_compensate(logits, self.base.source_prior_, self.target_prior_)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"target_prior": torch.as_tensor(self.target_prior_, dtype=torch.float64)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self.target_prior_ = state["target_prior"].numpy().astype(np.float64)
        except KeyError as exc:
            raise LongtailError(f"method +{self.name}: the saved state has no target_prior") from exc
