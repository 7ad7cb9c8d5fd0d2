"""DLSA's flow cascade (paper 004, Sec. 3.2-3.3, Fig. 4): filters in a row, fitted once per train split.

``num_filters`` Gaussian Mixture Flow Filters (:mod:`longtail.stages.dlsa.flow`). Each is fitted on
the train samples that reach it; its threshold ``alpha`` is the quantile of their log-likelihoods
that sends the ``filter_fraction`` of them with the **highest** likelihood (the well-clustered
samples; the "P(x) <= alpha" of Sec. 3.3 is a typo, its Fig. 4 and text mean high likelihood) to
the filter's cluster-aided classifier; the rest reach the next filter. Samples that pass every
filter go to the regular classifier. Test samples follow the same route by the thresholds learnt
on train. Given the val split, each filter stops training on val likelihood (best-on-val weights,
:func:`~longtail.stages.dlsa.flow.train_filter`). With ``route_folds >= 2`` the cascade also
records **cross-fitted routes** of the train samples: the train split is cut into that many
class-stratified folds, a cascade with the same parameters is fitted on all folds but one, and the
held-out fold is routed by it, so that every train sample gets the route, cluster and cluster prior
of flows that never saw it, as a test sample does (not in the paper; issue 11). The cascade is an
object of its own, fitted once and shared by every wrapped head on the
same features (the paper reuses one trained filter for all its classifiers). Its hyper-parameters
and their defaults are one frozen dataclass, :class:`CascadeParams`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from longtail.stages.base import check_number
from longtail.stages.data import FeatureSet
from longtail.stages.device import resolve_device
from longtail.stages.dlsa.flow import ROUTE_CHUNK, GaussianMixtureFlowFilter, train_filter
from longtail.stages.errors import LongtailError
from longtail.stages.heads import balanced_moments
from longtail.stages.losses.dlsa import flow_class_weights

#: filters in the cascade (the paper's default, Sec. 4.5 "Filter block number": 3 beat 2 and 4)
NUM_FILTERS = 3
#: share of the train samples reaching a filter that it sends to its classifier (Sec. 4.3: 30%)
FILTER_FRACTION = 0.3
#: MAF blocks per flow (Sec. 4.3: "2-layered MAF")
FLOW_BLOCKS = 2
#: hidden units of each MAF block's one hidden layer. The reference code ties it to the feature
#: dimension (33.6M parameters per flow at D = 2048); 256 gives 3.2M at D = 2048 and 0.2M at
#: D = 128, where one epoch of a filter on 10k samples took 1.2-2.4 s on one thread of a busy CPU
#: (0.6-0.8 s without the purity term's extra forward pass); raise it for large, well-sampled sets.
FLOW_HIDDEN = 256
FLOW_EPOCHS = 30
FLOW_LR = 1e-2
FLOW_BATCH_SIZE = 256
#: the automatic number of clusters: 500 (the paper's ImageNet-LT and Places-LT value) unless the
#: last filter would get fewer than this many train samples per cluster
MAX_CLUSTERS = 500
SAMPLES_PER_CLUSTER = 10
#: flow epochs without a better val likelihood before a filter stops (with a val split)
PATIENCE = 5


def default_sigma(dim: int) -> float:
    """Supplementary Sec. 3: centres ``mu_k ~ N(0, sigma^2 I)`` with ``sigma = sqrt(3 / (2 D))``.

    From eq. 5 there, ``E ||mu_p - mu_q||^2 = 2 D sigma^2``; asking for the centres to lie about 3
    apart (the three-sigma border of a unit-variance component) gives ``2 D sigma^2 = 3``.
    ``dim >= 1`` (FeatureSet rejects dimension 0), which guards the division.
    """
    return math.sqrt(3.0 / (2.0 * int(dim)))


def auto_num_clusters(samples_at_last_filter: int) -> int:
    """``min(500, max(2, n_last // 10))``: the paper's 500 clusters, fewer when the last filter is
    reached by fewer than 10 train samples per cluster."""
    return int(min(MAX_CLUSTERS, max(2, samples_at_last_filter // SAMPLES_PER_CLUSTER)))


def filter_sizes(num_samples: int, num_filters: int, fraction: float) -> list[tuple[int, int]]:
    """``(reaching, routed)`` train samples per filter: filter ``f`` is reached by ``n_f`` samples and
    sends ``round(fraction * n_f)`` of them to its classifier; ``n_{f+1} = n_f - routed_f``."""
    out, n = [], int(num_samples)
    for _ in range(int(num_filters)):
        m = int(math.floor(float(fraction) * n + 0.5))
        out.append((n, m))
        n -= m
    return out


@dataclass(frozen=True)
class CascadeParams:
    """The cascade's hyper-parameters and their defaults (also the ``dlsa`` wrapper's).

    Attributes:
        num_filters: filters in the cascade (default 3, Sec. 4.5).
        filter_fraction: share in ``(0, 1)`` of the train samples reaching a filter that it sends to
            its classifier, the highest-likelihood ones (default 0.3, Sec. 4.3).
        num_clusters: ``K``; ``None`` is :func:`auto_num_clusters` of the samples reaching the last
            filter (500 for large sets, as in the paper).
        flow_blocks: MAF blocks per flow (default 2, Sec. 4.3).
        flow_hidden: hidden units per MAF block (default :data:`FLOW_HIDDEN`, not tied to ``D``).
        sigma: standard deviation of the centres; ``None`` is :func:`default_sigma` of the number of
            non-constant dimensions (supplementary Sec. 3).
        q: exponent of the MLE class weights, eq. 6 (default 2, Sec. 4.3).
        lambda_bal, lambda_pure: weights of eq. 11 (defaults 1 and 0.02, supplementary Sec. 5,
            ImageNet-LT); 0 switches a term off (the ablations of Fig. 5-6).
        eta: decay of the momentum estimator (default 0.7, Sec. 4.3).
        flow_epochs, flow_lr, flow_batch_size: the flows' training schedule (Adam, cosine), at most
            ``flow_epochs`` epochs: with a val split a filter stops ``patience`` epochs after its best
            val likelihood and keeps the weights of that epoch.
        patience: see above (default :data:`PATIENCE`).
        route_folds: ``0`` (default): the classifiers learn from the routes of the train samples
            through the cascade fitted on them; ``>= 2``: cross-fitted routes (module docstring).
        seed: seeds the centres, the flows' initialisation, the batches and the purity pairs.
        device: ``auto``, ``cpu``, ``cuda``... (does not decide the cascade: a cache key leaves it out).
    """

    num_filters: int = NUM_FILTERS
    filter_fraction: float = FILTER_FRACTION
    num_clusters: int | None = None
    flow_blocks: int = FLOW_BLOCKS
    flow_hidden: int = FLOW_HIDDEN
    sigma: float | None = None
    q: float = 2.0
    lambda_bal: float = 1.0
    lambda_pure: float = 0.02
    eta: float = 0.7
    flow_epochs: int = FLOW_EPOCHS
    flow_lr: float = FLOW_LR
    flow_batch_size: int = FLOW_BATCH_SIZE
    patience: int = PATIENCE
    route_folds: int = 0
    seed: int = 0
    device: str = "auto"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, owner: str = "dlsa") -> None:
        """Validate every hyper-parameter (LongtailError ``"<owner>: <key> = ..."``)."""
        o = owner
        check_number(o, "num_filters", self.num_filters, integer=True, low=1)
        check_number(o, "filter_fraction", self.filter_fraction, low=0, high=1, low_open=True, high_open=True)
        check_number(o, "num_clusters", self.num_clusters, integer=True, low=1, allow_none=True)
        check_number(o, "flow_blocks", self.flow_blocks, integer=True, low=1)
        check_number(o, "flow_hidden", self.flow_hidden, integer=True, low=1)
        check_number(o, "sigma", self.sigma, low=0, low_open=True, allow_none=True)
        check_number(o, "q", self.q, low=0)
        check_number(o, "lambda_bal", self.lambda_bal, low=0)
        check_number(o, "lambda_pure", self.lambda_pure, low=0)
        check_number(o, "eta", self.eta, low=0, high=1, high_open=True)
        check_number(o, "flow_epochs", self.flow_epochs, integer=True, low=1)
        check_number(o, "flow_lr", self.flow_lr, low=0, low_open=True)
        check_number(o, "flow_batch_size", self.flow_batch_size, integer=True, low=1)
        check_number(o, "patience", self.patience, integer=True, low=1)
        check_number(o, "route_folds", self.route_folds, integer=True, low=0)
        if self.route_folds == 1:
            raise LongtailError(f"{o}: route_folds = 1: use 0 (no cross-fitting) or at least 2 folds")
        check_number(o, "seed", self.seed, integer=True, low=0)
        resolve_device(self.device)


#: the cascade's hyper-parameters, in order (also the ``dlsa`` wrapper's, less its own)
CASCADE_PARAMS = tuple(f.name for f in fields(CascadeParams))
#: their defaults
DEFAULTS = CascadeParams()


@dataclass(frozen=True)
class Routing:
    """Where a cascade sends each sample; tensors on the cascade's device.

    Attributes:
        stage: ``(N,)`` int64, the filter that sent the sample to its classifier (``0..F-1``), or
            ``F`` for a sample that passed every filter (the regular classifier).
        cluster: ``(N, F)`` int64, ``k^`` (eq. 4) in every filter the sample reached, ``-1`` after it
            left the cascade.
        log_likelihood: ``(N, F)`` float32, ``log L(theta; x)`` (eq. 5) in every filter the sample
            reached, NaN after it left.
        latent: ``(N, D')`` float32, ``z`` of the filter that sent the sample out (zeros for the rest);
            ``D'`` is the number of non-constant feature dimensions.
        standardised: ``(N, D)`` float32, the standardised features.
    """

    stage: torch.Tensor
    cluster: torch.Tensor
    log_likelihood: torch.Tensor
    latent: torch.Tensor
    standardised: torch.Tensor

    @property
    def num_filters(self) -> int:
        return int(self.cluster.shape[1])

    def counts(self) -> list[int]:
        """Samples per group: ``F`` filters, then the regular classifier."""
        return torch.bincount(self.stage, minlength=self.num_filters + 1).tolist()


class FlowCascade:
    """A cascade of Gaussian Mixture Flow Filters (Sec. 3.2-3.3), fitted once, reusable by every head.

    ``FlowCascade(**params)`` with the keys of :class:`CascadeParams` (kept as :attr:`params`),
    validated by :meth:`fit` (the method contract). Learned state ends in ``_``; :meth:`state_dict`
    / :meth:`load_state_dict` hold tensors only, and ``FlowCascade(**same_params).load_state_dict(state)``
    routes exactly as the fitted one.
    """

    #: the name in error messages (the cascade's parameters are the ``dlsa`` wrapper's)
    owner = "dlsa"

    def __init__(self, **params: Any):
        self.params = CascadeParams(**params)  # TypeError for an unknown key

    def get_params(self) -> dict[str, Any]:
        return self.params.as_dict()

    def __repr__(self) -> str:
        return f"FlowCascade({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def check_params(self) -> None:
        """Validate every hyper-parameter (LongtailError naming the key)."""
        self.params.check(self.owner)

    def plan(self, num_samples: int) -> tuple[list[tuple[int, int]], int]:
        """``(filter_sizes, K)`` for ``num_samples`` train samples, or a LongtailError saying which
        filter would get too few samples (every filter must send out at least one and keep at least
        one, and be reached by at least ``K`` samples)."""
        p = self.params
        sizes = filter_sizes(num_samples, p.num_filters, p.filter_fraction)
        for f, (n, m) in enumerate(sizes):
            if m < 1 or m >= n:
                raise LongtailError(
                    f"{self.owner}: filter {f + 1} of {p.num_filters} is reached by {n} train sample(s) and would "
                    f"send {m} of them (filter_fraction {p.filter_fraction}) to its classifier: every filter must "
                    f"send out at least one and keep at least one; use fewer num_filters or another filter_fraction"
                )
        k = auto_num_clusters(sizes[-1][0]) if p.num_clusters is None else int(p.num_clusters)
        for f, (n, _) in enumerate(sizes):
            if k > n:
                raise LongtailError(
                    f"{self.owner}: num_clusters = {k} is larger than the {n} train samples that reach filter "
                    f"{f + 1} of {p.num_filters} ({num_samples} train samples in all); use at most {sizes[-1][0]}"
                )
        return sizes, k

    # ------------------------------------------------------------------ fit
    def is_fitted(self) -> bool:
        return hasattr(self, "filters_")

    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "FlowCascade":
        """Fit the filters one after the other on the train samples that reach each; with ``val``,
        each stops on the likelihood of the val samples that reach it (module docstring)."""
        p = self.params
        if not isinstance(train, FeatureSet):
            raise TypeError("FlowCascade.fit expects a FeatureSet")
        train.check_train()
        if val is not None and (val.dim != train.dim or val.labels is None):
            raise LongtailError(f"dlsa: the val split must have labels and the train split's dimension {train.dim}")
        self.check_params()
        sizes, k = self.plan(len(train))
        dev = resolve_device(p.device)
        labels = train.labels
        num_classes = train.num_classes
        mean, std = balanced_moments(train.features, labels, num_classes)
        scale = max(float(std.max()), 1e-300)  # guards the relative test below against all-zero std
        active = std > 1e-6 * scale
        if not active.any():
            raise LongtailError(
                f"{train.source or 'features'}: split {train.name!r}: every feature dimension is constant; "
                "a flow has nothing to model"
            )
        std = np.where(active, std, 1.0)  # guards the division in standardise: constant dims are centred only
        self.mean_ = torch.tensor(mean, dtype=torch.float32, device=dev)
        self.std_ = torch.tensor(std, dtype=torch.float32, device=dev)
        self.active_ = torch.tensor(active, device=dev)
        self.num_clusters_ = k
        self.num_classes_ = num_classes
        self.dim_ = train.dim
        self.train_counts_ = torch.as_tensor(train.class_counts.copy())
        self.train_fingerprint_ = fingerprint(train)
        sigma = default_sigma(int(active.sum())) if p.sigma is None else float(p.sigma)
        self.sigma_ = sigma

        x = self._standardise(torch.tensor(train.features, device=dev))
        xa = x[:, self.active_]
        y = torch.tensor(labels, device=dev)
        if val is not None:
            xv = self._standardise(torch.tensor(val.features, device=dev))[:, self.active_]
            yv = torch.tensor(val.labels, device=dev)
            val_reaching = torch.arange(len(val), device=dev)
        generator = torch.Generator(device=dev)
        generator.manual_seed(int(p.seed))
        filters, thresholds, priors, histories, best = [], [], [], [], []
        reaching = torch.arange(len(train), device=dev)
        for f, (n, m) in enumerate(sizes):
            xf, yf = xa[reaching], y[reaching]
            counts_f = torch.bincount(yf, minlength=num_classes)
            weights = torch.as_tensor(flow_class_weights(counts_f.cpu().numpy(), float(p.q)),
                                      dtype=torch.float32, device=dev)
            filt = self._new_filter(int(xa.shape[1]), k, generator, sigma).to(dev)
            history, stopping = train_filter(
                filt, xf, yf, weights, epochs=int(p.flow_epochs), lr=float(p.flow_lr),
                batch_size=int(p.flow_batch_size), lambda_bal=float(p.lambda_bal),
                lambda_pure=float(p.lambda_pure), generator=generator,
                desc=f"dlsa filter {f + 1}/{p.num_filters}",
                val=None if val is None else (xv[val_reaching], yv[val_reaching]), patience=int(p.patience),
            )
            _, ll, cluster = filt.evaluate(xf)
            threshold = quantile_threshold(ll, m)
            routed = ll.double() > threshold
            filters.append(filt)
            thresholds.append(threshold)
            priors.append(cluster_prior(cluster, yf, k, num_classes))
            histories.append(history)
            best.append(stopping.best_epoch if stopping is not None else len(history) - 1)
            reaching = reaching[~routed]
            if val is not None and val_reaching.numel():
                _, llv, _ = filt.evaluate(xv[val_reaching])
                val_reaching = val_reaching[~(llv.double() > threshold)]
        self.filters_ = filters
        self.thresholds_ = torch.tensor(thresholds, dtype=torch.float64)
        self.cluster_priors_ = torch.stack(priors)  # (F, K, C) float64
        self.history_ = histories
        self.best_epoch_ = torch.tensor(best, dtype=torch.int64)
        if int(p.route_folds) >= 2:
            self._cross_fit(train, val, k)
        return self

    def _cross_fit(self, train: FeatureSet, val: FeatureSet | None, k: int) -> None:
        """Cross-fitted routes of the train samples (``route_folds >= 2``, module docstring).

        Sets ``oof_stage_`` ``(N,)`` (the group of each train sample under the cascade that did not
        see it), ``oof_cluster_`` ``(N,)`` (its cluster in the filter that sent it out, -1 past every
        filter), ``oof_fold_`` ``(N,)`` and ``oof_priors_`` ``(folds, F, K, C)`` (the cluster priors of
        each fold's cascade). Folds are class-stratified (each class's samples dealt round-robin in a
        seeded order), so every fold's cascade sees every class with at least ``folds`` samples.
        """
        p = self.params
        folds = int(p.route_folds)
        labels = train.labels
        rng = np.random.default_rng([int(p.seed), 7])
        fold = np.empty(len(train), dtype=np.int64)
        for c in range(train.num_classes):
            rows = np.flatnonzero(labels == c)
            fold[rows[rng.permutation(rows.size)]] = (np.arange(rows.size) + c) % folds
        dev = self.mean_.device
        stage = torch.full((len(train),), len(self.filters_), dtype=torch.long, device=dev)
        cluster = torch.full((len(train),), -1, dtype=torch.long, device=dev)
        priors = []
        for j in range(folds):
            keep = fold != j
            counts = np.bincount(labels[keep], minlength=train.num_classes)
            part = FeatureSet(train.features[keep], labels[keep], counts, train.class_names, name=train.name,
                              source=train.source)
            sub = FlowCascade(**{**p.as_dict(), "route_folds": 0, "num_clusters": k, "seed": int(p.seed) + 1 + j})
            try:
                sub.fit(part, val)
            except LongtailError as exc:
                raise LongtailError(f"dlsa: route_folds = {folds}: the cascade of fold {j + 1} cannot be fitted "
                                    f"({exc}); use fewer folds") from None
            held = np.flatnonzero(~keep)
            route = sub.route(train.features[held])
            idx = torch.as_tensor(held, device=dev)
            stage[idx] = route.stage.to(dev)
            out = route.stage < route.num_filters
            cluster[idx[out]] = route.cluster[out, route.stage[out]].to(dev)
            priors.append(sub.cluster_priors_.to(dev))
        self.oof_stage_ = stage
        self.oof_cluster_ = cluster
        self.oof_fold_ = torch.as_tensor(fold, device=dev)
        self.oof_priors_ = torch.stack(priors)  # (folds, F, K, C) float64

    def has_cross_fitted_routes(self) -> bool:
        return hasattr(self, "oof_stage_")

    def _new_filter(self, dim: int, k: int, generator: torch.Generator, sigma: float) -> GaussianMixtureFlowFilter:
        """A filter with centres ``sigma * N(0, I)`` and a flow initialised from a seed drawn from ``generator``."""
        p = self.params
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
            torch.manual_seed(seed)
            filt = GaussianMixtureFlowFilter(dim, k, int(p.flow_blocks), int(p.flow_hidden), float(p.eta))
        with torch.no_grad():
            filt.centres.copy_(sigma * torch.randn(k, dim, generator=generator, device=generator.device).cpu())
        return filt

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean_) / self.std_  # std_ > 0: floored to 1 for constant dimensions in fit

    # ------------------------------------------------------------------ route
    def route(self, features: np.ndarray | torch.Tensor) -> Routing:
        """Send every row of ``features`` ``(N, D)`` down the cascade by the train thresholds.

        Filter ``f`` evaluates the samples still in the cascade (in chunks of rows) and sends out
        those whose log-likelihood is above its threshold. Deterministic: the train features route
        exactly as during :meth:`fit` (same device, same chunks).
        """
        self._check_fitted()
        dev = self.mean_.device
        x = torch.as_tensor(features, dtype=torch.float32).to(dev)
        if x.ndim != 2 or x.shape[1] != self.dim_:
            raise LongtailError(
                f"dlsa: features of shape {tuple(x.shape)} do not match the fitted dimension {self.dim_}")
        n, nf = int(x.shape[0]), len(self.filters_)
        xs = self._standardise(x)
        xa = xs[:, self.active_]
        stage = torch.full((n,), nf, dtype=torch.long, device=dev)
        cluster = torch.full((n, nf), -1, dtype=torch.long, device=dev)
        log_lik = torch.full((n, nf), float("nan"), device=dev)
        latent = torch.zeros(n, xa.shape[1], device=dev)
        reaching = torch.arange(n, device=dev)
        for f, filt in enumerate(self.filters_):
            z, ll, k = filt.evaluate(xa[reaching])
            log_lik[reaching, f] = ll
            cluster[reaching, f] = k
            routed = ll.double() > float(self.thresholds_[f])
            out = reaching[routed]
            stage[out] = f
            latent[out] = z[routed]
            reaching = reaching[~routed]
        return Routing(stage=stage, cluster=cluster, log_likelihood=log_lik, latent=latent, standardised=xs)

    # ------------------------------------------------------------------ persistence
    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise RuntimeError("FlowCascade is not fitted yet: call fit() or load_state_dict() first")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything :meth:`route` needs, as CPU tensors (safetensors-compatible)."""
        self._check_fitted()
        state = {
            "num_filters": torch.tensor(len(self.filters_)),
            "num_clusters": torch.tensor(self.num_clusters_),
            "num_classes": torch.tensor(self.num_classes_),
            "dim": torch.tensor(self.dim_),
            "sigma": torch.tensor(self.sigma_, dtype=torch.float64),
            "mean": self.mean_, "std": self.std_, "active": self.active_,
            "thresholds": self.thresholds_, "cluster_priors": self.cluster_priors_,
            "train_counts": self.train_counts_, "train_fingerprint": self.train_fingerprint_,
            "best_epoch": self.best_epoch_,
        }
        if self.has_cross_fitted_routes():
            state.update({"oof_stage": self.oof_stage_, "oof_cluster": self.oof_cluster_, "oof_fold": self.oof_fold_,
                          "oof_priors": self.oof_priors_})
        for f, (filt, history) in enumerate(zip(self.filters_, self.history_)):
            for key, value in filt.state_dict().items():
                state[f"filter{f}.{key}"] = value
            state[f"filter{f}.history"] = torch.tensor([h["total"] for h in history], dtype=torch.float64)
            state[f"filter{f}.val_history"] = torch.tensor([h.get("val_nll", math.nan) for h in history],
                                                           dtype=torch.float64)
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "FlowCascade":
        """Restore a fitted cascade; its hyper-parameters must be those it was fitted with."""
        p = self.params
        self.check_params()
        dev = resolve_device(p.device)
        try:
            nf = int(state["num_filters"])
            k = int(state["num_clusters"])
            if nf != int(p.num_filters) or (p.num_clusters is not None and k != int(p.num_clusters)):
                raise LongtailError(
                    f"dlsa: the saved cascade has {nf} filters and {k} clusters, the parameters say "
                    f"{p.num_filters} and {p.num_clusters}"
                )
            self.num_clusters_ = k
            self.num_classes_ = int(state["num_classes"])
            self.dim_ = int(state["dim"])
            self.sigma_ = float(state["sigma"])
            self.mean_ = state["mean"].to(dev, torch.float32)
            self.std_ = state["std"].to(dev, torch.float32)
            self.active_ = state["active"].to(dev, torch.bool)
            self.thresholds_ = state["thresholds"].to(torch.float64).cpu()
            self.cluster_priors_ = state["cluster_priors"].to(dev, torch.float64)
            self.train_counts_ = state["train_counts"].to(torch.int64).cpu()
            self.train_fingerprint_ = state["train_fingerprint"].to(torch.float64).cpu()
            self.best_epoch_ = state["best_epoch"].to(torch.int64).cpu()
            if "oof_stage" in state:
                self.oof_stage_ = state["oof_stage"].to(dev, torch.int64)
                self.oof_cluster_ = state["oof_cluster"].to(dev, torch.int64)
                self.oof_fold_ = state["oof_fold"].to(dev, torch.int64)
                self.oof_priors_ = state["oof_priors"].to(dev, torch.float64)
            elif int(p.route_folds) >= 2:
                raise KeyError("oof_stage")
            dim = int(self.active_.sum())
            filters, histories = [], []
            for f in range(nf):
                prefix = f"filter{f}."
                own = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
                history = own.pop("history")
                val_history = own.pop("val_history")
                filt = GaussianMixtureFlowFilter(dim, k, int(p.flow_blocks), int(p.flow_hidden), float(p.eta))
                filt.load_state_dict(own)
                filters.append(filt.to(dev).eval().requires_grad_(False))
                histories.append([{"total": float(v), **({} if math.isnan(float(w)) else {"val_nll": float(w)})}
                                  for v, w in zip(history, val_history)])
        except (KeyError, RuntimeError) as exc:
            raise LongtailError(f"dlsa: the saved cascade does not fit these parameters: {exc}") from exc
        self.filters_ = filters
        self.history_ = histories
        return self


def fingerprint(train: FeatureSet, chunk: int = 65536) -> torch.Tensor:
    """A cheap check that a cascade and a train split belong together: ``(N, sum x, sum x^2, sum y)``,
    float64 ``(4,)`` (not a hash: it catches another split or store, not a single flipped value).
    Summed in float64 over chunks of rows (no float64 copy of the whole split)."""
    total = np.zeros(2)
    for start in range(0, len(train), chunk):
        rows = train.features[start:start + chunk].astype(np.float64)
        total += (rows.sum(), np.square(rows).sum())
    return torch.tensor([float(len(train)), total[0], total[1], float(train.require_labels().sum())],
                        dtype=torch.float64)


def quantile_threshold(log_likelihood: torch.Tensor, num_out: int) -> float:
    """The threshold ``alpha`` that sends the ``num_out`` highest log-likelihoods out (``> alpha``).

    The midpoint (in float64) between the ``num_out``-th and the next highest value, so that exactly
    ``num_out`` samples lie above it; samples tied at that boundary all stay (go on). ``1 <= num_out
    < N`` (checked by :meth:`FlowCascade.plan`).
    """
    top = torch.topk(log_likelihood.double(), num_out + 1).values
    return float(0.5 * (top[num_out - 1] + top[num_out]))


def cluster_prior(cluster: torch.Tensor, labels: torch.Tensor, num_clusters: int, num_classes: int) -> torch.Tensor:
    """``P(y | h = k)`` (Sec. 3.4): class frequencies of the samples in each cluster, ``(K, C)`` float64.

    An empty cluster gets the class frequencies of all the samples (rows of ``cluster``).
    """
    joint = torch.zeros(num_clusters * num_classes, dtype=torch.float64, device=cluster.device)
    joint.index_add_(0, cluster * num_classes + labels, torch.ones_like(labels, dtype=torch.float64))
    joint = joint.view(num_clusters, num_classes)
    sizes = joint.sum(1, keepdim=True)
    marginal = joint.sum(0, keepdim=True) / joint.sum()  # the sum is N >= 1
    return torch.where(sizes > 0, joint / sizes.clamp_min(1.0), marginal)  # clamp guards empty clusters
