"""Stage 1: backbones and batched feature extraction.

Three kinds of backbone, one abstraction (:class:`Backbone`: a module whose forward returns the
features, i.e. the activations *before* the classifier):

* ``builtin``: a small CNN trained here on the long-tailed train split with plain cross-entropy
  and instance-balanced sampling (stage 1 of decoupling, Kang et al. 2020);
* ``torchscript``: a user's TorchScript file (``torch.jit.load``); ``method`` names the exported
  method that returns features (default ``forward``);
* ``python``: a ``package.module:function`` returning an ``nn.Module``; ``classifier`` optionally
  names its final classifier submodule, whose *input* is taken as the features.

Inference is batched on the configured device, with mixed precision on CUDA, and yields chunks so
that the caller writes them to the store as they come.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from longtail.stages.device import resolve_device
from longtail.stages.errors import LongtailError


class SmallCNN(nn.Module):
    """A small CNN for 8x8 (or larger) single-channel images: 3 conv blocks, global pooling."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            block(in_channels, width),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class FeaturesOf(nn.Module):
    """Wraps a classifier network so that forward returns the input of its classifier."""

    def __init__(self, net: nn.Module, classifier: str | None, method: str = "forward"):
        super().__init__()
        self.net = net
        self.method = method
        self._captured: list[torch.Tensor] = []
        self.classifier = classifier
        if classifier is not None:
            try:
                sub = net.get_submodule(classifier)
            except AttributeError as exc:
                raise LongtailError(f"backbone: the module has no submodule {classifier!r} (classifier)") from exc
            sub.register_forward_pre_hook(lambda _m, args: self._captured.append(args[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._captured.clear()
        out = getattr(self.net, self.method)(x)
        if self.classifier is not None:
            if not self._captured:
                raise LongtailError(f"backbone: classifier {self.classifier!r} was not called in forward")
            out = self._captured[-1]
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)


@dataclass
class Backbone:
    """A feature extractor ready for inference, with its identity for lineage."""

    module: nn.Module
    identity: dict
    weights_hash: str
    train_log: list = field(default_factory=list)


def hash_state(module: nn.Module) -> str:
    """blake2b over the module's parameters and buffers (names, shapes, bytes), in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        arr = t.detach().cpu().contiguous()
        h.update(str(tuple(arr.shape)).encode() + str(arr.dtype).encode())
        h.update(arr.numpy().tobytes() if arr.dtype != torch.bfloat16 else arr.float().numpy().tobytes())
    return h.hexdigest()


def hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_torchscript(path: str, method: str = "forward") -> Backbone:
    """A user TorchScript file whose ``method`` returns features."""
    if not os.path.isfile(path):
        raise LongtailError(f"backbone file {path!r} does not exist")
    try:
        with warnings.catch_warnings():  # the user chose TorchScript; its deprecation is not theirs to fix
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(path, map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError with multi-line text
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LongtailError(f"backbone file {path!r} is not a readable TorchScript file ({first})") from exc
    if not hasattr(module, method):
        raise LongtailError(f"backbone file {path!r} has no method {method!r}")
    wrapped = FeaturesOf(module, None, method)
    return Backbone(wrapped, {"kind": "torchscript", "path": os.path.basename(path), "method": method},
                    hash_file(path))


def load_python(target: str, kwargs: dict | None = None, classifier: str | None = None) -> Backbone:
    """``package.module:function`` returning an ``nn.Module``."""
    if ":" not in target:
        raise LongtailError(f"backbone target {target!r} must look like 'package.module:function'")
    mod_name, fn_name = target.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise LongtailError(f"backbone target {target!r}: cannot import {mod_name!r} ({exc})") from exc
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise LongtailError(f"backbone target {target!r}: {fn_name!r} is not a function of {mod_name!r}")
    module = fn(**(kwargs or {}))
    if not isinstance(module, nn.Module):
        raise LongtailError(f"backbone target {target!r} returned {type(module).__name__}, not an nn.Module")
    wrapped = FeaturesOf(module, classifier)
    identity = {"kind": "python", "target": target, "kwargs": kwargs or {}, "classifier": classifier}
    return Backbone(wrapped, identity, hash_state(module))


def train_small_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 30,
    lr: float = 0.05,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    width: int = 32,
    seed: int = 0,
    device: str = "auto",
) -> Backbone:
    """Stage 1: train :class:`SmallCNN` with plain cross-entropy and instance-balanced sampling.

    SGD with Nesterov momentum 0.9 and a one-cycle schedule; a one-pixel random shift of each batch
    as augmentation. This loop is its own, not :func:`~longtail.stages.train.engine.fit_module`:
    the stores already made were extracted with it, and its draws (one CPU generator for the row
    orders and the shifts, interleaved batch by batch; the global generator, seeded, for the
    initialisation, whose state is restored afterwards) and schedule are what make the same seed give the same features. The returned
    backbone's forward gives the pooled features (before the classifier).
    """
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the default initialisation draws from the global
        torch.default_generator.manual_seed(seed)  # CPU generator: seeded here, restored after
        model = SmallCNN(num_classes, in_channels=images.shape[1], width=width)
    model = model.to(dev)
    x = torch.as_tensor(images, dtype=torch.float32, device=dev)
    y = torch.as_tensor(labels, dtype=torch.long, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps_per_epoch = max(1, -(-len(y) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    log = []
    model.train()
    for epoch in tqdm(range(epochs), desc="stage 1: train small-cnn", unit="epoch", disable=None, leave=False):
        perm = torch.randperm(len(y), generator=gen).to(dev)
        total = torch.zeros((), device=dev)
        for start in range(0, len(y), batch_size):
            idx = perm[start:start + batch_size]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
            loss = nn.functional.cross_entropy(model(shift_images(x[idx], dx, dy)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        log.append({"epoch": epoch, "loss": float(total) / len(y)})  # one device sync per epoch
    model.eval()
    weights_hash = hash_state(model)
    model = model.cpu()
    identity = {"kind": "builtin", "name": "small-cnn", "width": width, "epochs": epochs, "lr": lr,
                "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed}
    return Backbone(FeaturesOf(model, None, "features"), identity, weights_hash, log)


def shift_images(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Images ``(B, C, H, W)`` shifted by ``dx`` columns and ``dy`` rows (each in -1..1), zero padded."""
    if dx == 0 and dy == 0:
        return x
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def extract_chunks(
    backbone: Backbone,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: str = "auto",
    desc: str = "extract",
) -> Iterator[np.ndarray]:
    """Run the backbone over ``images`` (N, ...) in batches; yield ``(n_i, D)`` float32 chunks.

    On CUDA the forward runs under autocast (float16) and the features are cast back to float32.
    """
    if batch_size < 1:
        raise LongtailError(f"extraction batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    module = backbone.module.to(dev).eval()
    n = len(images)
    with torch.inference_mode(), tqdm(total=n, desc=desc, unit="img", disable=None, leave=False) as bar:
        for start in range(0, n, batch_size):
            xb = torch.as_tensor(np.asarray(images[start:start + batch_size]), dtype=torch.float32).to(dev)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                feats = module(xb)
            feats = feats.float()
            if not torch.isfinite(feats).all():
                raise LongtailError(f"backbone produced NaN or infinite features in rows {start}..{start + len(xb) - 1}")
            bar.update(len(xb))
            yield feats.cpu().numpy().astype(np.float32, copy=False)


def save_small_cnn(model: SmallCNN) -> bytes:
    """The trained built-in backbone as safetensors bytes (tensors only, never pickle)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state["_shape"] = torch.tensor([model.classifier.out_features, model.body[0][0].in_channels,
                                    model.body[0][0].out_channels])
    return save(state)


def load_small_cnn(data: bytes) -> SmallCNN:
    """Inverse of :func:`save_small_cnn`."""
    from safetensors.torch import load

    state = load(data)
    num_classes, in_channels, width = (int(v) for v in state.pop("_shape"))
    model = SmallCNN(num_classes, in_channels=in_channels, width=width)
    model.load_state_dict(state)
    return model.eval()
