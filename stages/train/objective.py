"""What a method customises in the shared training loop: an :class:`Objective`.

``loss`` is the only required part; the hooks run at fit start, epoch start, batch end and epoch
end (in that order, :func:`longtail.stages.train.engine.fit_module`) and may keep per-row state in
``state.records``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from longtail.stages.train.data import Batch
from longtail.stages.train.state import TrainState


@dataclass
class StepOutput:
    """One step's result: ``loss`` (the scalar back-propagated), optionally the batch's ``logits``
    ``(B, C)``, its unreduced ``per_sample`` loss ``(B,)`` and named ``terms`` (scalars) that the
    loop averages per epoch next to ``loss`` (DLSA's eq. 11 parts, a meta loss)."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    per_sample: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    """The training objective of one fit, with optional hooks (all no-ops by default)."""

    def loss(self, module: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        raise NotImplementedError

    def on_fit_start(self, state: TrainState) -> None:
        """Before the first epoch (reset running statistics, allocate ``state.records``)."""

    def on_epoch_start(self, state: TrainState) -> None:
        """Before the epoch's rows are drawn (``state.epoch`` is the new epoch)."""

    def on_batch_end(self, state: TrainState, batch: Batch, out: StepOutput) -> None:
        """After the optimiser step of ``batch`` (record per-row state from ``out``)."""

    def on_epoch_end(self, state: TrainState, means: dict[str, float]) -> None:
        """After the epoch, with the epoch's mean ``loss`` and terms (already checked finite)."""


class LossObjective(Objective):
    """A cited pure loss as an objective: ``fn(module(batch.x), batch.y, **stats)``.

    ``epoch_stats(epoch)`` (optional) gives extra keyword arguments per epoch, e.g. LDAM-DRW's
    deferred weights: ``lambda epoch: {"weight": w if epoch >= start else None}``.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], epoch_stats: Callable[[int], dict] | None = None,
                 **stats: Any):
        self.fn = fn
        self.stats = stats
        self.epoch_stats = epoch_stats

    def loss(self, module: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        z = module(batch.x)
        extra = self.epoch_stats(batch.epoch) if self.epoch_stats is not None else {}
        return StepOutput(self.fn(z, batch.y, **self.stats, **extra), logits=z)
