"""What one fit is: its optimiser settings (:class:`OptimConfig`) and its running state
(:class:`TrainState`), which the loop hands to the objective's hooks and the step rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from longtail.stages.train.data import TrainData


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings of one fit. ``lr_name`` is how the user knows the learning rate (the
    parameter an error message asks to lower: ``lr``, ``flow_lr``).

    ``optimizer`` names a row of :data:`longtail.stages.train.engine.OPTIMIZERS`:

    * ``"sgd"`` (with ``momentum``) and ``"adam"`` are minibatch solvers: ``epochs`` passes of
      ``batch_size`` rows under a cosine schedule from ``lr``, at least ``min_steps`` optimiser steps
      (:meth:`total_epochs` adds epochs on small data; 0 keeps exactly ``epochs``);
    * ``"lbfgs"`` is the full-batch solver of :func:`longtail.stages.train.engine.fit_full_batch`:
      L-BFGS with a strong-Wolfe line search (``lr`` is its first trial step, 1 as usual) on the
      expected loss of the sampler plus ``weight_decay / 2 * ||theta||^2``, stopped by the first of:
      the largest gradient entry at most ``tol_grad``; a loss change between iterations below
      ``tol_change`` times the initial loss; ``max_iter`` iterations. ``epochs`` and
      ``batch_size`` are not used.
    """

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    optimizer: Literal["sgd", "adam", "lbfgs"] = "sgd"
    momentum: float = 0.9
    lr_name: str = "lr"
    min_steps: int = 0
    max_iter: int = 500
    tol_grad: float = 1e-5
    tol_change: float = 1e-9
    history_size: int = 20

    def steps_per_epoch(self, n: int) -> int:
        return math.ceil(n / self.batch_size)  # guarded: batch_size >= 1 (checked by the method)

    def total_epochs(self, n: int) -> int:
        """The epochs a minibatch fit on ``n`` rows runs: ``epochs``, or more when that is fewer than
        ``min_steps`` optimiser steps (``ceil(min_steps / steps_per_epoch)``)."""
        epochs = int(self.epochs)
        if self.min_steps > 0:
            epochs = max(epochs, math.ceil(int(self.min_steps) / self.steps_per_epoch(n)))  # steps >= 1
        return epochs

    @property
    def full_batch(self) -> bool:
        """Whether the solver sees every row at once (L-BFGS) rather than minibatches."""
        return self.optimizer == "lbfgs"


@dataclass
class TrainState:
    """The state of one fit, handed to the objective's hooks and the step rule."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    #: the minibatch solvers' cosine schedule; ``None`` for the full-batch solver
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator
    data: TrainData
    config: OptimConfig
    desc: str = "head"
    epoch: int = 0
    step: int = 0
    #: mean loss and terms of every finished epoch
    history: list[dict[str, float]] = field(default_factory=list)
    #: per-row buffers owned by the objective (e.g. each row's last prediction)
    records: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the full-batch solver's report (``iterations``, ``evaluations``, ``grad_max``, ``stopped``)
    solver: dict[str, float | str] = field(default_factory=dict)

    @property
    def lr(self) -> float:
        """The learning rate of the current step (the schedule's value)."""
        return float(self.optimizer.param_groups[0]["lr"])
