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
    parameter an error message asks to lower: ``lr``, ``flow_lr``)."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    lr_name: str = "lr"

    def steps_per_epoch(self, n: int) -> int:
        return math.ceil(n / self.batch_size)  # guarded: batch_size >= 1 (checked by the method)


@dataclass
class TrainState:
    """The state of one fit, handed to the objective's hooks and the step rule."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
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

    @property
    def lr(self) -> float:
        """The learning rate of the current step (the schedule's value)."""
        return float(self.optimizer.param_groups[0]["lr"])
