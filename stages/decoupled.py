"""The decoupled classifiers of Kang et al. (ICLR 2020, "Decoupling representation and classifier
for long-tailed recognition") on cached features: ``crt``, ``tau-norm`` and ``lws``.

All three are :class:`~longtail.stages.heads.TrainedHead` s: ``crt`` re-trains a fresh classifier
with class-balanced sampling (the class strata are the labels), ``tau-norm`` rescales the trained
class weights after the fit, ``lws`` trains the classifier, then one scale per class with the
classifier frozen (two :func:`~longtail.stages.train.engine.fit_module` calls over different
parameters of one module).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from longtail.stages.base import FitContext
from longtail.stages.data import FeatureSet
from longtail.stages.heads import (
    BATCH_SIZE,
    EPOCHS,
    LR,
    MAX_ITER,
    WEIGHT_DECAY,
    TrainedHead,
    balanced_accuracy,
    head_sampler,
)
from longtail.stages.modules import LinearClassifier, ScaledClassifier
from longtail.stages.train.data import TrainData
from longtail.stages.train.engine import fit_module

#: the grid ``tau-norm`` chooses tau from on val: 0, 0.1, ..., 2
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))
#: candidate powers gamma of the train prior that tau-normalised logits carry
PRIOR_POWERS = tuple(round(0.1 * i, 1) for i in range(11))


class ClassifierRetrainingHead(TrainedHead):
    """Decoupled classifier re-training (cRT, Kang et al., ICLR 2020).

    A freshly initialised linear classifier trained with cross-entropy and class-balanced sampling
    on the fixed features.
    """

    name = "crt"
    auto_solver = "lbfgs"
    sampling = "class"

    def logit_prior(self) -> np.ndarray:
        """Uniform: class-balanced sampling trains the softmax on a uniform label distribution."""
        self._check_fitted()
        return np.full(self.num_classes_, 1.0 / self.num_classes_)


class TauNormHead(TrainedHead):
    """tau-normalised classifier (Kang et al., ICLR 2020, "Decoupling representation and classifier").

    Fits a bias-free linear cross-entropy head (instance-balanced), then rescales each class weight
    vector, ``w_c / ||w_c||^tau``; the bias is dropped, so the head is trained without one and
    ``tau = 0`` is exactly the fitted head. ``tau = None`` chooses tau from ``0, 0.1, ..., 2`` by
    balanced accuracy on the **val** split (ties: the smallest tau), ``tau = 1`` when no val split
    is given. The tau used is stored as ``tau_``.
    """

    name = "tau-norm"
    auto_solver = "lbfgs"

    def __init__(self, *, tau: float | None = None, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, solver: str = "auto", max_iter: int = MAX_ITER,
                 min_steps: int = 0, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         solver=solver, max_iter=max_iter, min_steps=min_steps, seed=seed, device=device)
        self.tau = tau

    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        if self.tau is not None:
            self._check("tau", self.tau, low=0)

    def new_module(self, dim: int, num_classes: int) -> nn.Module:
        return LinearClassifier(dim, num_classes, bias=False)

    def _train(self, data: TrainData, generator: torch.Generator, ctx: FitContext) -> None:
        super()._train(data, generator, ctx)
        val = ctx.val
        self.val_scores_ = None
        if self.tau is not None:
            self.tau_ = float(self.tau)
        elif val is None:
            self.tau_ = 1.0
        else:
            self.tau_ = self._choose_tau(val)
        self.prior_power_ = None if val is None else self._choose_prior_power(val)

    def _choose_tau(self, val: FeatureSet) -> float:
        dev = self.mean_.device
        with torch.inference_mode():
            xv = self._standardise(torch.tensor(val.features, device=dev))
            scores = [balanced_accuracy(self.scores(self.module_, xv, tau).argmax(1), val.labels, self.num_classes_)
                      for tau in TAU_GRID]
        self.val_scores_ = np.asarray(scores)  # val balanced accuracy per TAU_GRID value (diagnostic)
        return float(TAU_GRID[int(np.argmax(scores))])  # argmax: the first (smallest) tau among ties

    def _choose_prior_power(self, val: FeatureSet) -> float:
        """Which prior do tau-normalised logits carry? Neither the train prior (tau-normalisation
        removes part of it) nor the uniform one: model it as ``p_s^gamma`` (renormalised) and
        choose ``gamma`` in ``0, 0.1, ..., 1`` on the **val** split, as the power whose removal
        (``z - gamma log p_s``, PC-Softmax to a uniform target, paper 002 eq. 4) gives the best
        balanced accuracy (ties: the smallest). One scalar, so 20 val samples a class suffice."""
        dev = self.mean_.device
        log_ps = torch.log(torch.as_tensor(self.source_prior_, dtype=torch.float32, device=dev))
        with torch.inference_mode():
            zv = self.scores(self.module_, self._standardise(torch.tensor(val.features, device=dev)))
            scores = [balanced_accuracy((zv - g * log_ps).argmax(1), val.labels, self.num_classes_)
                      for g in PRIOR_POWERS]
        return float(PRIOR_POWERS[int(np.argmax(scores))])

    def logit_prior(self) -> np.ndarray:
        """``p_s^gamma`` renormalised, ``gamma`` chosen on val (:meth:`_choose_prior_power`); the
        train prior (``gamma = 1``) when no val split was given."""
        self._check_fitted()
        gamma = 1.0 if getattr(self, "prior_power_", None) is None else self.prior_power_
        p = np.asarray(self.source_prior_, dtype=np.float64) ** gamma
        return p / p.sum()  # > 0: the train prior has no zero entry (checked in fit)

    def scores(self, module: nn.Module, x: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """``x (w_c / ||w_c||^tau)^T``, ``tau`` the fitted ``tau_`` unless given."""
        tau = self.tau_ if tau is None else tau
        w = module.weight
        norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # guards a class whose weights are all zero
        return F.linear(x, w / norms.pow(tau))

    def _extra_state(self) -> dict[str, torch.Tensor]:
        state = {"tau": torch.tensor(self.tau_, dtype=torch.float64)}
        if getattr(self, "val_scores_", None) is not None:
            state["val_scores"] = torch.as_tensor(self.val_scores_, dtype=torch.float64)
        if getattr(self, "prior_power_", None) is not None:
            state["prior_power"] = torch.tensor(self.prior_power_, dtype=torch.float64)
        return state

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.tau_ = float(state["tau"])
        self.val_scores_ = state["val_scores"].numpy() if "val_scores" in state else None
        self.prior_power_ = float(state["prior_power"]) if "prior_power" in state else None


class LearnableWeightScalingHead(TrainedHead):
    """Learnable weight scaling (LWS, Kang et al., ICLR 2020).

    Stage 1 fits a linear cross-entropy head with instance-balanced sampling (the same head, with
    the same seed, as ``ce``); stage 2 freezes its weights and bias and learns one scale per class,
    ``z_c = s_c (w_c . x + b_c)``, with class-balanced sampling (same epochs and lr, no weight
    decay on the scales, which would pull them to 0 rather than to 1). Under the default full-batch
    L-BFGS both stages are convex and solved to convergence; the scales are then held to 1 by the
    same ridge (``weight_decay / 2 ||s - 1||^2``), without which they would grow without bound
    wherever the frozen classifier separates the train split.
    """

    name = "lws"
    auto_solver = "lbfgs"

    def new_module(self, dim: int, num_classes: int) -> nn.Module:
        return ScaledClassifier(dim, num_classes)

    def _train(self, data: TrainData, generator: torch.Generator, ctx: FitContext) -> None:
        module, objective, config = self.module_, self.objective(ctx), self.optim_config()
        fit_module(module, data, objective, config, generator=generator,
                   sampler=head_sampler("instance", data.balance, ctx.num_classes),
                   params=[(f"linear.{k}", p) for k, p in module.linear.named_parameters()],
                   desc=f"{self.name} (classifier)")
        fit_module(module, data, objective, config, generator=generator,
                   sampler=head_sampler("class", data.balance, ctx.num_classes),
                   params=[("scales", module.scales)], desc=f"{self.name} (scales)")
