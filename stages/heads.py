"""Stage-2 heads: the public head protocol :class:`TrainedHead`, and the heads that only swap a loss.

Every head is a classifier trained on fixed (cached) backbone features by the one training loop,
:func:`longtail.stages.train.engine.fit_module`, with the train features put on the configured
device once. Its solver (``solver``: ``auto``, ``lbfgs`` or ``sgd``) follows one rule: ``auto`` is
full-batch L-BFGS to convergence (:func:`~longtail.stages.train.engine.fit_full_batch`: the
sampler's expected loss plus the ridge ``weight_decay / 2 ||theta||^2``, stopped at a largest
gradient entry of 1e-5, a relative change of 1e-9 or ``max_iter`` iterations) for the heads whose
objective is a smooth full-batch function of a linear module (:attr:`TrainedHead.auto_solver`;
convex for the cross-entropy family), and minibatch SGD for the others (batches drawn from a
seeded ``torch.Generator``, instance- or class-balanced, momentum 0.9, a cosine learning-rate
schedule, ``epochs`` but at least ``min_steps`` steps). ``solver = "sgd"`` is the training of the
heads before issue 11, bit for bit; the ridge default ``5e-4`` serves both solvers (README,
"Heads at their defaults", for how it was chosen). A head declares three things (the protocol, also what composites
such as DLSA and users' own heads build on): its module (:meth:`TrainedHead.new_module`), its
objective (:meth:`TrainedHead.objective`) and its optimiser settings
(:meth:`TrainedHead.optim_config`), plus the sampler (:attr:`TrainedHead.sampling`) and how the
module's output becomes logits (:meth:`TrainedHead.scores`). The two-stage heads of
:mod:`longtail.stages.decoupled` (``tau-norm``, ``lws``) add a step after training.

Features are standardised for every head (one decision keeps the heads comparable): SGD on cached
features of arbitrary offset and scale (ReLU activations, sums of them) is otherwise badly
conditioned. The mean and standard deviation are those of the train split re-weighted to a uniform
label prior (:func:`balanced_moments`), stored as state: the plain train mean sits among the head
classes, and centring on it tilts every angle a cosine classifier sees towards them (on a 2-D
five-class long tail with means on a circle it cost ``cosine`` and ``ldam-drw`` 10 to 13 points of
balanced accuracy). A fit holds at most one standardised copy of the train features: on the CPU
none (the caller's array is shared and each minibatch is standardised as it is gathered, the same
float32 operations, so the same values; a method that reads every row at once, such as the
full-batch solver, gets the whole standardised matrix once), on an accelerator the copy made for
the device (:func:`standardised_copy`).

Registered names here: ``ce``, ``balanced-softmax``, ``logit-adjust``, ``cb-ce``, ``focal``,
``cosine``, ``ldam-drw``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from longtail.stages.base import FitContext, Method, check_number
from longtail.stages.calibrate import prior_from_log
from longtail.stages.data import FeatureSet
from longtail.stages.device import resolve_device
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import per_class_accuracy
from longtail.stages.losses import (
    balanced_softmax_loss,
    class_balanced_weights,
    cross_entropy,
    focal_loss,
    ldam_loss,
    logit_adjusted_loss,
)
from longtail.stages.modules import CosineClassifier, LinearClassifier, ScaledClassifier
from longtail.stages.train.data import TrainData
from longtail.stages.train.engine import OptimConfig, Sampler, fit_module
from longtail.stages.train.objective import LossObjective, Objective
from longtail.stages.train.samplers import ClassBalancedSampler, InstanceSampler
from longtail.stages.train.standardise import balanced_moments, host_tensor, standardised_copy

__all__ = [
    "TrainedHead", "LinearClassifier", "CosineClassifier", "ScaledClassifier", "balanced_moments",
    "balanced_accuracy", "host_tensor", "standardised_copy", "head_sampler", "EPOCHS", "LR", "BATCH_SIZE",
    "WEIGHT_DECAY", "MAX_ITER",
]

# Defaults shared by every head. For the SGD solver, on standardised features: with 30 epochs and a cosine schedule,
# lr 0.1 was within a point of balanced accuracy of the best of {0.05, 0.1, 0.2} for every head on a
# synthetic 100-class, 512-d long-tailed problem (counts 500..5; 0.01 was worse where tried);
# weight decay 5e-4 as in paper 002 (Sec. 6.2).
EPOCHS = 30
LR = 0.1
BATCH_SIZE = 256
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
#: at least this many SGD steps for the heads that keep minibatch SGD (``cosine``, ``ldam-drw``): 30
#: epochs are 60 steps on digits-lt's 353 rows; 5,000 steps put both within about a point of ten
#: times as many there (benchmarks/heads_convergence.py)
SGD_MIN_STEPS = 5000
#: L-BFGS iteration cap of the full-batch solver (a cap, not the usual stop: see the README's rule)
MAX_ITER = 500
#: rows per chunk when computing logits: bounds the temporaries (a standardised chunk and its logits;
#: 64 MiB of float32 at D = 2048), not a per-sample loop
LOGITS_CHUNK = 8192


def head_sampler(sampling: str, strata: torch.Tensor, num_strata: int) -> Sampler:
    """The sampler a head's ``sampling`` names: ``"instance"`` (a permutation per epoch) or
    ``"class"`` (:class:`~longtail.stages.train.samplers.ClassBalancedSampler` over ``strata``
    ``(N,)`` with values in ``[0, num_strata)``)."""
    if sampling == "instance":
        return InstanceSampler()
    if sampling == "class":
        return ClassBalancedSampler(strata, num_strata)
    raise ValueError(f"unknown sampling {sampling!r}")


def balanced_accuracy(pred: torch.Tensor, labels: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes that have at least one sample in ``labels``
    (:func:`stages.evaluate.per_class_accuracy`, NaN for an absent class, skipped here)."""
    return float(np.nanmean(per_class_accuracy(pred.cpu().numpy(), labels, num_classes)))


# ---------------------------------------------------------------------- the head protocol
class TrainedHead(Method):
    """A classifier trained on standardised features by :func:`~longtail.stages.train.engine.fit_module`.

    The public protocol (what a head, a user's head and a composite such as DLSA use):

    * :attr:`sampling`: ``"instance"`` or ``"class"`` (:func:`head_sampler`);
    * :meth:`new_module` ``(dim, num_classes) -> nn.Module``: a pure factory; the module has
      ``reset_parameters(generator)`` and may name ``no_decay`` parameters;
    * :meth:`objective` ``(ctx) -> Objective``: the training objective (default cross-entropy);
    * :meth:`optim_config` ``(epochs=None) -> OptimConfig``: the optimiser settings;
    * :meth:`scores` ``(module, x)``: logits of standardised ``x`` (default ``module(x)``).

    A subclass adds its own hyper-parameters to ``__init__`` (keyword-only, stored unchanged) and
    checks them in ``_check_params(num_classes)`` (call ``super()`` and :meth:`_check`).
    """

    #: ``"instance"`` or ``"class"``
    sampling: ClassVar[str] = "instance"

    #: what ``solver = "auto"`` means for this head: ``"lbfgs"`` where the objective is a smooth,
    #: full-batch function of a linear module's parameters (the convex heads), ``"sgd"`` otherwise
    #: (normalised modules, epoch schedules, per-batch randomness; the default for a subclass)
    auto_solver: ClassVar[str] = "sgd"
    #: the solvers this head can be trained by
    solvers: ClassVar[tuple[str, ...]] = ("lbfgs", "sgd")

    def __init__(self, *, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, solver: str = "auto", max_iter: int = MAX_ITER,
                 min_steps: int = 0, seed: int = 0, device: str = "auto"):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.solver = solver
        self.max_iter = max_iter
        self.min_steps = min_steps
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------ the protocol
    def new_module(self, dim: int, num_classes: int) -> nn.Module:
        """The module to train, for ``dim`` inputs and ``num_classes`` outputs (unfitted)."""
        return LinearClassifier(dim, num_classes)

    def objective(self, ctx: FitContext) -> Objective:
        """The training objective; plain cross-entropy unless a head says otherwise."""
        return LossObjective(cross_entropy)

    def resolved_solver(self) -> str:
        """``solver``, with ``"auto"`` resolved to the head's :attr:`auto_solver`."""
        return self.auto_solver if self.solver == "auto" else str(self.solver)

    def optim_config(self, epochs: int | None = None) -> OptimConfig:
        """The solver's settings from the constructor parameters (``epochs`` replaced when given).

        ``lbfgs``: full-batch L-BFGS to convergence (``max_iter``, ``weight_decay``; first trial
        step 1; :func:`~longtail.stages.train.engine.fit_full_batch` states the stopping rule).
        ``sgd``: minibatch SGD with momentum 0.9 and a cosine schedule from ``lr`` over ``epochs``
        (at least ``min_steps`` steps).
        """
        epochs = int(self.epochs if epochs is None else epochs)
        if self.resolved_solver() == "lbfgs":
            return OptimConfig(epochs=epochs, lr=1.0, batch_size=int(self.batch_size), optimizer="lbfgs",
                               weight_decay=float(self.weight_decay), max_iter=int(self.max_iter))
        return OptimConfig(epochs=epochs, lr=float(self.lr), batch_size=int(self.batch_size),
                           weight_decay=float(self.weight_decay), momentum=MOMENTUM,
                           min_steps=int(self.min_steps))

    def scores(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits of standardised features ``x`` ``(B, D)`` from ``module``."""
        return module(x)

    # ------------------------------------------------------------------ checks
    def _check(self, key: str, value: Any, **bounds: Any) -> None:
        """:func:`~longtail.stages.base.check_number` with the owner ``method '<name>'``."""
        check_number(f"method {self.name!r}", key, value, **bounds)

    def _check_params(self, num_classes: int) -> None:
        self._check("epochs", self.epochs, integer=True, low=1)
        self._check("lr", self.lr, low=0, low_open=True)
        self._check("batch_size", self.batch_size, integer=True, low=1)
        self._check("weight_decay", self.weight_decay, low=0)
        self._check("max_iter", self.max_iter, integer=True, low=1)
        self._check("min_steps", self.min_steps, integer=True, low=0)
        self._check("seed", self.seed, integer=True, low=0)
        allowed = ("auto", *self.solvers)
        if self.solver not in allowed:
            raise LongtailError(f"method {self.name!r}: solver = {self.solver!r} must be one of "
                                f"{', '.join(map(repr, allowed))}")
        resolve_device(self.device)

    # ------------------------------------------------------------------ fit
    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean_) / self.std_  # std_ > 0: floored in _fit

    def _standardise_in_place(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_standardise` of a tensor the caller owns, in place (the same float32 values)."""
        return x.sub_(self.mean_).div_(self.std_)

    def _fit(self, train: FeatureSet, val: FeatureSet | None, ctx: FitContext) -> None:
        counts = ctx.class_counts
        if (counts <= 0).any():
            c = int(np.flatnonzero(counts <= 0)[0])
            raise LongtailError(
                f"{train.source or 'features'}: class_counts of class {train.class_names[c]!r} is "
                f"{int(counts[c])} but the split has samples of it (counts and labels disagree)"
            )
        dev = ctx.device
        generator = torch.Generator(device=dev)
        generator.manual_seed(int(self.seed))
        mean, std = balanced_moments(train.features, train.labels, ctx.num_classes)
        # guards the division in _standardise: constant features (std ~ 0) are centred, not scaled
        std = np.where(std > 1e-6 * max(std.max(), 1e-300), std, 1.0)
        self.mean_ = torch.tensor(mean, dtype=torch.float32, device=dev)
        self.std_ = torch.tensor(std, dtype=torch.float32, device=dev)
        labels = torch.tensor(train.labels, device=dev)
        if dev.type == "cpu":  # the features as they are, standardised batch by batch (no copy of every row)
            data = TrainData(host_tensor(train.features), labels, transform=self._standardise_in_place)
        else:  # the copy on the device, needed anyway, is the standardised one
            data = TrainData(standardised_copy(train.features, self.mean_, self.std_), labels)
        module = self.new_module(ctx.dim, ctx.num_classes).to(dev)
        module.reset_parameters(generator)
        self.module_ = module
        self._train(data, generator, ctx)

    def _train(self, data: TrainData, generator: torch.Generator, ctx: FitContext) -> None:
        """Train ``self.module_`` on ``data`` (one :func:`fit_module` call; two-stage heads add steps)."""
        fit_module(self.module_, data, self.objective(ctx), self.optim_config(), generator=generator,
                   sampler=head_sampler(self.sampling, data.balance, ctx.num_classes), desc=self.name)

    # ------------------------------------------------------------------ logits and state
    def _logits(self, features: np.ndarray) -> np.ndarray:
        dev = self.mean_.device
        out = []
        with torch.inference_mode():
            for start in range(0, features.shape[0], LOGITS_CHUNK):
                xb = standardised_copy(features[start:start + LOGITS_CHUNK], self.mean_, self.std_)
                out.append(self.scores(self.module_, xb).float().cpu())
        return torch.cat(out).numpy()

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"mean": self.mean_, "std": self.std_}
        state.update({f"module.{k}": v for k, v in self.module_.state_dict().items()})
        state.update(self._extra_state())
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        dev = resolve_device(self.device)
        try:
            self.mean_ = state["mean"].to(dev, torch.float32)
            self.std_ = state["std"].to(dev, torch.float32)
            module = self.new_module(self.dim_, self.num_classes_)
            module.load_state_dict({k[len("module."):]: v for k, v in state.items() if k.startswith("module.")})
            self.module_ = module.to(dev).eval().requires_grad_(False)
            self._load_extra_state(state)
        except (KeyError, RuntimeError) as exc:
            raise LongtailError(f"method {self.name!r}: the saved state does not fit this method: {exc}") from exc


def _counts(ctx: FitContext) -> torch.Tensor:
    """The train counts ``(C,)`` as float64 on the fit's device (each > 0: checked in ``_fit``)."""
    return torch.as_tensor(ctx.class_counts, dtype=torch.float64, device=ctx.device)


# ---------------------------------------------------------------------- the heads
class CrossEntropyHead(TrainedHead):
    """Linear classifier, softmax cross-entropy, instance-balanced sampling (the baseline)."""

    name = "ce"
    auto_solver = "lbfgs"


class BalancedSoftmaxHead(TrainedHead):
    """Linear classifier trained with Balanced Softmax (Ren et al. 2020); raw logits at test time."""

    name = "balanced-softmax"
    auto_solver = "lbfgs"

    def objective(self, ctx: FitContext) -> Objective:
        return LossObjective(balanced_softmax_loss, class_counts=_counts(ctx))

    def logit_prior(self) -> np.ndarray:
        """Uniform: the softmax of the raw logits estimates the balanced posterior (paper 002, Sec. 4.3
        compensates Balanced Softmax with ``log p_t - log p_u``)."""
        self._check_fitted()
        return np.full(self.num_classes_, 1.0 / self.num_classes_)


class LogitAdjustHead(TrainedHead):
    """Linear classifier trained with the logit-adjusted loss (Menon et al. 2021); raw logits at test."""

    name = "logit-adjust"
    auto_solver = "lbfgs"

    def __init__(self, *, tau: float = 1.0, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, solver: str = "auto", max_iter: int = MAX_ITER,
                 min_steps: int = 0, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         solver=solver, max_iter=max_iter, min_steps=min_steps, seed=seed, device=device)
        self.tau = tau

    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        self._check("tau", self.tau, low=0)

    def objective(self, ctx: FitContext) -> Objective:
        return LossObjective(logit_adjusted_loss, class_counts=_counts(ctx), tau=float(self.tau))

    def logit_prior(self) -> np.ndarray:
        """``p_s^(1 - tau)``, normalised: uniform for ``tau = 1``, the train prior for ``tau = 0``.

        The loss fits ``softmax(f + tau log p_s)`` to ``p_s(y|x) ∝ p_s(y) p(x|y)``, so at its optimum
        ``f(x)[y] = log p(x|y) + (1 - tau) log p_s(y) + const(x)``: the logits carry the prior
        ``∝ p_s^(1 - tau)``, exactly as Theorem 1 of paper 002 assumes of a softmax's logits.
        """
        self._check_fitted()
        return prior_from_log((1.0 - float(self.tau)) * np.log(np.asarray(self.source_prior_, dtype=np.float64)))


class ClassBalancedCEHead(TrainedHead):
    """Cross-entropy weighted by class-balanced (effective-number) weights (Cui et al. 2019).

    Default ``beta = 0.99``: the effective number ``E_n = (1 - beta^n) / (1 - beta)`` saturates at
    ``1 / (1 - beta)`` samples, so beta only matters for counts near or above ``1 / (1 - beta)``.
    For the small counts of stage-2 benchmarks (5..100 per class), ``beta = 0.999`` (saturation at
    1000) gives ``E_n`` within 5% of ``n``, i.e. plain inverse frequency; ``beta = 0.9`` (10)
    flattens 5..100 to a weight ratio of 2.4. ``beta = 0.99`` saturates at 100: ``E_5 = 4.9``,
    ``E_100 = 63.4``, a ratio of 12.9 instead of 20, a genuinely effective-number weighting.
    """

    name = "cb-ce"
    auto_solver = "lbfgs"

    def __init__(self, *, beta: float = 0.99, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, solver: str = "auto", max_iter: int = MAX_ITER,
                 min_steps: int = 0, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         solver=solver, max_iter=max_iter, min_steps=min_steps, seed=seed, device=device)
        self.beta = beta

    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        self._check("beta", self.beta, low=0, high=1)

    def objective(self, ctx: FitContext) -> Objective:
        weight = torch.as_tensor(class_balanced_weights(ctx.class_counts, float(self.beta)), device=ctx.device)
        return LossObjective(cross_entropy, weight=weight)

    def _train(self, data: TrainData, generator: torch.Generator, ctx: FitContext) -> None:
        p = class_balanced_weights(ctx.class_counts, float(self.beta)) * np.asarray(ctx.class_counts, dtype=np.float64)
        self.logit_prior_ = p / p.sum()  # > 0: positive weights times positive counts (checked in _fit)
        super()._train(data, generator, ctx)

    def logit_prior(self) -> np.ndarray:
        """``w_y p_s(y)``, normalised (``w`` the class-balanced weights of the loss).

        The population minimiser of ``sum_y w_y p_s(y|x) (-log q_y(x))`` is ``q_y ∝ w_y p_s(y|x) ∝
        w_y p_s(y) p(x|y)``: the weighted loss trains the softmax under the prior ``∝ w p_s``.
        """
        self._check_fitted()
        return np.asarray(self.logit_prior_, dtype=np.float64)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {"logit_prior": torch.as_tensor(self.logit_prior_, dtype=torch.float64)}

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.logit_prior_ = state["logit_prior"].numpy().astype(np.float64)


class FocalHead(TrainedHead):
    """Linear classifier trained with the softmax focal loss (Lin et al. 2017)."""

    name = "focal"
    auto_solver = "lbfgs"

    def __init__(self, *, gamma: float = 2.0, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, solver: str = "auto", max_iter: int = MAX_ITER,
                 min_steps: int = 0, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         solver=solver, max_iter=max_iter, min_steps=min_steps, seed=seed, device=device)
        self.gamma = gamma

    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        self._check("gamma", self.gamma, low=0)

    def objective(self, ctx: FitContext) -> Objective:
        return LossObjective(focal_loss, gamma=float(self.gamma))


class CosineHead(TrainedHead):
    """Cosine classifier (normalised features and class weights, times a scale), cross-entropy.

    ``scale = 16``: a cosine logit lies in ``[-1, 1]``, so the scale bounds the logit gap and with
    it the largest attainable softmax confidence; 16 lets 2..1000 classes reach a confident softmax
    while keeping the gradients of the correctly classified samples alive. ``learn_scale = True``
    lets the data adjust it.
    """

    name = "cosine"

    def __init__(self, *, scale: float = 16.0, learn_scale: bool = True, epochs: int = EPOCHS, lr: float = LR,
                 batch_size: int = BATCH_SIZE, weight_decay: float = WEIGHT_DECAY, solver: str = "auto", max_iter: int = MAX_ITER,
                 min_steps: int = SGD_MIN_STEPS, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         solver=solver, max_iter=max_iter, min_steps=min_steps, seed=seed, device=device)
        self.scale = scale
        self.learn_scale = learn_scale

    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        self._check("scale", self.scale, low=0, low_open=True)
        if not isinstance(self.learn_scale, bool):
            raise LongtailError(f"method {self.name!r}: learn_scale = {self.learn_scale!r} must be true or false")

    def new_module(self, dim: int, num_classes: int) -> nn.Module:
        return CosineClassifier(dim, num_classes, float(self.scale), bool(self.learn_scale))


def deferred_reweighting_epoch(epochs: int, drw_start: float) -> int:
    """First epoch (0-based) of deferred re-weighting: ``floor(drw_start * epochs)``.

    Cao et al. switch the class-balanced weights on at epoch 160 of 200 on CIFAR (``0.8``).
    """
    return int(math.floor(float(drw_start) * int(epochs) + 1e-9))  # 1e-9: 0.8 * 200 is 159.999...


class DeferredReweightingObjective(LossObjective):
    """:func:`~stages.losses.ldam_loss` with ``weight`` from epoch
    :func:`deferred_reweighting_epoch` of the fit's epochs on: ``epochs`` until the fit starts, then
    the epochs the fit really runs (``config.total_epochs``: more than ``epochs`` when ``min_steps``
    asks for them), so the re-weighted share stays the last ``1 - drw_start`` of the training."""

    def __init__(self, weight: torch.Tensor, drw_start: float, epochs: int, **stats: Any):
        super().__init__(ldam_loss, epoch_stats=lambda epoch: {"weight": weight if epoch >= self.start else None},
                         **stats)
        self.drw_start = drw_start
        self.start = deferred_reweighting_epoch(epochs, drw_start)

    def on_fit_start(self, state) -> None:
        self.start = deferred_reweighting_epoch(state.config.total_epochs(len(state.data)), self.drw_start)


class LDAMDRWHead(TrainedHead):
    """LDAM loss with deferred re-weighting (Cao et al., NeurIPS 2019, Sec. 3.2-3.3, Algorithm 1).

    A cosine classifier (Cao et al. normalise features and weights for LDAM) trained with
    :func:`~stages.losses.ldam_loss`; from epoch ``floor(drw_start * epochs)`` on (default the last
    20%, their epoch 160 of 200) the loss is weighted by class-balanced weights with ``beta``
    (0.9999 as in Cao et al.'s code: at stage-2 counts this is close to inverse frequency, which is
    what DRW intends). Test-time logits are ``scale * cos``, without margins.
    """

    name = "ldam-drw"
    solvers = ("sgd",)  # deferred re-weighting is an epoch schedule: a minibatch notion

    def __init__(self, *, max_margin: float = 0.5, scale: float = 30.0, drw_start: float = 0.8,
                 beta: float = 0.9999, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, solver: str = "auto", max_iter: int = MAX_ITER,
                 min_steps: int = SGD_MIN_STEPS, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         solver=solver, max_iter=max_iter, min_steps=min_steps, seed=seed, device=device)
        self.max_margin = max_margin
        self.scale = scale
        self.drw_start = drw_start
        self.beta = beta

    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        self._check("max_margin", self.max_margin, low=0, low_open=True)
        self._check("scale", self.scale, low=0, low_open=True)
        self._check("drw_start", self.drw_start, low=0, high=1)
        self._check("beta", self.beta, low=0, high=1)

    def new_module(self, dim: int, num_classes: int) -> nn.Module:
        return CosineClassifier(dim, num_classes, 1.0, learn_scale=False)

    def objective(self, ctx: FitContext) -> Objective:
        """:func:`~stages.losses.ldam_loss`, with the class-balanced weights from the epoch
        :func:`deferred_reweighting_epoch` on (the objective reads the batch's epoch)."""
        weight = torch.as_tensor(class_balanced_weights(ctx.class_counts, float(self.beta)), device=ctx.device)
        return DeferredReweightingObjective(weight, float(self.drw_start), int(self.epochs),
                                            class_counts=_counts(ctx), max_margin=float(self.max_margin),
                                            scale=float(self.scale))

    def scores(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return float(self.scale) * module(x)
