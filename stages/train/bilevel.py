"""The bi-level look-ahead step of the meta-learned methods: :class:`MetaObjective` and :class:`BilevelStep`.

Jamal et al.'s conditional weights (paper 003, Algorithm 1), Meta-CALA (paper 000, Algorithm A-2,
eq. A.12-A.14) and MetaLAD (paper 001, Algorithm 1, eq. 34-36) share one step, the one-step
look-ahead ("L2RW" / "Meta-Weight-Net") scheme of the meta-learning specification (§0 and §4.1):

1. the meta variables ``φ`` of the batch (:meth:`MetaObjective.meta_variables`);
2. the training loss ``L_B(θ, φ)`` (:meth:`MetaObjective.inner_loss`);
3. a virtual step ``θ̂(φ) = θ − η ∇_θ L_B(θ, φ)``, keeping the graph;
4. the meta loss ``L_m(θ̂(φ))`` on a meta batch (:meth:`MetaObjective.meta_loss`, plain mean CE);
5. ``φ`` moved with ``∇_φ L_m`` (:meth:`MetaObjective.meta_update`);
6. the real step on ``L_B(θ, φ_new)`` with ``φ_new`` detached: exactly
   :func:`~longtail.stages.train.engine.plain_step`.

The virtual step of 3 is **plain SGD** at the current scheduled learning rate ``η_t`` (the
optimiser's ``param_groups[0]["lr"]``, or a fixed ``virtual_lr``): the real optimiser's momentum
and weight decay are ignored in the look-ahead, as the three papers' equations write it (paper 003
Algorithm 1 line 10, paper 000 eq. A.12, paper 001 eq. 34). They would change only where the meta
gradient is evaluated, not its form (specification §1.2).

Meta variables come in two kinds, and the step treats both alike:

- **fresh** per batch: Jamal's ``ε ∈ R^n``, zeros with ``requires_grad`` every batch (Algorithm 1
  line 8), moved once to ``ε = −τ ∇_ε L_m`` (line 13, never clipped or normalised) and discarded;
- **persistent**: the parameters of Meta-CALA's adjustment network, MetaLAD's ``(3, C, C)``
  coefficients; the same leaf tensors every batch, moved by one step of their own optimiser
  (:func:`optimizer_update`: Adam at ``meta_lr``; plain SGD at ``eta2``, eq. 35).

Randomness: the train rows come from the fit's generator exactly as under ``plain_step``; meta
batches come from :class:`MetaBatches`' **own** seeded generator (re-seeded at every fit start), so
a bi-level fit draws the same train permutation as its non-meta base (the parity special cases
J1, M1, L2 of the specification).
"""

from __future__ import annotations

import math
import weakref
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from longtail.stages.errors import LongtailError
from longtail.stages.train.data import Batch, TrainData
from longtail.stages.train.engine import Sampler, TrainState, plain_step
from longtail.stages.train.objective import Objective, StepOutput
from longtail.stages.train.samplers import InstanceSampler

Tensors = dict[str, torch.Tensor]


def trainable(module: nn.Module) -> Tensors:
    """The parameters the fit optimises (``requires_grad``; ``fit_module(params=...)`` froze the
    others), by name: the ``params`` of a look-ahead and of the real step."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def call(module: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``params`` in place of those parameters (the others as they are), through
    :func:`torch.func.functional_call`, so that the result is differentiable in ``params``."""
    return functional_call(module, dict(params), (x,))


class MetaObjective(Objective):
    """A training objective with meta variables, for :class:`BilevelStep`.

    A subclass implements :meth:`meta_variables`, :meth:`inner_loss` and :meth:`meta_update`;
    :meth:`meta_loss` defaults to plain unweighted mean CE, which all three papers use (paper 003
    eq. 9, paper 000 eq. A.13, paper 001 eq. 35 read as in specification §3.2). The hooks of
    :class:`~longtail.stages.train.objective.Objective` run as in any fit; diagnostics of the meta
    values (Jamal's per-class mean ``ε``, say) are recorded in :meth:`meta_update`, which sees them.
    """

    def meta_variables(self, state: TrainState, batch: Batch) -> Tensors:
        """Leaf tensors with ``requires_grad``, by name: FRESH per batch (Jamal's
        ``{"eps": torch.zeros(n, requires_grad=True)}``, Algorithm 1 line 8) or PERSISTENT (the same
        tensors each call: an adjustment network's parameters, MetaLAD's ``(3, C, C)``
        coefficients). Must consume no randomness of ``state.generator``."""
        raise NotImplementedError

    def inner_loss(self, params: Mapping[str, torch.Tensor], state: TrainState, batch: Batch,
                   meta: Mapping[str, torch.Tensor]) -> StepOutput:
        """The training loss ``L_B(θ, φ)`` of ``batch`` under ``meta``, the batch mean, with the
        logits from ``call(state.module, params, batch.x)`` so that it is differentiable in
        ``params`` (the virtual step) and in ``meta`` (the meta-gradient). The real step calls it
        again with the live parameters and the detached updated meta values."""
        raise NotImplementedError

    def meta_loss(self, params: Mapping[str, torch.Tensor], state: TrainState, meta_batch: Batch) -> torch.Tensor:
        """The outer loss at the virtual parameters ``params``: plain mean cross-entropy of the
        meta batch, no weights and no adjustment (override for Jamal with a non-CE ``L``)."""
        return F.cross_entropy(call(state.module, params, meta_batch.x), meta_batch.y)

    def meta_update(self, meta: Tensors, grads: Tensors, state: TrainState) -> Tensors:
        """The meta values of the real step from ``grads`` (``∇_φ L_m``, same keys and shapes as
        ``meta``; zeros where ``L_m`` does not depend on a variable), detached. Fresh:
        ``gradient_step(meta, grads, tau)`` (``ε = −τ ∇_ε L_m`` from 0, no clipping); persistent:
        ``optimizer_update(self.meta_optimizer, meta, grads)``."""
        raise NotImplementedError

    def loss(self, module: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        """The loss of a step without a meta update (between meta steps when ``every > 1``, or
        under ``plain_step``): :meth:`inner_loss` under the current meta values, detached (fresh
        ones at their initial value, e.g. ``ε = 0``: Jamal's loss is then CB-CE)."""
        meta = {k: v.detach() for k, v in self.meta_variables(state, batch).items()}
        return self.inner_loss(trainable(module), state, batch, meta)

    def warmup_loss(self, module: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        """The loss of :class:`BilevelStep`'s warm-up epochs (default :meth:`loss`). Jamal and
        MetaLAD train plain unweighted CE there (paper 003 Algorithm 1 lines 1-5; paper 001
        Algorithm 1 lines 2-6)."""
        return self.loss(module, batch, state)


def gradient_step(meta: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], step_size: float) -> Tensors:
    """``φ − step_size · ∇_φ L_m``, detached: Jamal's line 13 (``ε = −τ ∇_ε L_m`` from ``ε = 0``,
    never clipped or normalised, paper 003 §4.3). A persistent objective that keeps the result as
    its new value must mark it ``requires_grad`` again before the next look-ahead."""
    return {k: (v.detach() - step_size * grads[k]).detach() for k, v in meta.items()}


def optimizer_update(optimizer: torch.optim.Optimizer, meta: Mapping[str, torch.Tensor],
                     grads: Mapping[str, torch.Tensor]) -> Tensors:
    """One step of a persistent meta variable's own ``optimizer`` (which holds exactly the tensors
    of ``meta``) with ``grads`` as their gradients: Meta-CALA's Adam at ``meta_lr`` (eq. A.13),
    MetaLAD's plain SGD at ``eta2`` (eq. 35). Returns the updated values, detached (views of the
    leaves, which stay persistent)."""
    for key, p in meta.items():
        p.grad = grads[key].detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: p.detach() for k, p in meta.items()}


class MetaBatches:
    """The meta batches of a bi-level fit, drawn from their own seeded generator.

    Args:
        data: the meta set (balanced by class, or by class and group), on the fit's device.
        batch_size: rows per meta batch; ``None`` (or at least ``len(data)``) gives the whole meta
            set, in its order, at every step, and draws nothing.
        sampler: which rows an order of the meta set visits (default
            :class:`~longtail.stages.train.samplers.InstanceSampler`: a shuffle, so the batches cycle
            over the set without replacement;
            ``ClassBalancedSampler(data.balance)`` draws class-balanced batches with replacement).
            Consecutive batches are consecutive ``batch_size`` slices of one order; a new order is
            drawn when fewer than ``batch_size`` of its rows remain (those are skipped, so every
            batch has ``batch_size`` rows).
        seed: seeds the generator (on ``data``'s device) at every fit start (:meth:`reset`): the
            fit's own generator, and so its train permutation, is never touched, and two fits with
            the same seed see the same meta batches.
    """

    def __init__(self, data: TrainData, batch_size: int | None = None, *, sampler: Sampler | None = None,
                 seed: int = 0):
        if len(data) == 0:
            raise LongtailError("bi-level step: the meta set is empty")
        if batch_size is not None and int(batch_size) < 1:
            raise LongtailError(f"bi-level step: meta batch size must be at least 1, got {batch_size}")
        self.data = data
        self.batch_size = None if batch_size is None or int(batch_size) >= len(data) else int(batch_size)
        self.sampler = InstanceSampler() if sampler is None else sampler
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        """Start over: re-seed the generator, forget the current order."""
        self.generator = torch.Generator(device=self.data.device).manual_seed(self.seed)
        self._order: torch.Tensor | None = None
        self._pos = 0

    def next(self, epoch: int, step: int) -> Batch:
        """The next meta batch (tagged with the train ``epoch`` and ``step``)."""
        if self.batch_size is None:
            rows = torch.arange(len(self.data), device=self.data.device)
            return self.data.batch(rows, epoch, step)
        if self._order is None or self._pos + self.batch_size > int(self._order.shape[0]):
            self._order = self.sampler.epoch_order(len(self.data), self.generator)
            self._pos = 0
        rows = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.data.batch(rows, epoch, step)


def meta_gradient(state: TrainState, batch: Batch, objective: MetaObjective, meta_batch: Batch,
                  lr: float) -> tuple[Tensors, Tensors, torch.Tensor]:
    """Steps 1-4 of the look-ahead: ``(meta, ∇_meta L_m, L_m)`` for ``batch`` at the module's
    current trainable parameters ``θ``, with

        ``θ̂(φ) = θ − lr · ∇_θ L_B(θ, φ)``   (plain SGD, graph kept: paper 003 Alg. 1 line 10,
                                               paper 000 eq. A.12, paper 001 eq. 34)
        ``L_m = objective.meta_loss(θ̂(φ), state, meta_batch)``   (line 12, eq. A.13, eq. 35)

    A trainable parameter the inner loss does not use keeps ``θ̂ = θ``; a meta variable ``L_m``
    does not depend on gets a zero gradient. ``L_m`` is returned detached. Touches no ``.grad``.
    """
    meta = objective.meta_variables(state, batch)
    params = trainable(state.module)
    names = list(params)
    inner = objective.inner_loss(params, state, batch, meta)
    grads = torch.autograd.grad(inner.loss, [params[k] for k in names], create_graph=True, allow_unused=True)
    virtual = {k: params[k] if g is None else params[k] - lr * g for k, g in zip(names, grads)}
    outer = objective.meta_loss(virtual, state, meta_batch)
    keys = [k for k, v in meta.items() if v.requires_grad]
    found = torch.autograd.grad(outer, [meta[k] for k in keys], allow_unused=True) if keys else ()
    by_key = dict(zip(keys, found))
    meta_grads = {k: torch.zeros_like(v) if by_key.get(k) is None else by_key[k] for k, v in meta.items()}
    return meta, meta_grads, outer.detach()


class _Computed(Objective):
    """Hands ``plain_step`` a loss computed already, so that the real step is ``plain_step`` itself."""

    def __init__(self, out: StepOutput):
        self.out = out

    def loss(self, module: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        return self.out


class BilevelStep:
    """The bi-level look-ahead step rule (a ``StepRule`` for ``fit_module(step=...)``).

    Per batch, in epochs ``>= warmup_epochs`` and on every ``every``-th step of them (counted from
    the first step after the warm-up): :func:`meta_gradient` with the next meta batch of
    ``meta_batches`` at ``virtual_lr`` (``None``: the scheduler's current lr ``state.lr``, ``η_t``),
    then ``objective.meta_update``, then the real step, which is
    :func:`~longtail.stages.train.engine.plain_step` on ``objective.inner_loss`` with the live
    parameters and the updated meta values (zero_grad, backward, optimiser step, schedule step), its
    ``terms["meta"]`` the meta loss. Steps between meta steps are plain steps on
    ``objective.loss`` (the current meta values, no update); warm-up steps plain steps on
    ``objective.warmup_loss`` (Jamal's and MetaLAD's CE phase). This is paper 003 Algorithm 1 lines
    8-15, paper 000 Algorithm A-2 lines 4-6 and paper 001 Algorithm 1 lines 12-17.

    The look-ahead is plain SGD: the real optimiser's momentum and weight decay are ignored there,
    as in the papers' equations. Meta batches draw only from ``meta_batches``' own generator,
    re-seeded when a new fit starts (the step sees a new ``TrainState``), so the train rows are those
    of ``plain_step`` and, with meta values held fixed, the trained parameters equal ``plain_step``'s
    bit for bit. The fit's history gets ``meta`` only from epochs with meta steps; with
    ``every > 1`` the engine averages it over all the epoch's rows, i.e. about ``1/every`` of the
    mean meta loss.
    """

    def __init__(self, meta_batches: MetaBatches, *, virtual_lr: float | None = None, every: int = 1,
                 warmup_epochs: int = 0):
        if int(every) != every or every < 1:
            raise LongtailError(f"bi-level step: every must be a positive integer, got {every}")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise LongtailError(f"bi-level step: warmup_epochs must be a non-negative integer, got {warmup_epochs}")
        if virtual_lr is not None and not (math.isfinite(virtual_lr) and virtual_lr >= 0):
            raise LongtailError(f"bi-level step: virtual_lr must be finite and non-negative, got {virtual_lr}")
        self.meta_batches = meta_batches
        self.virtual_lr = None if virtual_lr is None else float(virtual_lr)
        self.every = int(every)
        self.warmup_epochs = int(warmup_epochs)
        self._fit: weakref.ref | None = None
        self._meta_stage_steps = 0

    def _start_if_new(self, state: TrainState) -> None:
        if self._fit is None or self._fit() is not state:
            self._fit = weakref.ref(state)
            self._meta_stage_steps = 0
            self.meta_batches.reset()

    def __call__(self, state: TrainState, batch: Batch, objective: MetaObjective) -> StepOutput:
        self._start_if_new(state)
        if batch.epoch < self.warmup_epochs:
            return plain_step(state, batch, _Computed(objective.warmup_loss(state.module, batch, state)))
        position = self._meta_stage_steps  # steps since the warm-up ended
        self._meta_stage_steps += 1
        if position % self.every:
            return plain_step(state, batch, _Computed(objective.loss(state.module, batch, state)))
        meta_batch = self.meta_batches.next(batch.epoch, batch.step)
        lr = state.lr if self.virtual_lr is None else self.virtual_lr
        meta, grads, outer = meta_gradient(state, batch, objective, meta_batch, lr)
        updated = {k: v.detach() for k, v in objective.meta_update(meta, grads, state).items()}
        out = objective.inner_loss(trainable(state.module), state, batch, updated)
        plain_step(state, batch, _Computed(out))
        out.terms = {**out.terms, "meta": outer}
        return out
