"""Heuristic-CALA and Dynamic-LA heads (paper 000, Zhou, Wu, Yang, AAAI 2025).

``heuristic-cala`` trains the linear head with the CALA loss (eq. 5, 8; Algorithm A-1): every batch
is MixUp-augmented (``alpha = 0.2``, appendix B.II) and its logits are adjusted by
``tau1 log p_tr(c) + tau2 v(x, c)``, ``v`` the K-neighbourhood estimate of the CCPD ratio
(:func:`stages.losses.cala.cala_adjustment`). Test-time logits are the plain ``f(x)``.
``cala-no-u`` (``tau1 = 0``) and ``cala-no-v`` (``tau2 = 0``) are the ablations of Table 5.
``dynamic-la`` (appendix D.VII) is the ``K = infinity`` case: ``tau log p_pr(c)``, ``p_pr`` the
class proportions of the model's own predictions on the train set.

How the statistics follow the training (all on the configured device, no extra pass over the data):

* **Neighbours.** A :class:`~stages.neighbours.NeighbourTable` of the raw train features (cosine,
  self excluded, appendix B.II): the pipeline hands its cached table over with :meth:`set_table`;
  without one, ``fit`` builds it with :func:`~stages.neighbours.build_table`. Only the first ``k``
  columns are used, so a table with a larger K serves too.
* **MixUp on a linear head.** ``f`` is affine, so ``f(lam x_i + (1 - lam) x_j) = lam f(x_i) +
  (1 - lam) f(x_j)``: the head computes the logits of the clean batch once and mixes them, which is
  exactly training on mixed features, and it gets the clean predictions ``q_i = softmax(f(x_i))`` for
  free. One ``lam ~ Beta(alpha, alpha)`` per batch (folded to ``lam >= 1/2``, so the mixed sample
  stays closest to ``x_i``, whose neighbourhood adjusts it), partners by a random permutation of the
  batch; the loss is ``lam l_CALA(y_i) + (1 - lam) l_CALA(y_j)``.
* **Refresh.** The predictions ``q`` and MixUp labels of every train row are recorded as its batch
  is trained; at the start of each epoch the adjustment ``(N, C)`` is recomputed from the records of
  the previous epoch (every row is visited once per epoch), so ``p_pr`` follows the model epoch by
  epoch. The first epoch has no predictions yet: it trains with ``v = 0`` (``dynamic-la``: the train
  prior, i.e. logit adjustment) as a warm-up.

Which label prior do the plain logits carry (for ``+pc``)? At the optimum of eq. 5,
``f(x)[c] + tau1 log p_tr(c) + tau2 v(x, c) = log p_tr(c | x) + const(x)``; ``v`` estimates a ratio of
class-conditional densities (eq. 4), which carries no label prior, so the logits carry
``p_tr^(1 - tau1)`` (renormalised), as for ``logit-adjust`` with ``tau = tau1``. For ``dynamic-la``
they carry ``p_tr / p_pr^tau`` (renormalised), ``p_pr`` the proportions its last epoch was adjusted by
(``pred_prior_``).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from longtail.stages.base import register
from longtail.stages.calibrate import prior_from_log
from longtail.stages.data import FeatureSet
from longtail.stages.device import resolve_device
from longtail.stages.errors import LongtailError
from longtail.stages.heads import BATCH_SIZE, EPOCHS, LR, WEIGHT_DECAY, LinearClassifier, _check_number, _Head, train_module
from longtail.stages.losses.cala import cala_adjustment, cala_loss, dynamic_la_adjustment
from longtail.stages.neighbours import INDEXES, NeighbourTable, build_table, table_fingerprint

#: paper 000 defaults: tau1 = 1.5, tau2 = 1 (section "Experiments for Class Imbalance"), MixUp alpha
#: 0.2 and smoothing 0.05 (appendix B.II); K = 30 inside the paper's grid 10-100
TAU1, TAU2, K, ALPHA, SMOOTHING = 1.5, 1.0, 30, 0.2, 0.05


class _AdjustedMixupHead(_Head):
    """A linear head trained on MixUp batches with a logit adjustment refreshed every epoch from the
    recorded predictions (not registered). Subclasses give :meth:`_adjustment`."""

    def __init__(self, *, alpha: float = ALPHA, epochs: int = EPOCHS, lr: float = LR,
                 batch_size: int = BATCH_SIZE, weight_decay: float = WEIGHT_DECAY, seed: int = 0,
                 device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.alpha = alpha

    def _check_own_params(self) -> None:
        _check_number(self.name, "alpha", self.alpha, low=0, low_open=True)

    def _records(self) -> set[str]:
        """What :meth:`_adjustment` reads of the previous epoch: ``probs`` (every row's prediction),
        ``pred_sum`` (their sum), ``mixup`` (every row's MixUp partner label and weight)."""
        return set()

    def _adjustment(self, epoch: int, y: torch.Tensor, rec: dict[str, Any], log_prior: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` or ``(C,)`` float32 adjustment for ``epoch`` from the previous epoch's records
        ``rec``: ``probs`` ``(N, C)`` (or None), the predictions of every row; ``pred_sum`` ``(C,)``
        float64, their sum; ``partner`` and ``lam`` ``(N,)``, the MixUp partner labels and weights.
        ``log_prior`` ``(C,)`` float64 is ``log p_tr``."""
        raise NotImplementedError

    def _train(self, x, y, class_counts, generator, val) -> None:
        assert type(self.module_) is LinearClassifier  # the logit mixing below needs an affine head
        n, c, dev = int(y.shape[0]), self.num_classes_, y.device
        log_prior = torch.log(torch.as_tensor(self.source_prior_, dtype=torch.float64, device=dev))
        wanted = self._records()
        rec: dict[str, Any] = {
            # q = softmax(f(x)) of every row, recorded when its batch trains, and their sum
            "probs": torch.empty(n, c, dtype=torch.float32, device=dev) if "probs" in wanted else None,
            "pred_sum": torch.zeros(c, dtype=torch.float64, device=dev) if "pred_sum" in wanted else None,
            # MixUp partner label of every row in the current epoch, and the weight of its own label
            "partner": y.clone() if "mixup" in wanted else None,
            "lam": torch.ones(n, dtype=torch.float32, device=dev) if "mixup" in wanted else None,
        }
        beta = np.random.default_rng([int(self.seed), 0xCA1A])  # one host draw per batch, no device sync
        alpha = float(self.alpha)
        current: dict[str, Any] = {"epoch": -1, "adjust": None}

        def loss(z: torch.Tensor, rows: torch.Tensor, epoch: int) -> torch.Tensor:
            if epoch != current["epoch"]:  # first batch of an epoch: refresh from the previous one
                current["epoch"], current["adjust"] = epoch, None  # (frees the old one first)
                current["adjust"] = self._adjustment(epoch, y, rec, log_prior)
                if rec["pred_sum"] is not None:
                    rec["pred_sum"].zero_()
            yb = y[rows]
            if rec["probs"] is not None or rec["pred_sum"] is not None:
                with torch.no_grad():
                    q = torch.softmax(z.detach().float(), dim=1)
                    if rec["probs"] is not None:
                        rec["probs"][rows] = q
                    if rec["pred_sum"] is not None:
                        rec["pred_sum"] += q.sum(dim=0, dtype=torch.float64)
            perm = torch.randperm(rows.numel(), generator=generator, device=dev)
            w = float(beta.beta(alpha, alpha))
            w = max(w, 1.0 - w)
            yp = yb[perm]
            if rec["partner"] is not None:
                rec["partner"][rows] = yp
                rec["lam"][rows] = w
            adjust = current["adjust"]
            adj = adjust if adjust.dim() == 1 else adjust[rows]
            return cala_loss(w * z + (1.0 - w) * z[perm], yb, adj, partner_labels=yp, lam=w)

        # the trainer hands the loss the "labels" of the batch: here the row numbers, so the loss
        # finds each row's neighbourhood and records its prediction (instance sampling needs no labels)
        train_module(self.module_, x, torch.arange(n, device=dev), loss, sampling="instance",
                     num_classes=c, generator=generator, desc=self.name, **self._optim_args())


@register("heuristic-cala")
class HeuristicCALAHead(_AdjustedMixupHead):
    """Heuristic-CALA (paper 000, eq. 5 and 8, appendix B.II, Algorithm A-1).

    Args:
        tau1: weight of ``u(y) = log p_tr(y)`` (1.5).
        tau2: weight of the neighbourhood CCPD-ratio term ``v(x, y)`` (1).
        k: neighbourhood size K, ``1 <= K < N`` (30; the paper's grid is 10-100).
        alpha: MixUp ``Beta(alpha, alpha)`` parameter (0.2).
        smoothing: the smoothing factor of eq. A.11 in ``[0, 1)`` (0.05).
        index: the neighbour table's faiss index, ``flat`` (exact), ``ivf`` or ``hnsw``.
        epochs, lr, batch_size, weight_decay, seed, device: the shared head trainer's.
    """

    def __init__(self, *, tau1: float = TAU1, tau2: float = TAU2, k: int = K, alpha: float = ALPHA,
                 smoothing: float = SMOOTHING, index: str = "flat", epochs: int = EPOCHS, lr: float = LR,
                 batch_size: int = BATCH_SIZE, weight_decay: float = WEIGHT_DECAY, seed: int = 0,
                 device: str = "auto"):
        super().__init__(alpha=alpha, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.tau1 = tau1
        self.tau2 = tau2
        self.k = k
        self.smoothing = smoothing
        self.index = index

    # ------------------------------------------------------------------ the neighbour table
    def table_params(self) -> dict:
        """The neighbour table this method needs (the pipeline caches it: :mod:`pipeline.tables`)."""
        return {"k": self.k, "metric": "cosine", "index": self.index, "device": self.device}

    def set_table(self, table: NeighbourTable) -> "HeuristicCALAHead":
        """Use ``table`` (checked against the train split in ``fit``) instead of building one."""
        if not isinstance(table, NeighbourTable):
            raise TypeError("set_table expects a NeighbourTable")
        self._table = table
        return self

    def _uses_table(self) -> bool:
        return float(self.tau2) != 0.0

    def _check_own_params(self) -> None:
        super()._check_own_params()
        _check_number(self.name, "tau1", self.tau1, low=0)
        _check_number(self.name, "tau2", self.tau2, low=0)
        _check_number(self.name, "k", self.k, integer=True, low=1)
        _check_number(self.name, "smoothing", self.smoothing, low=0)
        if float(self.smoothing) >= 1:
            raise LongtailError(f"method {self.name!r}: smoothing = {self.smoothing!r} must be >= 0 and < 1")
        if self.index not in INDEXES:
            raise LongtailError(f"method {self.name!r}: index = {self.index!r} is not one of {', '.join(INDEXES)}")

    def _fit(self, train: FeatureSet, val: FeatureSet | None) -> None:
        self._check_params()
        self._neighbours = None  # (N, k) rows of the table; not state (the table is an artifact)
        if self._uses_table():
            n = len(train)
            if int(self.k) >= n:
                raise LongtailError(f"method {self.name!r}: k = {self.k} must be smaller than the {n} train samples")
            store = train.meta.get("store_fingerprint")
            table = getattr(self, "_table", None)
            if table is None:
                table = build_table(train.features, int(self.k), index=self.index, device=self.device,
                                    seed=int(self.seed),
                                    fingerprint=table_fingerprint(store) if store else "")
            else:
                # a table that records its features must have been built on exactly these
                table.check_for(n, table_fingerprint(store) if store and table.fingerprint else None)
                if table.k < int(self.k):
                    raise LongtailError(f"method {self.name!r}: the neighbour table has K = {table.k}, "
                                        f"k = {self.k} was asked for")
            self._neighbours = torch.as_tensor(np.ascontiguousarray(table.indices[:, :int(self.k)]),
                                               device=resolve_device(self.device))
        try:
            super()._fit(train, val)
        finally:
            self._neighbours = None

    def _records(self) -> set[str]:
        return {"probs", "mixup"} if self._neighbours is not None else set()

    def _adjustment(self, epoch, y, rec, log_prior):
        if epoch == 0 or self._neighbours is None:  # warm-up (no predictions yet) or no v term
            return (float(self.tau1) * log_prior).float()
        return cala_adjustment(self._neighbours, y, rec["probs"], log_prior,
                               tau1=float(self.tau1), tau2=float(self.tau2), smoothing=float(self.smoothing),
                               partner_labels=rec["partner"], lam=rec["lam"])

    def logit_prior(self) -> np.ndarray:
        """``p_tr^(1 - tau1)``, normalised (module docstring): uniform for ``tau1 = 1``."""
        self._check_fitted()
        return prior_from_log((1.0 - float(self.tau1)) * np.log(np.asarray(self.source_prior_, dtype=np.float64)))


def _fixed(cls: type[HeuristicCALAHead], key: str, value: float) -> type[HeuristicCALAHead]:
    """Give an ablation the constructor of ``cls`` without ``key`` (fixed to ``value``)."""
    sig = inspect.signature(cls.__init__)

    def __init__(self, **params):
        cls.__init__(self, **{key: value}, **params)

    __init__.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != key])
    return __init__


@register("cala-no-u")
class CALANoUHead(HeuristicCALAHead):
    """Heuristic-CALA without the class-prior term (``tau1 = 0``; paper 000, Table 5)."""

    __init__ = _fixed(HeuristicCALAHead, "tau1", 0.0)


@register("cala-no-v")
class CALANoVHead(HeuristicCALAHead):
    """Heuristic-CALA without the neighbourhood term (``tau2 = 0``; paper 000, Table 5): logit
    adjustment with ``tau1`` on MixUp batches. It needs no neighbour table (and asks for none)."""

    __init__ = _fixed(HeuristicCALAHead, "tau2", 0.0)
    table_params = None  # type: ignore[assignment]  (the pipeline builds no table for it)


@register("dynamic-la")
class DynamicLAHead(_AdjustedMixupHead):
    """Dynamic-LA (paper 000, appendix D.VII): logit adjustment ``tau log p_pr(c)`` by the class
    proportions of the model's predictions on the train set, refreshed every epoch; the
    ``K = infinity`` case of Heuristic-CALA (with ``tau1 = tau2 = tau``), so it trains on MixUp
    batches like Algorithm A-1.

    Args:
        tau: the adjustment's weight (1, as LA).
        alpha: MixUp ``Beta(alpha, alpha)`` parameter (0.2).
        epochs, lr, batch_size, weight_decay, seed, device: the shared head trainer's.
    """

    def __init__(self, *, tau: float = 1.0, alpha: float = ALPHA, epochs: int = EPOCHS, lr: float = LR,
                 batch_size: int = BATCH_SIZE, weight_decay: float = WEIGHT_DECAY, seed: int = 0,
                 device: str = "auto"):
        super().__init__(alpha=alpha, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.tau = tau

    def _check_own_params(self) -> None:
        super()._check_own_params()
        _check_number(self.name, "tau", self.tau, low=0)

    def _records(self) -> set[str]:
        return {"pred_sum"}

    def _adjustment(self, epoch, y, rec, log_prior):
        if epoch == 0:  # no predictions yet: the train prior (logit adjustment) as a warm-up
            p = torch.exp(log_prior)
        else:
            p = rec["pred_sum"] / float(y.shape[0])  # mean softmax over the train set; N >= 1
        self.pred_prior_ = p.cpu().numpy()
        return dynamic_la_adjustment(p, float(self.tau)).float()

    def logit_prior(self) -> np.ndarray:
        """``p_tr / p_pr^tau``, normalised, ``p_pr`` the proportions used in the last epoch."""
        self._check_fitted()
        log_p = np.log(np.asarray(self.source_prior_, dtype=np.float64))
        log_p = log_p - float(self.tau) * np.log(np.maximum(self.pred_prior_, 1e-12))  # as dynamic_la_adjustment
        return prior_from_log(log_p)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {"pred_prior": torch.as_tensor(self.pred_prior_, dtype=torch.float64)}

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.pred_prior_ = state["pred_prior"].numpy().astype(np.float64)  # KeyError: _load_state
