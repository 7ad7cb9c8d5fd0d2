"""The train features a head fits on: their class-balanced moments and their standardisation.

:func:`balanced_moments` gives the mean and standard deviation every head standardises with
(:mod:`longtail.stages.heads`, whose docstring says why they are class-balanced; DLSA's cascade uses
them too), :func:`standardised_copy` the one standardised copy an accelerator gets and
:func:`host_tensor` the caller's array as a tensor without a copy (on the CPU, batches are
standardised as they are gathered: :class:`~longtail.stages.train.data.TrainData`'s ``transform``).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from longtail.stages.errors import LongtailError

__all__ = ["balanced_moments", "host_tensor", "standardised_copy", "MOMENTS_CHUNK", "MOMENTS_BLOCK"]

#: float64 values per chunk of :func:`balanced_moments` and rows x D float32 values per chunk of
#: :func:`standardised_copy` (1 MiB and 512 KiB: a chunk's temporaries stay in the CPU's cache; at
#: 100,000 x 512, chunks of 1,024 rows took 1.5 to 4 times as long as chunks of 256)
MOMENTS_CHUNK = 1 << 17
#: chunks per block of :func:`balanced_moments`: the unit of work of its threads (fixed, so that the
#: order of the sums, and with it the result, does not depend on the number of threads)
MOMENTS_BLOCK = 16


def balanced_moments(features: np.ndarray, labels: np.ndarray, num_classes: int,
                     chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced mean and standard deviation of ``features`` ``(N, D)``, float64 ``(D,)`` each.

    ``mean = (1/C) sum_c mean(x | y = c)`` and ``var = (1/C) sum_c mean((x - mean)^2 | y = c)``: the
    moments of the train distribution re-weighted to a uniform label prior. Both are weighted sums
    over the rows with ``w_i = 1 / (C n_{y_i})`` (``sum_i w_i = 1``): ``mean = sum_i w_i x_i`` and
    ``var = sum_i w_i (x_i - mean)^2``. Computed once per fit on the host arrays the features arrive
    in, in one pass over them in row order: chunks of ``chunk`` rows (default: 1 MiB of float64) are
    shifted by the first row ``K`` in float64 and give ``S1 = sum_i w_i (x_i - K)`` and ``S2 = sum_i
    w_i (x_i - K)^2``; then ``mean = K + S1 / W`` and ``var = S2 / W - (S1 / W)^2`` with ``W = sum_i
    w_i`` (the shifted-data formula, Chan, Golub and LeVeque 1983: with ``K`` a sample of the data
    the subtraction loses no more than a few float64 digits, far from float32 resolution).
    Deterministic: the sums are ``np.einsum`` loops in a fixed order (no threaded BLAS), over fixed
    blocks of :data:`MOMENTS_BLOCK` chunks whose partial sums are added in block order; the blocks
    run on up to ``torch.get_num_threads()`` threads (NumPy releases the GIL), which changes the
    time, not the result.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise LongtailError(f"balanced standardisation: class {int(np.argmin(counts))} has no train sample")
    weights = (1.0 / (num_classes * counts))[labels]  # guarded: every count > 0
    n, d = features.shape
    rows = max(1, MOMENTS_CHUNK // d) if chunk is None else int(chunk)  # d >= 1: FeatureSet rejects 0
    shift = np.asarray(features[0], dtype=np.float64)

    def block_sums(lo: int) -> tuple[np.ndarray, np.ndarray]:
        s1, s2 = np.zeros(d), np.zeros(d)
        buf = np.empty((min(rows, n), d))
        for start in range(lo, min(lo + rows * MOMENTS_BLOCK, n), rows):
            part = features[start:start + rows]
            dev = np.subtract(part, shift, out=buf[:len(part)], dtype=np.float64)
            w = weights[start:start + rows]
            s1 += np.einsum("i,ij->j", w, dev)
            s2 += np.einsum("i,ij->j", w, np.square(dev, out=dev))
        return s1, s2

    starts = range(0, n, rows * MOMENTS_BLOCK)
    workers = min(max(1, torch.get_num_threads()), len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(block_sums, starts))  # in block order, whatever thread ran each
    else:
        parts = [block_sums(lo) for lo in starts]
    s1, s2 = parts[0]
    for p1, p2 in parts[1:]:
        s1, s2 = s1 + p1, s2 + p2
    total = weights.sum()  # > 0: a sum of positive weights, ~1
    mean_k = s1 / total
    var = np.maximum(s2 / total - np.square(mean_k), 0.0)  # rounding may leave -1e-17 for a constant column
    return shift + mean_k, np.sqrt(var)


def host_tensor(features: np.ndarray) -> torch.Tensor:
    """``features`` as a CPU tensor sharing its memory (a copy only for negative strides). A
    read-only array (a memory-mapped store) is shared too, without torch's warning: the training
    engine only reads it (:class:`~longtail.stages.train.data.TrainData` transforms gathered copies)."""
    src = np.ascontiguousarray(features)  # torch takes no negative strides
    if src.flags.writeable:
        return torch.from_numpy(src)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(src)


def standardised_copy(features: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(features - mean) / std`` as a new float32 tensor on ``mean``'s device: the one copy of the
    features a fit keeps, filled chunk by chunk (no full-size temporaries; on an accelerator the
    chunks are what goes to the device anyway), with the same float32 operations as ``(x - mean) /
    std`` on the whole array, so the same values."""
    n, d = features.shape
    out = torch.empty((n, d), dtype=torch.float32, device=mean.device)
    rows = max(1, MOMENTS_CHUNK // d)  # d >= 1: FeatureSet rejects 0
    for start in range(0, n, rows):
        part = out[start:start + rows]
        part.copy_(host_tensor(features[start:start + rows]))
        part.sub_(mean).div_(std)
    return out
