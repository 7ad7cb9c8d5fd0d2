"""The one training loop of every trained method: :func:`fit_module` (minibatch, or full batch).

Heads, LWS's two phases, LDAM-DRW, Heuristic-CALA and Dynamic-LA, LADE, DLSA's flow filters and
cluster-aided classifiers and the stage-1 CNN all train here. What a method customises it gives as
an :class:`~longtail.stages.train.objective.Objective` (the loss and its hooks), a sampler (which
rows an epoch visits: instance or class-balanced over ``strata``), an :class:`OptimConfig` and a
step rule (:func:`plain_step`, or the bi-level look-ahead step of
:mod:`longtail.stages.train.bilevel`).

What every fit gets: SGD with momentum or Adam from one table (:data:`OPTIMIZERS`); a cosine
learning-rate schedule per step from ``lr`` to 0; no weight decay for the parameters a module names
in ``no_decay``; rows drawn from one seeded ``torch.Generator`` on the data's device; one device sync
per epoch (the epoch's mean loss and terms), with a :class:`LongtailError` naming the fit, the epoch
and the learning rate when one is not finite; a progress bar over epochs, quiet off a terminal; eval
mode and frozen parameters at the end.

The full-batch solver (``OptimConfig(optimizer="lbfgs")``, :func:`fit_full_batch`) serves the
convex linear heads on cached features: the same objective, sampler and parameters, solved to
convergence by L-BFGS instead of run for a fixed number of minibatch epochs.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from longtail.stages.errors import LongtailError
from longtail.stages.train.data import Batch, TrainData
from longtail.stages.train.objective import Objective, StepOutput
from longtail.stages.train.samplers import ClassBalancedSampler, InstanceSampler
from longtail.stages.train.state import OptimConfig, TrainState


def _fusable(groups: list[dict]) -> bool:
    """Whether torch's fused Adam serves every parameter (CPU or CUDA floats): the same update in one
    kernel per step instead of a dozen element-wise passes over each tensor (4.5x faster on the
    3.2M parameters of a DLSA flow at ``D = 2,048``)."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])


#: optimiser name -> factory of ``(param groups, config)``
OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr, fused=_fusable(groups)),
    # one group (L-BFGS takes no per-group options): fit_full_batch adds the weight decay itself
    "lbfgs": lambda groups, c: torch.optim.LBFGS(
        [p for g in groups for p in g["params"]], lr=c.lr, max_iter=int(c.max_iter),
        max_eval=2 * int(c.max_iter), tolerance_grad=float(c.tol_grad),
        tolerance_change=float(c.tol_change), history_size=int(c.history_size), line_search_fn="strong_wolfe"),
}


class Sampler(Protocol):
    def epoch_order(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(M,)`` row indices one epoch visits, in order."""


class StepRule(Protocol):
    def __call__(self, state: TrainState, batch: Batch, objective: Objective) -> StepOutput: ...


def plain_step(state: TrainState, batch: Batch, objective: Objective) -> StepOutput:
    """The objective's loss, ``zero_grad``, ``backward``, one optimiser and one schedule step."""
    out = objective.loss(state.module, batch, state)
    state.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    return out


def param_groups(module: nn.Module, weight_decay: float,
                 params: Iterable[tuple[str, nn.Parameter]] | None = None) -> list[dict]:
    """The parameters to optimise (``params``, default all of ``module``; the others are frozen), in
    a group with ``weight_decay`` and one without for the names in ``module.no_decay`` (matched on
    the full name or its last part). Empty groups are left out."""
    chosen = None if params is None else {id(p) for _, p in params}
    no_decay = set(getattr(module, "no_decay", ()))
    decay, plain = [], []
    for name, p in module.named_parameters():
        p.requires_grad_(chosen is None or id(p) in chosen)
        if p.requires_grad:
            (plain if name.rsplit(".", 1)[-1] in no_decay or name in no_decay else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": plain, "weight_decay": 0.0}) if g["params"]]


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay from the optimiser's lr to 0 over ``total_steps`` (at least 1)."""
    total = max(1, int(total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))


def fit_module(module: nn.Module, data: TrainData, objective: Objective, config: OptimConfig, *,
               generator: torch.Generator, sampler: Sampler | None = None,
               params: Iterable[tuple[str, nn.Parameter]] | None = None,
               step: StepRule = plain_step, desc: str = "head") -> TrainState:
    """Train ``module`` on ``data`` (on the generator's device) with ``objective``; returns the state.

    Per epoch: ``on_epoch_start``, the epoch's rows from ``sampler`` (default
    :class:`~longtail.stages.train.samplers.InstanceSampler`), then batches of ``batch_size`` of
    them in order, each through ``step`` and ``on_batch_end``; then one device sync for the epoch's
    means (``loss`` and every term, weighted by batch size), the finite check and ``on_epoch_end``.
    The number of epochs is ``config.total_epochs(len(data))`` (``epochs``, more if ``min_steps``
    asks for them).

    A full-batch ``config`` (``optimizer="lbfgs"``) goes to :func:`fit_full_batch` instead; it
    takes the plain step rule only.
    """
    if config.full_batch:
        if step is not plain_step:
            raise ValueError(f"{desc}: the full-batch solver {config.optimizer!r} has its own step rule")
        return fit_full_batch(module, data, objective, config, generator=generator, sampler=sampler,
                              params=params, desc=desc)
    n = len(data)
    sampler = InstanceSampler() if sampler is None else sampler
    epochs = config.total_epochs(n)
    optimizer = OPTIMIZERS[config.optimizer](param_groups(module, config.weight_decay, params), config)
    scheduler = cosine_schedule(optimizer, epochs * config.steps_per_epoch(n))
    state = TrainState(module, optimizer, scheduler, generator, data, config, desc=desc)
    objective.on_fit_start(state)
    module.train()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=None, leave=False)
    for epoch in bar:
        state.epoch = epoch
        objective.on_epoch_start(state)
        order = sampler.epoch_order(n, generator)
        seen = int(order.shape[0])
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, seen, config.batch_size):
            rows = order[start:start + config.batch_size]
            batch = data.batch(rows, epoch, state.step)
            out = step(state, batch, objective)
            state.step += 1
            size = rows.numel()
            for key, value in (("loss", out.loss), *out.terms.items()):
                part = value.detach().double() * size
                sums[key] = sums[key] + part if key in sums else part
            objective.on_batch_end(state, batch, out)
        means = {k: float(v) / seen for k, v in sums.items()}  # one device sync per epoch; seen >= 1
        if not all(math.isfinite(v) for v in means.values()):
            detail = "" if len(means) == 1 else " (" + ", ".join(f"{k} {v:.4g}" for k, v in means.items()) + ")"
            raise LongtailError(
                f"{desc}: the training loss became {means['loss']} at epoch {epoch + 1}{detail}: "
                f"lower {config.lr_name} (now {config.lr})")
        state.history.append(means)
        objective.on_epoch_end(state, means)
        bar.set_postfix(loss=f"{means['loss']:.4g}")
    bar.close()
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return state


# ---------------------------------------------------------------------- the full-batch solver
def full_batch_groups(sampler: Sampler | None, data: TrainData) -> list[tuple[torch.Tensor, float]]:
    """The sampler's expected loss as ``(rows, weight)`` pairs: ``sum_g weight_g * loss(rows_g)``.

    Instance sampling (or none): every row at once, weight 1. Class-balanced sampling
    (:class:`~longtail.stages.train.samplers.ClassBalancedSampler`) draws a stratum uniformly, then
    a row of it: its expected minibatch loss is the mean over the ``S`` strata of each stratum's
    mean loss, so one group per stratum with weight ``1 / S``. A loss that is not a mean over rows
    (LADE's batch estimates) sees each stratum as one batch, as a class-balanced minibatch would
    see a mixture of them. Another sampler has no stated expectation: ``ValueError`` (a bug)."""
    n = len(data)
    if sampler is None or isinstance(sampler, InstanceSampler):
        return [(torch.arange(n, device=data.device), 1.0)]
    if isinstance(sampler, ClassBalancedSampler):
        seg = sampler.segments
        bounds = torch.stack([seg.offsets, seg.counts]).cpu().tolist()  # one host copy, S strata
        weight = 1.0 / sampler.num_strata  # num_strata >= 1: every stratum has a row (checked)
        return [(seg.order[o:o + c], weight) for o, c in zip(*bounds)]
    raise ValueError(f"the full-batch solver knows the expected loss of instance and class-balanced "
                     f"sampling, not of {type(sampler).__name__}")


def fit_full_batch(module: nn.Module, data: TrainData, objective: Objective, config: OptimConfig, *,
                   generator: torch.Generator, sampler: Sampler | None = None,
                   params: Iterable[tuple[str, nn.Parameter]] | None = None, desc: str = "head") -> TrainState:
    """Minimise the full-batch objective of ``module`` on ``data`` by L-BFGS; returns the state.

    The objective is ``sum_g w_g objective.loss(rows_g)`` (:func:`full_batch_groups`: the expected
    loss of ``sampler``) plus the ridge ``weight_decay / 2 * ||theta||^2`` over the parameters that
    decay; a parameter the module names in ``no_decay`` (a scale, which decay would pull to 0) is
    instead held to its value at the start of the fit with the same strength, ``weight_decay / 2 *
    ||theta - theta_0||^2``, so that the problem has a finite minimiser even on separable data
    (unregularised L-BFGS on separable data grows the weights without bound). With torch's SGD
    convention (``grad += weight_decay * theta``) this is the same regularised problem the
    minibatch solver's weight decay approximately solves.

    Solver: :class:`torch.optim.LBFGS` with a strong-Wolfe line search, first trial step
    ``config.lr``, ``config.history_size`` correction pairs. Stopping rule: the largest absolute
    gradient entry of the objective at most ``config.tol_grad``, or a change of the objective
    between iterations below ``config.tol_change`` times its initial value, or ``config.max_iter``
    iterations (or ``2 * max_iter`` function evaluations), whichever comes first; what happened is
    recorded in ``state.solver``. The data is seen as one batch: with the hooks ``on_fit_start``,
    ``on_epoch_start`` (epoch 0) before the solve, and after it one pass at the solution through
    ``on_batch_end`` (per group), the finite check and ``on_epoch_end`` with the data loss and terms
    (``state.history`` holds that one entry). Nothing is drawn from ``generator``.
    """
    groups_rows = full_batch_groups(sampler, data)
    groups = param_groups(module, config.weight_decay, params)
    optimizer = OPTIMIZERS[config.optimizer](groups, config)
    state = TrainState(module, optimizer, None, generator, data, config, desc=desc)
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    anchored = [(p, p.detach().clone()) for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    wd = float(config.weight_decay)
    if sampler is None or isinstance(sampler, InstanceSampler):  # one group of every row: no gathered copy
        batches = [data.whole(0, 0)]
    else:
        batches = [data.batch(rows, 0, 0) for rows, _ in groups_rows]

    def data_loss() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[StepOutput]]:
        outs = [objective.loss(module, batch, state) for batch in batches]
        loss = sum(w * out.loss for (_, w), out in zip(groups_rows, outs))
        terms: dict[str, torch.Tensor] = {}
        for (_, w), out in zip(groups_rows, outs):
            for key, value in out.terms.items():
                terms[key] = terms[key] + w * value if key in terms else w * value
        return loss, terms, outs

    def penalty() -> torch.Tensor | float:
        if wd == 0.0:
            return 0.0
        ridge = sum(p.square().sum() for p in decayed) + sum((p - p0).square().sum() for p, p0 in anchored)
        return 0.5 * wd * ridge

    bar = tqdm(desc=desc, unit="eval", disable=None, leave=False)
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        optimizer.zero_grad(set_to_none=True)
        total = data_loss()[0] + penalty()
        total.backward()
        evaluations += 1
        bar.update(1)
        return total

    objective.on_fit_start(state)
    module.train()
    objective.on_epoch_start(state)
    with torch.no_grad():
        initial = float(data_loss()[0] + penalty())
    # the change tolerance relative to the initial objective (a mean loss, so of order 1)
    optimizer.param_groups[0]["tolerance_change"] = float(config.tol_change) * max(abs(initial), 1e-12)
    if math.isfinite(initial):
        optimizer.step(closure)
    bar.close()
    lbfgs = optimizer.state[optimizer.param_groups[0]["params"][0]]
    iterations = int(lbfgs.get("n_iter", 0))
    state.step = iterations
    optimizer.zero_grad(set_to_none=True)  # one pass at the solution: its loss, terms and gradient
    loss, terms, outs = data_loss()
    (loss + penalty()).backward()
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_max = max((float(gr.abs().max()) for gr in grads), default=0.0)
    optimizer.zero_grad(set_to_none=True)
    loss, terms = loss.detach(), {k: v.detach() for k, v in terms.items()}
    stopped = ("max_iter" if iterations >= int(config.max_iter) else
               "max_eval" if int(lbfgs.get("func_evals", 0)) >= 2 * int(config.max_iter) else
               "tol_grad" if grad_max <= float(config.tol_grad) else "tol_change")
    state.solver = {"iterations": iterations, "evaluations": evaluations, "grad_max": grad_max,
                    "stopped": stopped}
    for batch, out in zip(batches, outs):
        objective.on_batch_end(state, batch, out)
    means = {"loss": float(loss), **{k: float(v) for k, v in terms.items()}}
    if not all(math.isfinite(v) for v in means.values()):
        raise LongtailError(
            f"{desc}: the training loss became {means['loss']} in the full-batch L-BFGS fit (after "
            f"{iterations} iterations): raise weight_decay (now {config.weight_decay}) or use solver 'sgd'")
    state.history.append(means)
    objective.on_epoch_end(state, means)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return state
