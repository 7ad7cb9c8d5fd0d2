"""Helpers shared by the scripts in ``benchmarks/``: the machine's cores and load, and the seeded
ImageNet-LT-shaped synthetic feature set.

The scripts import it as ``benchlib`` with this folder on ``sys.path``. Only the standard library
at module level: ``bench_stages.py``'s spawned children re-import it, and the idle child's RSS must
be that of a process that imports torch and nothing else of ours.
"""

from __future__ import annotations

import math
import os
import platform

#: the synthetic ImageNet-LT-shaped feature set
SYN_CLASSES = 1000
SYN_DIM = 2048
SYN_TRAIN = 115_846
SYN_MAX = 1280
SYN_MIN = 5
SYN_VAL_PER_CLASS = 10
SYN_TEST_PER_CLASS = 20
#: per-dimension standard deviation of the class means (the noise has standard deviation 1):
#: two class means are about ``0.1 * sqrt(2 * 2048) = 6.4`` noise standard deviations apart, so a
#: linear head separates well-sampled classes and struggles on 5-shot ones
SYN_MEAN_SCALE = 0.1
#: rows generated (and handed to the writer) at a time: 4096 x 2048 float32 = 32 MiB
SYN_CHUNK_ROWS = 4096
SYN_SEED = 0
SYN_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


# ===================================================================================== machine
def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def own_cpu_s() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def busy_seconds() -> float | None:
    """CPU seconds every process of the machine has used so far (``/proc/stat``), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ===================================================================================== synthetic ImageNet-LT
def _bisect(f, lo: float, hi: float, iters: int = 200) -> float:
    f_lo = f(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if (f(mid) > 0) == (f_lo > 0):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def synthetic_class_sizes(num_classes: int = SYN_CLASSES, total: int = SYN_TRAIN, n_max: int = SYN_MAX,
                          n_min: int = SYN_MIN):
    """Per-class train counts: a monotone Pareto (Lomax) profile with exact max, min and sum.

    ``n(i) = n_max * (1 + i / k) ** (-a)`` for ranks ``i = 0 .. C-1``: ``a = ln(n_max / n_min) /
    ln(1 + (C-1) / k)`` pins ``n(0) = n_max`` and ``n(C-1) = n_min``; the scale ``k`` is solved by
    bisection so that the real-valued sizes sum to ``total``. Rounding by largest remainder (floor
    every size, give the missing units to the largest fractional parts, ties to the lower rank)
    keeps the sum exact and the profile non-increasing. For ImageNet-LT's numbers
    (C = 1000, 115,846 images, 1,280..5) this gives k ~ 180.4, a ~ 2.954.
    """
    import numpy as np

    ranks = np.arange(num_classes, dtype=np.float64)

    def real(k: float) -> np.ndarray:
        a = math.log(n_max / n_min) / math.log1p((num_classes - 1) / k)
        return n_max * (1.0 + ranks / k) ** (-a)

    k = _bisect(lambda k: real(k).sum() - total, 1e-3, 1e7)
    x = real(k)
    sizes = np.floor(x).astype(np.int64)
    missing = int(total - sizes.sum())
    frac = x - sizes
    order = np.lexsort((ranks, -frac))  # largest fraction first, then lowest rank
    sizes[order[:missing]] += 1
    if not (sizes.sum() == total and sizes[0] == n_max and sizes[-1] == n_min and (np.diff(sizes) <= 0).all()):
        raise RuntimeError(f"synthetic profile failed its own checks (sum {sizes.sum()}, max {sizes[0]}, "
                           f"min {sizes[-1]})")  # a bug in this function, not user input
    return sizes, {"k": k, "a": math.log(n_max / n_min) / math.log1p((num_classes - 1) / k)}


def synthetic_labels(split: str):
    import numpy as np

    if split == "train":
        sizes, _ = synthetic_class_sizes()
    else:
        per = SYN_VAL_PER_CLASS if split == "val" else SYN_TEST_PER_CLASS
        sizes = np.full(SYN_CLASSES, per, dtype=np.int64)
    labels = np.repeat(np.arange(SYN_CLASSES, dtype=np.int64), sizes)
    rng = np.random.default_rng([SYN_SEED, 100 + SYN_SPLIT_IDS[split]])
    return labels[rng.permutation(len(labels))]


def synthetic_means():
    import numpy as np

    rng = np.random.default_rng([SYN_SEED, 0])
    means = rng.standard_normal((SYN_CLASSES, SYN_DIM), dtype=np.float32)
    means *= np.float32(SYN_MEAN_SCALE)
    return means


def synthetic_chunks(split: str, means, labels):
    """Yields ``(start, features (n, D) float32, labels (n,))``; chunk ``j`` of a split has its own
    seeded generator, so any process regenerates the same bytes."""
    import numpy as np

    for j, start in enumerate(range(0, len(labels), SYN_CHUNK_ROWS)):
        lab = labels[start:start + SYN_CHUNK_ROWS]
        rng = np.random.default_rng([SYN_SEED, 1 + SYN_SPLIT_IDS[split], j])
        x = rng.standard_normal((len(lab), SYN_DIM), dtype=np.float32)
        x += means[lab]
        yield start, x, lab


def synthetic_features(split: str, labels, means=None):
    """The features of ``split`` for ``labels`` (a prefix of :func:`synthetic_labels`), generated
    chunk by chunk into one float32 array (no second copy)."""
    import numpy as np

    x = np.empty((len(labels), SYN_DIM), dtype=np.float32)
    for start, chunk, _ in synthetic_chunks(split, synthetic_means() if means is None else means, labels):
        x[start:start + len(chunk)] = chunk
    return x


# ===================================================================================== formatting
def fmt_s(sec: float) -> str:
    if sec < 1e-3:
        return f"{sec * 1e6:.0f} µs"
    if sec < 1:
        return f"{sec * 1e3:.3g} ms"
    return f"{sec:.3g} s" if sec < 100 else f"{sec:.0f} s"
