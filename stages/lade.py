"""The ``lade`` head: a linear classifier trained with the LADE loss (paper 002, Hong et al., CVPR 2021).

Training (eq. 20): cross-entropy with the source prior injected into the softmax (LADE-CE, eq. 18)
plus ``alpha`` times the regulariser LADER (eq. 15-16, per-class weights ``alpha_c = p_s(c)``,
regularised Donsker-Varadhan weight ``lam``), so that the raw logits estimate
``log p_u(x|y) / p_u(x)`` (eq. 8), free of the source prior. Inference (eq. 17): the target prior is
injected into the softmax, ``p_t(y|x) ∝ p_t(y) e^{f(x)[y]}``. The logits returned are
``f(x) + log p_t - log p_u`` (``p_u`` uniform), so ``target_prior = None`` (uniform) gives the raw
regularised logits ``f(x)`` unchanged, whose positive-class values approach ``log C`` (eq. 21); a
constant per row changes no softmax.

Defaults. Table 7 of the paper uses ``alpha`` in 0.005..0.1 and ``lam`` in 0.01..0.5, chosen per data
set by grid search on val. Stage 2 trains a linear head on fixed features for tens of epochs, not a
ResNet for hundreds, so its logits are smaller and a weak regulariser barely moves them: on
``digits-lt`` (raw 64-pixel features, three data seeds, two training seeds, scored on the **val**
split and its shifted subsets with ratios 20..1), ``alpha = lam = 0.01`` (CIFAR-100-LT's row) stayed
within 0.2 points of Balanced Softmax (87.8% vs 87.6% mean accuracy), while ``alpha = 0.1, lam = 0.1``
reached 90.8%, within 0.7 points of the best of the grid ``{0.01, 0.1, 0.5}^2`` and with a lower
val NLL than Balanced Softmax (0.39 vs 0.44). Hence ``alpha = 0.1`` (Table 7's CIFAR-100-LT IB 100
row) and ``lam = 0.1`` (its Places-LT row): the strong end of ``alpha``, the middle of ``lam``.

Both are constructor parameters; choose them on val for a new data set, as the paper does.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from longtail.stages.base import register
from longtail.stages.calibrate import validate_prior
from longtail.stages.data import FeatureSet
from longtail.stages.heads import BATCH_SIZE, EPOCHS, LR, WEIGHT_DECAY, _check_number, _Head
from longtail.stages.losses.lade import lade_loss

#: default LADER weight alpha (eq. 20) and Donsker-Varadhan regulariser lambda (eq. 9, 15): see the module docstring
ALPHA = 0.1
LAMBDA = 0.1


@register("lade")
class LADEHead(_Head):
    """Linear classifier trained with LADE (eq. 18-20); target prior injected at inference (eq. 17).

    Args:
        alpha: weight of LADER in eq. 20 (``alpha = 0`` is Balanced Softmax).
        lam: the regularised Donsker-Varadhan weight ``lambda`` of eq. 9 and 15.
        target_prior: ``C`` probabilities, the test-time label prior of eq. 17; ``None`` is uniform.
        epochs, lr, batch_size, weight_decay, seed, device: the shared head trainer's.
    """

    def __init__(self, *, alpha: float = ALPHA, lam: float = LAMBDA, target_prior: Sequence[float] | None = None,
                 epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.alpha = alpha
        self.lam = lam
        self.target_prior = target_prior

    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "LADEHead":
        if isinstance(train, FeatureSet):  # Method.fit raises the TypeError otherwise
            train.check_train()  # the same message as every method for a class without a sample
            self._target(train.num_classes)  # a bad target prior fails before the training
        return super().fit(train, val)

    def check_params(self, num_classes: int) -> None:
        super().check_params(num_classes)
        self._target(num_classes)

    def _check_own_params(self) -> None:
        _check_number(self.name, "alpha", self.alpha, low=0)
        _check_number(self.name, "lam", self.lam, low=0)

    def _target(self, num_classes: int) -> np.ndarray:
        if self.target_prior is None:
            return np.full(num_classes, 1.0 / num_classes)  # num_classes >= 1 (FeatureSet)
        return validate_prior(self.target_prior, num_classes, f"method {self.name!r}: target_prior")

    def _loss_fn(self, class_counts, device):
        counts = torch.as_tensor(class_counts, dtype=torch.float64, device=device)  # validated in _fit
        alpha, lam = float(self.alpha), float(self.lam)
        return lambda z, y, epoch: lade_loss(z, y, counts, alpha=alpha, lam=lam)

    def _train(self, x, y, class_counts, generator, val) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fit() has already warned about a renormalised target
            self.target_prior_ = self._target(self.num_classes_)
        super()._train(x, y, class_counts, generator, val)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 17: ``f(x) + log p_t - log p_u``, the shift computed in float64."""
        with np.errstate(divide="ignore"):  # log 0 = -inf: a class the target prior excludes
            shift = np.log(self.target_prior_) + np.log(self.num_classes_)
        return self.module_(x) + torch.as_tensor(shift, device=x.device).to(x.dtype)

    def logit_prior(self) -> np.ndarray:
        """The label prior the logits carry (eq. 17): ``target_prior``, uniform by default."""
        self._check_fitted()
        return np.asarray(self.target_prior_, dtype=np.float64)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {"target_prior": torch.as_tensor(self.target_prior_, dtype=torch.float64)}

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.target_prior_ = state["target_prior"].numpy().astype(np.float64)  # KeyError: _load_state
