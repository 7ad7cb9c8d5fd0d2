"""DLSA's wrapper ``dlsa+<head>``: cluster-aided classifiers (Sec. 3.4) through the public head protocol."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from longtail.stages.base import FitContext, Frozen, Method, Requirement, Wrapper, check_number
from longtail.stages.data import FeatureSet
from longtail.stages.device import resolve_device
from longtail.stages.dlsa.cascade import CASCADE_PARAMS, FlowCascade, fingerprint, DEFAULTS
from longtail.stages.dlsa.diagnostics import TAIL_THRESHOLD, diagnostics
from longtail.stages.dlsa.flow import ROUTE_CHUNK
from longtail.stages.errors import LongtailError
from longtail.stages.heads import TrainedHead, head_sampler
from longtail.stages.modules import LinearClassifier
from longtail.stages.train.data import TrainData
from longtail.stages.train.engine import fit_module

NUM_FILTERS, FILTER_FRACTION, FLOW_BLOCKS, FLOW_HIDDEN, FLOW_EPOCHS, FLOW_LR, FLOW_BATCH_SIZE = (
    DEFAULTS.num_filters, DEFAULTS.filter_fraction, DEFAULTS.flow_blocks, DEFAULTS.flow_hidden, DEFAULTS.flow_epochs,
    DEFAULTS.flow_lr, DEFAULTS.flow_batch_size)


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

    name = "dlsa"
    kind = "prefix"

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

    def _requirements(self) -> list[Requirement]:
        """The flow cascade (kind ``dlsa-cascade``), shared by every ``dlsa+<head>`` on a store."""
        return [Requirement(kind="dlsa-cascade", params=self.cascade_params(),
                            modules=("longtail.stages.dlsa.flow", "longtail.stages.dlsa.cascade"),
                            build=lambda train: self.make_cascade().fit(train),
                            save=lambda c: (c.state_dict(), {"params": {k: v for k, v in self.cascade_params().items()
                                                                        if k != "device"}}),
                            load=lambda tensors, meta: self.make_cascade().load_state_dict(tensors),
                            attach=self.set_cascade)]

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
        self._cascade = cascade  # handed over, not learned: kept across fits
        return self

    def diagnostics(self, train: FeatureSet) -> dict[str, Any]:
        """``{"dlsa": diagnostics of this wrapper's cascade with its tail_threshold}``: the cascade
        it was fitted with, or before any fit the one attached by :meth:`set_cascade` (all that the
        diagnostics need; no classifier is trained)."""
        cascade = getattr(self, "cascade_", None) or getattr(self, "_cascade", None)
        if cascade is None:
            self._check_fitted()  # the one-line "not fitted yet" error
        return {"dlsa": diagnostics(cascade, train, self.tail_threshold)}

    def logit_prior(self) -> np.ndarray:
        """The head's: every cluster-aided classifier is trained with its loss and the global counts."""
        return self.base.logit_prior()

    # ------------------------------------------------------------------ fit
    def _check_params(self, num_classes: int) -> None:
        self._head()
        self.make_cascade().check_params()
        if self.classifier_samples not in ("routed", "all"):
            raise LongtailError(
                f"dlsa: classifier_samples = {self.classifier_samples!r} must be 'routed' or 'all'")
        check_number("dlsa", "tail_threshold", self.tail_threshold, integer=True, low=0)

    def _head(self) -> TrainedHead:
        head = self.base.inner if isinstance(self.base, Frozen) else self.base
        if not isinstance(head, TrainedHead):
            raise LongtailError(f"method 'dlsa+{self.base.name}': dlsa wraps a trained head (ce, balanced-softmax, "
                                f"cosine, ...), not {self.base.name!r}")
        return head

    def _new_module(self, active_dim: int) -> nn.Module:
        xz_dim = self.dim_ + active_dim
        return ClusterAidedModule(self._head().new_module(xz_dim, self.num_classes_), xz_dim, self.num_classes_)

    @staticmethod
    def _inputs(cascade: FlowCascade, filt: int, standardised: torch.Tensor, latent: torch.Tensor,
                cluster: torch.Tensor) -> torch.Tensor:
        """``[x, z, P(y | h = k^)]`` ``(N, D + D' + C)``: the input of filter ``filt``'s cluster-aided classifier."""
        prior = cascade.cluster_priors_[filt][cluster].to(standardised.dtype)
        return torch.cat([standardised, latent, prior], dim=1)

    def _fit(self, train: FeatureSet, val: FeatureSet | None, ctx: FitContext) -> None:
        head = self._head()
        cascade = getattr(self, "_cascade", None)
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
        head_ctx = FitContext(num_classes=ctx.num_classes, dim=ctx.dim, class_counts=ctx.class_counts,
                              source_prior=ctx.source_prior, device=dev, val=None, provenance=ctx.provenance)
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
            module = self._new_module(active_dim).to(dev)
            module.reset_parameters(generator)
            present, compact = torch.unique(y, return_inverse=True)  # class sampling among present classes
            fit_module(module, TrainData(inputs, y, strata=compact), head.objective(head_ctx),
                       head.optim_config(epochs=epochs), generator=generator,
                       sampler=head_sampler(head.sampling, compact, int(present.numel())),
                       desc=f"dlsa+{head.name} (filter {f + 1})")
            modules.append(module.eval())
        self.modules_ = modules

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
