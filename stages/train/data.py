"""What the training loop iterates over: :class:`TrainData` (all rows) and :class:`Batch` (one step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch


class TrainData:
    """The rows one training loop iterates over; every tensor on one device.

    Attributes:
        x: ``(N, D)`` float model inputs.
        y: ``(N,)`` int64 labels in ``[0, C)``, never remapped (what the loss sees).
        strata: ``(N,)`` int64, what class-balanced sampling balances (default: ``y``); DLSA's
            cluster-aided classifiers balance the classes present in a group, for example.
        extras: per-row side data ``(N, ...)`` a method registered; a batch carries its rows of each.
        transform: optional, row-wise map of the stored inputs (``transform(x)[rows] ==
            transform(x[rows])``, for example a standardisation ``(x - mean) / std``) that may
            modify its argument in place. Given, the constructor's ``x`` is the stored input and
            every batch applies ``transform`` to a gathered copy of its rows, so a minibatch fit
            never holds a transformed copy of every row; :attr:`x` is then ``transform`` of all
            rows, computed once on first access and kept (for a method that reads every row).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, strata: torch.Tensor | None = None,
                 extras: Mapping[str, torch.Tensor] | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self._stored = x
        self.y = y
        self.strata = strata
        self.extras = {} if extras is None else extras
        self.transform = transform
        self._x = x if transform is None else None
        n = int(x.shape[0])
        for key, value in (("y", self.y), ("strata", self.strata), *self.extras.items()):
            if value is not None and int(value.shape[0]) != n:
                raise ValueError(f"TrainData: {key} has {int(value.shape[0])} rows, x has {n}")

    @property
    def x(self) -> torch.Tensor:
        """``(N, D)`` model inputs of every row (``transform`` applied once, then kept)."""
        if self._x is None:
            self._x = self.transform(self._stored.clone())  # clone: transform may work in place
        return self._x

    @property
    def device(self) -> torch.device:
        """The device of the rows (without applying ``transform`` to all of them)."""
        return self._stored.device

    def __len__(self) -> int:
        return int(self._stored.shape[0])

    @property
    def balance(self) -> torch.Tensor:
        """What a class-balanced sampler balances: ``strata``, else ``y``."""
        return self.y if self.strata is None else self.strata

    def batch(self, rows: torch.Tensor, epoch: int, step: int) -> "Batch":
        """The rows ``rows`` ``(B,)`` of every tensor, as one step's batch."""
        if self._x is not None:
            x = self._x[rows]
        else:
            x = self.transform(self._stored[rows])  # a gathered copy: transformed in place
        return Batch(rows=rows, x=x, y=self.y[rows],
                     extras={k: v[rows] for k, v in self.extras.items()}, epoch=epoch, step=step)

    def whole(self, epoch: int, step: int) -> "Batch":
        """Every row in order as one batch: ``batch(arange(N))`` without gathering a copy of each
        tensor (the batch holds :attr:`x`, ``y`` and the extras themselves; the full-batch solver's)."""
        return Batch(rows=torch.arange(len(self), device=self.device), x=self.x, y=self.y,
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
