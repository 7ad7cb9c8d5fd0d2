"""The one minibatch training loop of every trained method: :func:`fit_module`.

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
from longtail.stages.train.samplers import InstanceSampler
from longtail.stages.train.state import OptimConfig, TrainState


#: optimiser name -> factory of ``(param groups, config)``
OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr),
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
    """
    n = len(data)
    sampler = InstanceSampler() if sampler is None else sampler
    optimizer = OPTIMIZERS[config.optimizer](param_groups(module, config.weight_decay, params), config)
    scheduler = cosine_schedule(optimizer, int(config.epochs) * config.steps_per_epoch(n))
    state = TrainState(module, optimizer, scheduler, generator, data, config, desc=desc)
    objective.on_fit_start(state)
    module.train()
    bar = tqdm(range(int(config.epochs)), desc=desc, unit="epoch", disable=None, leave=False)
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
