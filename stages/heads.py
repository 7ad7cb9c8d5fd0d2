"""Stage-2 heads: one trainer, many objectives.

Every head is a classifier trained on fixed (cached) backbone features. They share one trainer,
:func:`train_module`: a minibatch loop over the train features, put on the configured device once,
batches drawn by index permutation from a seeded ``torch.Generator`` (instance-balanced or
class-balanced sampling), SGD with momentum 0.9 and a cosine learning-rate schedule, one progress
bar over epochs (quiet when not on a terminal). Heads differ only in three things: the module
(:meth:`_Head._new_module`), the loss (:meth:`_Head._loss_fn`) and the sampler
(:attr:`_Head.sampling`); the two-stage heads (``tau-norm``, ``lws``) add a post-training step.

Features are standardised for every head (one decision keeps the heads comparable): SGD on cached
features of arbitrary offset and scale (ReLU activations, sums of them) is otherwise badly
conditioned. The mean and standard deviation are those of the train split re-weighted to a uniform
label prior (:func:`balanced_moments`), stored as state: the plain train mean sits among the head
classes, and centring on it tilts every angle a cosine classifier sees towards them (on a 2-D
five-class long tail with means on a circle it cost ``cosine`` and ``ldam-drw`` 10 to 13 points of
balanced accuracy).

Registered names: ``ce``, ``balanced-softmax``, ``logit-adjust``, ``cb-ce``, ``focal``, ``cosine``,
``ldam-drw``, ``crt``, ``tau-norm``, ``lws``.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from longtail.stages.base import Method, check_number, register
from longtail.stages.calibrate import prior_from_log
from longtail.stages.data import FeatureSet
from longtail.stages.device import resolve_device
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import per_class_accuracy
from longtail.stages.losses import (
    balanced_softmax_loss,
    class_balanced_weights,
    cross_entropy,
    focal_loss,
    ldam_loss,
    logit_adjusted_loss,
)

#: a loss as the trainer calls it: ``(logits, labels, epoch) -> scalar``
LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

# Defaults shared by every head. SGD on standardised features: with 30 epochs and a cosine schedule,
# lr 0.1 was within a point of balanced accuracy of the best of {0.05, 0.1, 0.2} for every head on a
# synthetic 100-class, 512-d long-tailed problem (counts 500..5; 0.01 was worse where tried);
# weight decay 5e-4 as in paper 002 (Sec. 6.2).
EPOCHS = 30
LR = 0.1
BATCH_SIZE = 256
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
#: rows per chunk when computing logits (bounds device memory, not a per-sample loop)
LOGITS_CHUNK = 65536
#: rows per chunk of :func:`balanced_moments`: float64 temporaries of 8192 x D (128 MiB at D = 2048;
#: at 60k x 2048 features one chunk of all rows took twice as long, its 1 GiB temporaries out of cache)
MOMENTS_CHUNK = 8192
#: the grid ``tau-norm`` chooses tau from on val: 0, 0.1, ..., 2
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))


# ---------------------------------------------------------------------- modules
class LinearClassifier(nn.Module):
    """``z = x W^T + b``, ``W`` of shape ``(C, D)``."""

    no_decay: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dim: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_classes))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """``torch.nn.Linear``'s uniform initialisation, drawn from ``generator``."""
        bound = 1.0 / math.sqrt(self.weight.shape[1])  # guarded: dim >= 1 (FeatureSet rejects 0)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class CosineClassifier(nn.Module):
    """``z_c = s * cos(x, w_c)``: features and class weights normalised to unit length.

    ``s`` is a learnable parameter (not weight-decayed, which would only shrink it) or a fixed
    buffer.
    """

    no_decay: ClassVar[tuple[str, ...]] = ("scale",)

    def __init__(self, dim: int, num_classes: int, scale: float, learn_scale: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))
        value = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)
        self._init_scale = float(scale)

    def reset_parameters(self, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])  # guarded: dim >= 1
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            self.scale.fill_(self._init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.normalize divides by max(||v||, 1e-12): guards all-zero feature rows and weight rows
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class ScaledClassifier(nn.Module):
    """Learnable weight scaling (Kang et al.): ``z_c = s_c * (w_c . x + b_c)``."""

    no_decay: ClassVar[tuple[str, ...]] = ("scales",)

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = LinearClassifier(dim, num_classes, bias=True)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.linear.reset_parameters(generator)
        with torch.no_grad():
            self.scales.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scales


# ---------------------------------------------------------------------- samplers
def instance_balanced_indices(num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch of instance-balanced sampling: a random permutation of ``[0, N)``."""
    return torch.randperm(num_samples, generator=generator, device=generator.device)


class ClassBalancedSampler:
    """Class-balanced sampling (Kang et al., ICLR 2020: ``p_j ∝ n_j^q`` with ``q = 0``).

    Each draw picks a class uniformly, then a sample of that class uniformly; one epoch draws ``N``
    samples (with replacement). Vectorised on the generator's device.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int):
        counts = torch.bincount(labels, minlength=num_classes)
        if bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise LongtailError(f"class-balanced sampling: class(es) {missing[:5]} have no train sample")
        self.num_classes = num_classes
        self.order = torch.argsort(labels, stable=True)  # sample indices grouped by class
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts  # where each class starts in ``order``

    def __call__(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        dev = generator.device
        cls = torch.randint(self.num_classes, (num_samples,), generator=generator, device=dev)
        u = torch.rand(num_samples, generator=generator, device=dev, dtype=torch.float64)
        n = self.counts[cls]
        within = torch.minimum((u * n).long(), n - 1)  # minimum guards u * n rounding up to n
        return self.order[self.offsets[cls] + within]


# ---------------------------------------------------------------------- the trainer
def train_module(
    module: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    generator: torch.Generator,
    sampling: str = "instance",
    num_classes: int | None = None,
    trainable: Callable[[str], bool] | None = None,
    desc: str = "head",
) -> list[float]:
    """Train ``module`` on ``(features, labels)`` (already on the generator's device).

    SGD with momentum 0.9 and a per-step cosine schedule from ``lr`` to 0. ``sampling`` is
    ``"instance"`` (a permutation per epoch) or ``"class"`` (:class:`ClassBalancedSampler`).
    ``trainable(name)`` selects the parameters to optimise (default: all); the others are frozen.
    Parameters named in ``module.no_decay`` get no weight decay. Returns the mean loss of each epoch.
    """
    n = int(features.shape[0])
    if sampling == "instance":
        draw = lambda: instance_balanced_indices(n, generator)  # noqa: E731
    elif sampling == "class":
        sampler = ClassBalancedSampler(labels, int(num_classes or int(labels.max()) + 1))
        draw = lambda: sampler(n, generator)  # noqa: E731
    else:
        raise ValueError(f"unknown sampling {sampling!r}")

    no_decay = set(getattr(module, "no_decay", ()))
    decay, plain = [], []
    for name, p in module.named_parameters():
        p.requires_grad_(trainable is None or trainable(name))
        if p.requires_grad:
            (plain if name.rsplit(".", 1)[-1] in no_decay or name in no_decay else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": plain, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM)
    total_steps = epochs * math.ceil(n / batch_size)  # guarded: batch_size >= 1 (checked by the head)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps))  # total_steps >= 1
    )

    history: list[float] = []
    module.train()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=None, leave=False)
    for epoch in bar:
        order = draw()
        running = torch.zeros((), device=features.device, dtype=torch.float64)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = loss_fn(module(features[idx]), labels[idx], epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.detach().double() * idx.numel()
        mean_loss = float(running) / n  # one device sync per epoch; n >= 1 (FeatureSet rejects empty splits)
        if not math.isfinite(mean_loss):
            raise LongtailError(
                f"{desc}: the training loss became {mean_loss} at epoch {epoch + 1}: lower lr (now {lr})"
            )
        history.append(mean_loss)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
    bar.close()
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return history


def balanced_moments(features: np.ndarray, labels: np.ndarray, num_classes: int,
                     chunk: int = MOMENTS_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced mean and standard deviation of ``features`` ``(N, D)``, float64 ``(D,)`` each.

    ``mean = (1/C) sum_c mean(x | y = c)`` and ``var = (1/C) sum_c mean((x - mean)^2 | y = c)``: the
    moments of the train distribution re-weighted to a uniform label prior. Computed once per fit
    on the host arrays the features arrive in (before they go to the device), in float64, by
    segment sums over the rows sorted by class, in chunks of rows: deterministic on every machine
    (a scatter-add on an accelerator sums in an arbitrary order) and bounded in memory.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise LongtailError(f"balanced standardisation: class {int(np.argmin(counts))} has no train sample")
    order = np.argsort(labels, kind="stable")

    def class_sums(transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        out = np.zeros((num_classes, features.shape[1]))
        for start in range(0, len(order), chunk):
            rows = order[start:start + chunk]
            lab = labels[rows]  # sorted, so each class is one contiguous segment of the chunk
            seg = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
            out[lab[seg]] += np.add.reduceat(transform(features[rows].astype(np.float64)), seg, axis=0)
        return out

    mean = (class_sums(lambda v: v) / counts[:, None]).mean(axis=0)  # guarded: every count > 0
    sq_dev = lambda v: np.square(np.subtract(v, mean, out=v), out=v)  # noqa: E731 (v is a fresh copy)
    var = (class_sums(sq_dev) / counts[:, None]).mean(axis=0)  # guarded as above
    return mean, np.sqrt(var)


def balanced_accuracy(pred: torch.Tensor, labels: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes that have at least one sample in ``labels``
    (:func:`stages.evaluate.per_class_accuracy`, NaN for an absent class, skipped here)."""
    return float(np.nanmean(per_class_accuracy(pred.cpu().numpy(), labels, num_classes)))


# ---------------------------------------------------------------------- the head base class
def _check_number(method: str, key: str, value, **bounds) -> None:
    """:func:`~stages.base.check_number` with the owner ``method 'name'`` of every head's messages."""
    check_number(f"method {method!r}", key, value, **bounds)


class _Head(Method):
    """A classifier trained on standardised features with :func:`train_module` (not registered).

    Subclasses set :attr:`sampling` and override :meth:`_loss_fn`, and where needed
    :meth:`_new_module`, :meth:`_train`, :meth:`_scores` and the extra-state hooks.
    """

    #: ``"instance"`` or ``"class"``
    sampling: ClassVar[str] = "instance"

    def __init__(self, *, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, seed: int = 0, device: str = "auto"):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------ hooks
    def _check_own_params(self) -> None:
        """Validate the subclass's own hyper-parameters (LongtailError naming the key)."""

    def _new_module(self) -> nn.Module:
        return LinearClassifier(self.dim_, self.num_classes_)

    def _loss_fn(self, class_counts: np.ndarray, device: torch.device) -> LossFn:
        """The training loss; plain cross-entropy unless a head says otherwise."""
        return lambda z, y, epoch: cross_entropy(z, y)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of standardised features ``x``."""
        return self.module_(x)

    def logit_prior(self) -> np.ndarray:
        """The label prior ``(C,)`` float64 that this head's logits are calibrated to.

        What ``+pc`` swaps for the target prior (``p_s`` of paper 002, eq. 4: "the distribution which
        the model logits are entangled with"). A head trained with a plain softmax on the train
        split estimates ``p_s(y|x)``: the train prior (the default). Heads that remove the prior in
        training override this (``balanced-softmax``, ``logit-adjust``, ``cb-ce``, ``crt``).
        """
        self._check_fitted()
        return np.asarray(self.source_prior_, dtype=np.float64)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def _train(self, x: torch.Tensor, y: torch.Tensor, class_counts: np.ndarray,
               generator: torch.Generator, val: FeatureSet | None) -> None:
        train_module(
            self.module_, x, y, self._loss_fn(class_counts, x.device), sampling=self.sampling,
            num_classes=self.num_classes_, generator=generator, desc=self.name, **self._optim_args(),
        )

    # ------------------------------------------------------------------ shared machinery
    def _optim_args(self) -> dict:
        return {"epochs": int(self.epochs), "lr": float(self.lr), "batch_size": int(self.batch_size),
                "weight_decay": float(self.weight_decay)}

    def check_params(self, num_classes: int) -> None:
        """Hyper-parameter checks, run by the pipeline before any work (and again in fit)."""
        self._check_params()
        resolve_device(self.device)

    def _check_params(self) -> None:
        _check_number(self.name, "epochs", self.epochs, integer=True, low=1)
        _check_number(self.name, "lr", self.lr, low=0, low_open=True)
        _check_number(self.name, "batch_size", self.batch_size, integer=True, low=1)
        _check_number(self.name, "weight_decay", self.weight_decay, low=0)
        _check_number(self.name, "seed", self.seed, integer=True, low=0)
        self._check_own_params()

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean_) / self.std_  # std_ > 0: floored in _fit

    def _fit(self, train: FeatureSet, val: FeatureSet | None) -> None:
        self._check_params()
        dev = resolve_device(self.device)
        counts = train.class_counts
        if (counts <= 0).any():
            c = int(np.flatnonzero(counts <= 0)[0])
            raise LongtailError(
                f"{train.source or 'features'}: class_counts of class {train.class_names[c]!r} is "
                f"{int(counts[c])} but the split has samples of it (counts and labels disagree)"
            )
        generator = torch.Generator(device=dev)
        generator.manual_seed(int(self.seed))
        mean, std = balanced_moments(train.features, train.labels, self.num_classes_)
        # guards the division in _standardise: constant features (std ~ 0) are centred, not scaled
        std = np.where(std > 1e-6 * max(std.max(), 1e-300), std, 1.0)
        self.mean_ = torch.tensor(mean, dtype=torch.float32, device=dev)
        self.std_ = torch.tensor(std, dtype=torch.float32, device=dev)
        x = self._standardise(torch.tensor(train.features, device=dev))
        y = torch.tensor(train.labels, device=dev)
        self.module_ = self._new_module().to(dev)
        self.module_.reset_parameters(generator)
        self._train(x, y, counts, generator, val)

    def _logits(self, features: np.ndarray) -> np.ndarray:
        dev = self.mean_.device
        out = []
        with torch.inference_mode():
            for start in range(0, features.shape[0], LOGITS_CHUNK):
                xb = torch.tensor(features[start:start + LOGITS_CHUNK], device=dev)
                out.append(self._scores(self._standardise(xb)).float().cpu())
        return torch.cat(out).numpy()

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"mean": self.mean_, "std": self.std_}
        state.update({f"module.{k}": v for k, v in self.module_.state_dict().items()})
        state.update(self._extra_state())
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        dev = resolve_device(self.device)
        try:
            self.mean_ = state["mean"].to(dev, torch.float32)
            self.std_ = state["std"].to(dev, torch.float32)
            module = self._new_module()
            module.load_state_dict({k[len("module."):]: v for k, v in state.items() if k.startswith("module.")})
            self.module_ = module.to(dev).eval().requires_grad_(False)
            self._load_extra_state(state)
        except (KeyError, RuntimeError) as exc:
            raise LongtailError(f"method {self.name!r}: the saved state does not fit this method: {exc}") from exc


# ---------------------------------------------------------------------- the heads
@register("ce")
class CrossEntropyHead(_Head):
    """Linear classifier, softmax cross-entropy, instance-balanced sampling (the baseline)."""


@register("balanced-softmax")
class BalancedSoftmaxHead(_Head):
    """Linear classifier trained with Balanced Softmax (Ren et al. 2020); raw logits at test time."""

    def _loss_fn(self, class_counts, device):
        counts = torch.as_tensor(class_counts, dtype=torch.float64, device=device)
        return lambda z, y, epoch: balanced_softmax_loss(z, y, counts)

    def logit_prior(self) -> np.ndarray:
        """Uniform: the softmax of the raw logits estimates the balanced posterior (paper 002, Sec. 4.3
        compensates Balanced Softmax with ``log p_t - log p_u``)."""
        self._check_fitted()
        return np.full(self.num_classes_, 1.0 / self.num_classes_)


@register("logit-adjust")
class LogitAdjustHead(_Head):
    """Linear classifier trained with the logit-adjusted loss (Menon et al. 2021); raw logits at test."""

    def __init__(self, *, tau: float = 1.0, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.tau = tau

    def _check_own_params(self) -> None:
        _check_number(self.name, "tau", self.tau, low=0)

    def _loss_fn(self, class_counts, device):
        counts = torch.as_tensor(class_counts, dtype=torch.float64, device=device)
        return lambda z, y, epoch: logit_adjusted_loss(z, y, counts, tau=float(self.tau))

    def logit_prior(self) -> np.ndarray:
        """``p_s^(1 - tau)``, normalised: uniform for ``tau = 1``, the train prior for ``tau = 0``.

        The loss fits ``softmax(f + tau log p_s)`` to ``p_s(y|x) ∝ p_s(y) p(x|y)``, so at its optimum
        ``f(x)[y] = log p(x|y) + (1 - tau) log p_s(y) + const(x)``: the logits carry the prior
        ``∝ p_s^(1 - tau)``, exactly as Theorem 1 of paper 002 assumes of a softmax's logits.
        """
        self._check_fitted()
        return prior_from_log((1.0 - float(self.tau)) * np.log(np.asarray(self.source_prior_, dtype=np.float64)))


@register("cb-ce")
class ClassBalancedCEHead(_Head):
    """Cross-entropy weighted by class-balanced (effective-number) weights (Cui et al. 2019).

    Default ``beta = 0.99``: the effective number ``E_n = (1 - beta^n) / (1 - beta)`` saturates at
    ``1 / (1 - beta)`` samples, so beta only matters for counts near or above ``1 / (1 - beta)``.
    For the small counts of stage-2 benchmarks (5..100 per class), ``beta = 0.999`` (saturation at
    1000) gives ``E_n`` within 5% of ``n``, i.e. plain inverse frequency; ``beta = 0.9`` (10)
    flattens 5..100 to a weight ratio of 2.4. ``beta = 0.99`` saturates at 100: ``E_5 = 4.9``,
    ``E_100 = 63.4``, a ratio of 12.9 instead of 20, a genuinely effective-number weighting.
    """

    def __init__(self, *, beta: float = 0.99, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.beta = beta

    def _check_own_params(self) -> None:
        _check_number(self.name, "beta", self.beta, low=0, high=1)

    def _loss_fn(self, class_counts, device):
        weight = torch.as_tensor(class_balanced_weights(class_counts, float(self.beta)), device=device)
        return lambda z, y, epoch: cross_entropy(z, y, weight=weight)

    def _train(self, x, y, class_counts, generator, val) -> None:
        p = class_balanced_weights(class_counts, float(self.beta)) * np.asarray(class_counts, dtype=np.float64)
        self.logit_prior_ = p / p.sum()  # > 0: positive weights times positive counts (validated in fit)
        super()._train(x, y, class_counts, generator, val)

    def logit_prior(self) -> np.ndarray:
        """``w_y p_s(y)``, normalised (``w`` the class-balanced weights of the loss).

        The population minimiser of ``sum_y w_y p_s(y|x) (-log q_y(x))`` is ``q_y ∝ w_y p_s(y|x) ∝
        w_y p_s(y) p(x|y)``: the weighted loss trains the softmax under the prior ``∝ w p_s``.
        """
        self._check_fitted()
        return np.asarray(self.logit_prior_, dtype=np.float64)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {"logit_prior": torch.as_tensor(self.logit_prior_, dtype=torch.float64)}

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.logit_prior_ = state["logit_prior"].numpy().astype(np.float64)


@register("focal")
class FocalHead(_Head):
    """Linear classifier trained with the softmax focal loss (Lin et al. 2017)."""

    def __init__(self, *, gamma: float = 2.0, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.gamma = gamma

    def _check_own_params(self) -> None:
        _check_number(self.name, "gamma", self.gamma, low=0)

    def _loss_fn(self, class_counts, device):
        return lambda z, y, epoch: focal_loss(z, y, gamma=float(self.gamma))


@register("cosine")
class CosineHead(_Head):
    """Cosine classifier (normalised features and class weights, times a scale), cross-entropy.

    ``scale = 16``: a cosine logit lies in ``[-1, 1]``, so the scale bounds the logit gap and with
    it the largest attainable softmax confidence; 16 lets 2..1000 classes reach a confident softmax
    while keeping the gradients of the correctly classified samples alive. ``learn_scale = True``
    lets the data adjust it.
    """

    def __init__(self, *, scale: float = 16.0, learn_scale: bool = True, epochs: int = EPOCHS, lr: float = LR,
                 batch_size: int = BATCH_SIZE, weight_decay: float = WEIGHT_DECAY, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.scale = scale
        self.learn_scale = learn_scale

    def _check_own_params(self) -> None:
        _check_number(self.name, "scale", self.scale, low=0, low_open=True)
        if not isinstance(self.learn_scale, bool):
            raise LongtailError(f"method {self.name!r}: learn_scale = {self.learn_scale!r} must be true or false")

    def _new_module(self) -> nn.Module:
        return CosineClassifier(self.dim_, self.num_classes_, float(self.scale), bool(self.learn_scale))


def deferred_reweighting_epoch(epochs: int, drw_start: float) -> int:
    """First epoch (0-based) of deferred re-weighting: ``floor(drw_start * epochs)``.

    Cao et al. switch the class-balanced weights on at epoch 160 of 200 on CIFAR (``0.8``).
    """
    return int(math.floor(float(drw_start) * int(epochs) + 1e-9))  # 1e-9: 0.8 * 200 is 159.999...


@register("ldam-drw")
class LDAMDRWHead(_Head):
    """LDAM loss with deferred re-weighting (Cao et al., NeurIPS 2019, Sec. 3.2-3.3, Algorithm 1).

    A cosine classifier (Cao et al. normalise features and weights for LDAM) trained with
    :func:`~stages.losses.ldam_loss`; from epoch ``floor(drw_start * epochs)`` on (default the last
    20%, their epoch 160 of 200) the loss is weighted by class-balanced weights with ``beta``
    (0.9999 as in Cao et al.'s code: at stage-2 counts this is close to inverse frequency, which is
    what DRW intends). Test-time logits are ``scale * cos``, without margins.
    """

    def __init__(self, *, max_margin: float = 0.5, scale: float = 30.0, drw_start: float = 0.8,
                 beta: float = 0.9999, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.max_margin = max_margin
        self.scale = scale
        self.drw_start = drw_start
        self.beta = beta

    def _check_own_params(self) -> None:
        _check_number(self.name, "max_margin", self.max_margin, low=0, low_open=True)
        _check_number(self.name, "scale", self.scale, low=0, low_open=True)
        _check_number(self.name, "drw_start", self.drw_start, low=0, high=1)
        _check_number(self.name, "beta", self.beta, low=0, high=1)

    def _new_module(self) -> nn.Module:
        return CosineClassifier(self.dim_, self.num_classes_, 1.0, learn_scale=False)

    def _loss_fn(self, class_counts, device):
        counts = torch.as_tensor(class_counts, dtype=torch.float64, device=device)
        weight = torch.as_tensor(class_balanced_weights(class_counts, float(self.beta)), device=device)
        start = deferred_reweighting_epoch(self.epochs, self.drw_start)
        margin, scale = float(self.max_margin), float(self.scale)

        def loss(z: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            w = weight if epoch >= start else None
            return ldam_loss(z, y, counts, max_margin=margin, scale=scale, weight=w)

        return loss

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return float(self.scale) * self.module_(x)


@register("crt")
class ClassifierRetrainingHead(_Head):
    """Decoupled classifier re-training (cRT, Kang et al., ICLR 2020).

    A freshly initialised linear classifier trained with cross-entropy and class-balanced sampling
    on the fixed features.
    """

    sampling = "class"

    def logit_prior(self) -> np.ndarray:
        """Uniform: class-balanced sampling trains the softmax on a uniform label distribution."""
        self._check_fitted()
        return np.full(self.num_classes_, 1.0 / self.num_classes_)


#: candidate powers gamma of the train prior that tau-normalised logits carry
PRIOR_POWERS = tuple(round(0.1 * i, 1) for i in range(11))


@register("tau-norm")
class TauNormHead(_Head):
    """tau-normalised classifier (Kang et al., ICLR 2020, "Decoupling representation and classifier").

    Fits a bias-free linear cross-entropy head (instance-balanced), then rescales each class weight
    vector, ``w_c / ||w_c||^tau``; the bias is dropped, so the head is trained without one and
    ``tau = 0`` is exactly the fitted head. ``tau = None`` chooses tau from ``0, 0.1, ..., 2`` by
    balanced accuracy on the **val** split (ties: the smallest tau), ``tau = 1`` when no val split
    is given. The tau used is stored as ``tau_``.
    """

    def __init__(self, *, tau: float | None = None, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                 weight_decay: float = WEIGHT_DECAY, seed: int = 0, device: str = "auto"):
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         seed=seed, device=device)
        self.tau = tau

    def _check_own_params(self) -> None:
        if self.tau is not None:
            _check_number(self.name, "tau", self.tau, low=0)

    def _new_module(self) -> nn.Module:
        return LinearClassifier(self.dim_, self.num_classes_, bias=False)

    def _train(self, x, y, class_counts, generator, val) -> None:
        super()._train(x, y, class_counts, generator, val)
        self.val_scores_ = None
        if self.tau is not None:
            self.tau_ = float(self.tau)
        elif val is None:
            self.tau_ = 1.0
        else:
            self.tau_ = self._choose_tau(val)
        self.prior_power_ = None if val is None else self._choose_prior_power(val)

    def _choose_tau(self, val: FeatureSet) -> float:
        dev = self.mean_.device
        with torch.inference_mode():
            xv = self._standardise(torch.tensor(val.features, device=dev))
            scores = [balanced_accuracy(self._scores(xv, tau).argmax(1), val.labels, self.num_classes_)
                      for tau in TAU_GRID]
        self.val_scores_ = np.asarray(scores)  # val balanced accuracy per TAU_GRID value (diagnostic)
        return float(TAU_GRID[int(np.argmax(scores))])  # argmax: the first (smallest) tau among ties

    def _choose_prior_power(self, val: FeatureSet) -> float:
        """Which prior do tau-normalised logits carry? Neither the train prior (tau-normalisation
        removes part of it) nor the uniform one: model it as ``p_s^gamma`` (renormalised) and
        choose ``gamma`` in ``0, 0.1, ..., 1`` on the **val** split, as the power whose removal
        (``z - gamma log p_s``, PC-Softmax to a uniform target, paper 002 eq. 4) gives the best
        balanced accuracy (ties: the smallest). One scalar, so 20 val samples a class suffice."""
        dev = self.mean_.device
        log_ps = torch.log(torch.as_tensor(self.source_prior_, dtype=torch.float32, device=dev))
        with torch.inference_mode():
            zv = self._scores(self._standardise(torch.tensor(val.features, device=dev)))
            scores = [balanced_accuracy((zv - g * log_ps).argmax(1), val.labels, self.num_classes_)
                      for g in PRIOR_POWERS]
        return float(PRIOR_POWERS[int(np.argmax(scores))])

    def logit_prior(self) -> np.ndarray:
        """``p_s^gamma`` renormalised, ``gamma`` chosen on val (:meth:`_choose_prior_power`); the
        train prior (``gamma = 1``) when no val split was given."""
        self._check_fitted()
        gamma = 1.0 if getattr(self, "prior_power_", None) is None else self.prior_power_
        p = np.asarray(self.source_prior_, dtype=np.float64) ** gamma
        return p / p.sum()  # > 0: the train prior has no zero entry (checked in fit)

    def _scores(self, x: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        tau = self.tau_ if tau is None else tau
        w = self.module_.weight
        norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # guards a class whose weights are all zero
        return F.linear(x, w / norms.pow(tau))

    def _extra_state(self) -> dict[str, torch.Tensor]:
        state = {"tau": torch.tensor(self.tau_, dtype=torch.float64)}
        if getattr(self, "val_scores_", None) is not None:
            state["val_scores"] = torch.as_tensor(self.val_scores_, dtype=torch.float64)
        if getattr(self, "prior_power_", None) is not None:
            state["prior_power"] = torch.tensor(self.prior_power_, dtype=torch.float64)
        return state

    def _load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.tau_ = float(state["tau"])
        self.val_scores_ = state["val_scores"].numpy() if "val_scores" in state else None
        self.prior_power_ = float(state["prior_power"]) if "prior_power" in state else None


@register("lws")
class LearnableWeightScalingHead(_Head):
    """Learnable weight scaling (LWS, Kang et al., ICLR 2020).

    Stage 1 fits a linear cross-entropy head with instance-balanced sampling (the same head, with
    the same seed, as ``ce``); stage 2 freezes its weights and bias and learns one scale per class,
    ``z_c = s_c (w_c . x + b_c)``, with class-balanced sampling (same epochs and lr, no weight
    decay on the scales, which would pull them to 0 rather than to 1).
    """

    def _new_module(self) -> nn.Module:
        return ScaledClassifier(self.dim_, self.num_classes_)

    def _train(self, x, y, class_counts, generator, val) -> None:
        loss = self._loss_fn(class_counts, x.device)
        args = self._optim_args()
        train_module(self.module_, x, y, loss, sampling="instance", num_classes=self.num_classes_,
                     generator=generator, trainable=lambda name: name.startswith("linear."),
                     desc=f"{self.name} (classifier)", **args)
        train_module(self.module_, x, y, loss, sampling="class", num_classes=self.num_classes_,
                     generator=generator, trainable=lambda name: name == "scales",
                     desc=f"{self.name} (scales)", **args)
