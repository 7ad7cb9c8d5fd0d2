"""What the training loop iterates over: :class:`TrainData` (all rows) and :class:`Batch` (one step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch


@dataclass(frozen=True)
class TrainData:
    """The rows one training loop iterates over; every tensor on one device.

    Attributes:
        x: ``(N, D)`` float model inputs.
        y: ``(N,)`` int64 labels in ``[0, C)``, never remapped (what the loss sees).
        strata: ``(N,)`` int64, what class-balanced sampling balances (default: ``y``); DLSA's
            cluster-aided classifiers balance the classes present in a group, for example.
        extras: per-row side data ``(N, ...)`` a method registered; a batch carries its rows of each.
    """

    x: torch.Tensor
    y: torch.Tensor
    strata: torch.Tensor | None = None
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.x.shape[0])
        for key, value in (("y", self.y), ("strata", self.strata), *self.extras.items()):
            if value is not None and int(value.shape[0]) != n:
                raise ValueError(f"TrainData: {key} has {int(value.shape[0])} rows, x has {n}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def balance(self) -> torch.Tensor:
        """What a class-balanced sampler balances: ``strata``, else ``y``."""
        return self.y if self.strata is None else self.strata

    def batch(self, rows: torch.Tensor, epoch: int, step: int) -> "Batch":
        """The rows ``rows`` ``(B,)`` of every tensor, as one step's batch."""
        return Batch(rows=rows, x=self.x[rows], y=self.y[rows],
                     extras={k: v[rows] for k, v in self.extras.items()}, epoch=epoch, step=step)

    def whole(self, epoch: int, step: int) -> "Batch":
        """Every row in order as one batch: ``batch(arange(N))`` without gathering a copy of each
        tensor (the batch holds ``x``, ``y`` and the extras themselves; the full-batch solver's)."""
        return Batch(rows=torch.arange(len(self), device=self.x.device), x=self.x, y=self.y,
                     extras=dict(self.extras), epoch=epoch, step=step)


@dataclass(frozen=True)
class Batch:
    """One optimiser step's rows: ``rows`` ``(B,)`` int64 indices into :class:`TrainData`, their
    inputs ``x`` ``(B, D)``, labels ``y`` ``(B,)`` (global, never remapped), ``extras`` (each
    ``TrainData.extras[k][rows]``), the 0-based ``epoch`` and global optimiser ``step``."""

    rows: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    extras: Mapping[str, torch.Tensor]
    epoch: int
    step: int
