#!/usr/bin/env python
"""Time every stage of longtail on a CUDA device, check it against the CPU, and write the GPU table.

Usage (from the repository root)::

    python benchmarks/bench_gpu.py --write-readme                 # on a GPU machine: the README's GPU table
    python benchmarks/bench_gpu.py --out gpu.md                   # the table into gpu.md (and gpu.json) only
    python benchmarks/bench_gpu.py --device cpu --tiny            # the same code on a tiny set, on the CPU
    python benchmarks/bench_gpu.py --from-json gpu.json --write-readme   # README from a saved run

One prepared script for a scarce GPU (issue 13, item 4): it must end within ``--budget-s`` (default
400 s, which keeps the whole run under 8 minutes on one H100 or H200 with 16 CPU cores) and keeps
what it measured if it is stopped (the table and the raw numbers are rewritten to ``--out`` and
``--out``'s ``.json`` after every run, and every run prints its time as it ends).

**Data.** The ImageNet-LT-shaped synthetic set of ``benchlib.py`` (train 115,846 x 2,048 float32,
1,000 classes, 1,280 down to 5 per class; val 10 and test 20 per class), generated chunk by chunk
into a Zarr feature store in a temporary directory, as ``bench_stages.py`` builds it, and read
back with ``open_store(...).read``. ``--tiny``: the same recipe at 2,000 x 64, 20 classes, every
head and flow at 1 epoch (the L-BFGS heads at 20 iterations), short runs not repeated.

**Stages** (run in :data:`PRIORITY` order, the ones the issue names first; ``--stages`` picks
some):

``extract``
    :func:`longtail.stages.extract.extract_chunks` (autocast float16 on CUDA) with the built-in
    :class:`~longtail.stages.extract.SmallCNN`, width ``D / 4`` so that its pooled features are
    ``D``-dimensional (2,048), randomly initialised (seeded), on seeded 8 x 8 one-channel images, as
    many as the train split has rows; the default extraction batch size.
``neighbours``
    The neighbour table Heuristic-CALA asks for (its :meth:`requirements`: exact cosine, its
    default ``K``) through :func:`longtail.stages.neighbours.build_table`: faiss on the GPU when the
    installed faiss has GPU support, else faiss on the CPU (the table says which ran).
each registered method (``ce``, ``crt``, ``heuristic-cala``, ... and ``dlsa+ce``)
    ``make_method(name, {"seed": 0, "device": ...}).fit(train, val)`` at its defaults; the shared
    artifacts it declares (a neighbour table, the DLSA cascade, a meta set) are built before the
    timed fit (the table and the cascade are their own stages), then the test logits.
``evaluate``
    :func:`longtail.stages.evaluate.evaluate` on ``ce``'s test logits: numpy, no CUDA path.
``dlsa-cascade``
    The DLSA flow cascade at its defaults (``dlsa+ce``'s cascade requirement: 3 filters, 30 flow
    epochs stopped on val likelihood, 500 clusters at this size).

**What each row gives.** The stage on the device at full size (``torch.cuda.synchronize`` around
every timed call; a run under :data:`SHORT_S` seconds is repeated ``--repeats`` times and the median
and best reported, a longer one runs once), its peak GPU memory (allocated by torch, beyond what
earlier stages hold; faiss' own is not counted), and test balanced accuracy for the methods. The
same stage on the CPU is the plain baseline, at a reduced row count where the full size is
unaffordable (the ``cmp_*`` sizes of :class:`Spec`; the table says which), with the device run again
at that same size: the ratio is CPU time over device time on the same rows. The comparison runs of
the methods train at most :data:`CMP_EPOCHS` epochs (:data:`CMP_FLOW_EPOCHS` flow epochs) with
``min_steps = 0`` on both devices (:func:`method_params`); the full-size runs keep every default.
The agreement check (CPU against the device, same rows) is, per stage:

* extraction: the largest absolute feature difference relative to the largest feature (float16
  autocast on CUDA against float32 on the CPU; tolerance :data:`TOL_EXTRACT`);
* neighbour table: the share of neighbour indices both tables have (ties may order differently;
  tolerance :data:`TOL_NEIGHBOUR_OVERLAP`) and the largest similarity difference;
* methods: (a) float tolerance: the device-fitted state loaded into a CPU method gives logits within
  :data:`TOL_LOGITS` (relative to the largest logit) of the device's; (b) training: the device's
  batches come from a generator on the device, so a CPU fit sees other batches (a nondeterministic
  difference, not a float one): the test balanced accuracies of the two fits, within
  :data:`TOL_ACC_POINTS` points (the share of equal predictions is given too);
* DLSA cascade: the device-fitted flows loaded on the CPU route the test rows with log-likelihoods
  within :data:`TOL_LOGLIK` (relative) and send at least :data:`TOL_SAME_GROUP` of them to the same
  group (the share for separately fitted flows is given too);
* evaluation: every metric of the ``ce`` fit from its device logits and from its CPU logits (state
  moved to the CPU), largest absolute difference.

**Budget.** Stage by stage, in :data:`PRIORITY` order: the device run at the comparison size, at full
size (each at most ``--stage-cap-s`` seconds, 3x that for the DLSA cascade, 2x for ``dlsa+ce``),
then the CPU baseline and the check (each at most ``--cpu-cap-s``; all of them together at most
``--cpu-share`` of the budget, after which the remaining CPU baselines are skipped). A run is
stopped (SIGALRM) when its time is up; once ``--budget-s`` is spent the remaining stages are
skipped. Skipped and stopped runs are said in their row. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, readme (also when imported by tests)

from benchlib import (  # noqa: E402  (benchmarks/benchlib.py)
    SYN_CHUNK_ROWS, SYN_CLASSES, SYN_DIM, SYN_MAX, SYN_MEAN_SCALE, SYN_MIN, SYN_SEED, SYN_SPLIT_IDS,
    SYN_TEST_PER_CLASS, SYN_TRAIN, SYN_VAL_PER_CLASS, cores, cpu_name, fmt_s, synthetic_chunks,
    synthetic_class_sizes, synthetic_labels, synthetic_means)

START_MARKER = "<!-- gpu-table:start -->"
END_MARKER = "<!-- gpu-table:end -->"
COMMAND = "python benchmarks/bench_gpu.py --write-readme"

#: a device run shorter than this is repeated (``--repeats``) and its median reported
SHORT_S = 2.0
#: agreement tolerances (CPU against the device, same rows; module docstring)
TOL_EXTRACT = 1e-2  # relative: float16 autocast against float32
TOL_NEIGHBOUR_OVERLAP = 0.99
TOL_SIM = 1e-3
TOL_LOGITS = 1e-3  # relative to the largest absolute logit (at least 1)
TOL_LOGLIK = 1e-3  # relative to the largest absolute log-likelihood (at least 1)
TOL_ACC_POINTS = 2.0
TOL_SAME_GROUP = 0.99  # a log-likelihood at a threshold may fall on either side
TOL_METRICS = 1e-3
#: the comparison runs (both devices, reduced size): at most this many epochs, and flow epochs (a flow
#: step of 256 rows at D = 2,048 took about 1.5 s on 2 busy cores)
CMP_EPOCHS = 10
CMP_FLOW_EPOCHS = 3
#: ``--tiny``: L-BFGS iterations of the full-batch heads (their ``max_iter``; the SGD ones run 1 epoch)
TINY_MAX_ITER = 20
#: the order of the stages: the ones the issue names first, so that a short budget keeps them
PRIORITY = ("extract", "neighbours", "ce", "evaluate", "dlsa-cascade", "heuristic-cala", "balanced-softmax",
            "logit-adjust", "cb-ce", "focal", "cosine", "ldam-drw", "crt", "lws", "tau-norm", "lade", "dlsa+ce")
#: the stages that are not methods
NON_METHODS = ("extract", "neighbours", "evaluate", "dlsa-cascade")
#: the composite methods run besides the registered ones
EXTRA_METHODS = ("dlsa+ce",)


class StageTimeout(Exception):
    """A run outlived the time it was given (SIGALRM)."""


# ===================================================================================== sizes
@dataclass(frozen=True)
class Spec:
    """The data set and the reduced sizes of the CPU comparison."""

    name: str
    classes: int
    dim: int
    train: int
    n_max: int
    n_min: int
    val_per_class: int
    test_per_class: int
    #: ``None``: every method at its defaults; else this many epochs (and flow epochs)
    epochs: int | None
    #: the comparison subset of the methods and the cascade: about this many train rows (class-stratified,
    #: at least one per class) and the first rows of each class in val and test
    cmp_train: int
    cmp_val_per_class: int
    cmp_test_per_class: int
    #: images of the extraction comparison; rows of the neighbour-table comparison
    cmp_extract: int
    cmp_neighbours: int
    #: the smaller subset of the DLSA cascade and ``dlsa+ce`` (its flows cost far more per row)
    cmp_dlsa_train: int
    cmp_dlsa_val_per_class: int
    cmp_dlsa_test_per_class: int


FULL = Spec("imagenet-lt-synthetic", SYN_CLASSES, SYN_DIM, SYN_TRAIN, SYN_MAX, SYN_MIN, SYN_VAL_PER_CLASS,
            SYN_TEST_PER_CLASS, None, cmp_train=2048, cmp_val_per_class=2, cmp_test_per_class=5,
            cmp_extract=1024, cmp_neighbours=16384, cmp_dlsa_train=1000, cmp_dlsa_val_per_class=1,
            cmp_dlsa_test_per_class=2)
TINY = Spec("tiny", 20, 64, 2000, 500, 5, 10, 20, 1, cmp_train=800, cmp_val_per_class=5, cmp_test_per_class=10,
            cmp_extract=1000, cmp_neighbours=1000, cmp_dlsa_train=500, cmp_dlsa_val_per_class=3,
            cmp_dlsa_test_per_class=5)


# ===================================================================================== data
def _labels(spec: Spec, split: str):
    """The labels of ``split``: ``benchlib``'s for the full set, the same recipe at ``spec``'s size else."""
    import numpy as np

    if spec == FULL:
        return synthetic_labels(split)
    if split == "train":
        sizes, _ = synthetic_class_sizes(spec.classes, spec.train, spec.n_max, spec.n_min)
    else:
        sizes = np.full(spec.classes, spec.val_per_class if split == "val" else spec.test_per_class, dtype=np.int64)
    labels = np.repeat(np.arange(spec.classes, dtype=np.int64), sizes)
    rng = np.random.default_rng([SYN_SEED, 100 + SYN_SPLIT_IDS[split]])
    return labels[rng.permutation(len(labels))]


def _chunks(spec: Spec, split: str, labels):
    """``(start, features, labels)`` chunks: ``benchlib.synthetic_chunks`` for the full set; at
    another size the same recipe, with the class means scaled by ``sqrt(2048 / D)`` so that two
    classes are as far apart (in noise standard deviations) as in the full set."""
    import numpy as np

    if spec == FULL:
        yield from synthetic_chunks(split, synthetic_means(), labels)
        return
    rng = np.random.default_rng([SYN_SEED, 0])
    means = rng.standard_normal((spec.classes, spec.dim), dtype=np.float32)
    means *= np.float32(SYN_MEAN_SCALE * math.sqrt(SYN_DIM / spec.dim))
    for j, start in enumerate(range(0, len(labels), SYN_CHUNK_ROWS)):
        lab = labels[start:start + SYN_CHUNK_ROWS]
        x = np.random.default_rng([SYN_SEED, 1 + SYN_SPLIT_IDS[split], j]).standard_normal(
            (len(lab), spec.dim), dtype=np.float32)
        x += means[lab]
        yield start, x, lab


def write_store(spec: Spec, url: str) -> dict:
    """Generate ``spec``'s set chunk by chunk into a feature store at ``url`` (as ``bench_stages.py``
    writes the synthetic set); returns the seconds it took and the split sizes."""
    import numpy as np

    from longtail.storage.featurestore import FeatureStoreWriter

    t0 = time.perf_counter()
    labels = {s: _labels(spec, s) for s in SYN_SPLIT_IDS}
    counts = np.bincount(labels["train"], minlength=spec.classes)
    fingerprint = json.dumps({"name": spec.name, "classes": spec.classes, "dim": spec.dim, "seed": SYN_SEED},
                             sort_keys=True)
    w = FeatureStoreWriter(
        url, class_names=[f"c{c:04d}" for c in range(spec.classes)], class_counts=counts.tolist(),
        backbone={"kind": "synthetic", "name": spec.name}, backbone_hash="synthetic",
        dataset_fingerprint=fingerprint, feature_dim=spec.dim, splits={s: len(v) for s, v in labels.items()},
        extra_attrs={"dataset": spec.name})
    for split, lab in labels.items():
        w.begin_split(split)
        for start, x, yl in _chunks(spec, split, lab):
            w.write_chunk(split, x, yl, index=np.arange(start, start + len(yl), dtype=np.int64))
        w.end_split(split)
    w.finish()
    return {"seconds": time.perf_counter() - t0, "splits": {s: len(v) for s, v in labels.items()}}


@dataclass
class Data:
    """The splits one run sees: the full set or a comparison subset."""

    name: str
    train: Any
    val: Any
    test: Any


def _first_per_class(labels, take) -> Any:
    """Sorted row numbers: the first ``take[c]`` rows of each class ``c`` (in row order)."""
    import numpy as np

    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(len(take)))
    return np.sort(np.concatenate([order[s:s + int(t)] for s, t in zip(starts, take)]))


def _subset(fs, rows, class_counts, name: str):
    return dataclasses.replace(fs, features=fs.features[rows], labels=fs.labels[rows], class_counts=class_counts,
                               index=None if fs.index is None else fs.index[rows],
                               attributes=None if fs.attributes is None else fs.attributes[rows], name=name, meta={})


def comparison_data(full: Data, train_rows: int, val_per_class: int, test_per_class: int,
                    name: str = "cmp") -> Data:
    """About ``train_rows`` train rows, class-stratified (``round(n_c * R / N)``, at least one per
    class), and the first ``val_per_class`` / ``test_per_class`` rows of each class in val and test;
    ``class_counts`` are the subset's own."""
    import numpy as np

    counts = full.train.class_counts
    n = int(counts.sum())
    take = np.maximum(1, np.floor(counts * (train_rows / n) + 0.5)).astype(np.int64)
    take = np.minimum(take, counts)
    rows = _first_per_class(full.train.labels, take)
    sub_counts = np.bincount(full.train.labels[rows], minlength=len(counts)).astype(np.int64)
    out = {"train": _subset(full.train, rows, sub_counts, "train")}
    for split, per in (("val", val_per_class), ("test", test_per_class)):
        fs = getattr(full, split)
        have = np.bincount(fs.labels, minlength=len(counts))
        out[split] = _subset(fs, _first_per_class(fs.labels, np.minimum(have, per)), sub_counts, split)
    return Data(name, out["train"], out["val"], out["test"])


def neighbour_data(full: Data, rows: int) -> Data:
    """The first ``rows`` train rows (the neighbour-table comparison)."""
    import numpy as np

    if rows >= len(full.train):
        return Data("cmp-nb", full.train, full.val, full.test)
    r = np.arange(rows)
    counts = np.bincount(full.train.labels[r], minlength=full.train.num_classes).astype(np.int64)
    return Data("cmp-nb", _subset(full.train, r, counts, "train"), None, None)


# ===================================================================================== timing
def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise :class:`StageTimeout` in this (main) thread after ``seconds`` (SIGALRM; a no-op off the
    main thread or where there is no ``setitimer``). A long C call finishes before the signal is
    handled."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise StageTimeout(f"stopped after {seconds:.0f} s (its time limit)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timed(fn: Callable[[], Any], device, repeats: int) -> tuple[dict, Any]:
    """Time ``fn()`` with a device sync before and after; a first run under :data:`SHORT_S` seconds is
    followed by ``repeats - 1`` more. Returns ``({"seconds": median, "best": ..., "times": [...]},
    the last result)``."""
    times: list[float] = []
    result = None
    while True:
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if times[0] >= SHORT_S or len(times) >= max(1, repeats):
            break
    return {"seconds": statistics.median(times), "best": min(times), "times": times}, result


def warm_up(device) -> None:
    """Before anything is timed: start the device's context, cuBLAS and cuDNN (a matrix product and a
    float16 convolution) and do the lazy imports of a first fit (an L-BFGS and an SGD head on 64
    random rows)."""
    import numpy as np
    import torch

    from longtail.stages.data import FeatureSet
    from longtail.stages.registry import make_method

    dev = torch.device(device)
    x = torch.ones(64, 64, device=dev)
    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
        (x @ x).sum().item()
        torch.nn.functional.conv2d(x.view(1, 1, 64, 64), torch.ones(4, 1, 3, 3, device=dev)).sum().item()
    rng = np.random.default_rng(0)
    labels = np.arange(64) % 4
    train = FeatureSet(rng.standard_normal((64, 8), dtype=np.float32), labels, np.bincount(labels), "abcd")
    for name, params in (("ce", {"max_iter": 3}), ("cosine", {"epochs": 1, "min_steps": 0})):
        make_method(name, {"seed": 0, "device": str(dev), **params}).fit(train).logits(train.features)
    _sync(dev)


def _gpu_peak_reset(device) -> float:
    """Reset the peak-memory counter; returns the bytes allocated now (what earlier stages hold)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    return 0.0


def _gpu_peak_mib(device, held: float) -> float | None:
    """The peak allocated GPU memory since :func:`_gpu_peak_reset` beyond the ``held`` bytes."""
    import torch

    if torch.device(device).type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - held) / 2**20
    return None


# ===================================================================================== the stages
@dataclass
class Context:
    """What the stages share: the spec, repeats, data sets, built artifacts, the full ``ce`` fit."""

    spec: Spec
    repeats: int
    data: dict[str, Data] = field(default_factory=dict)
    artifacts: dict[tuple, Any] = field(default_factory=dict)
    ce_full: dict = field(default_factory=dict)


def _rows(stage: str, data: Data, ctx: Context) -> int:
    if stage == "extract":
        return ctx.spec.train if data.name == "full" else ctx.spec.cmp_extract
    return len(data.train)


def _default(cls, key: str) -> Any:
    return inspect.signature(cls.__init__).parameters[key].default


def method_params(name: str, device: str, epochs: int | None, comparison: bool = False) -> dict:
    """``{"seed": 0, "device": device}`` for ``name``'s base and for every wrapper of the name that
    takes them (nested under its name), so that no part of the method falls back to ``device: auto``.

    ``epochs`` (``--tiny``): that many epochs (``flow_epochs`` for ``dlsa``) and
    :data:`TINY_MAX_ITER` L-BFGS iterations. ``comparison`` (the reduced-size runs, the same on both
    devices): at most :data:`CMP_EPOCHS` epochs and :data:`CMP_FLOW_EPOCHS` flow epochs, and
    ``min_steps = 0``: the SGD heads'
    floor of 5,000 steps would otherwise make a 2,000-row fit as long as the full-size one. Both
    devices then do the same work, so their ratio and their agreement are like for like; the
    full-size runs keep every default."""
    from longtail.stages.registry import METHODS, PREFIX_WRAPPERS, SUFFIX_WRAPPERS, parse_name

    parsed = parse_name(name)
    base = METHODS[parsed.base]
    base_names = base._param_names()
    params: dict[str, Any] = {k: v for k, v in (("seed", 0), ("device", device)) if k in base_names}
    if "epochs" in base_names and (epochs is not None or comparison):
        params["epochs"] = int(epochs) if epochs is not None else min(int(_default(base, "epochs")), CMP_EPOCHS)
    if epochs is not None and "max_iter" in base_names:
        params["max_iter"] = TINY_MAX_ITER
    if (comparison or epochs is not None) and "min_steps" in base_names:
        params["min_steps"] = 0
    for w in parsed.prefixes + parsed.suffixes:
        cls = PREFIX_WRAPPERS.get(w) or SUFFIX_WRAPPERS[w]
        names = cls._param_names()
        sub = {k: v for k, v in (("seed", 0), ("device", device)) if k in names}
        if "flow_epochs" in names and (epochs is not None or comparison):
            sub["flow_epochs"] = int(epochs) if epochs is not None else min(int(_default(cls, "flow_epochs")),
                                                                          CMP_FLOW_EPOCHS)
        if sub:
            params[w] = sub
    return params


def _artifact_key(req, data: Data, device: str) -> tuple:
    params = {k: v for k, v in dict(req.params).items() if k != "device"}
    return (req.kind, json.dumps(params, sort_keys=True, default=str), data.name, str(device))


def _attach(method, data: Data, device: str, ctx: Context) -> float:
    """Build (or take from an earlier stage) every shared artifact ``method`` declares and attach it;
    returns the seconds spent building."""
    spent = 0.0
    splits = {"train": data.train, "val": data.val, "test": data.test}
    for req in method.requirements():
        key = _artifact_key(req, data, device)
        if key not in ctx.artifacts:
            t0 = time.perf_counter()
            args = (splits[req.split],) + ((data.val,) if req.with_val else ())
            ctx.artifacts[key] = req.build(*args)
            _sync(device)
            spent += time.perf_counter() - t0
        req.attach(ctx.artifacts[key])
    return spent


def _balanced_accuracy(logits, test, train) -> float:
    from longtail.stages.evaluate import evaluate

    return float(evaluate(logits, test.labels, train.class_counts)["balanced_accuracy"])


def run_method(name: str) -> Callable[[Data, str, Context], dict]:
    def run(data: Data, device: str, ctx: Context) -> dict:
        from longtail.stages.registry import make_method

        params = method_params(name, device, ctx.spec.epochs, comparison=data.name != "full")
        method = make_method(name, params)
        artifacts_s = _attach(method, data, device, ctx)
        fit, _ = timed(lambda: method.fit(data.train, data.val), device, ctx.repeats)
        logits_t, logits = timed(lambda: method.logits(data.test.features), device, ctx.repeats)
        out = {**fit, "logits_s": logits_t["seconds"], "artifacts_s": artifacts_s,
               "balanced_accuracy": _balanced_accuracy(logits, data.test, data.train),
               "epochs": method.chain()[-1].get_params().get("epochs"),
               "_logits": logits, "_state": method.state_dict(), "_params": params}
        if name == "ce" and data.name == "full":
            ctx.ce_full.update(logits=logits, state=out["_state"], params=params, device=device)
        return out

    return run


def check_method(name: str) -> Callable[[dict, dict, Data, Context], dict]:
    def check(dev: dict, cpu: dict, data: Data, ctx: Context) -> dict:
        import numpy as np

        from longtail.stages.registry import make_method

        moved = make_method(name, method_params(name, "cpu", ctx.spec.epochs, comparison=True))
        moved.load_state_dict(dev["_state"])
        diff = float(np.abs(moved.logits(data.test.features) - dev["_logits"]).max())
        scale = max(1.0, float(np.abs(dev["_logits"]).max()))
        acc_diff = 100.0 * abs(cpu["balanced_accuracy"] - dev["balanced_accuracy"])
        same_pred = float((cpu["_logits"].argmax(axis=1) == dev["_logits"].argmax(axis=1)).mean())
        ok = diff <= TOL_LOGITS * scale and acc_diff <= TOL_ACC_POINTS
        return {"ok": ok, "text": f"logits max abs diff {diff:.2g} (largest {scale:.3g}; device state on the CPU); "
                                  f"separate fits: bal. acc. {100 * cpu['balanced_accuracy']:.1f} vs "
                                  f"{100 * dev['balanced_accuracy']:.1f}, {100 * same_pred:.0f}% same predictions",
                "logits_max_abs_diff": diff, "logits_scale": scale, "balanced_accuracy_diff_points": acc_diff,
                "same_predictions": same_pred}

    return check


def _images(n: int, seed: int = 7):
    import numpy as np

    return np.random.default_rng([SYN_SEED, seed]).standard_normal((n, 1, 8, 8), dtype=np.float32)


def run_extract(data: Data, device: str, ctx: Context) -> dict:
    import numpy as np
    import torch

    from longtail.stages import extract as ex

    n = _rows("extract", data, ctx)
    images = _images(n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SYN_SEED)
        net = ex.SmallCNN(ctx.spec.classes, in_channels=1, width=max(1, ctx.spec.dim // 4)).eval()
    backbone = ex.Backbone(ex.FeaturesOf(net, None, "features"), {}, "")
    bs = inspect.signature(ex.extract_chunks).parameters["batch_size"].default  # the config's default too
    keep = data.name != "full"  # the comparison keeps its features; the full run streams them away

    def work():
        out = []
        for chunk in ex.extract_chunks(backbone, images, batch_size=bs, device=device, desc="extract"):
            if keep:
                out.append(chunk)
        return np.concatenate(out) if keep else None

    t, feats = timed(work, device, ctx.repeats)
    return {**t, "images_per_s": n / t["seconds"], "batch_size": bs, "feature_dim": net.feature_dim,
            "_features": feats}


def check_extract(dev: dict, cpu: dict, data: Data, ctx: Context) -> dict:
    import numpy as np

    diff = float(np.abs(dev["_features"] - cpu["_features"]).max())
    scale = max(float(np.abs(cpu["_features"]).max()), 1e-12)  # guards an all-zero output
    rel = diff / scale
    return {"ok": rel <= TOL_EXTRACT, "text": f"max abs difference {rel:.2g} x the largest feature magnitude",
            "relative_max_abs_diff": rel}


def _table_requirement(device: str, ctx: Context):
    from longtail.stages.registry import make_method

    method = make_method("heuristic-cala", method_params("heuristic-cala", device, ctx.spec.epochs))
    return next(r for r in method.requirements() if r.kind == "neighbours")


def run_neighbours(data: Data, device: str, ctx: Context) -> dict:
    import faiss

    req = _table_requirement(device, ctx)
    t, table = timed(lambda: req.build(data.train), device, ctx.repeats)
    ctx.artifacts[_artifact_key(req, data, device)] = table
    gpu = (_device_type(device) == "cuda" and hasattr(faiss, "StandardGpuResources")
           and faiss.get_num_gpus() > 0 and table.k + 1 <= 2048)  # neighbours._gpu_id's rule
    return {**t, "k": table.k, "faiss": f"faiss {faiss.__version__} on the {'GPU' if gpu else 'CPU'}",
            "_indices": table.indices, "_sims": table.similarities}


def check_neighbours(dev: dict, cpu: dict, data: Data, ctx: Context) -> dict:
    import numpy as np

    a, b = dev["_indices"], cpu["_indices"]
    same = sum(len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(a, b)) / float(a.size)
    sim = float(np.abs(dev["_sims"] - cpu["_sims"]).max())
    return {"ok": same >= TOL_NEIGHBOUR_OVERLAP and sim <= TOL_SIM,
            "text": f"{100 * same:.2f}% of neighbours in both tables; similarity max abs diff {sim:.2g}",
            "overlap": same, "sim_max_abs_diff": sim}


def _cascade_requirement(device: str, ctx: Context, comparison: bool):
    from longtail.stages.registry import make_method

    method = make_method("dlsa+ce", method_params("dlsa+ce", device, ctx.spec.epochs, comparison))
    return next(r for r in method.requirements() if r.kind == "dlsa-cascade"), method


def run_cascade(data: Data, device: str, ctx: Context) -> dict:
    req, _ = _cascade_requirement(device, ctx, comparison=data.name != "full")
    t, cascade = timed(lambda: req.build(data.train, data.val), device, ctx.repeats)
    ctx.artifacts[_artifact_key(req, data, device)] = cascade
    routing = cascade.route(data.test.features)
    return {**t, "filters": len(cascade.filters_), "test_groups": routing.counts(),
            "_state": cascade.state_dict(), "_loglik": routing.log_likelihood.cpu().numpy(),
            "_stage": routing.stage.cpu().numpy()}


def check_cascade(dev: dict, cpu: dict, data: Data, ctx: Context) -> dict:
    import numpy as np

    _, method = _cascade_requirement("cpu", ctx, comparison=True)
    moved = method.make_cascade().load_state_dict(dev["_state"])
    routing = moved.route(data.test.features)
    ll, stage = routing.log_likelihood.cpu().numpy(), routing.stage.cpu().numpy()
    both = np.isfinite(ll) & np.isfinite(dev["_loglik"])
    diff = float(np.abs(ll[both] - dev["_loglik"][both]).max()) if both.any() else 0.0
    scale = max(1.0, float(np.abs(dev["_loglik"][both]).max()) if both.any() else 1.0)
    same = float((stage == dev["_stage"]).mean())
    trained = float((cpu["_stage"] == dev["_stage"]).mean())
    ok = diff <= TOL_LOGLIK * scale and same >= TOL_SAME_GROUP
    return {"ok": ok, "text": f"log-lik. max abs diff {diff:.2g} (scale {scale:.3g}), {100 * same:.1f}% same "
                              f"group (device flows on the CPU); separate fits: {100 * trained:.0f}% same group",
            "loglik_max_abs_diff": diff, "same_group": same, "same_group_separate_fits": trained}


def run_evaluate(data: Data, device: str, ctx: Context) -> dict:
    from longtail.stages.evaluate import evaluate

    if not ctx.ce_full:
        raise StageTimeout("no full-size ce fit to evaluate (ce did not run)")
    logits = ctx.ce_full["logits"]
    t, metrics = timed(lambda: evaluate(logits, data.test.labels, data.train.class_counts), device, ctx.repeats)
    return {**t, "logits_shape": list(logits.shape), "_metrics": metrics}


def check_evaluate(dev: dict, cpu: dict, data: Data, ctx: Context) -> dict:
    from longtail.stages.evaluate import evaluate
    from longtail.stages.registry import make_method

    moved = make_method("ce", method_params("ce", "cpu", ctx.spec.epochs)).load_state_dict(ctx.ce_full["state"])
    cpu_metrics = evaluate(moved.logits(data.test.features), data.test.labels, data.train.class_counts)
    diffs = [abs(float(cpu_metrics[k]) - float(v)) for k, v in dev["_metrics"].items()
             if isinstance(v, float) and math.isfinite(v)]
    diff = max(diffs, default=0.0)
    return {"ok": diff <= TOL_METRICS, "text": f"every metric from CPU and device logits of the same `ce` fit: "
                                               f"max abs diff {diff:.2g}", "metrics_max_abs_diff": diff}


def _device_type(device: str) -> str:
    import torch

    return torch.device(device).type


@dataclass(frozen=True)
class Stage:
    key: str
    label: str
    run: Callable[[Data, str, Context], dict]
    check: Callable[[dict, dict, Data, Context], dict]
    #: the data sets: (full, comparison); ``None`` comparison: the full set on the CPU too
    cmp: str | None = "cmp"
    #: a device run may take ``--stage-cap-s`` times this
    cap_factor: float = 1.0


def stage_list(selected: list[str] | None) -> list[Stage]:
    """Every stage in :data:`PRIORITY` order, then the other registered methods (sorted); ``selected``:
    only those keys (``heads`` stands for every method)."""
    from longtail.stages.errors import LongtailError
    from longtail.stages.registry import known_methods

    methods = list(known_methods()) + list(EXTRA_METHODS)
    keys = [k for k in PRIORITY if k in NON_METHODS or k in methods]
    keys += [m for m in methods if m not in keys]
    if selected is not None:
        want = set()
        for s in selected:
            if s == "heads":
                want.update(methods)
            elif s in keys:
                want.add(s)
            else:
                raise LongtailError(f"--stages: unknown stage {s!r} (known: heads, {', '.join(keys)})")
        keys = [k for k in keys if k in want]
    out = []
    for k in keys:
        if k == "extract":
            out.append(Stage(k, "extract (small CNN; autocast on CUDA)", run_extract, check_extract, cmp="cmp-ex"))
        elif k == "neighbours":
            out.append(Stage(k, "neighbour table (flat, cosine)", run_neighbours, check_neighbours, cmp="cmp-nb"))
        elif k == "evaluate":
            out.append(Stage(k, "evaluate (`ce` test logits)", run_evaluate, check_evaluate, cmp=None))
        elif k == "dlsa-cascade":
            out.append(Stage(k, "DLSA flow cascade", run_cascade, check_cascade, cmp="cmp-dlsa", cap_factor=3.0))
        elif k.startswith("dlsa+"):  # on the cascade's subset, which gives it the cascade fitted there
            out.append(Stage(k, f"`{k}` fit", run_method(k), check_method(k), cmp="cmp-dlsa", cap_factor=2.0))
        else:
            out.append(Stage(k, f"`{k}` fit", run_method(k), check_method(k)))
    return out


# ===================================================================================== the run
def _public(d: dict | None) -> dict | None:
    """``d`` without its private (``_``) entries: what goes into the JSON."""
    if d is None:
        return None
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _try(fn: Callable[[], dict], seconds: float | None) -> dict:
    """``fn()`` under a deadline; a stop or a failure becomes ``{"error": ...}`` (the run goes on)."""
    try:
        with deadline(seconds):
            return fn()
    except StageTimeout as exc:
        return {"error": str(exc), "stopped": True}
    except Exception as exc:  # noqa: BLE001  (any failure of one stage is reported in its row)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"error": f"{type(exc).__name__}: {first}"}


class Runner:
    def __init__(self, args, device: str, ctx: Context, t_start: float, facts: dict):
        self.args, self.device, self.ctx, self.t0, self.facts = args, device, ctx, t_start, facts
        self.rows: dict[str, dict] = {}
        self.setup: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    def save(self) -> None:
        """Rewrite the table and the JSON (after every run: a stopped script keeps what finished)."""
        doc = {"facts": {**self.facts, "total_s": self.elapsed()}, "setup": self.setup,
               "stages": [_public(r) for r in self.rows.values()], "args": _args_record(self.args)}
        if self.args.out:
            _write_atomic(_json_path(self.args.out), json.dumps(doc, indent=1, default=_json_default))
            _write_atomic(self.args.out, render(doc) + "\n")

    def run(self, stages: list[Stage]) -> None:
        """Every stage in order: on the device at the comparison size and at full size, then on the
        CPU at the comparison size and the agreement check. The CPU runs together may use
        ``--cpu-share`` of the budget; once it is spent the remaining CPU baselines are skipped, and
        once the whole budget is spent the remaining stages are."""
        self.cpu_spent = 0.0
        for st in stages:
            row = self.rows[st.key] = {"key": st.key, "label": st.label, "cmp_data": st.cmp or "full"}
            full = self.ctx.data["full"]
            cmp = self.ctx.data[st.cmp] if st.cmp else None
            row["full_rows"] = _rows(st.key, full, self.ctx)
            row["cmp_rows"] = _rows(st.key, cmp if cmp is not None else full, self.ctx)
            if self.left() <= 0:
                row["device_full"] = {"error": "skipped (budget spent)", "stopped": True}
                row["cpu"] = {"error": "skipped (budget spent)", "stopped": True}
                self.say(f"{st.key}: skipped (budget)")
            else:
                self._device(st, row, full, cmp)
                self._cpu(st, row)
            self.save()

    def _device(self, st: Stage, row: dict, full: Data, cmp: Data | None) -> None:
        cap = self.args.stage_cap_s * st.cap_factor
        if cmp is not None:
            _gpu_peak_reset(self.device)
            row["_device_cmp"] = _try(lambda: st.run(cmp, self.device, self.ctx), min(self.left(), cap))
            row["device_cmp"] = _public(row["_device_cmp"])
            self._print(st.key, "device, comparison size", row["device_cmp"])
            self.save()
            if row["device_cmp"].get("stopped"):  # the full size would be stopped too
                row["device_full"] = {"error": "skipped: its comparison run was stopped", "stopped": True}
                return
        held = _gpu_peak_reset(self.device)
        result = _try(lambda: st.run(full, self.device, self.ctx), max(1.0, min(self.left(), cap)))
        row["device_full"] = _public(result)
        if "seconds" in result:
            row["device_full"]["gpu_peak_mib"] = _gpu_peak_mib(self.device, held)
        self._print(st.key, "device, full size", row["device_full"])
        self.save()
        if cmp is None:  # the full run is the comparison run (the full result's arrays are dropped else)
            row["_device_cmp"], row["device_cmp"] = result, row["device_full"]

    def _cpu(self, st: Stage, row: dict) -> None:
        dev = row.get("_device_cmp")
        if dev is None or "error" in dev:
            row["cpu"] = {"error": "no device run to compare with", "stopped": True}
            return
        cpu_left = self.args.budget_s * self.args.cpu_share - self.cpu_spent
        left = min(self.left(), self.args.cpu_cap_s, cpu_left)
        if left <= 1.0:
            why = "CPU share of the budget spent" if cpu_left <= 1.0 else "budget spent"
            row["cpu"] = {"error": f"skipped ({why})", "stopped": True}
            self.say(f"{st.key}: CPU baseline skipped ({why})")
            return
        data = self.ctx.data[st.cmp] if st.cmp else self.ctx.data["full"]
        t0 = time.perf_counter()
        row["_cpu"] = _try(lambda: st.run(data, "cpu", self.ctx), left)
        row["cpu"] = _public(row["_cpu"])
        self._print(st.key, "CPU, comparison size", row["cpu"])
        self.save()
        if "error" not in row["_cpu"]:
            row["check"] = _try(lambda: st.check(dev, row["_cpu"], data, self.ctx), max(5.0, self.left()))
            self.say(f"{st.key}: check {'ok' if row['check'].get('ok') else 'FAILED'}: "
                     f"{row['check'].get('text', row['check'].get('error'))}")
        self.cpu_spent += time.perf_counter() - t0
        for key in ("_cpu", "_device_cmp"):  # their arrays are not needed any more
            row.pop(key, None)

    def _print(self, key: str, what: str, r: dict) -> None:
        if "seconds" in r:
            extra = f", best {fmt_s(r['best'])} of {len(r['times'])}" if len(r["times"]) > 1 else ""
            self.say(f"{key}: {what}: {fmt_s(r['seconds'])}{extra}")
        else:
            self.say(f"{key}: {what}: {r.get('error')}")


def _args_record(args) -> dict:
    return {k: getattr(args, k) for k in ("device", "tiny", "stages", "budget_s", "cpu_share", "cpu_cap_s",
                                          "stage_cap_s", "repeats")}


def _json_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".json"


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def machine_facts(device: str, threads: int) -> dict:
    import numpy as np
    import torch

    facts = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "cpu": cpu_name(), "cores": cores(), "torch_threads": threads, "python": platform.python_version(),
             "torch": torch.__version__, "cuda": torch.version.cuda, "numpy": np.__version__,
             "device": device}
    try:
        import faiss

        facts["faiss"] = faiss.__version__
        facts["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        facts["faiss"] = "absent"
    if torch.device(device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cudnn"] = torch.backends.cudnn.version()
        props = torch.cuda.get_device_properties(device)
        facts["gpu_memory_gib"] = props.total_memory / 2**30
    return facts


# ===================================================================================== rendering
def _fmt_time(r: dict | None) -> str:
    if not r:
        return "—"
    if "seconds" not in r:
        return (r.get("error") or "—").replace("|", "/")
    if len(r["times"]) > 1:
        return f"{fmt_s(r['seconds'])} (median of {len(r['times'])}, best {fmt_s(r['best'])})"
    return f"{fmt_s(r['seconds'])} (1 run)"


def _row(r: dict, dev_name: str) -> str:
    full, cmpd, cpu, chk = r.get("device_full"), r.get("device_cmp"), r.get("cpu"), r.get("check")
    label = r["label"]
    extra = []
    if full and "faiss" in full:
        extra.append(f"{full['faiss']}, K = {full['k']}")
    if full and "images_per_s" in full:
        extra.append(f"{full['images_per_s']:,.0f} images/s, batch {full['batch_size']}")
    if full and full.get("artifacts_s"):
        extra.append(f"+ {fmt_s(full['artifacts_s'])} to build its shared artifacts, untimed")
    if full and "filters" in full:
        extra.append(f"test rows per group {full['test_groups']}")
    if r["key"] == "evaluate":
        extra.append("numpy on the CPU: no CUDA path")
    if extra:
        label += f" ({'; '.join(extra)})"
    acc = f"{100 * full['balanced_accuracy']:.1f}" if full and "balanced_accuracy" in full else ""
    peak = f"{full['gpu_peak_mib']:,.0f}" if full and full.get("gpu_peak_mib") is not None else "—"
    same = r["cmp_rows"] == r["full_rows"]
    if cpu and "seconds" in cpu and cmpd and "seconds" in cmpd:
        ratio = f"**{cpu['seconds'] / cmpd['seconds']:.1f}x**" if cmpd["seconds"] > 0 else "n/a"  # guards 0
    else:
        ratio = "—"
    if r["key"] == "evaluate":
        ratio = "1x (same code)"
    dev_same = "same run" if same and r["cmp_data"] == "full" else _fmt_time(cmpd)
    if chk is None:
        check = "—"
    elif "error" in chk:
        check = f"check failed to run: {chk['error']}"
    else:
        check = f"{'ok' if chk['ok'] else '**DIFFERS**'}: {chk['text']}"
    return (f"| {label} | {r['full_rows']:,} | {_fmt_time(full)} | {acc} | {peak} | {r['cmp_rows']:,} | "
            f"{_fmt_time(cpu)} | {dev_same} | {ratio} | {check.replace('|', '/')} |")


def render(doc: dict) -> str:
    f, setup, args = doc["facts"], doc.get("setup", {}), doc.get("args", {})
    dev = f["device"]
    gpu = f"GPU **{f['gpu']}** ({f['gpu_memory_gib']:.0f} GiB), " if "gpu" in f else "**no GPU** (device `cpu`), "
    faiss_txt = f"faiss {f.get('faiss')} ({'with' if f.get('faiss_gpus') else 'without'} GPU support)"
    cuda = f" (CUDA {f['cuda']}, cuDNN {f.get('cudnn')})" if f.get("cuda") else ""
    run = "" if not args.get("tiny") and not args.get("stages") else (
        f" This run: `--device {args.get('device')}{' --tiny' if args.get('tiny') else ''}"
        f"{' --stages ' + args['stages'] if args.get('stages') else ''}`: "
        + ("a tiny set, not a performance figure." if args.get("tiny") else "some stages only."))
    lines = [
        f"_Measured {f['date']}: {gpu}{f['cores']} CPU cores ({f['cpu']}, torch threads {f['torch_threads']}); "
        f"Python {f['python']}, torch {f['torch']}{cuda}, {faiss_txt}, numpy {f['numpy']}; "
        f"{f.get('total_s', 0) / 60:.1f} minutes in all"
        + (f" over {f['runs']} runs (`--stages`), merged" if f.get("runs", 1) > 1 else "")
        + f" (budget {args.get('budget_s', 0):.0f} s a run). Reproduce with "
        f"`{COMMAND}`.{run}_",
        "",
    ]
    if setup:
        sp = setup.get("splits", {})
        lines += [
            f"Data: {setup.get('spec', '')}, train {sp.get('train', 0):,} x {setup.get('dim', 0):,}, "
            f"{setup.get('classes', 0):,} classes, val {sp.get('val', 0):,}, test {sp.get('test', 0):,}; generated "
            f"into a feature store in {fmt_s(setup.get('write_s', 0))} and read back in "
            f"{fmt_s(setup.get('read_s', 0))}. The CPU baseline of the methods runs on a class-stratified subset "
            f"({setup.get('cmp', '')}), that of the DLSA cascade and `dlsa+ce` on a smaller one "
            f"({setup.get('cmp_dlsa', '')}), the neighbour table's on the first rows of train, extraction's on "
            f"fewer images; the same subset runs on `{dev}` for the ratio.",
            "",
        ]
    lines += [
        f"| stage | rows | `{dev}` time, full size | test bal. acc. (%) | GPU memory peak (MiB) | CPU baseline rows "
        f"| CPU time | `{dev}` time, same rows | CPU / `{dev}` | agreement, CPU vs `{dev}` |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r, dev) for r in doc.get("stages", [])]
    lines += [
        "",
        "Times: `torch.cuda.synchronize()` before and after each timed call; a run under "
        f"{SHORT_S:g} s is repeated (median and best), a longer one runs once. Method rows time `fit(train, val)` "
        + ("at the defaults" if not args.get("tiny") else "at 1 epoch") + "; "
        "a neighbour table, DLSA cascade or meta set it needs is built before (the first two are their own rows). "
        + ("" if args.get("tiny") else
           f"The comparison runs (both devices) train at most {CMP_EPOCHS} epochs ({CMP_FLOW_EPOCHS} flow epochs) "
           "with `min_steps = 0`, so that the CPU baselines fit in the budget: the same work on both devices, hence "
           "a like-for-like ratio and check. ")
        + f"A run is stopped after {args.get('stage_cap_s', 0):.0f} s on `{dev}` (3x that for the DLSA cascade, 2x for "
        f"`dlsa+ce`) or "
        f"{args.get('cpu_cap_s', 0):.0f} s on the CPU, and stages are skipped once the budget is spent. "
        f"Agreement: methods: the `{dev}`-fitted state loaded into a CPU method gives the same logits within "
        f"{TOL_LOGITS:g} x the largest logit (float tolerance), and a CPU fit (whose batches come from another "
        f"generator: not comparable value by value) lands within {TOL_ACC_POINTS:g} points of test balanced "
        f"accuracy; extraction: float16 autocast against float32 within {TOL_EXTRACT:g} of the largest feature; "
        f"neighbour table: at least {100 * TOL_NEIGHBOUR_OVERLAP:g}% of neighbours shared (ties may order "
        "differently); DLSA cascade: the flows fitted on the device route the test rows on the CPU with the same "
        "log-likelihoods (float tolerance) and groups.",
    ]
    return "\n".join(lines)


def merge(docs: list[dict]) -> dict:
    """Saved runs on one machine as one: a stage's row from the first run that measured it at full
    size on the device (else from the first run that has it); rows in the order they first appear.
    ``ValueError`` for runs on different GPUs, devices or sizes."""
    first = docs[0]
    ident = ("gpu", "device")
    for d in docs[1:]:
        if any(d["facts"].get(k) != first["facts"].get(k) for k in ident) or (
                d.get("args", {}).get("tiny") != first.get("args", {}).get("tiny")):
            raise ValueError("the runs were made on different devices or at different sizes")
    rows: dict[str, dict] = {}
    for d in docs:
        for r in d["stages"]:
            old = rows.get(r["key"])
            if old is None or ("seconds" not in (old.get("device_full") or {})
                               and "seconds" in (r.get("device_full") or {})):
                rows[r["key"]] = r
    out = {**first, "stages": list(rows.values())}
    if len(docs) > 1:
        out["facts"] = {**first["facts"], "total_s": sum(d["facts"].get("total_s", 0.0) for d in docs),
                        "runs": len(docs)}
    return out


def _insert_performance(text: str | None, block: str) -> str:
    """README.md without the gpu-table markers: the block before ``### Heads at their defaults`` (the
    end of the Performance section), else at the end."""
    if text is None:
        return f"## Performance\n\n{block}\n"
    anchor = text.find("\n### Heads at their defaults")
    if anchor == -1:
        return text.rstrip("\n") + f"\n\n{block}\n"
    return text[:anchor].rstrip("\n") + f"\n\n{block}\n" + text[anchor:]


def _readme_worthy(doc: dict, args) -> bool:
    """Whether ``doc`` may go into the project's README: a full-size run on a GPU (another README,
    ``--readme``, takes any run). Says why not on stderr."""
    if args.readme is not None:
        return True
    if "gpu" not in doc["facts"] or doc.get("args", {}).get("tiny"):
        print("error: --write-readme: the README's GPU table takes a full-size run on a CUDA device, not a "
              f"{'--tiny ' if doc.get('args', {}).get('tiny') else ''}run on {doc['facts']['device']!r} "
              "(the table is in --out)", file=sys.stderr)
        return False
    return True


def write_readme(table: str, readme: str | None = None) -> None:
    from readme import README, write_section  # benchmarks/readme.py

    write_section(START_MARKER, END_MARKER, table, readme or README, if_missing=_insert_performance)


# ===================================================================================== main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (auto: CUDA when present)")
    p.add_argument("--tiny", action="store_true", help="2,000 x 64, 20 classes, 1 epoch: a check of the script")
    p.add_argument("--stages", default=None,
                   help="comma-separated stages (extract, neighbours, evaluate, dlsa-cascade, a method name, or "
                        "heads for every method); default all")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="seconds the whole run may take, setup included (default 400: a run stopped mid-way "
                        "may overrun by the C call in flight, and the whole stays under 8 minutes)")
    p.add_argument("--cpu-share", type=float, default=0.3,
                   help="share of the budget the CPU baselines and checks may use in all (default 0.3)")
    p.add_argument("--cpu-cap-s", type=float, default=45.0, help="at most this many seconds per CPU baseline")
    p.add_argument("--stage-cap-s", type=float, default=75.0,
                   help="at most this many seconds per device run (3x that for the DLSA cascade, 2x for dlsa+ce)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"runs of a stage under {SHORT_S:g} s (median reported; default 3, 1 with --tiny)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores; 1 with --tiny)")
    p.add_argument("--out", default="bench_gpu.md",
                   help="the table, rewritten after every run (the raw numbers beside it, .json)")
    p.add_argument("--write-readme", action="store_true", help="put the table into README.md between the "
                                                               "gpu-table markers")
    p.add_argument("--readme", default=None, help=argparse.SUPPRESS)  # another README (the tests)
    p.add_argument("--from-json", default=None,
                   help="render a saved run's .json (no benchmark is run); several, comma-separated, are merged "
                        "(a stage's row from the first run that measured it at full size)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 3
    if (args.repeats < 1 or args.budget_s <= 0 or not 0 <= args.cpu_share < 1 or args.cpu_cap_s <= 0
            or args.stage_cap_s <= 0 or (args.threads is not None and args.threads < 1)):
        p.error("--repeats and --threads must be >= 1, --budget-s and the caps > 0, 0 <= --cpu-share < 1")
    return args


def importable_longtail() -> str | None:
    """Make ``longtail`` importable from this checkout when it is not installed (a GPU image whose
    Python the project's pins do not match, where ``pip install -e .`` refuses): a temporary folder
    holding ``longtail/{stages,storage,pipeline,flows}`` as links to the repository's folders goes
    first on ``sys.path`` (``longtail`` is a namespace package, as installed). Returns the folder
    (the caller removes it), or None when ``longtail`` imports already."""
    try:
        import longtail.stages  # noqa: F401
        return None
    except ModuleNotFoundError as exc:
        if exc.name not in ("longtail", "longtail.stages"):
            raise  # a dependency is missing: links would not help
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = tempfile.mkdtemp(prefix="longtail-src-")
    os.mkdir(os.path.join(folder, "longtail"))
    for name in ("stages", "storage", "pipeline", "flows"):
        os.symlink(os.path.join(root, name), os.path.join(folder, "longtail", name))
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    print(f"longtail is not installed: importing it from {root}", file=sys.stderr)
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    linked = importable_longtail()
    try:
        return _main(args)
    finally:
        if linked:
            shutil.rmtree(linked, ignore_errors=True)


def _main(args) -> int:
    if args.from_json:
        docs = []
        for path in args.from_json.split(","):
            with open(path, encoding="utf-8") as f:
                docs.append(json.load(f))
        try:
            doc = merge(docs)
        except ValueError as exc:
            print(f"error: --from-json: {exc}", file=sys.stderr)
            return 2
        return _finish(doc, args)

    t_start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="longtail-gpu-bench-")
    import torch

    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if args.tiny else cores())  # tiny ops only lose to thread start-up
    torch.set_num_threads(threads)
    try:
        from longtail.stages.device import resolve_device
        from longtail.stages.errors import LongtailError
        from longtail.storage.featurestore import open_store

        try:
            device = str(resolve_device(args.device))
            stages = stage_list([s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None)
        except LongtailError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        spec = TINY if args.tiny else FULL
        facts = machine_facts(device, threads)
        if args.write_readme and not _readme_worthy({"facts": facts, "args": _args_record(args)}, args):
            return 2  # said before the run, not after it
        ctx = Context(spec, args.repeats)
        runner = Runner(args, device, ctx, t_start, facts)
        print("longtail GPU benchmark")
        for k, v in facts.items():
            print(f"  {k:<15s} {v}")
        print(f"  stages          {', '.join(s.key for s in stages)}", flush=True)

        url = os.path.join(workdir, "features.zarr")
        written = write_store(spec, url)
        t0 = time.perf_counter()
        store = open_store(url)
        full = Data("full", store.read("train"), store.read("val"), store.read("test"))
        read_s = time.perf_counter() - t0
        ctx.data["full"] = full
        ctx.data["cmp"] = comparison_data(full, spec.cmp_train, spec.cmp_val_per_class, spec.cmp_test_per_class)
        ctx.data["cmp-dlsa"] = comparison_data(full, spec.cmp_dlsa_train, spec.cmp_dlsa_val_per_class,
                                               spec.cmp_dlsa_test_per_class, "cmp-dlsa")
        ctx.data["cmp-nb"] = neighbour_data(full, spec.cmp_neighbours)
        ctx.data["cmp-ex"] = Data("cmp-ex", None, None, None)  # extraction makes its own images
        c, cd = ctx.data["cmp"], ctx.data["cmp-dlsa"]
        runner.setup = {"spec": spec.name, "splits": written["splits"], "dim": spec.dim, "classes": spec.classes,
                        "write_s": written["seconds"], "read_s": read_s,
                        "cmp": f"train {len(c.train):,}, val {len(c.val):,}, test {len(c.test):,} rows",
                        "cmp_dlsa": f"train {len(cd.train):,}, val {len(cd.val):,}, test {len(cd.test):,} rows"}
        runner.say(f"data: store written in {fmt_s(written['seconds'])}, read in {fmt_s(read_s)}; "
                   f"comparison subset {runner.setup['cmp']}")
        runner.save()
        warm_up(device)
        runner.run(stages)
        doc = {"facts": {**facts, "total_s": runner.elapsed()}, "setup": runner.setup,
               "stages": list(runner.rows.values()), "args": _args_record(args)}
        doc["stages"] = [_public(r) for r in doc["stages"]]
        print(f"\ntotal: {runner.elapsed():.0f} s", flush=True)
        return _finish(doc, args)
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(workdir, ignore_errors=True)


def _finish(doc: dict, args) -> int:
    """Print the table of ``doc`` and, with ``--write-readme``, put it into the README (exit status)."""
    table = render(doc)
    print()
    print(table)
    if args.write_readme:
        if not _readme_worthy(doc, args):
            return 2
        write_readme(table, args.readme)
        print("README.md: GPU table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
