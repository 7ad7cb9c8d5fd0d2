"""DLSA: Gaussian Mixture Flow Filters and Cluster-aided Classifiers (paper 004, Xu et al., ECCV 2022).

Dynamic Label Space Adjustment on cached features, in three pieces:

* :class:`GaussianMixtureFlowFilter` (Sec. 3.3): a masked autoregressive flow (nflows MAF,
  ``flow_blocks`` blocks of one hidden layer of ``flow_hidden`` units, reversed order between
  blocks) maps standardised features ``x`` to ``z``; the latent density is a ``K``-component
  Gaussian mixture with identity covariances, centres drawn once from ``N(0, sigma^2 I)`` and
  fixed, and a uniform prior (eq. 2-4). It is trained with eq. 11,
  ``L_MLE + lambda_bal L_bal + lambda_pure L_pure`` (:mod:`stages.losses.dlsa`, eq. 5-10).
* :class:`FlowCascade` (Sec. 3.2-3.3, Fig. 4): ``num_filters`` filters in a row. Each is fitted on
  the train samples that reach it; its threshold ``alpha`` is the quantile of their
  log-likelihoods that sends the ``filter_fraction`` of them with the **highest** likelihood (the
  well-clustered samples; the "P(x) <= alpha" of Sec. 3.3 is a typo, its Fig. 4 and text mean high
  likelihood) to the filter's cluster-aided classifier; the rest reach the next filter. Samples
  that pass every filter go to the regular classifier. Test samples follow the same route by the
  thresholds learnt on train. The cascade is an object of its own, fitted once and shared by every
  wrapped head on the same features (the paper reuses one trained filter for all its classifiers).
* :class:`DLSA`, registered as the prefix wrapper ``dlsa`` (``dlsa+ce``, ``dlsa+balanced-softmax``,
  ...): one classifier per group. The group a filter sends out is classified by a cluster-aided
  classifier (Sec. 3.4), ``softmax(FC([x, z]) + FC(P(y | h = k^)))`` with ``P(y | h = k)`` the class
  frequencies of the train samples in cluster ``k``; what passes every filter is classified by the
  wrapped head itself, fitted on all train samples.

Choices this module makes, and why:

* **Standardisation.** Features are standardised once with the class-balanced train moments
  (:func:`stages.heads.balanced_moments`, the heads' convention); the flows model the standardised
  non-constant dimensions. A constant dimension has no density (a flow can raise the likelihood
  of a constant without bound), so constant dimensions are left out of the flows (documented,
  tested); features with no non-constant dimension are an error.
* **Weights and the MLE's scale.** The MLE weights (eq. 6) use the class counts of the samples
  that reach the filter (the samples it is fitted on; the reference code does the same). Eq. 7 is
  printed as a *sum* over the batch; the filter uses its *mean* over the batch
  (:func:`~stages.losses.dlsa.weighted_mle_loss` with ``reduction="mean"``), like eq. 8-10, which
  are batch averages. With the printed sum, ``L_MLE`` is ``|B|`` times larger and the default
  ``lambda_bal = 1``, ``lambda_pure = 0.02`` (supplementary Sec. 5, tuned with the authors' code,
  which also averages) have no visible effect: on a synthetic 100-class long tail (32-d, 5k
  samples, one filter, hidden 64) the cluster-size entropy was 0.89 of ``log K`` with ``L_bal``
  and 0.88 without, mean purity 0.63 with ``L_pure`` and 0.62 without. With the mean (defaults,
  seeds 0 and 1): entropy 0.97 with ``L_bal`` and 0.45 without, mean purity 0.64 with ``L_pure``
  and 0.55 without (the paper's Fig. 5-6), and the filter still enriches tail samples: 26-27% of
  the samples it sends out are tail samples (at most 50 train samples) against 13% of the data
  (39% without ``L_pure``, whose class-balanced pairs push tail samples out of the dense region).
* **Schedule.** Each flow is trained for ``flow_epochs`` epochs of instance-sampled batches
  (eq. 8 needs batches drawn from the data distribution) with Adam (lr ``1e-2``, cosine schedule;
  the paper's SGD at lr 0.2 was tuned to the authors' unstandardised features and loss scale; on
  the 100-class set with hidden 64, Adam at ``1e-3`` separated head from tail barely above
  chance, 15% tail samples sent out against 13%, and ``1e-2`` 25%) and the last epoch is kept:
  no epoch is chosen on any split. (The reference code keeps the epoch with the most clusters of
  purity > 0.7 and size > 10 on train, and picks its classifiers' epochs on the test split.) Purity
  pairs (eq. 10): ``ceil(flow_batch_size / 2)`` pairs per step, two different classes drawn
  uniformly among the classes that reach the filter, then one sample of each uniformly ("sampling with equal probability for each class",
  Sec. 3.3; the reference code does the same). A class with a single train sample is fine (a pair
  needs one sample per class); a filter reached by a single class has no pair and no purity term.
* **Cluster prior.** ``P(y | h = k)`` is computed on the train samples that reach the filter; an
  empty cluster (possible for a test sample) gets the class frequencies of all of them.
* **Classifier losses.** Every cluster-aided classifier is trained with the wrapped head's loss,
  sampler and optimiser settings (:func:`stages.heads.train_module`), with the **global** train
  class counts: a head that compensates the train prior (``balanced-softmax``, ``logit-adjust``)
  then estimates the posterior of a balanced test set *within the group*: the group's train prior
  is ``n_{g,y}``, its balanced-test prior is ``n_{g,y} / n_y`` (the share of class ``y`` routed to
  the group, the same on train and test), and their ratio is ``n_y``. Classes without a train
  sample in the group need no special case. Class-balanced sampling (``crt``) draws among the
  classes present in the group. A group of ``n_f`` samples is trained for ``ceil(epochs * N / n_f)``
  epochs (about the head's number of SGD steps on all ``N`` samples). Two-stage post-processing of a head (``tau-norm``'s tau,
  ``lws``'s separate scale stage) is not applied to the cluster-aided classifiers: they train the
  head's module in one stage, and their logits are the module's outputs (for ``ldam-drw`` the
  unscaled cosine plus the prior term, which has the same argmax as the scaled one).
* **The regular classifier is the head fitted on all train samples**, not on the samples left
  after the last filter as in the paper and the reference code. The flows give the few train
  samples of a tail class large weights (eq. 6) and high likelihoods, so a filter sends all of
  them out, while the unseen test samples of that class fall further down the cascade, into
  groups whose classifiers never saw the class. On a synthetic 50-class long tail (32-d, 2.7k
  train samples, balanced test), 38% of the test samples routed to the second filter belonged to
  classes with no train sample in that group; classifiers trained only on their group's train
  samples (the paper) reached 68-70% balanced accuracy against 98-99.7% for ``ce``,
  ``balanced-softmax`` and ``cosine`` alone; the head on all samples past the last filter brought
  ``dlsa+<head>`` to 89-90%, and ``classifier_samples = "all"`` (cluster-aided classifiers trained on
  every train sample through their filter) to 95-98%. (On a 20-class 16-d set, ``"routed"`` gave
  95.2/97.2/96.9% against 93.5/95.6/99.0% for the heads alone, ``"all"`` 92.8/95.8/97.5%.) The
  default stays the paper's ``"routed"``. The head on all samples is also what the wrapper
  contract gives for free: a cached, already fitted head is reused as is.

Everything runs on the configured device, batched (flows in chunks of rows, groups by index), with
one seed for the cascade (``seed``) and the head's ``seed`` for the classifiers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from longtail.stages.base import Method, Wrapper, check_number, register
from longtail.stages.data import FeatureSet
from longtail.stages.device import resolve_device
from longtail.stages.errors import LongtailError
from longtail.stages.heads import LinearClassifier, _Head, balanced_moments, train_module
from longtail.stages.losses.dlsa import (
    balancedness_loss,
    batch_cluster_posterior,
    bias_corrected,
    flow_class_weights,
    gmm_log_likelihood,
    momentum_update,
    purity_loss,
    weighted_mle_loss,
)

# ---------------------------------------------------------------------- defaults
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
#: rows per chunk when evaluating flows (bounds device memory, not a per-sample loop)
ROUTE_CHUNK = 16384
#: the tail of the diagnostics: classes with at most this many train samples (Sec. 1, Fig. 2)
TAIL_THRESHOLD = 50


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


# ---------------------------------------------------------------------- the flow filter
def build_maf(dim: int, blocks: int, hidden: int) -> nn.Module:
    """nflows MAF: ``blocks`` x (MaskedAffineAutoregressiveTransform with one hidden layer of
    ``hidden`` ReLU units), the order reversed between blocks; ``forward(x) -> (z, log|det J|)``.

    Only the forward (density) direction is used: ``x -> z`` is one pass of each MADE.
    Initialised from torch's global generator: call it under :func:`torch.random.fork_rng` with a
    seed (as :class:`FlowCascade` does).
    """
    from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform, ReversePermutation

    layers: list[nn.Module] = []
    for b in range(int(blocks)):
        if b:
            layers.append(ReversePermutation(int(dim)))
        layers.append(MaskedAffineAutoregressiveTransform(
            features=int(dim), hidden_features=int(hidden), num_blocks=0, use_residual_blocks=False))
    return CompositeTransform(layers)


class MomentumPosterior:
    """The state of the momentum estimator of the cluster posterior (Sec. 3.3; supplementary Sec. 2.2).

    ``update(p^_t)`` sets ``p~_t = eta p~_{t-1} + (1 - eta) p^_t`` (``p~_0 = 0``, only ``p^_t``
    carries a gradient) and returns the bias-corrected ``p~_t / (1 - eta^t)``.
    """

    def __init__(self, eta: float):
        self.eta = float(eta)
        self.reset()

    def reset(self) -> None:
        self.value: torch.Tensor | float = 0.0
        self.step = 0

    def update(self, batch_posterior: torch.Tensor) -> torch.Tensor:
        self.step += 1
        previous = self.value.detach() if isinstance(self.value, torch.Tensor) else self.value
        self.value = momentum_update(previous, batch_posterior, self.eta)
        return bias_corrected(self.value, self.eta, self.step)


class GaussianMixtureFlowFilter(nn.Module):
    """One Gaussian Mixture Flow Filter (Sec. 3.3): a MAF and ``K`` fixed centres.

    ``forward(x) -> (z, log_likelihood, log_posterior)`` with shapes ``(N, D)``, ``(N,)``, ``(N, K)``
    (eq. 4-5). The state of the balancedness loss's momentum estimator lives in
    :attr:`momentum` (reset by :meth:`fit`).
    """

    def __init__(self, dim: int, num_clusters: int, blocks: int, hidden: int, eta: float = 0.7):
        super().__init__()
        self.flow = build_maf(dim, blocks, hidden)
        self.register_buffer("centres", torch.zeros(int(num_clusters), int(dim)))
        self.momentum = MomentumPosterior(eta)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, logabsdet = self.flow(x)
        log_lik, log_post = gmm_log_likelihood(z, logabsdet, self.centres)
        return z, log_lik, log_post

    def losses(self, x: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor,
               pair_i: torch.Tensor | None, pair_j: torch.Tensor | None,
               lambda_bal: float, lambda_pure: float) -> dict[str, torch.Tensor]:
        """The terms of eq. 11 on one batch ``(x, y)`` and pairs ``(pair_i, pair_j)`` of features.

        ``mle`` (eq. 7), ``bal`` (eq. 9 on the bias-corrected momentum estimate of eq. 8; this
        advances :attr:`momentum`), ``pure`` (eq. 10) and ``total`` (eq. 11). A term whose weight is
        0 is not computed (and the momentum estimator does not move).
        """
        _, log_lik, log_post = self(x)
        out = {"mle": weighted_mle_loss(log_lik, y, class_weights, reduction="mean")}
        total = out["mle"]
        if lambda_bal > 0:
            out["bal"] = balancedness_loss(self.momentum.update(batch_cluster_posterior(log_post)))
            total = total + float(lambda_bal) * out["bal"].to(total.dtype)
        if lambda_pure > 0 and pair_i is not None:
            _, _, lp = self(torch.cat([pair_i, pair_j]))
            out["pure"] = purity_loss(lp[: len(pair_i)], lp[len(pair_i):])
            total = total + float(lambda_pure) * out["pure"]
        out["total"] = total
        return out

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, chunk: int = ROUTE_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, log_likelihood, cluster)`` of every row of ``x``, in chunks of rows, in eval mode.

        ``cluster`` is ``k^ = argmax_k P(k | x)`` (eq. 4), int64.
        """
        zs, lls, ks = [], [], []
        for start in range(0, x.shape[0], chunk):
            z, ll, lp = self(x[start:start + chunk])
            zs.append(z)
            lls.append(ll)
            ks.append(lp.argmax(1))
        if not zs:  # no row: empty results of the right shapes
            d = self.centres.shape[1]
            return x.new_zeros((0, d)), x.new_zeros((0,)), torch.zeros(0, dtype=torch.long, device=x.device)
        return torch.cat(zs), torch.cat(lls), torch.cat(ks)


class PairSampler:
    """Pairs of samples of two different classes, classes drawn with equal probability (eq. 10).

    Each pair draws an ordered pair of distinct classes uniformly among the classes present in
    ``labels`` (the first uniformly, the second uniformly among the others), then one sample of each
    class uniformly. Vectorised on the generator's device.
    """

    def __init__(self, labels: torch.Tensor):
        classes, counts = torch.unique(labels, return_counts=True)  # sorted classes
        self.num_classes = int(classes.numel())
        self.classes = classes
        self.order = torch.argsort(labels, stable=True)  # sample indices grouped by class
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts

    def __call__(self, num_pairs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(i, j)``: ``(P,)`` sample indices with ``labels[i] != labels[j]``; needs two classes."""
        if self.num_classes < 2:
            raise LongtailError("purity pairs need samples of at least two classes")
        dev = generator.device
        a = torch.randint(self.num_classes, (num_pairs,), generator=generator, device=dev)
        b = torch.randint(self.num_classes - 1, (num_pairs,), generator=generator, device=dev)
        b = b + (b >= a).long()  # uniform over the classes other than a
        return self._member(a, generator), self._member(b, generator)

    def _member(self, cls: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(cls.shape[0], generator=generator, device=generator.device, dtype=torch.float64)
        n = self.counts[cls]
        within = torch.minimum((u * n).long(), n - 1)  # minimum guards u * n rounding up to n
        return self.order[self.offsets[cls] + within]


def train_filter(
    filt: GaussianMixtureFlowFilter,
    x: torch.Tensor,
    y: torch.Tensor,
    class_weights: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    lambda_bal: float,
    lambda_pure: float,
    generator: torch.Generator,
    desc: str = "dlsa filter",
) -> list[dict[str, float]]:
    """Fit a filter on ``(x, y)`` (on the generator's device) with eq. 11; mean loss terms per epoch.

    Adam with a per-step cosine schedule from ``lr`` to 0; batches are a permutation of the rows per
    epoch (instance sampling, as eq. 8 assumes); ``ceil(batch_size / 2)`` purity pairs per step (as
    many samples as the batch). The loss is checked once per epoch: a non-finite loss raises
    :class:`LongtailError` instead of training on.
    """
    n = int(x.shape[0])
    # pairs are drawn even when lambda_pure = 0 (indices only, no forward pass), so that an ablation
    # sees the same batches as the full model
    pairs = PairSampler(y)
    if pairs.num_classes < 2:
        pairs = None  # one class reaches the filter: no pair of different classes, no purity term
    filt.momentum.reset()
    params = [p for p in filt.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps_per_epoch = math.ceil(n / batch_size)  # batch_size >= 1 (validated)
    total_steps = max(1, epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    history: list[dict[str, float]] = []
    filt.train()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=None, leave=False)
    for epoch in bar:
        order = torch.randperm(n, generator=generator, device=generator.device)
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            pi = pj = None
            if pairs is not None:
                i, j = pairs((int(idx.numel()) + 1) // 2, generator)
                if lambda_pure > 0:
                    pi, pj = x[i], x[j]
            terms = filt.losses(x[idx], y[idx], class_weights, pi, pj, lambda_bal, lambda_pure)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            schedule.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double()
        means = {k: float(v) / steps_per_epoch for k, v in sums.items()}  # device syncs once per epoch
        if not all(math.isfinite(v) for v in means.values()):
            raise LongtailError(
                f"{desc}: the flow loss became {means['total']} at epoch {epoch + 1} "
                f"({', '.join(f'{k} {v:.4g}' for k, v in means.items())}): lower flow_lr (now {lr})"
            )
        history.append(means)
        bar.set_postfix(loss=f"{means['total']:.4g}")
    bar.close()
    filt.eval()
    for p in filt.parameters():
        p.requires_grad_(False)
    return history


# ---------------------------------------------------------------------- the cascade
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


#: the cascade's hyper-parameters, in order (also the ``dlsa`` wrapper's, less ``tail_threshold``)
CASCADE_PARAMS = ("num_filters", "filter_fraction", "num_clusters", "flow_blocks", "flow_hidden", "sigma", "q",
                  "lambda_bal", "lambda_pure", "eta", "flow_epochs", "flow_lr", "flow_batch_size", "seed", "device")


class FlowCascade:
    """A cascade of Gaussian Mixture Flow Filters (Sec. 3.2-3.3), fitted once, reusable by every head.

    Hyper-parameters are stored by the constructor and validated by :meth:`fit` (the method
    contract). Learned state ends in ``_``; :meth:`state_dict` / :meth:`load_state_dict` hold tensors
    only, and ``FlowCascade(**same_params).load_state_dict(state)`` routes exactly as the fitted one.

    Args:
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
        flow_epochs, flow_lr, flow_batch_size: the flows' fixed training schedule (Adam, cosine).
        seed: seeds the centres, the flows' initialisation, the batches and the purity pairs.
        device: ``auto``, ``cpu``, ``cuda``...
    """

    #: the name in error messages (the cascade's parameters are the ``dlsa`` wrapper's)
    owner = "dlsa"

    def __init__(self, *, num_filters: int = NUM_FILTERS, filter_fraction: float = FILTER_FRACTION,
                 num_clusters: int | None = None, flow_blocks: int = FLOW_BLOCKS, flow_hidden: int = FLOW_HIDDEN,
                 sigma: float | None = None, q: float = 2.0, lambda_bal: float = 1.0, lambda_pure: float = 0.02,
                 eta: float = 0.7, flow_epochs: int = FLOW_EPOCHS, flow_lr: float = FLOW_LR,
                 flow_batch_size: int = FLOW_BATCH_SIZE, seed: int = 0, device: str = "auto"):
        self.num_filters = num_filters
        self.filter_fraction = filter_fraction
        self.num_clusters = num_clusters
        self.flow_blocks = flow_blocks
        self.flow_hidden = flow_hidden
        self.sigma = sigma
        self.q = q
        self.lambda_bal = lambda_bal
        self.lambda_pure = lambda_pure
        self.eta = eta
        self.flow_epochs = flow_epochs
        self.flow_lr = flow_lr
        self.flow_batch_size = flow_batch_size
        self.seed = seed
        self.device = device

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in CASCADE_PARAMS}

    def __repr__(self) -> str:
        return f"FlowCascade({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    # ------------------------------------------------------------------ validation
    def check_params(self) -> None:
        """Validate every hyper-parameter (LongtailError naming the key)."""
        o = self.owner
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
        check_number(o, "seed", self.seed, integer=True, low=0)
        resolve_device(self.device)

    def plan(self, num_samples: int) -> tuple[list[tuple[int, int]], int]:
        """``(filter_sizes, K)`` for ``num_samples`` train samples, or a LongtailError saying which
        filter would get too few samples (every filter must send out at least one and keep at least
        one, and be reached by at least ``K`` samples)."""
        sizes = filter_sizes(num_samples, self.num_filters, self.filter_fraction)
        for f, (n, m) in enumerate(sizes):
            if m < 1 or m >= n:
                raise LongtailError(
                    f"{self.owner}: filter {f + 1} of {self.num_filters} is reached by {n} train sample(s) and would "
                    f"send {m} of them (filter_fraction {self.filter_fraction}) to its classifier: every filter must "
                    f"send out at least one and keep at least one; use fewer num_filters or another filter_fraction"
                )
        k = auto_num_clusters(sizes[-1][0]) if self.num_clusters is None else int(self.num_clusters)
        for f, (n, _) in enumerate(sizes):
            if k > n:
                raise LongtailError(
                    f"{self.owner}: num_clusters = {k} is larger than the {n} train samples that reach filter "
                    f"{f + 1} of {self.num_filters} ({num_samples} train samples in all); use at most {sizes[-1][0]}"
                )
        return sizes, k

    # ------------------------------------------------------------------ fit
    def is_fitted(self) -> bool:
        return hasattr(self, "filters_")

    def fit(self, train: FeatureSet) -> "FlowCascade":
        """Fit the filters one after the other on the train samples that reach each."""
        if not isinstance(train, FeatureSet):
            raise TypeError("FlowCascade.fit expects a FeatureSet")
        train.check_train()
        self.check_params()
        sizes, k = self.plan(len(train))
        dev = resolve_device(self.device)
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
        sigma = default_sigma(int(active.sum())) if self.sigma is None else float(self.sigma)
        self.sigma_ = sigma

        x = self._standardise(torch.tensor(train.features, device=dev))
        xa = x[:, self.active_]
        y = torch.tensor(labels, device=dev)
        generator = torch.Generator(device=dev)
        generator.manual_seed(int(self.seed))
        filters, thresholds, priors, histories = [], [], [], []
        reaching = torch.arange(len(train), device=dev)
        for f, (n, m) in enumerate(sizes):
            xf, yf = xa[reaching], y[reaching]
            counts_f = torch.bincount(yf, minlength=num_classes)
            weights = torch.as_tensor(flow_class_weights(counts_f.cpu().numpy(), float(self.q)),
                                      dtype=torch.float32, device=dev)
            filt = self._new_filter(int(xa.shape[1]), k, generator, sigma).to(dev)
            history = train_filter(
                filt, xf, yf, weights, epochs=int(self.flow_epochs), lr=float(self.flow_lr),
                batch_size=int(self.flow_batch_size), lambda_bal=float(self.lambda_bal),
                lambda_pure=float(self.lambda_pure), generator=generator,
                desc=f"dlsa filter {f + 1}/{self.num_filters}",
            )
            _, ll, cluster = filt.evaluate(xf)
            threshold = quantile_threshold(ll, m)
            routed = ll.double() > threshold
            filters.append(filt)
            thresholds.append(threshold)
            priors.append(cluster_prior(cluster, yf, k, num_classes))
            histories.append(history)
            reaching = reaching[~routed]
        self.filters_ = filters
        self.thresholds_ = torch.tensor(thresholds, dtype=torch.float64)
        self.cluster_priors_ = torch.stack(priors)  # (F, K, C) float64
        self.history_ = histories
        return self

    def _new_filter(self, dim: int, k: int, generator: torch.Generator, sigma: float) -> GaussianMixtureFlowFilter:
        """A filter with centres ``sigma * N(0, I)`` and a flow initialised from a seed drawn from ``generator``."""
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
            torch.manual_seed(seed)
            filt = GaussianMixtureFlowFilter(dim, k, int(self.flow_blocks), int(self.flow_hidden), float(self.eta))
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
        }
        for f, (filt, history) in enumerate(zip(self.filters_, self.history_)):
            for key, value in filt.state_dict().items():
                state[f"filter{f}.{key}"] = value
            state[f"filter{f}.history"] = torch.tensor([h["total"] for h in history], dtype=torch.float64)
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "FlowCascade":
        """Restore a fitted cascade; its hyper-parameters must be those it was fitted with."""
        self.check_params()
        dev = resolve_device(self.device)
        try:
            nf = int(state["num_filters"])
            k = int(state["num_clusters"])
            if nf != int(self.num_filters) or (self.num_clusters is not None and k != int(self.num_clusters)):
                raise LongtailError(
                    f"dlsa: the saved cascade has {nf} filters and {k} clusters, the parameters say "
                    f"{self.num_filters} and {self.num_clusters}"
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
            dim = int(self.active_.sum())
            filters, histories = [], []
            for f in range(nf):
                prefix = f"filter{f}."
                own = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
                history = own.pop("history")
                filt = GaussianMixtureFlowFilter(dim, k, int(self.flow_blocks), int(self.flow_hidden), float(self.eta))
                filt.load_state_dict(own)
                filters.append(filt.to(dev).eval().requires_grad_(False))
                histories.append([{"total": float(v)} for v in history])
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


# ---------------------------------------------------------------------- diagnostics
def diagnostics(cascade: FlowCascade, train: FeatureSet, tail_threshold: int = TAIL_THRESHOLD) -> dict[str, Any]:
    """Head-tail separability of a fitted cascade on its train split (the paper's "feature evaluation").

    Tail classes have at most ``tail_threshold`` train samples (``train.class_counts``). Per filter,
    over the train samples that reach it:

    * ``samples_in``, ``samples_out``: samples reaching the filter / sent to its classifier;
    * ``tail_share_in``: share of tail samples among those reaching it (the baseline to beat);
    * ``separation_accuracy``: share of tail samples among those it sends out (above
      ``tail_share_in`` when the filter enriches tail samples, as the weighted MLE intends);
    * ``cluster_sizes``: ``K`` sizes (by ``k^``, eq. 4), ``cluster_size_entropy`` (nats) and its ratio
      to ``log K`` (1 = balanced), ``empty_clusters``;
    * ``mean_purity``: mean over non-empty clusters of the share of their largest class (Sec. 3.3's
      ``Purity(k)``), ``weighted_purity``: the same weighted by cluster size;
    * ``threshold``: the log-likelihood threshold.

    Plain Python numbers and lists (JSON-friendly); shares are ``None`` where nothing is counted.
    """
    check_number("dlsa diagnostics", "tail_threshold", tail_threshold, integer=True, low=0)
    labels = train.require_labels()
    route = cascade.route(train.features)
    counts = np.asarray(train.class_counts)
    is_tail = counts <= int(tail_threshold)
    tail_sample = torch.as_tensor(is_tail[labels], device=route.stage.device)
    y = torch.as_tensor(labels, device=route.stage.device)
    k, c = cascade.num_clusters_, train.num_classes
    out: dict[str, Any] = {
        "tail_threshold": int(tail_threshold),
        "num_tail_classes": int(is_tail.sum()),
        "num_clusters": int(k),
        "samples": len(train),
        "tail_share": float(is_tail[labels].mean()),
        "filters": [],
    }
    for f in range(route.num_filters):
        reached = route.cluster[:, f] >= 0
        sent = route.stage == f
        kk, yy = route.cluster[reached, f], y[reached]
        joint = torch.bincount(kk * c + yy, minlength=k * c).view(k, c).double()
        sizes = joint.sum(1)
        nonempty = sizes > 0
        purity = joint.max(1).values[nonempty] / sizes[nonempty]  # nonempty guards the division
        share = sizes / sizes.sum()  # the sum is the number of samples reaching the filter, >= 1
        entropy = float(-(share[nonempty] * share[nonempty].log()).sum())
        n_in, n_out = int(reached.sum()), int(sent.sum())
        out["filters"].append({
            "filter": f + 1,
            "samples_in": n_in,
            "samples_out": n_out,
            "tail_share_in": float(tail_sample[reached].double().mean()) if n_in else None,
            "separation_accuracy": float(tail_sample[sent].double().mean()) if n_out else None,
            "threshold": float(cascade.thresholds_[f]),
            "cluster_sizes": [int(s) for s in sizes.tolist()],
            "cluster_size_entropy": entropy,
            "cluster_size_entropy_ratio": entropy / math.log(k) if k > 1 else None,  # log K > 0 for K > 1
            "empty_clusters": int((~nonempty).sum()),
            "mean_purity": float(purity.mean()),
            "weighted_purity": float(joint.max(1).values.sum() / sizes.sum()),
        })
    out["samples_regular"] = int((route.stage == route.num_filters).sum())
    return out


# ---------------------------------------------------------------------- the classifiers
class ClusterAidedModule(nn.Module):
    """Sec. 3.4: ``FC([x, z]) + FC(P(y | h = k^))`` on one input ``[x, z, P(y | k^)]`` ``(N, D + D' + C)``.

    ``xz`` is the wrapped head's module family (linear, cosine, scaled) on ``[x, z]``; the prior
    term is a bias-free linear layer (the first FC's bias suffices).
    """

    def __init__(self, xz: nn.Module, xz_dim: int, num_classes: int):
        super().__init__()
        self.xz = xz
        self.prior = LinearClassifier(num_classes, num_classes, bias=False)
        self.xz_dim = int(xz_dim)
        self.no_decay = tuple(getattr(xz, "no_decay", ()))

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.xz.reset_parameters(generator)
        self.prior.reset_parameters(generator)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.xz(inputs[:, : self.xz_dim]) + self.prior(inputs[:, self.xz_dim:])


@register("dlsa", kind="prefix")
class DLSA(Wrapper):
    """DLSA around a head (``dlsa+<head>``): a flow cascade, cluster-aided classifiers, the head (paper 004).

    * The samples that pass every filter are classified by the wrapped head (``base``), fitted on
      all train samples as :meth:`Wrapper.fit` does (a base fitted elsewhere, e.g. a cached
      artifact, is used as is).
    * The samples filter ``f`` sends out are classified by its cluster-aided classifier (Sec. 3.4),
      built from the head: the head's module family on ``[x, z]`` plus a linear layer on the
      cluster prior, trained with the head's loss (global train counts), sampler and optimiser
      settings, for about as many SGD steps as the head takes on the whole train split
      (``ceil(epochs * N / n_f)`` epochs on ``n_f`` samples; a group of 30% of the data would
      otherwise get 30% of the updates). ``classifier_samples = "routed"`` (the paper) trains it on the train samples the
      filter sends out; ``"all"`` on every train sample, with that filter's ``z`` and cluster prior.

    The cascade is fitted by :meth:`fit` unless one was handed over with :meth:`set_cascade` (fit a
    cascade once, reuse it for every head on the same train features)::

        cascade = make_method("dlsa+ce", params).make_cascade().fit(train)   # or .load_state_dict(...)
        for head in ("ce", "balanced-softmax", "cosine"):
            make_method(f"dlsa+{head}", params).set_cascade(cascade).fit(train, val)

    ``state_dict`` holds the cascade (``cascade.*``), the cluster-aided classifiers (``group<f>.*``)
    and the head (``base.*``), so ``make_method(name, params).load_state_dict(state)`` reproduces the
    logits exactly. ``val`` only reaches the head's own ``fit`` (``tau-norm`` chooses tau on it);
    every DLSA schedule is fixed.

    Args (besides the cascade's, :class:`FlowCascade`):
        classifier_samples: ``"routed"`` or ``"all"``, the train samples of the cluster-aided
            classifiers (see above).
        tail_threshold: tail classes for :meth:`diagnostics` (at most this many train samples).
    """

    def __init__(self, base: Method, *, num_filters: int = NUM_FILTERS, filter_fraction: float = FILTER_FRACTION,
                 num_clusters: int | None = None, flow_blocks: int = FLOW_BLOCKS, flow_hidden: int = FLOW_HIDDEN,
                 sigma: float | None = None, q: float = 2.0, lambda_bal: float = 1.0, lambda_pure: float = 0.02,
                 eta: float = 0.7, flow_epochs: int = FLOW_EPOCHS, flow_lr: float = FLOW_LR,
                 flow_batch_size: int = FLOW_BATCH_SIZE, seed: int = 0, device: str = "auto",
                 classifier_samples: str = "routed", tail_threshold: int = TAIL_THRESHOLD):
        super().__init__(base)
        self.num_filters = num_filters
        self.filter_fraction = filter_fraction
        self.num_clusters = num_clusters
        self.flow_blocks = flow_blocks
        self.flow_hidden = flow_hidden
        self.sigma = sigma
        self.q = q
        self.lambda_bal = lambda_bal
        self.lambda_pure = lambda_pure
        self.eta = eta
        self.flow_epochs = flow_epochs
        self.flow_lr = flow_lr
        self.flow_batch_size = flow_batch_size
        self.seed = seed
        self.device = device
        self.classifier_samples = classifier_samples
        self.tail_threshold = tail_threshold

    # ------------------------------------------------------------------ the cascade
    def cascade_params(self) -> dict[str, Any]:
        """The cascade's hyper-parameters (this wrapper's but ``base``, ``classifier_samples``,
        ``tail_threshold``)."""
        return {k: getattr(self, k) for k in CASCADE_PARAMS}

    def make_cascade(self) -> FlowCascade:
        """An unfitted :class:`FlowCascade` with this wrapper's flow hyper-parameters."""
        return FlowCascade(**self.cascade_params())

    def set_cascade(self, cascade: FlowCascade) -> "DLSA":
        """Use an already fitted cascade (its parameters must equal this wrapper's, ``device`` aside);
        :meth:`fit` then trains only the classifiers. Returns ``self``."""
        if not isinstance(cascade, FlowCascade):
            raise TypeError("set_cascade expects a FlowCascade")
        if not cascade.is_fitted():
            raise LongtailError("dlsa: set_cascade needs a fitted cascade (fit it or load its state first)")
        mine, theirs = self.cascade_params(), cascade.get_params()
        diff = [f"{k} ({theirs[k]!r} != {mine[k]!r})" for k in CASCADE_PARAMS if k != "device" and theirs[k] != mine[k]]
        if diff:
            raise LongtailError(f"dlsa: the cascade was fitted with other parameters: {', '.join(diff)}")
        self.cascade_ = cascade
        return self

    def diagnostics(self, train: FeatureSet) -> dict[str, Any]:
        """:func:`diagnostics` of this wrapper's cascade with its ``tail_threshold``."""
        self._check_fitted()
        return diagnostics(self.cascade_, train, self.tail_threshold)

    def logit_prior(self) -> np.ndarray:
        """The prior the logits carry (for ``+pc``): the head's, since every cluster-aided
        classifier is trained with the head's loss and the global train counts."""
        from longtail.stages.calibrate import logit_prior

        return logit_prior(self.base)

    # ------------------------------------------------------------------ fit
    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "DLSA":
        """Validate the parameters (before minutes of fitting), fit the head unless it is fitted,
        then the cascade (unless one was set) and the cluster-aided classifiers."""
        if isinstance(train, FeatureSet):  # Method.fit raises the TypeError otherwise
            train.check_train()  # the same message as every method for a class without a sample
            self.check_params(train.num_classes)
        return super().fit(train, val)

    def check_params(self, num_classes: int) -> None:
        """The head's checks, then the cascade's and this wrapper's (run by the pipeline before any
        work, and by :meth:`fit` before the head is fitted)."""
        self._head().check_params(num_classes)
        self._check_own_params()

    def _head(self) -> _Head:
        if not isinstance(self.base, _Head):
            raise LongtailError(
                f"method 'dlsa+{self.base.name}': dlsa wraps a head trained by the head trainer "
                f"(ce, balanced-softmax, cosine, ...), not {self.base.name!r}"
            )
        return self.base

    def _prototype(self, dim: int, epochs: int | None = None) -> _Head:
        """A fresh, unfitted head of the base's class and parameters (``epochs`` replaced when given),
        sized for ``dim`` inputs: the factory of a cluster-aided classifier's module and loss."""
        head = self._head()
        params = head.get_params()
        if epochs is not None:
            params["epochs"] = int(epochs)
        proto = type(head)(**params)
        proto.dim_ = int(dim)
        proto.num_classes_ = self.num_classes_
        return proto

    def _new_module(self, active_dim: int) -> nn.Module:
        xz_dim = self.dim_ + active_dim
        return ClusterAidedModule(self._prototype(xz_dim)._new_module(), xz_dim, self.num_classes_)

    @staticmethod
    def _inputs(cascade: FlowCascade, filt: int, standardised: torch.Tensor, latent: torch.Tensor,
                cluster: torch.Tensor) -> torch.Tensor:
        """``[x, z, P(y | h = k^)]`` ``(N, D + D' + C)``: the input of filter ``filt``'s cluster-aided classifier."""
        prior = cascade.cluster_priors_[filt][cluster].to(standardised.dtype)
        return torch.cat([standardised, latent, prior], dim=1)

    def _fit(self, train: FeatureSet, val: FeatureSet | None) -> None:
        head = self._head()
        cascade = getattr(self, "cascade_", None)
        if cascade is None:
            cascade = self.make_cascade().fit(train)
        self._check_cascade(cascade, train)
        self.cascade_ = cascade
        route = cascade.route(train.features)
        dev = resolve_device(head.device)
        generator = torch.Generator(device=dev)
        generator.manual_seed(int(head.seed))
        y_all = torch.as_tensor(train.labels, device=route.stage.device)
        active_dim = int(cascade.active_.sum())
        n_all = len(train)
        modules = []
        for f in range(route.num_filters):
            if self.classifier_samples == "all":  # every train sample, through filter f
                idx = torch.arange(n_all, device=route.stage.device)
                z, _, k = cascade.filters_[f].evaluate(route.standardised[:, cascade.active_])
            else:  # the samples filter f sends out (the paper)
                idx = torch.nonzero(route.stage == f).flatten()
                z, k = route.latent[idx], route.cluster[idx, f]
            inputs = self._inputs(cascade, f, route.standardised[idx], z, k).to(dev)
            y = y_all[idx].to(dev)
            # as many SGD steps as the head on all N samples; ceil keeps at least the head's epochs
            epochs = int(math.ceil(int(head.epochs) * n_all / int(idx.numel())))  # idx has >= 1 sample
            proto = self._prototype(inputs.shape[1], epochs)
            loss = proto._loss_fn(train.class_counts, dev)  # global counts: see the module docstring
            module = self._new_module(active_dim).to(dev)
            module.reset_parameters(generator)
            present, compact = torch.unique(y, return_inverse=True)  # class sampling among present classes
            train_module(
                module, inputs, compact, lambda z, yc, epoch, present=present: loss(z, present[yc], epoch),
                sampling=head.sampling, num_classes=int(present.numel()), generator=generator,
                desc=f"dlsa+{head.name} (filter {f + 1})", **proto._optim_args(),
            )
            modules.append(module.eval())
        self.modules_ = modules

    def _check_own_params(self) -> None:
        self.make_cascade().check_params()
        if self.classifier_samples not in ("routed", "all"):
            raise LongtailError(
                f"dlsa: classifier_samples = {self.classifier_samples!r} must be 'routed' or 'all'")
        check_number("dlsa", "tail_threshold", self.tail_threshold, integer=True, low=0)

    def _check_cascade(self, cascade: FlowCascade, train: FeatureSet) -> None:
        same = (cascade.dim_ == train.dim and cascade.num_classes_ == train.num_classes
                and np.array_equal(cascade.train_counts_.numpy(), train.class_counts)
                and torch.allclose(cascade.train_fingerprint_, fingerprint(train), rtol=1e-9, atol=0))
        if not same:
            raise LongtailError(
                f"dlsa: the cascade was fitted on other train features than {train.source or 'these'} "
                f"(split {train.name!r}); fit one on this split"
            )

    # ------------------------------------------------------------------ logits
    def _logits(self, features: np.ndarray) -> np.ndarray:
        """Each row's logits from the classifier of its group: a filter's cluster-aided classifier
        or, past every filter, the head."""
        cascade = self.cascade_
        out = np.empty((features.shape[0], self.num_classes_), dtype=np.float32)
        dev = next(self.modules_[0].parameters()).device
        with torch.no_grad():
            for start in range(0, features.shape[0], ROUTE_CHUNK):
                chunk = features[start:start + ROUTE_CHUNK]
                route = cascade.route(chunk)
                stage = route.stage.cpu().numpy()
                rest = np.flatnonzero(stage == route.num_filters)
                if rest.size:
                    out[start + rest] = self.base.logits(chunk[rest])
                for f, module in enumerate(self.modules_):
                    idx = torch.nonzero(route.stage == f).flatten()
                    if idx.numel():
                        inputs = self._inputs(cascade, f, route.standardised[idx], route.latent[idx],
                                              route.cluster[idx, f])
                        out[start + idx.cpu().numpy()] = module(inputs.to(dev)).float().cpu().numpy()
        return out

    def routing(self, features: np.ndarray) -> np.ndarray:
        """The group of each row of ``features``: ``0..F-1`` a filter, ``F`` the head (past every filter)."""
        self._check_fitted()
        return self.cascade_.route(np.asarray(features, dtype=np.float32)).stage.cpu().numpy()

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"cascade.{k}": v for k, v in self.cascade_.state_dict().items()}
        for f, module in enumerate(self.modules_):
            state.update({f"group{f}.{k}": v for k, v in module.state_dict().items()})
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        cascade = self.make_cascade().load_state_dict(
            {k[len("cascade."):]: v for k, v in state.items() if k.startswith("cascade.")})
        self.cascade_ = cascade
        head = self._head()
        dev = resolve_device(head.device)
        active_dim = int(cascade.active_.sum())
        modules = []
        try:
            for f in range(len(cascade.filters_)):
                prefix = f"group{f}."
                module = self._new_module(active_dim)
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
                modules.append(module.to(dev).eval().requires_grad_(False))
        except RuntimeError as exc:
            raise LongtailError(f"method 'dlsa+{head.name}': the saved state does not fit this method: {exc}") from exc
        self.modules_ = modules
