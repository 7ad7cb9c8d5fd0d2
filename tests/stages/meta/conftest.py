"""Tiny long-tailed Gaussian problems for the meta-learned heads (a few ms per fit)."""

import numpy as np
import pytest
import torch
from torch import nn

from longtail.stages.data import FeatureSet
from longtail.stages.train.data import TrainData
from longtail.stages.train.engine import OptimConfig, TrainState, cosine_schedule

COUNTS = (40, 20, 10, 5)
NAMES = tuple("abcd")
#: a small minibatch SGD setting, passed explicitly to every head (and its non-meta base)
FIT = dict(epochs=4, lr=0.1, batch_size=16, min_steps=0, seed=3, device="cpu")  # exactly 4 epochs


def gaussians(counts, seed, dim=5):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(size=(len(counts), dim)) * 2
    y = np.repeat(np.arange(len(counts)), counts)
    return (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32), y


@pytest.fixture(scope="module")
def splits():
    x, y = gaussians(COUNTS, 0)
    xv, yv = gaussians([6] * len(COUNTS), 1)
    train = FeatureSet(x, y, np.array(COUNTS), NAMES, name="train")
    val = FeatureSet(xv, yv, np.array(COUNTS), NAMES, name="val")
    return train, val


def float64_state(seed=0, dim=3, classes=3, lr=0.5):
    """A bare float64 linear head and its state, for meta-gradients at a fixed ``θ``."""
    g = torch.Generator().manual_seed(seed)
    module = nn.Linear(dim, classes).double()
    with torch.no_grad():
        module.weight.copy_(torch.randn(classes, dim, generator=g, dtype=torch.float64) * 0.5)
        module.bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64) * 0.5)
    data = toy_data((7, 4, 2), seed + 1, dim)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    return TrainState(module, optimizer, cosine_schedule(optimizer, 1), torch.Generator(), data,
                      OptimConfig(epochs=1, lr=lr, batch_size=len(data)))


def toy_data(per_class, seed, dim=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.repeat_interleave(torch.arange(len(per_class)), torch.tensor(per_class))
    centres = 2.0 * torch.eye(len(per_class), dim, dtype=torch.float64)
    return TrainData(torch.randn(len(y), dim, generator=g, dtype=torch.float64) + centres[y], y)


def linear_ce_grad(W, b, x, y, row_weights):
    """``∇_{W,b} (1/n) Σ_i r_i CE(W x_i + b, y_i)`` in closed form: ``(1/n) Σ r_i (q_i − e_{y_i}) x_iᵀ``."""
    r = (torch.softmax(x @ W.T + b, 1) - torch.nn.functional.one_hot(y, W.shape[0]).double()) * row_weights[:, None]
    return r.T @ x / len(y), r.sum(0) / len(y)
