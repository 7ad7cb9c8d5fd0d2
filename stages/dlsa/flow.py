"""DLSA's Gaussian Mixture Flow Filter (paper 004, Sec. 3.3) and its training objective (eq. 11).

A masked autoregressive flow (nflows MAF, ``blocks`` blocks of one hidden layer of ``hidden`` units,
reversed order between blocks) maps standardised features ``x`` to ``z`` (nflows builds the flow and
owns its parameters; :func:`maf_forward` evaluates it faster, the same function); the latent density is a
``K``-component Gaussian mixture with identity covariances, centres fixed at construction and a
uniform prior (eq. 2-4). :class:`FlowObjective` is eq. 11, ``L_MLE + lambda_bal L_bal +
lambda_pure L_pure`` (:mod:`longtail.stages.losses.dlsa`, eq. 5-10), and :func:`train_filter` fits a
filter with it on the shared loop (:func:`longtail.stages.train.engine.fit_module`): Adam, a cosine
schedule, instance-sampled batches (eq. 8 needs batches drawn from the data distribution),
``ceil(batch_size / 2)`` purity pairs per step drawn from the fit's generator. Given val samples,
it stops on val likelihood (:class:`ValLikelihood`): after every epoch the class-weighted negative
log-likelihood of eq. 7 is estimated on the val samples, the weights of the epoch with the lowest
one are kept, and training stops ``patience`` epochs after it (not in the paper, which trains a
fixed schedule: a flow fitted to the few samples of a tail class memorises them, issue 11).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longtail.stages.errors import LongtailError
from longtail.stages.losses.dlsa import (
    balancedness_loss,
    batch_cluster_posterior,
    bias_corrected,
    gmm_log_likelihood,
    momentum_update,
    purity_loss,
    weighted_mle_loss,
)
from longtail.stages.train.data import Batch, TrainData
from longtail.stages.train.engine import OptimConfig, TrainState, fit_module
from longtail.stages.train.objective import Objective, StepOutput
from longtail.stages.train.samplers import Segments

#: rows per chunk when evaluating flows (bounds memory, not a per-sample loop): at D = 2,048 a chunk's
#: (rows, 2D) MADE outputs stay in cache; 2,048 rows evaluate 1.4x faster than 16,384 on a CPU
ROUTE_CHUNK = 2048


def build_maf(dim: int, blocks: int, hidden: int) -> nn.Module:
    """nflows MAF: ``blocks`` x (MaskedAffineAutoregressiveTransform with one hidden layer of
    ``hidden`` ReLU units), the order reversed between blocks; ``forward(x) -> (z, log|det J|)``.

    Only the forward (density) direction is used: ``x -> z`` is one pass of each MADE.
    Initialised from torch's global generator: call it under :func:`torch.random.fork_rng` with a
    seed (as :class:`~longtail.stages.dlsa.cascade.FlowCascade` does).
    """
    from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform, ReversePermutation

    layers: list[nn.Module] = []
    for b in range(int(blocks)):
        if b:
            layers.append(ReversePermutation(int(dim)))
        layers.append(MaskedAffineAutoregressiveTransform(
            features=int(dim), hidden_features=int(hidden), num_blocks=0, use_residual_blocks=False))
    return CompositeTransform(layers)


def _used_columns(layer: nn.Module) -> int:
    """The number ``c`` of leading input columns an nflows ``MaskedLinear`` reads: its mask is zero
    beyond column ``c``. A MADE's hidden unit of degree ``d`` reads the inputs of degree ``<= d``, so
    with fewer hidden units than inputs the first layer reads only the first ``hidden`` inputs
    (degrees 1..hidden); the rest of its weight is masked to zero."""
    used = torch.nonzero(layer.mask.any(0)).flatten()
    return int(used.max()) + 1 if used.numel() else 0


def _maf_block(t: nn.Module, x: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``t(x)`` of one nflows ``MaskedAffineAutoregressiveTransform`` without hidden blocks (a MADE
    ``initial_layer -> ReLU -> final_layer``), from its own parameters and masks.

    nflows interleaves each feature's scale and shift in the MADE's output (rows ``2i``, ``2i + 1``
    of the final layer) and applies softplus, log and the sum to stride-2 views; here the final
    layer's rows are reordered (scales first) so that they run on contiguous memory, and the first
    layer reads only the ``cols`` input columns its mask uses. The same function: ``scale =
    softplus(s) + 1e-3``, ``z = scale * x + shift``, ``log|det J| = sum log scale``.
    """
    made = t.autoregressive_net
    first, last = made.initial_layer, made.final_layer
    h = F.relu(F.linear(x[:, :cols], first.weight[:, :cols] * first.mask[:, :cols], first.bias))
    w = last.weight * last.mask
    out = F.linear(h, torch.cat((w[0::2], w[1::2])), torch.cat((last.bias[0::2], last.bias[1::2])))
    d = x.shape[1]
    scale = F.softplus(out[:, :d]) + t._epsilon
    return scale * x + out[:, d:], torch.log(scale).sum(1)


def flow_columns(flow: nn.Module) -> list[int | None]:
    """Per transform of a :func:`build_maf` flow, the input columns its first MADE layer reads
    (:func:`_used_columns`), ``None`` for a permutation: the plan of :func:`maf_forward`."""
    return [_used_columns(t.autoregressive_net.initial_layer) if hasattr(t, "autoregressive_net") else None
            for t in flow._transforms]


def maf_forward(flow: nn.Module, x: torch.Tensor, cols: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """``flow(x) -> (z, log|det J|)`` of a :func:`build_maf` flow, from its own parameters, faster.

    Equal to nflows' ``flow(x)`` up to float rounding (tested, with the gradients): the affine MADE
    blocks go through :func:`_maf_block` (contiguous scale and shift; the first layer on the input
    columns its mask uses, 256 of 2,048 at ``D = 2,048`` with 256 hidden units), the reverse
    permutations through ``index_select`` as in nflows. ``cols`` is :func:`flow_columns` of ``flow``.
    """
    logabsdet = x.new_zeros(x.shape[0])
    for t, c in zip(flow._transforms, cols):
        if c is None:  # a ReversePermutation: log|det| 0
            x = torch.index_select(x, 1, t._permutation)
        else:
            x, lad = _maf_block(t, x, c)
            logabsdet = logabsdet + lad
    return x, logabsdet


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
    (eq. 4-5); the flow's pass is :func:`maf_forward`. The state of the balancedness loss's momentum estimator lives in :attr:`momentum`
    (reset when a fit starts, :meth:`FlowObjective.on_fit_start`).
    """

    def __init__(self, dim: int, num_clusters: int, blocks: int, hidden: int, eta: float = 0.7):
        super().__init__()
        self.flow = build_maf(dim, blocks, hidden)
        self._cols = flow_columns(self.flow)  # the masks are fixed by (dim, hidden): a plan made once
        self.register_buffer("centres", torch.zeros(int(num_clusters), int(dim)))
        self.momentum = MomentumPosterior(eta)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, logabsdet = maf_forward(self.flow, x, self._cols)
        log_lik, log_post = gmm_log_likelihood(z, logabsdet, self.centres)
        return z, log_lik, log_post

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
    class uniformly (:class:`~longtail.stages.train.samplers.Segments`). On the generator's device.
    """

    def __init__(self, labels: torch.Tensor):
        self.segments = Segments(labels)  # the present classes, sorted
        self.num_classes = int(self.segments.keys.numel())

    def __call__(self, num_pairs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(i, j)``: ``(P,)`` sample indices with ``labels[i] != labels[j]``; needs two classes."""
        if self.num_classes < 2:
            raise LongtailError("purity pairs need samples of at least two classes")
        dev = generator.device
        a = torch.randint(self.num_classes, (num_pairs,), generator=generator, device=dev)
        b = torch.randint(self.num_classes - 1, (num_pairs,), generator=generator, device=dev)
        b = b + (b >= a).long()  # uniform over the classes other than a
        return self.segments.member(a, generator), self.segments.member(b, generator)


class FlowObjective(Objective):
    """Eq. 11 on one batch: ``L_MLE + lambda_bal L_bal + lambda_pure L_pure``.

    ``mle`` (eq. 7, the batch mean of the weighted log-likelihoods), ``bal`` (eq. 9 on the
    bias-corrected momentum estimate of eq. 8; it advances the filter's :attr:`momentum`) and
    ``pure`` (eq. 10 on ``ceil(B / 2)`` pairs of samples of two different classes) are the step's
    ``terms``. A term whose weight is 0 is not computed (the momentum estimator does not move), but
    the pairs are drawn whenever two classes reach the filter (indices only, no forward pass), so
    that an ablation sees the same batches as the full model.

    Args:
        class_weights: ``(C,)`` the MLE class weights (eq. 6) of the samples the filter is fitted on.
        lambda_bal, lambda_pure: the weights of eq. 11.
    """

    def __init__(self, class_weights: torch.Tensor, lambda_bal: float, lambda_pure: float):
        self.class_weights = class_weights
        self.lambda_bal = float(lambda_bal)
        self.lambda_pure = float(lambda_pure)
        self.pairs: PairSampler | None = None

    def on_fit_start(self, state: TrainState) -> None:
        state.module.momentum.reset()
        pairs = PairSampler(state.data.y)
        self.pairs = pairs if pairs.num_classes >= 2 else None  # one class reaches the filter: no pairs

    def loss(self, module: GaussianMixtureFlowFilter, batch: Batch, state: TrainState) -> StepOutput:
        pair = None
        if self.pairs is not None:
            i, j = self.pairs((int(batch.rows.numel()) + 1) // 2, state.generator)
            if self.lambda_pure > 0:
                pair = state.data.x[i], state.data.x[j]
        _, log_lik, log_post = module(batch.x)
        terms = {"mle": weighted_mle_loss(log_lik, batch.y, self.class_weights, reduction="mean")}
        total = terms["mle"]
        if self.lambda_bal > 0:
            terms["bal"] = balancedness_loss(module.momentum.update(batch_cluster_posterior(log_post)))
            total = total + self.lambda_bal * terms["bal"].to(total.dtype)
        if pair is not None:
            _, _, lp = module(torch.cat(pair))
            terms["pure"] = purity_loss(lp[: len(pair[0])], lp[len(pair[0]):])
            total = total + self.lambda_pure * terms["pure"]
        return StepOutput(total, terms=terms)


class _StopTraining(Exception):
    """Raised by :meth:`ValLikelihood.on_epoch_end` to end a fit early (caught by :func:`train_filter`)."""


def val_class_weights(class_weights: torch.Tensor, train_labels: torch.Tensor, val_labels: torch.Tensor) -> torch.Tensor:
    """Per-class weights ``(C,)`` float64 that turn per-class mean val log-likelihoods into an estimate
    of the training objective, eq. 7 averaged over the train distribution of the samples a filter
    is fitted on: ``n_c w(c)`` (``n_c`` train samples of class ``c``, ``w`` of eq. 6), normalised over
    the classes with at least one val sample; 0 for the others. All zeros when no class has both."""
    c = int(class_weights.shape[0])
    n = torch.bincount(train_labels, minlength=c).double().to(class_weights.device)
    present = torch.bincount(val_labels, minlength=c).to(class_weights.device) > 0
    v = torch.where(present, n * class_weights.double(), torch.zeros_like(n))
    total = float(v.sum())
    return v / total if total > 0 else v  # total > 0 guards the division; all zeros: no estimate


def val_objective(filt: GaussianMixtureFlowFilter, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> float:
    """``sum_c weights[c] * mean_{val x of class c} (-log L(theta; x))``: eq. 7 estimated on val
    (:func:`val_class_weights`; the classes of ``y`` must have a positive weight to count)."""
    _, ll, _ = filt.evaluate(x)
    c = int(weights.shape[0])
    sums = torch.zeros(c, dtype=torch.float64, device=ll.device).index_add_(0, y, -ll.double())
    counts = torch.bincount(y, minlength=c).double()
    means = sums / counts.clamp_min(1.0)  # clamp guards classes without a val sample (weight 0 there)
    return float((weights.to(means.device) * means).sum())


class ValLikelihood:
    """Early stopping of a flow filter on val likelihood, best-on-val weights.

    After each epoch, :func:`val_objective` of the filter on the val samples; the epoch with the
    lowest value so far is the best and its weights are copied; ``patience`` epochs without a new
    best end the fit. :attr:`best_epoch` (0-based), :attr:`values` (one per finished epoch).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, patience: int):
        self.x, self.y, self.weights, self.patience = x, y, weights, int(patience)
        self.values: list[float] = []
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, module: GaussianMixtureFlowFilter, epoch: int) -> None:
        value = val_objective(module, self.x, self.y, self.weights)
        self.values.append(value)
        if math.isfinite(value) and (self.best_state is None or value < self.values[self.best_epoch]):
            self.best_epoch = epoch
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        elif epoch - self.best_epoch >= self.patience:
            raise _StopTraining

    def restore(self, module: GaussianMixtureFlowFilter) -> None:
        if self.best_state is not None:
            module.load_state_dict(self.best_state)


class _StoppingObjective(FlowObjective):
    """:class:`FlowObjective` with :class:`ValLikelihood` at each epoch's end."""

    def __init__(self, *args, stopping: ValLikelihood):
        super().__init__(*args)
        self.stopping = stopping

    def on_fit_start(self, state: TrainState) -> None:
        super().on_fit_start(state)
        self.state = state  # its history survives an early stop

    def on_epoch_end(self, state: TrainState, means: dict[str, float]) -> None:
        self.stopping.on_epoch_end(state.module, state.epoch)


def train_filter(filt: GaussianMixtureFlowFilter, x: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor, *,
                 epochs: int, lr: float, batch_size: int, lambda_bal: float, lambda_pure: float,
                 generator: torch.Generator, desc: str = "dlsa filter",
                 val: tuple[torch.Tensor, torch.Tensor] | None = None, patience: int = 5,
                 ) -> tuple[list[dict[str, float]], ValLikelihood | None]:
    """Fit a filter on ``(x, y)`` (on the generator's device) with eq. 11 on the shared loop: Adam
    (no weight decay) with a per-step cosine schedule from ``lr`` to 0, a permutation of the rows per
    epoch; a non-finite loss raises a :class:`LongtailError` asking to lower ``flow_lr``.

    With ``val = (x_val, y_val)`` (the val samples that reach the filter, standardised like ``x``)
    and at least one val class also in ``y``, training stops on val likelihood
    (:class:`ValLikelihood`, ``patience`` epochs) and the filter ends with its best-on-val weights.

    Returns the mean ``total`` loss and terms of every epoch run (with ``val_nll`` when stopping on
    val) and the :class:`ValLikelihood` record (``None`` without val)."""
    config = OptimConfig(epochs=int(epochs), lr=float(lr), batch_size=int(batch_size), weight_decay=0.0,
                         optimizer="adam", lr_name="flow_lr")
    stopping = None
    if val is not None and val[1].numel():
        weights = val_class_weights(class_weights, y, val[1])
        if float(weights.sum()) > 0:
            stopping = ValLikelihood(val[0], val[1], weights, patience)
    if stopping is None:
        objective: FlowObjective = FlowObjective(class_weights, lambda_bal, lambda_pure)
        history = fit_module(filt, TrainData(x, y), objective, config, generator=generator, desc=desc).history
    else:
        objective = _StoppingObjective(class_weights, lambda_bal, lambda_pure, stopping=stopping)
        try:
            fit_module(filt, TrainData(x, y), objective, config, generator=generator, desc=desc)
        except _StopTraining:
            pass
        stopping.restore(filt)
        filt.eval().requires_grad_(False)
        history = objective.state.history
    out = [{"total": h["loss"], **{k: v for k, v in h.items() if k != "loss"}} for h in history]
    if stopping is not None:
        for h, v in zip(out, stopping.values):
            h["val_nll"] = v
    return out, stopping
