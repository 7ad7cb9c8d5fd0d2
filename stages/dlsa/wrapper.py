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
from longtail.stages.dlsa.diagnostics import TAIL_THRESHOLD, diagnostics, flow_stopping, separation
from longtail.stages.dlsa.flow import ROUTE_CHUNK
from longtail.stages.errors import LongtailError
from longtail.stages.heads import TrainedHead, head_sampler
from longtail.stages.modules import LinearClassifier
from longtail.stages.train.data import TrainData
from longtail.stages.train.engine import fit_module

NUM_FILTERS, FILTER_FRACTION, FLOW_BLOCKS, FLOW_HIDDEN, FLOW_EPOCHS, FLOW_LR, FLOW_BATCH_SIZE, PATIENCE = (
    DEFAULTS.num_filters, DEFAULTS.filter_fraction, DEFAULTS.flow_blocks, DEFAULTS.flow_hidden, DEFAULTS.flow_epochs,
    DEFAULTS.flow_lr, DEFAULTS.flow_batch_size, DEFAULTS.patience)

#: the cluster-aided classifiers' inputs besides the cluster prior: ``x`` (the authors' code) or
#: ``[x, z]`` (the paper's Sec. 3.4); ``auto`` fits both and keeps the better one on val
CLASSIFIER_INPUTS = ("auto", "x", "xz")
INPUT_CODES = {"x": 0, "xz": 1}


class ClusterAidedModule(nn.Module):
    """Sec. 3.4: ``FC(u) + FC(P(y | h = k^))`` on one input ``[u, P(y | k^)]`` ``(N, d + C)``.

    ``u`` is ``[x, z]`` (``d = D + D'``, the paper) or ``x`` alone (``d = D``, the authors' code);
    ``features`` is the wrapped head's module family (linear, cosine, scaled) on ``u``; the prior
    term is a bias-free linear layer (the first FC's bias suffices).
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.prior = LinearClassifier(num_classes, num_classes, bias=False)
        self.feature_dim = int(feature_dim)
        self.no_decay = tuple(getattr(features, "no_decay", ()))

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.features.reset_parameters(generator)
        self.prior.reset_parameters(generator)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.features(inputs[:, : self.feature_dim]) + self.prior(inputs[:, self.feature_dim:])


class DLSA(Wrapper):
    """DLSA around a head (``dlsa+<head>``): a flow cascade, cluster-aided classifiers, the head (paper 004).

    * The samples that pass every filter are classified by the wrapped head (``base``), fitted on
      all train samples as :meth:`Wrapper.fit` does (a base fitted elsewhere, e.g. a cached
      artifact, is used as is).
    * The samples filter ``f`` sends out are classified by its cluster-aided classifier (Sec. 3.4),
      built from the head: the head's module family on ``x`` or ``[x, z]`` plus a linear layer on
      the cluster prior, trained with the head's loss (global train counts), sampler and optimiser
      settings, for about as many SGD steps as the head takes on the whole train split
      (``ceil(epochs * N / n_f)`` epochs on ``n_f`` samples; a group of 30% of the data would
      otherwise get 30% of the updates). ``classifier_samples = "routed"`` (the paper) trains it on
      the train samples the filter sends out (with ``route_folds >= 2``, on the train samples that the
      cross-fitted cascades send there, with their out-of-fold cluster priors); ``"all"`` on every
      train sample, with that filter's ``z`` and cluster prior.
    * ``classifier_input``: ``"x"`` (the authors' code: ``x`` and the cluster prior), ``"xz"`` (the
      paper's ``[x, z]`` and the cluster prior) or ``"auto"`` (default): both are fitted and the one
      whose DLSA scores higher on val is kept (ties: ``x``); the choice is recorded.
    * ``gate`` (default on): each filter's group is scored on the val samples the cascade sends there,
      by its cluster-aided classifier and by the head (the class-balanced accuracy on those samples:
      each sample weighs ``1 / (val samples of its class)``, so the group scores add up to the
      val balanced accuracy); where the classifier is not strictly better, or no val sample reaches
      the group, the group is classified by the head. So the val split decides, group by group,
      whether DLSA may change the head's predictions at all (not in the paper; issue 11: DLSA's
      routes, learnt on train, do not carry to unseen samples on small data).

    Every choice is made on the val split, never on test; ``gate`` or ``classifier_input: auto``
    without a val split is an error (``gate: false`` with ``x`` or ``xz`` is the paper's ungated
    DLSA). With a val split the flows stop on val likelihood (:class:`FlowCascade`).

    The cascade is fitted by :meth:`fit` unless one was handed over with :meth:`set_cascade` (fit a
    cascade once, reuse it for every head on the same train features)::

        cascade = make_method("dlsa+ce", params).make_cascade().fit(train, val)   # or .load_state_dict(...)
        for head in ("ce", "balanced-softmax", "cosine"):
            make_method(f"dlsa+{head}", params).set_cascade(cascade).fit(train, val)

    ``state_dict`` holds the cascade (``cascade.*``), the cluster-aided classifiers (``group<f>.*``),
    the val choices (``select.*``) and the head (``base.*``), so
    ``make_method(name, params).load_state_dict(state)`` reproduces the logits exactly.

    Args (besides the cascade's, :class:`FlowCascade`):
        classifier_samples: ``"routed"`` or ``"all"``, the train samples of the cluster-aided
            classifiers (see above).
        classifier_input: ``"auto"``, ``"x"`` or ``"xz"`` (see above).
        gate: gate each group on val (see above).
        tail_threshold: tail classes for :meth:`diagnostics` (at most this many train samples).
    """

    name = "dlsa"
    kind = "prefix"

    def __init__(self, base: Method, *, num_filters: int = NUM_FILTERS, filter_fraction: float = FILTER_FRACTION,
                 num_clusters: int | None = None, flow_blocks: int = FLOW_BLOCKS, flow_hidden: int = FLOW_HIDDEN,
                 sigma: float | None = None, q: float = 2.0, lambda_bal: float = 1.0, lambda_pure: float = 0.02,
                 eta: float = 0.7, flow_epochs: int = FLOW_EPOCHS, flow_lr: float = FLOW_LR,
                 flow_batch_size: int = FLOW_BATCH_SIZE, patience: int = PATIENCE, route_folds: int = 0,
                 seed: int = 0, device: str = "auto", classifier_samples: str = "routed",
                 classifier_input: str = "auto", gate: bool = True, tail_threshold: int = TAIL_THRESHOLD):
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
        self.patience = patience
        self.route_folds = route_folds
        self.seed = seed
        self.device = device
        self.classifier_samples = classifier_samples
        self.classifier_input = classifier_input
        self.gate = gate
        self.tail_threshold = tail_threshold

    # ------------------------------------------------------------------ the cascade
    def cascade_params(self) -> dict[str, Any]:
        """The cascade's hyper-parameters (this wrapper's but ``base``, ``classifier_samples``,
        ``classifier_input``, ``gate``, ``tail_threshold``)."""
        return {k: getattr(self, k) for k in CASCADE_PARAMS}

    def make_cascade(self) -> FlowCascade:
        """An unfitted :class:`FlowCascade` with this wrapper's flow hyper-parameters."""
        return FlowCascade(**self.cascade_params())

    def _requirements(self) -> list[Requirement]:
        """The flow cascade (kind ``dlsa-cascade``), shared by every ``dlsa+<head>`` on a store;
        built on the train split, stopped on the val split's likelihood (``with_val``)."""
        return [Requirement(kind="dlsa-cascade", params=self.cascade_params(),
                            modules=("longtail.stages.dlsa.flow", "longtail.stages.dlsa.cascade"),
                            build=lambda train, val=None: self.make_cascade().fit(train, val),
                            save=lambda c: (c.state_dict(), {"params": {k: v for k, v in self.cascade_params().items()
                                                                        if k != "device"}}),
                            load=lambda tensors, meta: self.make_cascade().load_state_dict(tensors),
                            attach=self.set_cascade, with_val=True)]

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

    def diagnostics(self, train: FeatureSet, val: FeatureSet | None = None,
                    test: FeatureSet | None = None) -> dict[str, Any]:
        """``{"dlsa": ...}``: the cascade's diagnostics on train (:func:`diagnostics`, with this
        wrapper's tail_threshold), its head-tail separation on every split given
        (``separation``: train measures how well the flows fit their own samples, val and test how
        separable unseen samples are), each filter's early stopping (``flow``) and, once fitted, the
        val choices (``classifier_input``, ``groups``). Before any fit, the cascade attached by
        :meth:`set_cascade` (all that the cascade's part needs; no classifier is trained)."""
        cascade = getattr(self, "cascade_", None) or getattr(self, "_cascade", None)
        if cascade is None:
            self._check_fitted()  # the one-line "not fitted yet" error
        out = diagnostics(cascade, train, self.tail_threshold)
        counts = train.class_counts
        out["separation"] = {name: separation(cascade, split, counts, self.tail_threshold)
                             for name, split in (("train", train), ("val", val), ("test", test))
                             if split is not None and split.labels is not None}
        out["flow"] = flow_stopping(cascade)
        if self.is_fitted():
            out.update(self.selection())
        return {"dlsa": out}

    def selection(self) -> dict[str, Any]:
        """The val choices of a fitted wrapper: ``classifier_input`` (``{"chosen", "val_score": {x, xz}}``,
        the val balanced accuracy of the DLSA with either input; ``None`` where not fitted) and
        ``groups``: per filter, the val samples it receives, the class-balanced val accuracy there of
        its classifier and of the head, and who classifies the group (``classifier`` or ``head``)."""
        self._check_fitted()
        sel = self.select_
        nf = len(self.modules_)
        chosen = "xz" if int(sel["input"]) == INPUT_CODES["xz"] else "x"
        scores = sel["val_score"].tolist()
        groups = []
        for f in range(nf):
            weight = float(sel["val_weight"][f])
            acc = (lambda v: v / weight if weight > 0 else None)  # weight > 0 guards the division
            groups.append({
                "filter": f + 1,
                "val_samples": int(sel["val_samples"][f]),
                "train_samples": int(sel["train_samples"][f]),
                "classifier_val_accuracy": acc(float(sel["group_score"][f])),
                "head_val_accuracy": acc(float(sel["head_score"][f])),
                "uses": "classifier" if bool(sel["gate"][f]) else "head",
            })
        return {"classifier_input": {"setting": self.classifier_input, "chosen": chosen,
                                     "val_score": {k: (None if math.isnan(v) else v) for k, v in zip(("x", "xz"), scores)}},
                "gate": bool(self.gate), "groups": groups}

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
        if self.classifier_input not in CLASSIFIER_INPUTS:
            raise LongtailError(f"dlsa: classifier_input = {self.classifier_input!r} must be one of "
                                f"{', '.join(repr(c) for c in CLASSIFIER_INPUTS)}")
        if not isinstance(self.gate, bool):
            raise LongtailError(f"dlsa: gate = {self.gate!r} must be true or false")
        if self.classifier_samples == "all" and int(self.route_folds) >= 2:
            raise LongtailError("dlsa: route_folds applies to classifier_samples: routed (the 'all' classifiers "
                                "see every train sample, whatever its route)")
        check_number("dlsa", "tail_threshold", self.tail_threshold, integer=True, low=0)

    def _validate(self, ctx: FitContext) -> None:
        if ctx.val is None and (self.gate or self.classifier_input == "auto"):
            raise LongtailError("dlsa: gate and classifier_input: auto choose on the val split, and there is "
                                "none; give one, or set gate: false and classifier_input: x or xz (the ungated "
                                "DLSA of the paper)")

    def _head(self) -> TrainedHead:
        head = self.base.inner if isinstance(self.base, Frozen) else self.base
        if not isinstance(head, TrainedHead):
            raise LongtailError(f"method 'dlsa+{self.base.name}': dlsa wraps a trained head (ce, balanced-softmax, "
                                f"cosine, ...), not {self.base.name!r}")
        return head

    def _new_module(self, kind: str, active_dim: int) -> nn.Module:
        dim = self.dim_ + (active_dim if kind == "xz" else 0)
        return ClusterAidedModule(self._head().new_module(dim, self.num_classes_), dim, self.num_classes_)

    @staticmethod
    def _inputs(kind: str, standardised: torch.Tensor, latent: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """``[x, P(y | h = k^)]`` (``kind = "x"``, ``(N, D + C)``) or ``[x, z, P(y | h = k^)]`` (``"xz"``,
        ``(N, D + D' + C)``): the input of a cluster-aided classifier."""
        prior = prior.to(standardised.dtype)
        parts = [standardised, latent, prior] if kind == "xz" else [standardised, prior]
        return torch.cat(parts, dim=1)

    def _training_sets(self, cascade: FlowCascade, train: FeatureSet) -> list[tuple[torch.Tensor, ...]]:
        """Per filter ``(rows, standardised x, z, cluster prior)`` of the train samples its classifier
        learns from (class docstring)."""
        route = cascade.route(train.features)
        xa = route.standardised[:, cascade.active_]
        out = []
        for f in range(route.num_filters):
            if self.classifier_samples == "all":  # every train sample, through filter f
                idx = torch.arange(len(train), device=route.stage.device)
                z, _, k = cascade.filters_[f].evaluate(xa)
                prior = cascade.cluster_priors_[f][k]
            elif cascade.has_cross_fitted_routes():  # routed there by flows that did not see them
                idx = torch.nonzero(cascade.oof_stage_ == f).flatten()
                z, _, _ = cascade.filters_[f].evaluate(xa[idx])
                prior = cascade.oof_priors_[cascade.oof_fold_[idx], f, cascade.oof_cluster_[idx]]
            else:  # the samples filter f sends out (the paper)
                idx = torch.nonzero(route.stage == f).flatten()
                z, prior = route.latent[idx], cascade.cluster_priors_[f][route.cluster[idx, f]]
            out.append((idx, route.standardised[idx], z, prior))
        return out

    def _fit(self, train: FeatureSet, val: FeatureSet | None, ctx: FitContext) -> None:
        head = self._head()
        cascade = getattr(self, "_cascade", None)
        if cascade is None:
            cascade = self.make_cascade().fit(train, val)
        self._check_cascade(cascade, train)
        self.cascade_ = cascade
        dev = resolve_device(head.device)
        y_all = torch.as_tensor(train.labels)
        active_dim = int(cascade.active_.sum())
        n_all = len(train)
        head_ctx = FitContext(num_classes=ctx.num_classes, dim=ctx.dim, class_counts=ctx.class_counts,
                              source_prior=ctx.source_prior, device=dev, val=None, provenance=ctx.provenance)
        sets = self._training_sets(cascade, train)
        kinds = ("x", "xz") if self.classifier_input == "auto" else (self.classifier_input,)
        fitted: dict[str, list[nn.Module]] = {}
        for kind in kinds:
            generator = torch.Generator(device=dev)  # the same draws for either input
            generator.manual_seed(int(head.seed))
            modules = []
            for f, (idx, x, z, prior) in enumerate(sets):
                module = self._new_module(kind, active_dim).to(dev)
                module.reset_parameters(generator)
                if idx.numel():  # a group without train samples keeps its initial module and is gated off
                    y = y_all[idx.cpu()].to(dev)
                    # as many SGD steps as the head on all N samples; ceil keeps at least the head's epochs
                    epochs = int(math.ceil(int(head.epochs) * n_all / int(idx.numel())))
                    present, compact = torch.unique(y, return_inverse=True)  # class sampling among present classes
                    fit_module(module, TrainData(self._inputs(kind, x, z, prior).to(dev), y, strata=compact),
                               head.objective(head_ctx), head.optim_config(epochs=epochs), generator=generator,
                               sampler=head_sampler(head.sampling, compact, int(present.numel())),
                               desc=f"dlsa+{head.name} (filter {f + 1}, input {kind})")
                modules.append(module.eval().requires_grad_(False))
            fitted[kind] = modules
        train_samples = torch.tensor([int(s[0].numel()) for s in sets])
        self.select_ = self._select(cascade, fitted, val, train_samples)
        self.modules_ = fitted["xz" if int(self.select_["input"]) == INPUT_CODES["xz"] else "x"]

    def _select(self, cascade: FlowCascade, fitted: dict[str, list[nn.Module]], val: FeatureSet | None,
                train_samples: torch.Tensor) -> dict[str, torch.Tensor]:
        """The val choices (class docstring): the input, then the gate of each group.

        Per group ``f`` and candidate, the score is ``sum_{val i in f} correct_i / m_{y_i}`` (``m``:
        val samples per class), so that the scores of the groups add up to the val balanced accuracy of
        the combined classifier times the number of classes in val. The input whose gated DLSA scores higher is kept (ties:
        ``x``); a group uses its classifier only if it scores strictly above the head there."""
        nf = len(cascade.filters_)
        empty = train_samples == 0
        if val is None:  # gate off and a fixed input (checked in _validate)
            nan = torch.full((nf,), math.nan, dtype=torch.float64)
            return {"input": torch.tensor(INPUT_CODES[next(iter(fitted))]), "gate": ~empty,
                    "val_score": torch.full((2,), math.nan, dtype=torch.float64), "group_score": nan,
                    "head_score": nan, "val_weight": nan, "val_samples": torch.zeros(nf, dtype=torch.int64),
                    "train_samples": train_samples}
        labels = torch.as_tensor(val.labels)
        per_class = torch.bincount(labels, minlength=self.num_classes_).double()
        w = 1.0 / per_class[labels]  # every val label has a count >= 1
        present = int((per_class > 0).sum())  # >= 1: val has labels (checked by fit)
        route = cascade.route(val.features)
        stage = route.stage.cpu()
        head_ok = torch.as_tensor(self.base.logits(val.features).argmax(1)) == labels
        weight = torch.stack([w[stage == f].sum() for f in range(nf)])
        head_score = torch.stack([(w * head_ok)[stage == f].sum() for f in range(nf)])
        val_score = torch.full((2,), math.nan, dtype=torch.float64)
        best = None
        for kind, modules in fitted.items():
            scores = torch.zeros(nf, dtype=torch.float64)
            for f, module in enumerate(modules):
                idx = torch.nonzero(route.stage == f).flatten()
                if idx.numel():
                    inputs = self._inputs(kind, route.standardised[idx], route.latent[idx],
                                          cascade.cluster_priors_[f][route.cluster[idx, f]])
                    dev = next(module.parameters()).device
                    with torch.no_grad():
                        pred = module(inputs.to(dev)).argmax(1).cpu()
                    scores[f] = (w[idx.cpu()] * (pred == labels[idx.cpu()])).sum()
            gate = (scores > head_score) & ~empty if self.gate else ~empty
            rest = (w * head_ok)[stage == nf].sum()
            total = float(torch.where(gate, scores, head_score).sum() + rest)
            val_score[INPUT_CODES[kind]] = total / present  # the val balanced accuracy
            if best is None or total > best[0]:  # strictly better: ties keep the first ("x")
                best = (total, kind, scores, gate)
        _, kind, scores, gate = best
        return {"input": torch.tensor(INPUT_CODES[kind]), "gate": gate, "val_score": val_score,
                "group_score": scores, "head_score": head_score, "val_weight": weight,
                "val_samples": torch.bincount(stage, minlength=nf + 1)[:nf], "train_samples": train_samples}

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
    def _kind(self) -> str:
        return "xz" if int(self.select_["input"]) == INPUT_CODES["xz"] else "x"

    def _logits(self, features: np.ndarray) -> np.ndarray:
        """Each row's logits from the classifier of its group: a filter's cluster-aided classifier
        where the gate lets it, else (a gated group, or past every filter) the head."""
        cascade = self.cascade_
        kind = self._kind()
        gate = self.select_["gate"].tolist()
        out = np.empty((features.shape[0], self.num_classes_), dtype=np.float32)
        dev = next(self.modules_[0].parameters()).device
        with torch.no_grad():
            for start in range(0, features.shape[0], ROUTE_CHUNK):
                chunk = features[start:start + ROUTE_CHUNK]
                route = cascade.route(chunk)
                stage = route.stage.cpu().numpy()
                to_head = np.isin(stage, [route.num_filters] + [f for f, g in enumerate(gate) if not g])
                rest = np.flatnonzero(to_head)
                if rest.size:
                    out[start + rest] = self.base.logits(chunk[rest])
                for f, module in enumerate(self.modules_):
                    if not gate[f]:
                        continue
                    idx = torch.nonzero(route.stage == f).flatten()
                    if idx.numel():
                        inputs = self._inputs(kind, route.standardised[idx], route.latent[idx],
                                              cascade.cluster_priors_[f][route.cluster[idx, f]])
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
        state.update({f"select.{k}": v for k, v in self.select_.items()})
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
            self.select_ = {k[len("select."):]: v.cpu() for k, v in state.items() if k.startswith("select.")}
            kind = self._kind()
            for f in range(len(cascade.filters_)):
                prefix = f"group{f}."
                module = self._new_module(kind, active_dim)
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
                modules.append(module.to(dev).eval().requires_grad_(False))
        except (KeyError, RuntimeError) as exc:
            raise LongtailError(f"method 'dlsa+{head.name}': the saved state does not fit this method: {exc}") from exc
        self.modules_ = modules
