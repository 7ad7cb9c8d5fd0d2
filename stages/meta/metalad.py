"""``metalad``: meta logit adjustment for proportion, variance and distance imbalance (Wu, "Rethinking
Class Imbalance in Machine Learning", paper 001, §IV-C, eq. 33-36, Algorithm 1; specification
``meta-learning.md`` §3).

The training loss (eq. 33, with the bias kept) perturbs every non-target logit by a per-pair offset:

    ``ℓ_Λ(x, y) = CE(z + δ_{y,:}, y)``,  ``δ_{y,c} = λ_{y,c,1} P_{y,c} + λ_{y,c,2} V_{y,c} + λ_{y,c,3} G_{y,c}``,
    ``δ_{y,y} = 0``,

* ``P_{y,c} = log(π_c / π_y)``: proportion. Eq. 30/33 print ``log(π_y/π_c)``, which with ``λ = 1`` is
  logit adjustment with ``τ = −1`` (favouring head classes) and contradicts the paper's own guideline
  (§II-B) and Table VII; the sign is reconstructed as in the specification §3.8, so that ``λ_1 = τ``,
  ``λ_2 = λ_3 = 0`` is exactly ``logit-adjust`` with ``τ`` (softmax shift invariance, special case L2);
* ``V_{y,c} = Δw_ycᵀ Σ_y Δw_yc / ‖Δw_yc‖²`` with ``Δw_yc = w_y − w_c`` (rows of the current ``W``,
  detached): variance along ``Δw_yc`` of class ``y``'s standardised train features (eq. 29, "NISDA"),
  ``Σ_y`` the ML covariance. No ``D × D`` matrix is formed: with the centred class rows ``A_y`` and
  ``P_y = A_y Wᵀ``, ``V_{y,c} = mean_i ((P_y)_{i,y} − (P_y)_{i,c})² / ‖w_y − w_c‖²`` (``0`` where
  ``‖Δw‖² < 1e-12``), refreshed every ``stats_interval`` meta steps at ``N·D·C`` flops;
* ``G_{y,c} = log(Δ̄ / Δ_{y,c})``, ``Δ_{y,c} = ‖μ_y − μ_c‖`` (clamped at 1e-12) and ``Δ̄`` the mean over
  pairs: distance between class centres, fixed on frozen features.

The coefficients ``Λ ∈ R^{3×C×C}`` start at 1 ("initialized to a value of {1, 1, 1}", §V-A) and are
the meta parameters: after a plain-CE warm-up of ``floor(meta_start * epochs)`` epochs (Algorithm 1,
lines 2-6), every step takes the look-ahead ``Θ̂ = Θ − η_1 ∇_Θ L_n(Θ, Λ)`` (eq. 34), the plain CE
meta loss on a meta batch at ``Θ̂`` (eq. 35, read as plain CE: specification §3.2), one plain SGD step
``Λ ← Λ − η_2 ∇_Λ L_m`` (eq. 35) and the real step with the new ``Λ`` detached (eq. 36). ``terms``
switches terms off for the ablations of Tables VI-VII. Test time: the plain logits.

On frozen features ``μ``, ``Σ``, ``P`` and ``G`` are constants, so what remains is a meta-tuned
per-pair margin (specification §3.9). Tail classes with ``n_y ≤ D`` have a rank-deficient ``Σ_y``:
their variance term is underestimated in most directions.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from longtail.stages.base import FitContext
from longtail.stages.calibrate import prior_from_log
from longtail.stages.errors import LongtailError
from longtail.stages.heads import BATCH_SIZE, EPOCHS, LR, SGD_MIN_STEPS, WEIGHT_DECAY
from longtail.stages.meta.head import META_BATCH, META_PER_CLASS, MetaHead
from longtail.stages.train.bilevel import MetaObjective, call, optimizer_update
from longtail.stages.train.data import Batch
from longtail.stages.train.objective import StepOutput
from longtail.stages.train.state import TrainState

TERMS = ("proportion", "variance", "distance")
Tensors = dict[str, torch.Tensor]


def pair_statistics(x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fixed statistics of eq. 33 from standardised train features ``x`` ``(N, D)`` and labels:
    ``P`` ``(C, C)`` = ``log π_c − log π_y``, ``G`` ``(C, C)`` = ``log(Δ̄ / Δ_{y,c})`` (0 on the diagonal),
    the class means ``mu`` ``(C, D)`` and the centred rows ``centred`` ``(N, D)`` (``x − μ_{y}``).
    Class sums by a one-hot product (fixed order, no scatter-add). Every count is > 0."""
    c = int(counts.shape[0])
    onehot = F.one_hot(y, c).to(x.dtype)
    n = counts.to(x.dtype)
    mu = (onehot.T @ x) / n[:, None]  # guarded: every class has a train row
    log_pi = torch.log(counts.double()) - torch.log(counts.double().sum())
    P = (log_pi[None, :] - log_pi[:, None]).to(x.dtype)
    dist = torch.cdist(mu.double(), mu.double()).clamp_min(1e-12)  # clamp: duplicate centres
    off = ~torch.eye(c, dtype=torch.bool, device=x.device)
    mean = dist[off].mean() if c > 1 else torch.ones((), dtype=torch.float64, device=x.device)
    G = torch.where(off, torch.log(mean / dist), torch.zeros_like(dist)).to(x.dtype)
    return {"P": P, "G": G, "mu": mu, "centred": x - mu[y]}


def variance_term(centred: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``V_{y,c} = Δw_ycᵀ Σ_y Δw_yc / ‖Δw_yc‖²`` ``(C, C)`` without ``D × D`` matrices:
    ``mean_{i∈y} ((A W^T)_{i,y} − (A W^T)_{i,c})² / ‖w_y − w_c‖²``, 0 where ``‖Δw‖² < 1e-12`` (and so
    on the diagonal). ``centred`` ``(N, D)`` are the rows minus their class mean, ``W`` ``(C, D)``."""
    c = int(W.shape[0])
    proj = centred @ W.T  # (N, C)
    diff = proj.gather(1, y.unsqueeze(1)) - proj  # a_i . (w_{y_i} - w_c)
    onehot = F.one_hot(y, c).to(W.dtype)
    num = (onehot.T @ diff.square()) / counts.to(W.dtype)[:, None]  # guarded: counts > 0
    sq = (W * W).sum(1)
    norm = (sq[:, None] + sq[None, :] - 2.0 * (W @ W.T)).clamp_min(0.0)
    ok = norm >= 1e-12
    return torch.where(ok, num / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm))


class LogitPerturbationObjective(MetaObjective):
    """Paper 001, Algorithm 1 on the bi-level step: persistent ``Λ`` ``(3, C, C)``, plain SGD at ``eta2``.

    Records per epoch: the mean off-diagonal coefficient of each term (after the epoch's last meta
    step), the largest ``|Λ − Λ_0|``, and the mean size ``mean_{c≠y} |δ_{y,c}|`` over the epoch's rows.
    """

    def __init__(self, *, stats: Mapping[str, torch.Tensor], counts: torch.Tensor, labels: torch.Tensor,
                 terms: Sequence[str], eta2: float, lambda_init: float, epochs: int, stats_interval: int = 1):
        self.P, self.G, self.centred = stats["P"], stats["G"], stats["centred"]
        self.counts, self.labels = counts, labels
        c = int(counts.shape[0])
        dev, dtype = self.P.device, self.P.dtype
        self.mask = torch.tensor([float(t in terms) for t in TERMS], dtype=dtype, device=dev)
        self.off = (1.0 - torch.eye(c, dtype=dtype, device=dev))
        self.lam = torch.full((3, c, c), float(lambda_init), dtype=dtype, device=dev, requires_grad=True)
        self.init = float(lambda_init)
        self.meta_optimizer = torch.optim.SGD([self.lam], lr=float(eta2))
        self.stats_interval = int(stats_interval)
        self.V = torch.zeros(c, c, dtype=dtype, device=dev)
        self._since = None
        self.lam_mean = torch.full((int(epochs), 3), float("nan"), dtype=torch.float64, device=dev)
        self.lam_moved = torch.zeros(int(epochs), dtype=torch.float64, device=dev)
        self.delta_sum = torch.zeros(int(epochs), dtype=torch.float64, device=dev)
        self.delta_rows = torch.zeros(int(epochs), dtype=torch.float64, device=dev)

    def terms_tensor(self) -> torch.Tensor:
        """``T`` ``(3, C, C)``: ``P``, ``V``, ``G``, each times its ``terms`` switch, zero on the
        diagonal (kept until one of them is replaced, i.e. until ``V`` is refreshed)."""
        key = (id(self.P), id(self.V), id(self.G), id(self.off))
        if getattr(self, "_key", None) != key:
            self._T = torch.stack([self.P, self.V, self.G]) * self.mask[:, None, None] * self.off
            self._key = key
        return self._T

    def delta(self, lam: torch.Tensor) -> torch.Tensor:
        """``δ`` ``(C, C)`` = ``Σ_k λ_k ⊙ T_k``, zero on the diagonal (eq. 33)."""
        return (lam * self.terms_tensor()).sum(0)

    def meta_variables(self, state: TrainState, batch: Batch) -> Tensors:
        """``Λ`` (persistent); ``V`` refreshed from the current ``W`` every ``stats_interval`` calls
        (Algorithm 1, lines 9-11; detached)."""
        self._labels = batch.y
        if self.mask[1] > 0 and (self._since is None or self._since >= self.stats_interval):
            with torch.no_grad():
                self.V = variance_term(self.centred, self.labels, self.counts, state.module.weight.detach())
            self._since = 0
        if self._since is not None:
            self._since += 1
        return {"lam": self.lam}

    def inner_loss(self, params: Mapping[str, torch.Tensor], state: TrainState, batch: Batch,
                   meta: Mapping[str, torch.Tensor]) -> StepOutput:
        """``(1/n) Σ_i CE(z_i + δ_{y_i,:}, y_i)`` (eq. 33; Algorithm 1, lines 12 and 16)."""
        z = call(state.module, params, batch.x)
        return StepOutput(F.cross_entropy(z + self.delta(meta["lam"])[batch.y], batch.y), logits=z)

    def loss(self, module, batch: Batch, state: TrainState) -> StepOutput:
        z = module(batch.x)
        return StepOutput(F.cross_entropy(z + self.delta(self.lam.detach())[batch.y], batch.y), logits=z)

    def warmup_loss(self, module, batch: Batch, state: TrainState) -> StepOutput:
        """Plain CE (Algorithm 1, lines 2-6)."""
        z = module(batch.x)
        return StepOutput(F.cross_entropy(z, batch.y), logits=z)

    def meta_update(self, meta: Tensors, grads: Tensors, state: TrainState) -> Tensors:
        """``Λ ← Λ − η_2 ∇_Λ L_m`` (eq. 35), plain SGD; recorded for the diagnostics."""
        new = optimizer_update(self.meta_optimizer, meta, grads)
        e = state.epoch
        with torch.no_grad():
            lam = new["lam"]
            c = int(self.off.shape[0])
            d = self.delta(lam)[self._labels].abs().sum(1) / max(c - 1, 1)
            self.delta_sum[e] += d.double().sum()
            self.delta_rows[e] += float(d.shape[0])
            diag = lam.diagonal(dim1=1, dim2=2).double().sum(1)  # (unused entries, left out of the mean)
            self.lam_mean[e] = (lam.double().sum((1, 2)) - diag) / max(c * (c - 1), 1)
            self.lam_moved[e] = (lam - self.init).abs().max().double()
        return new

    def summary(self) -> dict[str, np.ndarray]:
        rows = self.delta_rows.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            size = np.where(rows > 0, self.delta_sum.cpu().numpy() / np.maximum(rows, 1), np.nan)
        moved = np.where(rows > 0, self.lam_moved.cpu().numpy(), np.nan)
        return {"lambda_mean": self.lam_mean.cpu().numpy(), "lambda_moved": moved, "delta_mean_abs": size,
                "lam": self.lam.detach().double().cpu().numpy()}


class MetaLADHead(MetaHead):
    """MetaLAD (paper 001): cross-entropy with meta-learned per-pair logit perturbations.

    Args:
        eta2: the meta step size (plain SGD on ``Λ``; 1e3, specification §3.3; the paper uses 1e2-1e3
            on ResNets). ``0`` keeps ``Λ`` at ``lambda_init``: the fixed-coefficient loss.
        terms: which of ``proportion``, ``variance``, ``distance`` enter ``δ`` (all; the ablations of
            Tables VI-VII switch them off).
        lambda_init: the initial coefficients (1, §V-A).
        meta_start: fraction of epochs of plain CE before the meta stage, in ``[0, 1)`` (2/3: T1 = 160 of
            240 epochs).
        stats_interval: meta steps between refreshes of the variance term (1).
        meta_per_class, meta_batch, meta_source: the meta set (10 per class from val; batches of 100).
        min_steps: at least this many minibatch steps (5,000, the SGD heads' budget: on small stores
            ``epochs`` alone is a few dozen steps and leaves the head under-trained); 0: ``epochs``.
        epochs, lr, batch_size, weight_decay, seed, device: the shared head trainer's.
    """

    name = "metalad"
    step_name = "eta2"

    def __init__(self, *, eta2: float = 1e3, terms: Sequence[str] = TERMS, lambda_init: float = 1.0,
                 meta_start: float = 2.0 / 3.0, stats_interval: int = 1, meta_per_class: int = META_PER_CLASS,
                 meta_batch: int = META_BATCH, meta_source: str = "val", epochs: int = EPOCHS, lr: float = LR,
                 batch_size: int = BATCH_SIZE, weight_decay: float = WEIGHT_DECAY, min_steps: int = SGD_MIN_STEPS, seed: int = 0,
                 device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         min_steps=min_steps, seed=seed, device=device)
        self.eta2 = eta2
        self.terms = terms
        self.lambda_init = lambda_init
        self.meta_start = meta_start
        self.stats_interval = stats_interval
        self.meta_per_class = meta_per_class
        self.meta_batch = meta_batch
        self.meta_source = meta_source

    def _check_params(self, num_classes: int) -> None:
        super()._check_params(num_classes)
        self._check("eta2", self.eta2, low=0, high=float(torch.finfo(torch.float32).max))  # an SGD lr in float32
        self._check("lambda_init", self.lambda_init)
        self._check("stats_interval", self.stats_interval, integer=True, low=1)
        terms = [self.terms] if isinstance(self.terms, str) else self.terms
        if not isinstance(terms, (list, tuple)) or not all(isinstance(t, str) for t in terms):
            raise LongtailError(f"method {self.name!r}: terms = {self.terms!r} must be a list of {', '.join(TERMS)}")
        unknown = [t for t in terms if t not in TERMS]
        if unknown:
            raise LongtailError(f"method {self.name!r}: unknown terms {', '.join(map(repr, unknown))} "
                                f"(known: {', '.join(TERMS)})")

    def _terms(self) -> tuple[str, ...]:
        return (self.terms,) if isinstance(self.terms, str) else tuple(self.terms)

    def objective(self, ctx: FitContext) -> LogitPerturbationObjective:
        """The objective of this head's own fit (its statistics are those of the rows it trains on)."""
        data = getattr(self, "_data", None)
        if data is None:  # a composite (dlsa+metalad) training this objective on its own rows and module
            raise LongtailError(f"method {self.name!r} trains only as a head of its own: its statistics and "
                                "variance term need its own rows and linear module (no dlsa+metalad)")
        counts = torch.as_tensor(np.asarray(ctx.class_counts), device=ctx.device)
        stats = pair_statistics(data.x, data.y, counts)
        return LogitPerturbationObjective(stats=stats, counts=counts, labels=data.y, terms=self._terms(),
                                          eta2=float(self.eta2), lambda_init=float(self.lambda_init),
                                          epochs=self.total_epochs(ctx), stats_interval=int(self.stats_interval))

    def _train(self, data, generator, ctx) -> None:
        self._data = data  # the standardised rows the statistics are computed from
        try:
            super()._train(data, generator, ctx)
        finally:
            self._data = None

    def _trained(self, objective: LogitPerturbationObjective, ctx: FitContext) -> None:
        out = objective.summary()
        self.lambda_mean_ = out["lambda_mean"]
        self.lambda_moved_ = out["lambda_moved"]
        self.delta_mean_abs_ = out["delta_mean_abs"]
        self.lam_ = out["lam"]

    def logit_prior(self) -> np.ndarray:
        """``p_tr^(1 − λ̄_1)``, ``λ̄_1`` the mean off-diagonal proportion coefficient (0 without the
        proportion term): exact when ``λ_1`` is constant (special case L2), an approximation otherwise
        (``V`` and ``G`` are margins, not priors; specification §4.2)."""
        self._check_fitted()
        lam1 = 0.0
        if "proportion" in self._terms():
            c = self.lam_.shape[1]
            lam1 = float(self.lam_[0][~np.eye(c, dtype=bool)].mean()) if c > 1 else 0.0
        return prior_from_log((1.0 - lam1) * np.log(np.asarray(self.source_prior_, dtype=np.float64)))

    # ------------------------------------------------------------------ state and diagnostics
    _SAVED = ("lambda_mean_", "lambda_moved_", "delta_mean_abs_", "lam_", "meta_loss_")

    def _extra_state(self) -> dict[str, torch.Tensor]:
        out = {f"meta.{k}": torch.as_tensor(np.asarray(getattr(self, k), dtype=np.float64)) for k in self._SAVED}
        out["meta.meta_rows_"] = torch.tensor(int(self.meta_rows_))
        out["meta.meta_start_epoch_"] = torch.tensor(int(self.meta_start_epoch_))
        return out

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in self._SAVED:
            setattr(self, k, state[f"meta.{k}"].numpy().astype(np.float64))
        self.meta_rows_ = int(state["meta.meta_rows_"])
        self.meta_start_epoch_ = int(state["meta.meta_start_epoch_"])

    def diagnostics(self, train, val=None, test=None) -> dict[str, Any] | None:
        """``{"meta": ...}``: the mean learned coefficient per term and epoch, how far ``Λ`` moved from
        its start, and the mean size of the adjustment ``mean_{c≠y} |δ_{y,c}|`` per epoch."""
        self._check_fitted()
        finite = lambda a: [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]  # noqa: E731
        return {"meta": {**self._meta_summary(), "eta2": float(self.eta2), "terms": list(self._terms()),
                         "lambda_mean": {t: finite(self.lambda_mean_[:, k]) for k, t in enumerate(TERMS)},
                         "lambda_moved": finite(self.lambda_moved_),
                         "delta_mean_abs": finite(self.delta_mean_abs_)}}
