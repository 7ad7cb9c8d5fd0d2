"""``meta-cb``: class-balanced weights plus meta-learned conditional weights (Jamal et al., CVPR 2020,
paper 003; specification ``meta-learning.md`` §1).

The training loss of a batch (paper 003, eq. 8; Algorithm 1, lines 9 and 14) is

    ``L_B(θ; ε) = (1/n) Σ_i (w_{y_i} + ε_i) L(f(x_i; θ), y_i)``

with ``w`` the effective-number class weights (§4.1, ``w_y ∝ (1 − β)/(1 − β^{n_y})`` normalised to sum
to ``C``: :func:`~longtail.stages.losses.class_balanced_weights`; ``beta`` defaults to the paper's
``(N − 1)/N``) and ``ε`` the conditional weights: zeros at every batch (line 8), moved by ONE
meta-gradient step ``ε = −τ ∇_ε L_{B_d}(θ̃(ε))`` (line 13, ``θ̃`` the plain-SGD look-ahead of line
10, ``L_{B_d}`` the unweighted mean of ``L`` on a meta batch, eq. 9 and line 12), never clipped or
normalised (§4.3), so ``w + ε`` may be negative. ``L`` is cross-entropy (``loss: ce``), the focal
loss (``focal``) or LDAM (``ldam``, on a cosine classifier as ``ldam-drw``), the paper's Tables 2-3.
The first ``floor(meta_start * epochs)`` epochs train the plain, unweighted ``L`` (lines 1-5).

``tau`` is in the paper's mean normalisation: the authors' code steps ``0.01`` on a SUM-normalised
line 9, i.e. ``tau = 0.01 * batch_size`` (the default). Since ``ε ∝ τ η_t`` times an inner product of
gradients that grows with the head's size, a linear head needs a much larger ``tau`` to move the
weights at all (specification §1.2, the pilot there): :attr:`MetaCBHead.eps_scale_` (mean ``|ε|``
over mean ``w`` of each epoch's rows) tells whether it did. The specification proposes medians; on
features whose train split the linear head fits almost exactly (the builtin CNN's on ``digits-lt``)
most rows have a zero loss gradient, so the median ``|ε|`` is 0 while the tail rows' weights move by
tenths: the mean does not hide them.

Test time: the plain logits. Special case J1: ``tau = 0`` and ``meta_start = 0`` is ``cb-ce`` with the
same ``beta``, seed and optimiser settings, bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from longtail.stages.base import FitContext
from longtail.stages.errors import LongtailError
from longtail.stages.heads import BATCH_SIZE, EPOCHS, LR, SGD_MIN_STEPS, WEIGHT_DECAY, LinearClassifier
from longtail.stages.losses import class_balanced_weights, ldam_margins
from longtail.stages.meta.head import META_BATCH, META_PER_CLASS, MetaHead
from longtail.stages.modules import CosineClassifier
from longtail.stages.train.bilevel import MetaObjective, call, gradient_step
from longtail.stages.train.data import Batch
from longtail.stages.train.objective import StepOutput
from longtail.stages.train.state import TrainState

LOSSES = ("ce", "focal", "ldam")
Tensors = dict[str, torch.Tensor]


def _nll(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``−log softmax(z)[y]`` per row (as :func:`~longtail.stages.losses.cross_entropy` computes it)."""
    return -F.log_softmax(z, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)


def per_sample_loss(loss: str, *, gamma: float = 2.0, margins: torch.Tensor | None = None,
                    scale: float = 30.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-row ``L(z, y)`` ``(B,)`` of ``loss``, the same operations as the project's batch losses
    (:func:`~longtail.stages.losses.cross_entropy`, ``focal_loss``, ``ldam_loss``) before their mean."""
    if loss == "ce":
        return _nll
    if loss == "focal":
        def focal(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # Lin et al. 2017, eq. 4
            log_pt = -_nll(z, y)
            return -((-torch.expm1(log_pt)).clamp_min(0.0) ** float(gamma)) * log_pt
        return focal

    def ldam(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # Cao et al. 2019, eq. 13
        m = margins.to(z.dtype)
        return _nll(float(scale) * (z - F.one_hot(y, z.shape[1]).to(z.dtype) * m[y].unsqueeze(1)), y)
    return ldam


class ConditionalWeightObjective(MetaObjective):
    """Paper 003, Algorithm 1 on the bi-level step: fresh ``ε = 0`` per batch, one step of size ``tau``.

    Records per epoch (diagnostics): the per-class sum and count of ``ε`` (paper 003, fig. 3), and the
    epoch's ``|ε|``, ``w_{y_i}`` and the share of rows whose total weight ``w + ε`` is negative.
    """

    def __init__(self, *, weight: torch.Tensor, tau: float, loss: Callable, epochs: int):
        self.weight = weight  # (C,) in the logits' dtype
        self.tau = float(tau)
        self.fn = loss
        c = int(weight.shape[0])
        dev = weight.device
        self.eps_sum = torch.zeros(int(epochs), c, dtype=torch.float64, device=dev)
        self.eps_count = torch.zeros(int(epochs), c, dtype=torch.float64, device=dev)
        self.negative = torch.zeros(int(epochs), dtype=torch.float64, device=dev)
        self.abs_sum = torch.zeros(int(epochs), dtype=torch.float64, device=dev)
        self.w_sum = torch.zeros(int(epochs), dtype=torch.float64, device=dev)

    def meta_variables(self, state: TrainState, batch: Batch) -> Tensors:
        """``ε ← 0 ∈ R^n`` with ``requires_grad`` (Algorithm 1, line 8): fresh every batch."""
        self._labels = batch.y  # (the rows meta_update records)
        return {"eps": torch.zeros(batch.rows.shape[0], dtype=self.weight.dtype, device=self.weight.device,
                                   requires_grad=True)}

    def inner_loss(self, params: Mapping[str, torch.Tensor], state: TrainState, batch: Batch,
                   meta: Mapping[str, torch.Tensor]) -> StepOutput:
        """``(1/n) Σ (w_{y_i} + ε_i) L_i(θ)`` (eq. 8; Algorithm 1, lines 9 and 14)."""
        z = call(state.module, params, batch.x)
        per = self.fn(z, batch.y)
        return StepOutput(((self.weight[batch.y] + meta["eps"]) * per).mean(), logits=z, per_sample=per)

    def meta_loss(self, params: Mapping[str, torch.Tensor], state: TrainState, meta_batch: Batch) -> torch.Tensor:
        """``(1/m) Σ_{j∈B_d} L(f(x_j; θ̃), y_j)``, unweighted (eq. 9; Algorithm 1, line 12)."""
        return self.fn(call(state.module, params, meta_batch.x), meta_batch.y).mean()

    def meta_update(self, meta: Tensors, grads: Tensors, state: TrainState) -> Tensors:
        """``ε = −τ ∇_ε L_{B_d}`` (line 13), never clipped or normalised; recorded for the diagnostics."""
        new = gradient_step(meta, grads, self.tau)
        eps, y, e = new["eps"], self._labels, state.epoch
        w = self.weight[y]
        onehot = F.one_hot(y, self.weight.shape[0]).double()
        self.eps_sum[e] += onehot.T @ eps.double()  # fixed-order class sums (no scatter-add)
        self.eps_count[e] += onehot.sum(0)
        self.negative[e] += ((w + eps) < 0).double().sum()
        self.abs_sum[e] += eps.abs().double().sum()
        self.w_sum[e] += w.double().sum()
        return new

    def warmup_loss(self, module: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        """Plain, unweighted ``L`` (Algorithm 1, lines 1-5)."""
        z = module(batch.x)
        per = self.fn(z, batch.y)
        return StepOutput(per.mean(), logits=z, per_sample=per)

    def summary(self) -> dict[str, np.ndarray]:
        """``eps_class_mean`` (epochs × C, NaN without a meta step), ``eps_scale`` (epochs,: mean
        ``|ε|`` / mean ``w`` of the epoch's rows) and ``negative_share`` (epochs,)."""
        count = self.eps_count.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0: a class or epoch without meta step
            mean = np.where(count > 0, self.eps_sum.cpu().numpy() / np.maximum(count, 1), np.nan)
            rows = count.sum(1)
            negative = np.where(rows > 0, self.negative.cpu().numpy() / np.maximum(rows, 1), np.nan)
            w_sum = self.w_sum.cpu().numpy()  # > 0 where rows were seen: class weights are positive
            scale = np.where(rows > 0, self.abs_sum.cpu().numpy() / np.where(rows > 0, w_sum, 1.0), np.nan)
        return {"eps_class_mean": mean, "eps_scale": scale, "negative_share": negative}


class MetaCBHead(MetaHead):
    """Jamal et al.'s class-balanced loss with meta-learned conditional weights (paper 003).

    Args:
        beta: effective-number parameter in ``[0, 1]``; ``None`` (default) is the paper's ``(N − 1)/N``.
        tau: the meta step size, mean normalisation; ``None`` is ``0.01 * batch_size`` (the authors'
            code). ``0`` keeps ``ε = 0``: ``cb-ce`` after the warm-up.
        meta_start: the fraction of epochs trained with plain ``L`` before the meta stage, in
            ``[0, 1)`` (0.8: epoch 160 of 200 in the authors' CIFAR setting).
        loss: ``ce``, ``focal`` or ``ldam``; ``gamma`` (focal), ``max_margin`` and ``scale`` (LDAM).
        meta_per_class: meta rows per class (10, paper 003 §5); ``meta_batch``: rows per meta batch
            (100, the authors' code); ``meta_source``: ``val`` (default) or ``train`` (held out).
        min_steps: at least this many minibatch steps (5,000, the SGD heads' budget: on small stores
            ``epochs`` alone is a few dozen steps and leaves the head under-trained); 0: ``epochs``.
        epochs, lr, batch_size, weight_decay, seed, device: the shared head trainer's.
    """

    name = "meta-cb"

    def __init__(self, *, beta: float | None = None, tau: float | None = None, meta_start: float = 0.8,
                 loss: str = "ce", gamma: float = 2.0, max_margin: float = 0.5, scale: float = 30.0,
                 meta_per_class: int = META_PER_CLASS, meta_batch: int = META_BATCH, meta_source: str = "val",
                 epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, min_steps: int = SGD_MIN_STEPS, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         min_steps=min_steps, seed=seed, device=device)
        self.beta = beta
        self.tau = tau
        self.meta_start = meta_start
        self.loss = loss
        self.gamma = gamma
        self.max_margin = max_margin
        self.scale = scale
        self.meta_per_class = meta_per_class
        self.meta_batch = meta_batch
        self.meta_source = meta_source

    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        self._check("beta", self.beta, low=0, high=1, allow_none=True)
        self._check("tau", self.tau, low=0, allow_none=True)
        if self.loss not in LOSSES:
            raise LongtailError(f"method {self.name!r}: loss = {self.loss!r} is not one of {', '.join(LOSSES)}")
        self._check("gamma", self.gamma, low=0)
        self._check("max_margin", self.max_margin, low=0, low_open=True)
        self._check("scale", self.scale, low=0, low_open=True)

    def tau_value(self) -> float:
        return 0.01 * int(self.batch_size) if self.tau is None else float(self.tau)

    def beta_value(self, counts: np.ndarray) -> float:
        n = float(np.sum(counts))
        return (n - 1.0) / n if self.beta is None else float(self.beta)  # n >= 1: a train split has rows

    def new_module(self, dim: int, num_classes: int) -> nn.Module:
        if self.loss == "ldam":  # as ldam-drw: LDAM on normalised features and weights (Cao et al.)
            return CosineClassifier(dim, num_classes, 1.0, learn_scale=False)
        return LinearClassifier(dim, num_classes)

    def scores(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return float(self.scale) * module(x) if self.loss == "ldam" else module(x)

    def objective(self, ctx: FitContext) -> ConditionalWeightObjective:
        counts = np.asarray(ctx.class_counts)
        weight = torch.as_tensor(class_balanced_weights(counts, self.beta_value(counts)), device=ctx.device)
        margins = torch.as_tensor(ldam_margins(counts, float(self.max_margin)), device=ctx.device)
        fn = per_sample_loss(self.loss, gamma=float(self.gamma), margins=margins, scale=float(self.scale))
        return ConditionalWeightObjective(weight=weight.to(torch.float32), tau=self.tau_value(), loss=fn,
                                      epochs=self.total_epochs(ctx))

    def _trained(self, objective: ConditionalWeightObjective, ctx: FitContext) -> None:
        out = objective.summary()
        self.eps_class_mean_ = out["eps_class_mean"]
        self.eps_scale_ = out["eps_scale"]
        self.negative_share_ = out["negative_share"]
        counts = np.asarray(ctx.class_counts)
        self.class_weights_ = class_balanced_weights(counts, self.beta_value(counts))  # float64, as cb-ce
        p = self.class_weights_ * np.asarray(ctx.class_counts, dtype=np.float64)
        self.logit_prior_ = p / p.sum()  # > 0: positive weights times positive counts

    def logit_prior(self) -> np.ndarray:
        """``w_y p_s(y)``, normalised, as ``cb-ce`` (specification §4.2: ``ε`` averages out)."""
        self._check_fitted()
        return np.asarray(self.logit_prior_, dtype=np.float64)

    # ------------------------------------------------------------------ state and diagnostics
    _SAVED = ("eps_class_mean_", "eps_scale_", "negative_share_", "class_weights_", "logit_prior_", "meta_loss_")

    def _extra_state(self) -> dict[str, torch.Tensor]:
        out = {f"meta.{k}": torch.as_tensor(np.asarray(getattr(self, k), dtype=np.float64)) for k in self._SAVED}
        out["meta.meta_rows_"] = torch.tensor(int(self.meta_rows_))
        out["meta.meta_start_epoch_"] = torch.tensor(int(self.meta_start_epoch_))
        return out

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in self._SAVED:
            setattr(self, k, state[f"meta.{k}"].numpy().astype(np.float64))
        self.meta_rows_ = int(state["meta.meta_rows_"])
        self.meta_start_epoch_ = int(state["meta.meta_start_epoch_"])

    def diagnostics(self, train, val=None, test=None) -> dict[str, Any] | None:
        """``{"meta": ...}``: the per-class mean conditional weight per epoch (paper 003, fig. 3), the
        scale of ``ε`` against ``w``, the share of negative total weights, the class weights."""
        self._check_fitted()
        finite = lambda a: [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]  # noqa: E731
        return {"meta": {**self._meta_summary(), "tau": self.tau_value(),
                         "class_weights": finite(self.class_weights_),
                         "eps_class_mean": [finite(row) for row in self.eps_class_mean_],
                         "eps_scale": finite(self.eps_scale_), "negative_share": finite(self.negative_share_)}}
