"""Meta-CALA (paper 000, Zhou, Wu, Yang, AAAI 2025; Algorithm A-2, eq. 9-11 and A.12-A.14).

Meta-CALA trains the linear head with the same CALA loss as Heuristic-CALA (eq. 5),

    l_CALA(x_i, y_i; δ_i) = -log softmax(z_i + τ1 u + τ2 δ_i)[y_i],   u_c = log p_tr(c),

but the CCPD-ratio term ``v(x_i, ·)`` is predicted by an adjustment network ``δ_i = g_Ω(ζ_i) ∈ R^C``
from the 42 training characteristics ``ζ_i`` of the row (:mod:`longtail.stages.meta.characteristics`),
and ``Ω`` is meta-learned on a small meta set balanced by class and by group (meta-learning
specification §2). Per step, on the shared engine's bi-level step
(:class:`~longtail.stages.train.bilevel.BilevelStep`):

1. ``ζ`` of the batch from the head at ``W^(t)``, without gradient (computed once per step and
   reused by the real step: A.14's ``ζ^(t+1)`` equals it, the classifier has not moved yet);
2. the virtual step ``Ŵ = W − η1 (1/n) Σ ∇_W l_CALA(x_i, y_i; g_Ω(ζ_i))`` (A.12), plain SGD at the
   scheduled learning rate, graph kept;
3. ``Ω ← Adam step on ∇_Ω (1/m) Σ_meta CE(f_Ŵ(x_j), y_j)`` (A.13; eq. 10 prints ``f_W``, with which
   ``∇_Ω`` would be 0: A.13's ``f_Ŵ`` is followed);
4. the real step of the head's optimiser on ``l_CALA`` with ``δ = g_Ω(ζ)`` at the new ``Ω``,
   detached (A.14).

No MixUp (Algorithm A-2 has no augmentation step, unlike A-1). Test logits are the plain ``z``.

The adjustment network (specification §2.2; widths and initialisation are not in the paper):
``BatchNorm(42) -> [Linear(·, hidden) -> ReLU] x layers -> Linear(hidden, C)``, the normalisation
with batch statistics (the inputs' scales differ by orders of magnitude; the network is never used
at test time), PyTorch's default initialisation drawn from its own seeded generator and the **last
layer zero**, so that ``δ ≡ 0`` at the start: the fit starts as logit adjustment with ``τ1``, and with
``meta_lr = 0`` it stays exactly that (special case M1). A class-constant output ``δ_i = c_i 1``
cancels in the softmax and gets no meta-gradient (M3): the output must be C-dimensional (the
released code's ``(n, 1)`` sigmoid output can change nothing).

The meta set (:class:`~longtail.stages.meta.head.MetaHead`'s, a shared artifact): ``per_group``
rows per (class, group) of the val split (or held out of train), the groups being a per-class KMeans
into ``groups`` clusters (paper: "clustered into six groups using KMeans ... evenly sample instances
from each group and class"), or the store's attributes when it has them (``meta_groups``). Meta
batches of ``meta_batch`` rows come from their own seeded generator, so the train permutation is the
one of ``logit-adjust`` with the same seed.

Diagnostics (``metrics.json``, section ``meta``): per epoch the mean effective adjustment
``τ2 |δ − mean_c δ|`` (the part of ``δ`` that changes the loss: a class-constant shift cancels) and
the mean ``|δ|``, the relative change of ``Ω``, and ``barely_moved``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from longtail.stages.base import FitContext, Requirement
from longtail.stages.cala import EPOCHS_ADJUSTED, K, default_tau1
from longtail.stages.calibrate import prior_from_log
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.heads import BATCH_SIZE, LR, WEIGHT_DECAY
from longtail.stages.losses import log_prior
from longtail.stages.losses.cala import cala_loss
from longtail.stages.meta.characteristics import NUM_CHARACTERISTICS, TrainingCharacteristics
from longtail.stages.meta.head import MetaHead
from longtail.stages.meta.metaset import build_meta_set, meta_set_requirement, split_for_fit
from longtail.stages.neighbours import (
    INDEXES,
    NeighbourTable,
    build_table,
    table_fingerprint,
    table_from_tensors,
    table_tensors,
)
from longtail.stages.train.bilevel import MetaObjective, Tensors, call, optimizer_update
from longtail.stages.train.data import Batch
from longtail.stages.train.engine import TrainState
from longtail.stages.train.objective import StepOutput

#: paper 000: τ2 = 1, Adam at 1e-3 for the adjustment network, six KMeans groups per class; τ1 and K
#: are ``heuristic-cala``'s (τ1 from the imbalance ratio, :func:`~longtail.stages.cala.default_tau1`;
#: K = 20, so one cached table serves both), two rows per (class, group) (the GLT setting), hidden
#: width 200 (the authors' code), meta batch 100 (code)
TAU2, META_LR, GROUPS, PER_GROUP, HIDDEN, META_BATCH = 1.0, 1e-3, 6, 2, 200, 100
#: "the meta step barely moved anything": the largest per-epoch mean effective adjustment
#: ``τ2 |δ − mean_c δ|`` stays below this many logits (a 1% change of a probability ratio)
INERT_THRESHOLD = 1e-2
#: an adjustment network whose mean effective output reaches this many logits has diverged (a
#: one-line error): e^-88 is below float32's smallest normal number, so the adjustment alone
#: saturates the softmax and the head's own logits no longer matter
ADJUST_LIMIT = 88.0
#: batch normalisation's epsilon (``nn.BatchNorm1d``'s)
BN_EPS = 1e-5
META_GROUPS = ("auto", "kmeans", "attribute")
NEIGHBOUR_STATS = ("exact", "cached")


# ---------------------------------------------------------------------- the adjustment network
class AdjustmentNetwork(nn.Module):
    """``g_Ω``: ``(n, 42)`` characteristics -> ``(n, C)`` adjustments ``δ`` (specification §2.2).

    The input normalisation is ``nn.BatchNorm1d`` in training mode written out (batch mean and
    biased variance, learnable scale and shift), so that one row (a last batch of one) gives its
    shift instead of an error; the running statistics of ``BatchNorm1d`` would never be used.
    """

    def __init__(self, num_classes: int, hidden: int = HIDDEN, layers: int = 1,
                 in_features: int = NUM_CHARACTERISTICS):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(in_features))
        self.norm_bias = nn.Parameter(torch.zeros(in_features))
        widths = [in_features] + [int(hidden)] * int(layers)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], num_classes)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """``nn.Linear``'s default uniform initialisation drawn from ``generator``; the output layer zero."""
        with torch.no_grad():
            self.norm_weight.fill_(1.0)
            self.norm_bias.zero_()
            for layer in self.hidden:
                bound = 1.0 / math.sqrt(layer.in_features)  # in_features >= 1
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, zeta: torch.Tensor) -> torch.Tensor:
        mean = zeta.mean(0)
        var = zeta.var(0, unbiased=False)
        x = (zeta - mean) * torch.rsqrt(var + BN_EPS) * self.norm_weight + self.norm_bias
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


# ---------------------------------------------------------------------- the objective
class MetaCALAObjective(MetaObjective):
    """Algorithm A-2 as a :class:`~longtail.stages.train.bilevel.MetaObjective`.

    The meta variables are the adjustment network's parameters (persistent leaves), moved by their
    own Adam (eq. A.13). The characteristics of a batch are computed once per optimiser step from
    the live head (:meth:`characteristics`). Every step's output carries two terms the engine
    averages per epoch: ``adjust`` (mean ``τ2 |δ − mean_c δ|``, the part of the adjustment that
    changes the loss) and ``adjust_raw`` (mean ``|δ|``).

    Args:
        network: the adjustment network on the fit's device (initialised).
        neighbours: ``(N, K)`` int64 neighbour rows of the fit's train rows.
        class_counts: ``(C,)`` float64 train counts on the fit's device (``u = log p_tr``).
        tau1, tau2: the weights of ``u`` and ``δ`` in eq. 5.
        meta_lr, meta_weight_decay: Adam's for ``Ω``.
        cached: the neighbour characteristics from a table (:class:`TrainingCharacteristics`).
    """

    def __init__(self, network: AdjustmentNetwork, neighbours: torch.Tensor, class_counts: torch.Tensor, *,
                 tau1: float, tau2: float, meta_lr: float, meta_weight_decay: float = 0.0,
                 cached: bool = False, owner: str = "meta-cala"):
        self.cached = bool(cached)
        self.owner = owner
        self.meta_lr = float(meta_lr)
        self.network = network
        self.neighbours = neighbours
        self.class_counts = class_counts
        self.tau1, self.tau2 = float(tau1), float(tau2)
        self.meta_optimizer = torch.optim.Adam(network.parameters(), lr=float(meta_lr),
                                               weight_decay=float(meta_weight_decay))
        self.chars: TrainingCharacteristics | None = None
        self._zeta: tuple[int, torch.Tensor] | None = None

    def on_fit_start(self, state: TrainState) -> None:
        self.chars = TrainingCharacteristics(state.data.x, state.data.y, self.neighbours, cached=self.cached)
        self._zeta = None
        self.initial = torch.cat([p.detach().flatten() for p in self.network.parameters()]).clone()
        self.adjust: list[float] = []  # per epoch, the terms below
        self.adjust_raw: list[float] = []

    def characteristics(self, state: TrainState, batch: Batch) -> torch.Tensor:
        """ζ ``(n, 42)`` of the batch at the head's current parameters, once per step."""
        if self._zeta is None or self._zeta[0] != batch.step:
            self._zeta = (batch.step, self.chars(state.module, batch.rows))
        return self._zeta[1]

    def meta_variables(self, state: TrainState, batch: Batch) -> Tensors:
        return dict(self.network.named_parameters())

    def inner_loss(self, params, state: TrainState, batch: Batch, meta) -> StepOutput:
        """Eq. 5 with ``v = δ = g_Ω(ζ)``: ``τ1 u`` formed as ``logit_adjusted_loss`` forms it, so
        that ``δ = 0`` trains exactly ``logit-adjust`` with ``tau = τ1``."""
        z = call(state.module, params, batch.x)
        delta = call(self.network, meta, self.characteristics(state, batch))
        adjustment = self.tau1 * log_prior(self.class_counts, z) + self.tau2 * delta
        with torch.no_grad():
            raw = delta.abs().mean()
            effective = self.tau2 * (delta - delta.mean(1, keepdim=True)).abs().mean()
        return StepOutput(cala_loss(z, batch.y, adjustment), logits=z,
                          terms={"adjust": effective, "adjust_raw": raw})

    def meta_update(self, meta: Tensors, grads: Tensors, state: TrainState) -> Tensors:
        return optimizer_update(self.meta_optimizer, meta, grads)

    def diverged(self, detail: str) -> LongtailError:
        """The one-line error of an adjustment network that diverged, naming the step size to lower."""
        return LongtailError(f"{self.owner}: the adjustment network diverged ({detail}): lower meta_lr "
                             f"(now {self.meta_lr:g})")

    def on_epoch_end(self, state: TrainState, means: dict[str, float]) -> None:
        """An epoch whose mean effective adjustment reached :data:`ADJUST_LIMIT` logits is an error:
        the softmax is saturated by ``δ`` alone (the loss itself stays finite in float32 until the
        adjustment nears 1e38, garbage long before)."""
        self.adjust.append(means["adjust"])
        self.adjust_raw.append(means["adjust_raw"])
        if not means["adjust"] < ADJUST_LIMIT:
            raise self.diverged(f"mean adjustment {means['adjust']:.3g} logits at epoch {state.epoch + 1}")

    def network_shift(self) -> float:
        """``‖Ω − Ω_0‖ / ‖Ω_0‖`` since the fit started (``Ω_0`` has non-zero hidden layers)."""
        now = torch.cat([p.detach().flatten() for p in self.network.parameters()])
        size = torch.linalg.vector_norm(self.initial).clamp_min(1e-12)  # guards an all-zero start
        return float(torch.linalg.vector_norm(now - self.initial) / size)


# ---------------------------------------------------------------------- the meta set's groups
def kmeans_groups(split: FeatureSet, groups: int, seed: int) -> np.ndarray:
    """``(N,)`` int64 KMeans group of every labelled row of ``split``, clustered **inside each class**
    (paper 000: "samples from each class ... are clustered into six groups using KMeans";
    specification §2.6): ``min(groups, distinct rows of the class)`` clusters, k-means++ with 10
    restarts, seeded per class from ``(seed, class)``. The features are scaled per dimension by the
    split's standard deviation first [D] (the head's train moments are not known when the meta set
    is built, as a shared artifact, from the val split; KMeans inside a class ignores the shift)."""
    from sklearn.cluster import KMeans

    labels = split.require_labels()
    x = split.features.astype(np.float64)
    std = x.std(axis=0)
    x = x / np.where(std > 0, std, 1.0)  # guards constant dimensions (left unscaled)
    out = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = min(int(groups), np.unique(x[rows], axis=0).shape[0])
        if k > 1:
            state = int(np.random.SeedSequence([int(seed), 0x3E7A, int(c)]).generate_state(1)[0])
            out[rows] = KMeans(n_clusters=k, n_init=10, random_state=state).fit_predict(x[rows])
    return out


def meta_groups_of(split: FeatureSet, mode: str, groups: int, seed: int, where: str) -> np.ndarray:
    """The groups the meta set balances inside each class: the split's attributes (``attribute``,
    or ``auto`` when it has them) or :func:`kmeans_groups`."""
    if mode == "attribute" or (mode == "auto" and split.attributes is not None):
        if split.attributes is None:
            raise LongtailError(f"{where}: meta_groups is attribute but the {split.name} split has no attributes")
        return np.asarray(split.attributes, dtype=np.int64)
    return kmeans_groups(split, groups, seed)


# ---------------------------------------------------------------------- the head
class MetaCALAHead(MetaHead):
    """Meta-CALA (paper 000, Algorithm A-2): the CALA loss with a meta-learned ``v`` term.

    Args:
        tau1: weight of ``u = log p_tr``; ``None`` (default): from the train imbalance ratio as for
            ``heuristic-cala`` (1 at 10:1, 1.5 at 100:1, paper 000 Fig. 5).
        tau2: weight of the learned adjustment ``δ`` (1).
        k: neighbourhood size K of the characteristics, ``1 <= K < N`` (20, as ``heuristic-cala``).
        neighbour_stats: ``exact`` (the neighbours' characteristics from the head at every step) or
            ``cached`` (from a table of every row's values, refreshed when the row is trained: up to
            an epoch stale; several times cheaper per step on large feature sets).
        index: the neighbour table's faiss index (``flat``, ``ivf``, ``hnsw``).
        hidden, layers: width and number of hidden layers of the adjustment network (200, 1).
        meta_lr: Adam's learning rate for the adjustment network (1e-3, the paper's), at most 1; 0
            keeps it at ``δ = 0`` (logit adjustment with ``tau1``).
        meta_weight_decay: Adam's weight decay for it (0).
        meta_batch: meta rows per meta step (100, or the meta set if smaller).
        groups: KMeans groups per class of the meta set (6, the paper's).
        per_group: meta rows per (class, group) (2, the paper's GLT setting).
        meta_groups: ``kmeans``, ``attribute`` (the pool's attributes) or ``auto`` (attributes when
            the pool has them, else KMeans).
        meta_source: ``val`` or ``train`` (held out of train: those rows leave the fit, and the
            neighbour table is then built on the rows that stay, not shared).
        epochs: 100, as ``heuristic-cala`` (whose per-epoch refresh this method's characteristics
            share); on the demo's ``digits-lt`` features, 100 epochs gave 89.2% balanced accuracy,
            300 epochs 90.4% (seed 0) and the other meta heads' 5,000-step budget 90.3% (3 seeds) at
            60 s a fit against 1 s, so no step budget by default (``min_steps`` 0).
        lr, batch_size, weight_decay, min_steps, seed, device: the shared head trainer's.

    There is no plain warm-up (``meta_start = 0``, Algorithm A-2 meta-learns from the first step)
    and a meta step at every step (Table A-5's setting).
    """

    name = "meta-cala"
    step_name = "meta_lr"
    meta_start = 0.0  # (not a parameter: MetaHead's warm-up fraction)

    def __init__(self, *, tau1: float | None = None, tau2: float = TAU2, k: int = K, index: str = "flat",
                 neighbour_stats: str = "exact", hidden: int = HIDDEN, layers: int = 1, meta_lr: float = META_LR,
                 meta_weight_decay: float = 0.0,
                 meta_batch: int = META_BATCH, groups: int = GROUPS, per_group: int = PER_GROUP,
                 meta_groups: str = "auto", meta_source: str = "val", epochs: int = EPOCHS_ADJUSTED, lr: float = LR,
                 batch_size: int = BATCH_SIZE, weight_decay: float = WEIGHT_DECAY, min_steps: int = 0, seed: int = 0,
                 device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         min_steps=min_steps, seed=seed, device=device)
        self.tau1 = tau1
        self.tau2 = tau2
        self.k = k
        self.index = index
        self.neighbour_stats = neighbour_stats
        self.hidden = hidden
        self.layers = layers
        self.meta_lr = meta_lr
        self.meta_weight_decay = meta_weight_decay
        self.meta_batch = meta_batch
        self.groups = groups
        self.per_group = per_group
        self.meta_groups = meta_groups
        self.meta_source = meta_source

    @property
    def meta_per_class(self) -> int:
        """MetaHead's rows per class of the meta set: here per (class, group)."""
        return self.per_group

    # ------------------------------------------------------------------ shared artifacts
    def _requirements(self) -> list[Requirement]:
        """The meta set (kind ``meta-set``, balanced by class and group) and, with ``meta_source:
        val``, the neighbour table (kind ``neighbours``, with the parameters ``heuristic-cala``
        declares for the same ``k`` and ``index``: the pipeline builds one table for both)."""
        meta = meta_set_requirement(source=self.meta_source, per_group=int(self.per_group), seed=int(self.seed),
                                    attach=self.set_meta_set, groups=self._groups,
                                    group_params={"groups": int(self.groups), "meta_groups": self.meta_groups},
                                    modules=("longtail.stages.meta.cala",))
        if self.meta_source != "val":
            return [meta]
        params: dict[str, Any] = {"k": int(self.k), "metric": "cosine", "index": self.index}
        if self.index != "flat":  # an approximate index draws its training sample from the seed
            params["seed"] = int(self.seed)
        table = Requirement(kind="neighbours", params={**params, "device": self.device},
                            modules=("longtail.stages.neighbours",), build=self.build_table, save=table_tensors,
                            load=table_from_tensors, attach=self.set_table)
        return [table, meta]

    def _groups(self, split: FeatureSet) -> np.ndarray:
        return meta_groups_of(split, self.meta_groups, int(self.groups), int(self.seed),
                              f"method {self.name!r}: meta set")

    def build_table(self, train: FeatureSet) -> NeighbourTable:
        """The neighbour table of ``train`` this method asks for."""
        store = train.meta.get("store_fingerprint")
        return build_table(train.features, int(self.k), index=self.index, device=self.device, seed=int(self.seed),
                           fingerprint=table_fingerprint(store) if store else "")

    def set_table(self, table: NeighbourTable) -> "MetaCALAHead":
        """Use ``table`` (checked against the train split in ``fit``) instead of building one."""
        if not isinstance(table, NeighbourTable):
            raise TypeError("set_table expects a NeighbourTable")
        self._table = table  # handed over, not learned: kept across fits
        return self

    # ------------------------------------------------------------------ checks
    def _check_params(self, num_classes: int) -> None:
        self._check("per_group", self.per_group, integer=True, low=1)  # (MetaHead checks it as meta_per_class)
        super()._check_params(num_classes)
        self._check("tau1", self.tau1, low=0, allow_none=True)
        self._check("tau2", self.tau2, low=0)
        self._check("k", self.k, integer=True, low=1)
        self._check("hidden", self.hidden, integer=True, low=1)
        self._check("layers", self.layers, integer=True, low=1)
        # Adam moves every parameter by about meta_lr per step: beyond 1 the network jumps by more
        # than its own scale at every step (the paper's 1e-3 already moves δ by ~0.5 logits)
        self._check("meta_lr", self.meta_lr, low=0, high=1)
        self._check("meta_weight_decay", self.meta_weight_decay, low=0)
        self._check("groups", self.groups, integer=True, low=1)
        for key, value, allowed in (("index", self.index, INDEXES), ("meta_groups", self.meta_groups, META_GROUPS),
                                    ("neighbour_stats", self.neighbour_stats, NEIGHBOUR_STATS)):
            if value not in allowed:
                raise LongtailError(f"method {self.name!r}: {key} = {value!r} is not one of {', '.join(allowed)}")

    def _validate(self, ctx: FitContext) -> None:
        super()._validate(ctx)  # the meta set's pool
        n = int(np.sum(ctx.class_counts))
        if self.meta_source == "val":
            if self.meta_groups == "attribute" and ctx.val.attributes is None:
                raise LongtailError(f"method {self.name!r}: meta set: meta_groups is attribute but the val split "
                                    "has no attributes")
            table = getattr(self, "_table", None)
            if table is not None:
                store = ctx.provenance.get("store_fingerprint")
                table.check_for(n, table_fingerprint(store) if store and table.fingerprint else None)
                if table.k < int(self.k):
                    raise LongtailError(f"method {self.name!r}: the neighbour table has K = {table.k}, "
                                        f"k = {self.k} was asked for")
        else:  # at most groups * per_group rows of a class leave train, and one always stays
            n -= int(np.minimum(np.asarray(ctx.class_counts) - 1, int(self.groups) * int(self.per_group)).sum())
        if int(self.k) >= n:
            raise LongtailError(f"method {self.name!r}: k = {self.k} must be smaller than the {n} train samples")

    # ------------------------------------------------------------------ fit
    def _fit(self, train: FeatureSet, val: FeatureSet | None, ctx: FitContext) -> None:
        """MetaHead's fit with the neighbourhoods of the fit's train rows, and a meta set drawn with
        this method's groups when none was attached (it is then this fit's only)."""
        where = f"method {self.name!r}: meta set"
        attached = getattr(self, "_meta_set", None)
        meta = attached
        if meta is None:  # (a Python shell: no pipeline handed one over)
            pool = val if self.meta_source == "val" else train
            meta = build_meta_set(pool, source=self.meta_source, per_group=int(self.per_group), seed=int(self.seed),
                                  groups=self._groups(pool), where=where)
        fit_train, _ = split_for_fit(train, val, meta, where=where)
        table = getattr(self, "_table", None)
        if fit_train is not train:  # rows held out of train: the neighbourhoods of the rows that stay
            table = self.build_table(replace(fit_train, meta={}))
        elif table is None:  # (a Python shell: no pipeline handed one over)
            table = self.build_table(train)
        self._neighbours = torch.as_tensor(np.ascontiguousarray(table.indices[:, :int(self.k)]), device=ctx.device)
        self._meta_set = meta
        try:
            super()._fit(train, val, ctx)
        finally:
            self._neighbours = None  # (N, k) rows of the table: not state (the table is an artifact)
            if attached is None:
                del self._meta_set

    def new_network(self, num_classes: int) -> AdjustmentNetwork:
        """The adjustment network, initialised from its own generator (seeded from ``seed``: the
        fit's generator, and so the train permutation, is untouched)."""
        net = AdjustmentNetwork(num_classes, int(self.hidden), int(self.layers))
        seed = int(np.random.SeedSequence([int(self.seed), 0x3E7A]).generate_state(1)[0])
        net.reset_parameters(torch.Generator().manual_seed(seed))
        return net

    def objective(self, ctx: FitContext) -> MetaCALAObjective:
        """The Meta-CALA objective for this head's own fit (its neighbourhoods)."""
        neighbours = getattr(self, "_neighbours", None)
        if neighbours is None:
            raise LongtailError(f"method {self.name!r}: its objective needs the neighbourhoods of its own fit")
        counts = torch.as_tensor(ctx.class_counts, dtype=torch.float64, device=ctx.device)
        return MetaCALAObjective(self.new_network(ctx.num_classes).to(ctx.device), neighbours, counts,
                                 tau1=self.resolved_tau1(ctx.class_counts), tau2=float(self.tau2),
                                 meta_lr=float(self.meta_lr),
                                 meta_weight_decay=float(self.meta_weight_decay),
                                 cached=self.neighbour_stats == "cached", owner=f"method {self.name!r}")

    def _trained(self, objective: MetaCALAObjective, ctx: FitContext) -> None:
        self.delta_mean_abs_ = np.asarray(objective.adjust, dtype=np.float64)
        self.adjust_raw_ = np.asarray(objective.adjust_raw, dtype=np.float64)
        self.network_shift_ = np.float64(objective.network_shift())

    def resolved_tau1(self, class_counts) -> float:
        """``tau1``, or for ``None`` the value of the train imbalance ratio (:func:`default_tau1`)."""
        return float(self.tau1) if self.tau1 is not None else default_tau1(class_counts)

    # ------------------------------------------------------------------ outputs
    def logit_prior(self) -> np.ndarray:
        """``p_tr^(1 - tau1)``, normalised, as ``heuristic-cala`` (``δ`` estimates a ratio of
        class-conditional densities and carries no label prior)."""
        self._check_fitted()
        prior = np.asarray(self.source_prior_, dtype=np.float64)
        return prior_from_log((1.0 - self.resolved_tau1(prior)) * np.log(prior))  # default_tau1 is scale-free

    def diagnostics(self, train: FeatureSet, val: FeatureSet | None = None,
                    test: FeatureSet | None = None) -> dict[str, Any]:
        """``{"meta": ...}``: MetaHead's summary (meta set, meta loss per epoch), per epoch the mean
        effective adjustment ``τ2 |δ − mean_c δ|`` in logits (``delta_mean_abs``, the part that
        changes the loss) and the mean ``|δ|`` (``adjust_raw``), the relative change of the network
        (``network_shift``) and ``barely_moved`` when the largest ``delta_mean_abs`` stayed below
        :data:`INERT_THRESHOLD`: "no gain" is then "the meta step did nothing"."""
        self._check_fitted()
        finite = lambda a: [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]  # noqa: E731
        peak = float(np.max(self.delta_mean_abs_)) if self.delta_mean_abs_.size else 0.0
        return {"meta": {**self._meta_summary(), "meta_lr": float(self.meta_lr),
                         "delta_mean_abs": finite(self.delta_mean_abs_), "adjust_raw": finite(self.adjust_raw_),
                         "network_shift": float(self.network_shift_),
                         "barely_moved": bool(not peak >= INERT_THRESHOLD), "barely_threshold": INERT_THRESHOLD}}

    _SAVED = ("delta_mean_abs_", "adjust_raw_", "network_shift_", "meta_loss_")

    def _extra_state(self) -> dict[str, torch.Tensor]:
        out = {f"meta.{k}": torch.as_tensor(np.asarray(getattr(self, k), dtype=np.float64)) for k in self._SAVED}
        out["meta.meta_rows_"] = torch.tensor(int(self.meta_rows_))
        out["meta.meta_start_epoch_"] = torch.tensor(int(self.meta_start_epoch_))
        return out

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in self._SAVED:  # KeyError: _load_state's one-line error
            setattr(self, k, state[f"meta.{k}"].numpy().astype(np.float64))
        self.meta_rows_ = int(state["meta.meta_rows_"])
        self.meta_start_epoch_ = int(state["meta.meta_start_epoch_"])
