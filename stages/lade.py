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

Both are constructor parameters; choose them on val for a new data set, as the paper does. (They
were chosen when heads trained by 30 SGD epochs; ``lade`` now trains by full-batch L-BFGS to
convergence, where its logits are larger, and they were not chosen again.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from longtail.stages.base import FitContext
from longtail.stages.calibrate import as_prior, validate_prior
from longtail.stages.heads import BATCH_SIZE, EPOCHS, LR, MAX_ITER, WEIGHT_DECAY, TrainedHead
from longtail.stages.losses.lade import lade_loss
from longtail.stages.train.data import TrainData
from longtail.stages.train.objective import LossObjective, Objective

#: default LADER weight alpha (eq. 20) and Donsker-Varadhan regulariser lambda (eq. 9, 15): see the module docstring
ALPHA = 0.1
LAMBDA = 0.1


class LADEHead(TrainedHead):
    """Linear classifier trained with LADE (eq. 18-20); target prior injected at inference (eq. 17).

    Args:
        alpha: weight of LADER in eq. 20 (``alpha = 0`` is Balanced Softmax).
        lam: the regularised Donsker-Varadhan weight ``lambda`` of eq. 9 and 15.
        target_prior: ``C`` probabilities, the test-time label prior of eq. 17; ``None`` is uniform.
        epochs, lr, batch_size, weight_decay, seed, device: the shared head trainer's.
    """

    name = "lade"
    auto_solver = "lbfgs"

    def __init__(self, *, alpha: float = ALPHA, lam: float = LAMBDA, target_prior: Sequence[float] | None = None,
                 epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, solver: str = "auto", max_iter: int = MAX_ITER,
                 min_steps: int = 0, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         solver=solver, max_iter=max_iter, min_steps=min_steps, seed=seed, device=device)
        self.alpha = alpha
        self.lam = lam
        self.target_prior = target_prior

    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        self._check("alpha", self.alpha, low=0)
        self._check("lam", self.lam, low=0)
        if self.target_prior is not None:  # a bad target prior fails before the training
            validate_prior(self.target_prior, num_classes, f"method {self.name!r}: target_prior")

    def objective(self, ctx: FitContext) -> Objective:
        counts = torch.as_tensor(ctx.class_counts, dtype=torch.float64, device=ctx.device)  # > 0: checked in _fit
        return LossObjective(lade_loss, class_counts=counts, alpha=float(self.alpha), lam=float(self.lam))

    def _train(self, data: TrainData, generator: torch.Generator, ctx: FitContext) -> None:
        # validated by _check_params before the fit; uniform (num_classes >= 1) when not given
        self.target_prior_ = (np.full(ctx.num_classes, 1.0 / ctx.num_classes) if self.target_prior is None
                              else as_prior(self.target_prior))
        super()._train(data, generator, ctx)

    def scores(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Eq. 17: ``f(x) + log p_t - log p_u``, the shift computed in float64."""
        with np.errstate(divide="ignore"):  # log 0 = -inf: a class the target prior excludes
            shift = np.log(self.target_prior_) + np.log(self.num_classes_)
        return module(x) + torch.as_tensor(shift, device=x.device).to(x.dtype)

    def logit_prior(self) -> np.ndarray:
        """The label prior the logits carry (eq. 17): ``target_prior``, uniform by default."""
        self._check_fitted()
        return np.asarray(self.target_prior_, dtype=np.float64)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {"target_prior": torch.as_tensor(self.target_prior_, dtype=torch.float64)}

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.target_prior_ = state["target_prior"].numpy().astype(np.float64)  # KeyError: _load_state
