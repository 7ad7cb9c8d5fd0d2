"""What the meta-learned heads share: the meta set, the bi-level fit, the meta stage and its checks.

A :class:`MetaHead` is a :class:`~longtail.stages.heads.TrainedHead` whose objective is a
:class:`~longtail.stages.train.bilevel.MetaObjective`, trained by
:class:`~longtail.stages.train.bilevel.BilevelStep` (specification §4.1):

* the meta set is a shared artifact (:func:`~longtail.stages.meta.metaset.meta_set_requirement`),
  ``meta_per_class`` rows per class from the val split (``meta_source: val``, the default) or held
  out of train (``meta_source: train``: those rows then leave the train set of the fit, and the
  class counts, priors and class weights are those of the rows that stay); without a pipeline,
  ``fit`` draws it itself with the same rule;
* its features are standardised with the head's own train moments, and meta batches of
  ``meta_batch`` rows come from their own generator seeded with ``seed``, so the train permutation
  is that of the non-meta base (the parity special cases);
* the first ``floor(meta_start * epochs)`` epochs are the plain warm-up of paper 003 (Algorithm 1,
  lines 1-5) and paper 001 (Algorithm 1, lines 2-6); the look-ahead is plain SGD at the scheduled lr;
* a step size that makes the training loss non-finite in the meta stage is a one-line error that
  names the meta step size (:attr:`MetaHead.step_name`), checked once per epoch (one device sync).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from longtail.stages.base import FitContext, Requirement
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.heads import TrainedHead, head_sampler
from longtail.stages.heads import deferred_reweighting_epoch as stage_epoch
from longtail.stages.meta.metaset import (
    META_SOURCES,
    MetaSet,
    build_meta_set,
    meta_set_requirement,
    select_meta_rows,
    split_for_fit,
)
from longtail.stages.train.bilevel import BilevelStep, MetaBatches, MetaObjective
from longtail.stages.train.data import Batch, TrainData
from longtail.stages.train.engine import fit_module
from longtail.stages.train.objective import StepOutput
from longtail.stages.train.state import TrainState

#: specification §1.3 / §3.3: ten meta rows per class (paper 003 §5, paper 001 §V), meta batches of 100
META_PER_CLASS, META_BATCH = 10, 100


class _CheckedStep:
    """``BilevelStep`` plus a finite check of the meta stage's losses at each epoch's last step."""

    def __init__(self, inner: BilevelStep, head: "MetaHead"):
        self.inner, self.head = inner, head
        self.finite: torch.Tensor | None = None

    def __call__(self, state: TrainState, batch: Batch, objective: MetaObjective) -> StepOutput:
        out = self.inner(state, batch, objective)
        if batch.epoch >= self.inner.warmup_epochs:
            ok = torch.isfinite(out.loss.detach()).all()
            self.finite = ok if self.finite is None else self.finite & ok
        last = (state.step + 1) % state.config.steps_per_epoch(len(state.data)) == 0
        if last and self.finite is not None:
            if not bool(self.finite):  # one device sync per meta-stage epoch
                raise LongtailError(
                    f"method {self.head.name!r}: the meta step made the training loss non-finite at epoch "
                    f"{batch.epoch + 1}: lower {self.head.step_name} (now {getattr(self.head, self.head.step_name)})")
            self.finite = None
        return out


class MetaHead(TrainedHead):
    """A head trained by the bi-level look-ahead step on a meta set (not registered).

    Subclasses give :meth:`objective` (a :class:`MetaObjective`), :attr:`step_name` (the meta step
    size an error asks to lower) and may keep what the objective recorded in :meth:`_trained`.
    Their ``__init__`` stores ``meta_start``, ``meta_per_class``, ``meta_batch`` and ``meta_source``.
    """

    #: the constructor parameter that scales the meta step (named when the loss becomes non-finite)
    step_name = "tau"

    # ------------------------------------------------------------------ the meta set
    def _requirements(self) -> list[Requirement]:
        """The meta set (kind ``meta-set``), drawn from ``meta_source``."""
        return [meta_set_requirement(source=self.meta_source, per_group=int(self.meta_per_class),
                                     seed=int(self.seed), attach=self.set_meta_set)]

    def set_meta_set(self, meta: MetaSet) -> "MetaHead":
        """Use ``meta`` (checked against the splits in ``fit``) instead of drawing one."""
        if not isinstance(meta, MetaSet):
            raise TypeError("set_meta_set expects a MetaSet")
        self._meta_set = meta  # handed over, not learned: kept across fits
        return self

    def total_epochs(self, ctx: FitContext) -> int:
        """The epochs the fit runs on its ``sum(ctx.class_counts)`` train rows: ``epochs``, more when
        ``min_steps`` asks for more steps (the step budget of the minibatch heads, README's solver rule)."""
        return self.optim_config().total_epochs(int(np.sum(ctx.class_counts)))

    def warmup_epochs(self, ctx: FitContext) -> int:
        """``floor(meta_start * total epochs)``: the plain warm-up before the meta stage."""
        return stage_epoch(self.total_epochs(ctx), float(self.meta_start))

    # ------------------------------------------------------------------ checks
    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        self._check("meta_start", self.meta_start, low=0, high=1, high_open=True)
        self._check("meta_per_class", self.meta_per_class, integer=True, low=1)
        self._check("meta_batch", self.meta_batch, integer=True, low=1)
        if self.meta_source not in META_SOURCES:
            raise LongtailError(f"method {self.name!r}: meta_source = {self.meta_source!r} is not one of "
                                f"{', '.join(META_SOURCES)}")

    def _validate(self, ctx: FitContext) -> None:
        where = f"method {self.name!r}: meta set"
        if self.meta_source == "val":
            if ctx.val is None:
                raise LongtailError(f"method {self.name!r}: meta_source is val but there is no val split "
                                    "(set meta_source: train to hold meta rows out of train)")
            select_meta_rows(ctx.val.require_labels(), per_group=1, num_classes=ctx.num_classes,
                             class_names=ctx.val.class_names, where=f"{where} (val split)")
        else:
            counts = np.asarray(ctx.class_counts)
            if (counts < 2).any():
                c = int(np.flatnonzero(counts < 2)[0])
                raise LongtailError(f"{where}: class {c} has {int(counts[c])} train row(s); meta_source: "
                                    "train needs at least 2 per class (one stays in train)")
        meta = getattr(self, "_meta_set", None)
        if meta is not None and meta.source != self.meta_source:
            raise LongtailError(f"{where}: the attached meta set was drawn from {meta.source}, "
                                f"meta_source is {self.meta_source}")

    # ------------------------------------------------------------------ fit
    def _fit(self, train: FeatureSet, val: FeatureSet | None, ctx: FitContext) -> None:
        meta = getattr(self, "_meta_set", None)
        if meta is None:  # (a Python shell: no pipeline handed one over)
            pool = val if self.meta_source == "val" else train
            meta = build_meta_set(pool, source=self.meta_source, per_group=int(self.meta_per_class),
                                  seed=int(self.seed), where=f"method {self.name!r}: meta set")
        fit_train, meta_rows = split_for_fit(train, val, meta, where=f"method {self.name!r}: meta set")
        if fit_train is not train:  # rows held out of train: the fit's counts and prior are those left
            ctx = replace(ctx, class_counts=fit_train.class_counts, source_prior=fit_train.prior)
            self.source_prior_ = ctx.source_prior
        self._meta_rows = meta_rows
        self.meta_rows_ = int(len(meta_rows))
        try:
            super()._fit(fit_train, val, ctx)
        finally:
            self._meta_rows = None  # features of the meta set: not state

    def _train(self, data: TrainData, generator: torch.Generator, ctx: FitContext) -> None:
        dev = data.x.device
        rows = self._meta_rows
        meta = TrainData(self._standardise(torch.tensor(rows.features, device=dev)),
                         torch.tensor(rows.labels, device=dev))
        batches = MetaBatches(meta, int(self.meta_batch), seed=int(self.seed))
        self.meta_start_epoch_ = self.warmup_epochs(ctx)
        step = _CheckedStep(BilevelStep(batches, warmup_epochs=self.meta_start_epoch_), self)
        objective = self.objective(ctx)
        state = fit_module(self.module_, data, objective, self.optim_config(), generator=generator,
                           sampler=head_sampler(self.sampling, data.balance, ctx.num_classes), step=step,
                           desc=self.name)
        self.meta_loss_ = np.array([h.get("meta", np.nan) for h in state.history], dtype=np.float64)
        self._trained(objective, ctx)

    def _trained(self, objective: MetaObjective, ctx: FitContext) -> None:
        """What the head keeps of its objective after training (diagnostics; default nothing)."""

    # ------------------------------------------------------------------ diagnostics
    def _meta_summary(self) -> dict[str, Any]:
        """The diagnostics every meta head reports: the meta set and the meta loss per epoch."""
        return {"method": self.name, "meta_source": self.meta_source, "meta_rows": int(self.meta_rows_),
                "meta_start_epoch": int(self.meta_start_epoch_),
                "meta_loss": [None if not np.isfinite(v) else float(v) for v in self.meta_loss_]}
