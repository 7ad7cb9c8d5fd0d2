#!/usr/bin/env python
"""Time every stage of longtail and write the README's performance table.

Usage (from the repository root)::

    python benchmarks/bench_stages.py --dataset all --write-readme
    python benchmarks/bench_stages.py --dataset digits-lt --heads ce,lws --device cpu

Two data sets:

``digits-lt``
    The built-in data set with the default config: stage-1 small-CNN training, extraction
    throughput of the trained backbone, feature-store write and read, and the fit of every
    registered head (default epochs) plus ``ce+pc``.

``imagenet-lt-synthetic``
    A synthetic feature set shaped like ImageNet-LT (115,846 x 2,048 float32 train features,
    1,000 classes, 1,280 down to 5 images per class; see :func:`synthetic_class_sizes`), with a
    balanced val (10 per class) and test (20 per class) split. It is generated chunk by chunk
    (seeded) straight into a Zarr feature store in a temporary directory. Heads run ``--epochs``
    epochs and are reported in seconds per epoch.

Paired head fits (``--heads-only``, and the last part of ``--dataset all``): minibatch heads at 3
epochs side by side with the plain loop, in one process, on a seeded 100,000 x 512 store and on
the ImageNet-LT-shaped one (issue 13's targets). ``--dataset all --write-readme`` writes both
README blocks, ``--heads-only --write-readme`` only this one.

Every number is a ratio against a plain baseline as well as an absolute value (DESIGN.md,
"Speed is measured in benchmarks/"): ``np.save`` / ``np.load`` of the same arrays for the store, a
plain torch loop training ``nn.Linear`` with ``F.cross_entropy`` (same epochs, batch size, lr,
weight decay, SGD with momentum, same tensors) for the heads.

Every timed stage runs in a fresh process (multiprocessing, spawn context) whose
``ru_maxrss`` is reported as its peak memory; that is the peak RSS of the whole process, Python,
torch and longtail included, so the script also reports the peak RSS of an idle child that only
imports torch. Times use ``time.perf_counter`` (with ``torch.cuda.synchronize`` on CUDA), a
warm-up where it matters and the median of at least ``--repeats`` runs for the short stages; the
large-set head epochs run once. On the small set a head and its baseline alternate in one
process; a store read and ``np.load`` of the same arrays always do (best of the rounds, issue 13).

Shared machines: before each stage the script waits (``--quiet-wait``) until other processes leave
the CPU, throws away timed runs during which they used more than a quarter of a core (measured
from ``/proc/stat``) and marks with a dagger what it could only measure under contention. Nothing
here asserts a time.
"""

from __future__ import annotations

# Only the standard library at module level: every spawned child re-imports this module, and the
# idle child's RSS must be that of a process that imports torch and nothing else of ours.
import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from benchlib import (  # benchmarks/benchlib.py (this folder is on sys.path, in every spawned child too)
    SYN_CLASSES, SYN_DIM, SYN_MAX, SYN_MEAN_SCALE, SYN_MIN, SYN_SEED, SYN_SPLIT_IDS, SYN_TEST_PER_CLASS,
    SYN_VAL_PER_CLASS, busy_seconds, cores, cpu_name, fmt_s, own_cpu_s, synthetic_chunks, synthetic_class_sizes,
    synthetic_features, synthetic_labels, synthetic_means)

START_MARKER = "<!-- perf-table:start -->"
END_MARKER = "<!-- perf-table:end -->"
COMMAND = "python benchmarks/bench_stages.py --dataset all --write-readme"
#: the head-fit block (``--heads-only``): minibatch heads side by side with the plain loop
HEADS_START = "<!-- perf-heads:start -->"
HEADS_END = "<!-- perf-heads:end -->"
HEADS_COMMAND = "python benchmarks/bench_stages.py --heads-only --write-readme"
#: ``--heads-only`` defaults: epochs, heads on the seeded Gaussian store and on the ImageNet-LT shape
#: (one head there: a round of a 3-epoch head fit and the plain loop takes over a minute on 2 cores)
PAIR_EPOCHS = 3
PAIR_HEADS = ("ce", "balanced-softmax", "logit-adjust")
PAIR_LARGE_HEADS = ("ce",)
PAIR_ROWS, PAIR_DIM = 100_000, 512

DIGITS = "digits-lt"
SYNTH = "imagenet-lt-synthetic"

#: heads run on the large set unless ``--heads`` says otherwise: a representative subset (every
#: sampler, module and two-stage variant; cb-ce, focal, lade and ce+pc only change ce's loss or
#: wrap it). A 1-epoch fit takes ~45 s there on 2 cores: this keeps ``--dataset all`` near 10
#: minutes on a quiet machine (every head: ~13); when other processes keep the CPU busy, runs are
#: 2 to 5x slower and the whole can take 30 minutes
SYNTH_DEFAULT_HEADS = ("ce", "balanced-softmax", "logit-adjust", "crt", "tau-norm", "lws", "cosine", "ldam-drw")

#: torch threads in every child (``--threads``; default: the cores this process may use)
THREADS = 1


# ===================================================================================== helpers
def _setup_child(device: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


#: a block of timed runs during which the rest of the machine used more than this many cores on
#: average is contended: short stages throw it away and run another, single runs are marked
CONTENDED_CORES = 0.25
#: timed runs are grouped into blocks of at least this long (at most :data:`MAX_BLOCK_RUNS` runs):
#: ``/proc/stat`` counts in 10 ms ticks, too coarse to judge a single millisecond-long run
MIN_BLOCK_S = 0.25
MAX_BLOCK_RUNS = 50
#: short stages stop throwing contended blocks away after this many seconds of timed runs
RETRY_BUDGET_S = 30.0
#: before each stage the driver waits (at most ``--quiet-wait`` seconds, and at most this many
#: seconds in all) until other processes use less than :data:`CONTENDED_CORES` cores
QUIET_WAIT_TOTAL_S = 300.0
_QUIET_LEFT = [QUIET_WAIT_TOTAL_S]
#: seconds per stage the driver may wait for a quiet machine (``--quiet-wait``)
QUIET_WAIT_S = 60.0
#: in a child: contended runs thrown away, whether its runs were checked for contention, and
#: whether contended runs had to be kept (then the stage is marked in the table)
_QC = {"discarded_runs": 0, "checked": False, "noisy_kept": False}


def _quiet_rounds(fns: list, repeats: int, device: str, single: bool = False) -> tuple[list[list[float]], list]:
    """Time rounds of ``fns`` (each round calls every function once, in order) until ``repeats``
    rounds ran on a quiet machine; return ``(times per function, last result per function)``.

    Rounds are timed in blocks of at least :data:`MIN_BLOCK_S`; a block during which other
    processes used more than :data:`CONTENDED_CORES` cores on average (machine CPU time from
    ``/proc/stat`` minus this process's own) is thrown away and run again, up to
    ``3 * repeats`` blocks and :data:`RETRY_BUDGET_S` seconds; after that the contended rounds
    count too and the stage is marked. ``single``: exactly one round, never repeated (long runs).
    """
    kept = [[] for _ in fns]
    noisy = [[] for _ in fns]
    results = [None] * len(fns)
    spent = 0.0
    for _ in range(1 if single else 3 * repeats):
        block = [[] for _ in fns]
        _sync(device)
        busy0, own0, t0 = busy_seconds(), own_cpu_s(), time.perf_counter()
        while True:
            for i, fn in enumerate(fns):
                _sync(device)
                t = time.perf_counter()
                results[i] = fn()
                _sync(device)
                block[i].append(time.perf_counter() - t)
            if single or time.perf_counter() - t0 >= MIN_BLOCK_S or len(block[0]) >= MAX_BLOCK_RUNS:
                break
        wall = time.perf_counter() - t0
        busy1, own1 = busy_seconds(), own_cpu_s()
        spent += wall
        contended = False
        if busy0 is not None and busy1 is not None and wall >= 0.05:  # wall > 0 guards the division
            contended = (busy1 - busy0 - (own1 - own0)) / wall > CONTENDED_CORES
        for i in range(len(fns)):
            (noisy if contended else kept)[i].extend(block[i])
        if len(kept[0]) >= repeats or (spent > RETRY_BUDGET_S and len(kept[0]) + len(noisy[0]) >= repeats):
            break
    _QC["checked"] = True
    if len(kept[0]) < repeats:  # only when contended blocks were thrown away: a quiet block keeps >= 1 run
        _QC["noisy_kept"] = True
        kept = [k + n for k, n in zip(kept, noisy)]
    else:
        _QC["discarded_runs"] += len(noisy[0])
    return kept, results


def _median_time(fn, repeats: int, device: str, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over at least ``repeats`` uncontended runs (see
    :func:`_quiet_rounds`) after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
        _sync(device)
    (times,), _ = _quiet_rounds([fn], repeats, device)
    return statistics.median(times), times


def _child_main(stage: str, kwargs: dict, threads: int) -> dict:
    """Entry point of every spawned child: run ``stage`` and add its peak memory."""
    import resource

    device = kwargs.get("device", "cpu")
    _setup_child(device, threads)
    out = STAGES[stage](**kwargs)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.setdefault("rss_mib", usage.ru_maxrss / 1024.0)  # Linux: KiB
    out.update(_QC)
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    if device.startswith("cuda"):
        import torch

        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def wait_for_quiet() -> float:
    """Wait until other processes use less than :data:`CONTENDED_CORES` cores over one second (at
    most :data:`QUIET_WAIT_S` seconds, and :data:`QUIET_WAIT_TOTAL_S` over the whole run); return
    the seconds waited. A contended run of a CPU-bound stage on a small machine takes several times
    longer than waiting for the other process to finish."""
    limit = min(QUIET_WAIT_S, _QUIET_LEFT[0])
    if limit <= 0 or busy_seconds() is None:
        return 0.0
    t0 = time.perf_counter()
    while True:
        b0 = busy_seconds()
        time.sleep(1.0)
        if busy_seconds() - b0 < CONTENDED_CORES or time.perf_counter() - t0 >= limit:
            break  # this process is idle meanwhile, so all the CPU counted is someone else's
    waited = time.perf_counter() - t0
    _QUIET_LEFT[0] -= waited
    return waited


def run_stage(stage: str, **kwargs) -> dict:
    """Run one stage in a fresh spawned process; return its result dict (with ``rss_mib``).

    Waits for a quiet machine first (:func:`wait_for_quiet`). Also records ``others_cores``: the
    CPU the rest of the machine used meanwhile (cores, on average), so that a number measured
    while someone else was computing can be flagged.
    """
    waited = wait_for_quiet()
    busy0 = busy_seconds()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        out = pool.submit(_child_main, stage, kwargs, THREADS).result()
    out["wall_s"] = time.perf_counter() - t0
    out["waited_s"] = waited
    busy1 = busy_seconds()
    if busy0 is not None and busy1 is not None:
        # wall_s > 0 guards the division; the parent's own CPU (waiting on the child) is negligible
        out["others_cores"] = max(0.0, busy1 - busy0 - out["cpu_s"]) / max(out["wall_s"], 1e-9)
    label = kwargs.get("name") or ""
    others = f", others {out['others_cores']:.2f} cores" if "others_cores" in out else ""
    if waited >= 1.5:
        others += f", waited {waited:.0f} s for a quiet machine"
    print(f"  {stage:<22s} {label:<18s} {out['wall_s']:6.1f} s (peak RSS {out['rss_mib']:6.0f} MiB{others})",
          flush=True)
    return out


def _read_all(url: str) -> dict:
    from longtail.storage.featurestore import open_store

    fs = open_store(url)
    return {s: fs.read(s) for s in fs.splits}


def _head_params(device: str, epochs: int | None) -> dict:
    """A head at its defaults (``epochs`` None: the convex heads solve to convergence with L-BFGS),
    or ``epochs`` epochs of minibatch SGD and nothing more (``solver: sgd``, ``min_steps: 0``), the
    unit a per-epoch time is measured in."""
    params: dict = {"seed": 0, "device": device}
    if epochs is not None:
        params.update({"epochs": int(epochs), "solver": "sgd", "min_steps": 0})
    return params


def _innermost(method):
    """The innermost (fitted) method below any wrappers."""
    while getattr(method, "base", None) is not None:
        method = method.base
    return method


def _solver(method) -> str:
    """The solver the innermost head of ``method`` fits with (``lbfgs`` or ``sgd``)."""
    inner = _innermost(method)
    return inner.resolved_solver() if hasattr(inner, "resolved_solver") else "sgd"


def _inner_params(method) -> dict:
    """Constructor parameters of the innermost (fitted) method below any wrappers."""
    return _innermost(method).get_params()


# ===================================================================================== stages
def stage_idle(device: str) -> dict:
    import torch  # noqa: F401  (the point: a child that only imports torch)

    return {}


def stage_digits_train(device: str, workdir: str, repeats: int) -> dict:
    """Stage 1: train the built-in small CNN with the default config on digits-lt."""
    from longtail.pipeline.config import BackboneConfig, DatasetConfig
    from longtail.stages import extract as ex
    from longtail.stages.datasets import digits_lt

    d, b = DatasetConfig(), BackboneConfig()
    ds = digits_lt(imbalance_ratio=d.imbalance_ratio, test_per_class=d.test_per_class,
                   val_per_class=d.val_per_class, seed=0)
    train = ds.splits["train"]
    result = {}

    def fit(epochs=b.epochs):
        result["bb"] = ex.train_small_cnn(train.images, train.labels, ds.num_classes, epochs=epochs, lr=b.lr,
                                          batch_size=b.batch_size, weight_decay=b.weight_decay,
                                          width=b.width, seed=0, device=device)

    fit(1)  # warm-up: one epoch (allocator, kernels)
    med, times = _median_time(fit, repeats, device, warmup=0)
    bb = result["bb"]
    with open(os.path.join(workdir, "digits_backbone.safetensors"), "wb") as f:
        f.write(ex.save_small_cnn(bb.module.net))
    meta = {"class_names": list(ds.class_names), "class_counts": ds.class_counts.tolist(),
            "backbone": bb.identity, "backbone_hash": bb.weights_hash, "fingerprint": ds.fingerprint}
    with open(os.path.join(workdir, "digits_meta.json"), "w") as f:
        json.dump(meta, f)
    return {"seconds": med, "times": times, "epochs": b.epochs, "batch_size": b.batch_size,
            "train_images": len(train), "final_loss": bb.train_log[-1]["loss"]}


def stage_digits_extract(device: str, workdir: str, repeats: int) -> dict:
    """Extraction throughput of the trained backbone over every split (default batch size)."""
    import numpy as np

    from longtail.pipeline.config import DatasetConfig, ExtractionConfig
    from longtail.stages import extract as ex
    from longtail.stages.datasets import digits_lt

    d = DatasetConfig()
    ds = digits_lt(imbalance_ratio=d.imbalance_ratio, test_per_class=d.test_per_class,
                   val_per_class=d.val_per_class, seed=0)
    with open(os.path.join(workdir, "digits_backbone.safetensors"), "rb") as f:
        module = ex.load_small_cnn(f.read())
    bb = ex.Backbone(ex.FeaturesOf(module, None, "features"), {}, "")
    bs = ExtractionConfig().batch_size
    feats: dict = {}

    def run():
        for name, split in ds.splits.items():
            feats[name] = list(ex.extract_chunks(bb, split.images, batch_size=bs, device=device, desc=name))

    med, times = _median_time(run, repeats, device, warmup=1)
    n = sum(len(s) for s in ds.splits.values())
    for name, split in ds.splits.items():
        np.save(os.path.join(workdir, f"digits_{name}_features.npy"), np.concatenate(feats[name]))
        np.save(os.path.join(workdir, f"digits_{name}_labels.npy"), split.labels)
        np.save(os.path.join(workdir, f"digits_{name}_index.npy"), split.index)
    return {"seconds": med, "times": times, "images": n, "images_per_s": n / med, "batch_size": bs,
            "dim": int(feats["train"][0].shape[1])}


def _digits_arrays(workdir: str) -> dict:
    import numpy as np

    out = {}
    for name in ("train", "val", "test"):
        out[name] = {k: np.load(os.path.join(workdir, f"digits_{name}_{k}.npy"))
                     for k in ("features", "labels", "index")}
    return out


def _nbytes(arrays: dict) -> int:
    return sum(a.nbytes for split in arrays.values() for a in split.values())


def stage_digits_store_write(device: str, workdir: str, repeats: int) -> dict:
    """FeatureStoreWriter, chunk by chunk (the extraction batches), into a fresh store per run."""
    from longtail.pipeline.config import ExtractionConfig
    from longtail.storage.featurestore import FeatureStoreWriter

    arrays = _digits_arrays(workdir)
    with open(os.path.join(workdir, "digits_meta.json")) as f:
        meta = json.load(f)
    bs = ExtractionConfig().batch_size
    counter = iter(range(10**6))

    def write(url=None):
        url = url or os.path.join(workdir, f"digits_w{next(counter)}.zarr")
        w = FeatureStoreWriter(
            url, class_names=meta["class_names"], class_counts=meta["class_counts"],
            backbone=meta["backbone"], backbone_hash=meta["backbone_hash"],
            dataset_fingerprint=meta["fingerprint"], feature_dim=int(arrays["train"]["features"].shape[1]),
            splits={s: len(a["labels"]) for s, a in arrays.items()}, extra_attrs={"dataset": DIGITS},
        )
        for s, a in arrays.items():
            w.begin_split(s)
            for start in range(0, len(a["labels"]), bs):
                sl = slice(start, start + bs)
                w.write_chunk(s, a["features"][sl], a["labels"][sl], index=a["index"][sl])
            w.end_split(s)
        w.finish()

    med, times = _median_time(write, repeats, device, warmup=1)
    write(os.path.join(workdir, "digits.zarr"))  # the store the read and head stages use
    rows = sum(len(a["labels"]) for a in arrays.values())
    return {"seconds": med, "times": times, "rows": rows, "bytes": _nbytes(arrays)}


def stage_digits_npsave(device: str, workdir: str, repeats: int) -> dict:
    """Baseline: np.save of the same arrays (features, labels, index of every split)."""
    import numpy as np

    arrays = _digits_arrays(workdir)
    out = os.path.join(workdir, "digits_npy")
    os.makedirs(out, exist_ok=True)

    def save():
        for s, a in arrays.items():
            for k, v in a.items():
                np.save(os.path.join(out, f"{s}_{k}.npy"), v)

    med, times = _median_time(save, repeats, device, warmup=1)
    rows = sum(len(a["labels"]) for a in arrays.values())
    return {"seconds": med, "times": times, "rows": rows, "bytes": _nbytes(arrays)}


def stage_store_read(device: str, url: str, folder: str, repeats: int, warmup: int = 1) -> dict:
    """open_store(url).read(split) for every split (validated FeatureSets), side by side with
    ``np.load`` of the same arrays from the ``.npy`` files in ``folder``: alternating, in this one
    process, so that both see the same machine; best of ``repeats`` each (issue 13)."""
    import numpy as np

    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".npy"))
    result = {}

    def read():
        result.clear()  # drop the previous copies (of both) before reading: one copy alive at a time
        sets = {s: store.read(s) for s in store.splits}
        result["rows"] = sum(len(fs) for fs in sets.values())
        result["bytes"] = sum(fs.features.nbytes + fs.labels.nbytes + (fs.index.nbytes if fs.index is not None
                                                                       else 0) for fs in sets.values())

    def load():
        result.pop("arrays", None)
        arrays = [np.load(f) for f in files]
        result["load_rows"] = sum(len(a) for a, f in zip(arrays, files) if f.endswith("_labels.npy"))
        result["load_bytes"] = sum(a.nbytes for a in arrays)

    from longtail.storage.featurestore import open_store

    store = open_store(url)
    for _ in range(warmup):
        read()
        load()
    (t_read, t_load), _ = _quiet_rounds([read, load], repeats, "cpu")
    return {"seconds": min(t_read), "times": t_read, "rows": result["rows"], "bytes": result["bytes"],
            "npload": {"seconds": min(t_load), "times": t_load, "rows": result["load_rows"],
                       "bytes": result["load_bytes"]}}


def _gauss_store(workdir: str, rows: int, dim: int) -> tuple[str, str]:
    """The seeded ``rows`` x ``dim`` store (Gaussians, 100 classes, written with FeatureStoreWriter;
    val and test of 1/20 and 1/10 the rows) and the ``.npy`` of its train features, written once
    per run (the first stage that asks writes them; later ones reuse them). Returns both paths."""
    import numpy as np

    from longtail.storage.featurestore import FeatureStoreWriter

    url = os.path.join(workdir, f"train_{rows}x{dim}.zarr")
    npy = os.path.join(workdir, f"train_{rows}x{dim}.npy")
    if os.path.exists(npy):
        return url, npy
    rng = np.random.default_rng(0)
    sizes = {"train": rows, "val": rows // 20, "test": rows // 10}
    labels = {s: rng.integers(0, 100, n) for s, n in sizes.items()}
    for lab in labels.values():
        lab[:100] = np.arange(100)
    w = FeatureStoreWriter(url, class_names=[str(c) for c in range(100)],
                           class_counts=np.bincount(labels["train"], minlength=100), backbone={"kind": "bench"},
                           backbone_hash="b", dataset_fingerprint="d", feature_dim=dim, splits=sizes)
    for split, n in sizes.items():
        x = rng.standard_normal(size=(n, dim), dtype=np.float32)
        w.begin_split(split)
        w.write_chunk(split, x, labels[split])
        w.end_split(split)
        if split == "train":
            np.save(npy + ".tmp.npy", x)
        del x
    w.finish()
    os.replace(npy + ".tmp.npy", npy)  # last: its presence says the store is complete
    return url, npy


def stage_store_read_train(device: str, workdir: str, rows: int, dim: int, repeats: int) -> dict:
    """The train split alone of the seeded ``rows`` x ``dim`` store (:func:`_gauss_store`), read
    side by side with ``np.load`` of the same array in this one process after a warm-up; best of
    ``repeats`` each."""
    import numpy as np

    from longtail.storage.featurestore import open_store

    url, npy = _gauss_store(workdir, rows, dim)
    store = open_store(url)
    holder = {}

    def read():
        holder.clear()
        holder["x"] = store.read("train").features

    def load():
        holder.clear()
        holder["x"] = np.load(npy)

    read()
    load()
    (t_read, t_load), _ = _quiet_rounds([read, load], repeats, "cpu")
    nbytes = rows * dim * 4
    return {"seconds": min(t_read), "times": t_read, "rows": rows, "bytes": nbytes, "dim": dim,
            "npload": {"seconds": min(t_load), "times": t_load, "rows": rows, "bytes": nbytes}}


def stage_npload(device: str, folder: str, repeats: int, warmup: int = 1) -> dict:
    """Baseline: np.load of every .npy file in ``folder`` (fully read, no memory map)."""
    import numpy as np

    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".npy"))
    result = {}

    def load():
        result["arrays"] = None
        result["arrays"] = [np.load(f) for f in files]

    med, times = _median_time(load, repeats, device, warmup=warmup)
    rows = sum(len(a) for a, f in zip(result["arrays"], files) if f.endswith("_labels.npy"))
    return {"seconds": med, "times": times, "rows": rows, "bytes": sum(a.nbytes for a in result["arrays"])}


def plain_ce_loop(train, device: str, epochs: int, batch_size: int, lr: float, weight_decay: float):
    """The baseline: a plain torch loop, ``nn.Linear`` + ``F.cross_entropy``, SGD (momentum 0.9),
    a random permutation per epoch, the same epochs / batch size / lr / weight decay as the heads,
    on the same train features (moved to the device inside the timed region, as the heads do; no
    standardisation, no schedule, no progress bar). Returns ``fit()``, which returns the model."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from longtail.stages.device import resolve_device

    dev = resolve_device(device)

    def fit():
        torch.manual_seed(0)
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.from_numpy(train.features).to(dev)
        y = torch.from_numpy(train.labels).to(dev)
        n = x.shape[0]
        model = nn.Linear(x.shape[1], train.num_classes).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen, device=dev)
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return model

    return fit


def _test_metrics(logits, test, train) -> dict:
    from longtail.stages.evaluate import evaluate

    m = evaluate(logits, test.labels, train.class_counts)
    return {k: m[k] for k in ("balanced_accuracy", "many", "medium", "few")}


def stage_head(device: str, url: str, name: str, epochs: int | None, repeats: int, warmup: int,
               paired: bool = True, logits_path: str | None = None) -> dict:
    """``make_method(name, {"seed": 0, "device": ...}).fit(train, val)``; test metrics untimed.

    ``paired``: the plain-CE baseline runs in the same process on the same tensors, alternating
    with the head (head, baseline, head, baseline ...) after ``warmup`` untimed fits of each, so
    that both see the same machine; the ratio is median over median. Unpaired (the large set, where
    one fit takes a minute and the load of a shared machine changes within minutes), the ratio is
    taken against the baseline's own process. ``repeats == 1``: one fit, never repeated. Peak RSS
    is taken right after the head's last fit.
    """
    import resource

    import numpy as np

    from longtail.stages.registry import make_method

    sets = _read_all(url)
    train, val, test = sets["train"], sets.get("val"), sets["test"]
    params = _head_params(device, epochs)
    inner = _inner_params(make_method(name, dict(params)))
    fit_head = lambda: make_method(name, dict(params)).fit(train, val)  # noqa: E731
    fit_base = plain_ce_loop(train, device, int(inner["epochs"]), int(inner["batch_size"]), float(inner["lr"]),
                             float(inner["weight_decay"]))
    for _ in range(warmup):
        fit_head()
        if paired:
            fit_base()
    rss = [0.0]

    def head_then_rss():
        m = fit_head()
        rss[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # before a baseline-only peak
        return m

    fns = [head_then_rss, fit_base] if paired else [head_then_rss]
    times, results = _quiet_rounds(fns, repeats, device, single=repeats == 1)
    method = results[0]
    t0 = time.perf_counter()
    logits = method.logits(test.features)
    logits_s = time.perf_counter() - t0
    if logits_path:
        np.save(logits_path, logits)
    out = {"seconds": statistics.median(times[0]), "times": times[0], "solver": _solver(method),
           "min_steps": int(inner.get("min_steps") or 0),
           "epochs": int(inner["epochs"]), "batch_size": int(inner["batch_size"]), "lr": float(inner["lr"]),
           "weight_decay": float(inner["weight_decay"]), "logits_s": logits_s,
           "metrics": _test_metrics(logits, test, train), "rss_mib": rss[0]}
    if paired:
        import torch

        model = results[1]
        with torch.inference_mode():
            base_logits = model(torch.from_numpy(test.features).to(next(model.parameters()).device))
        out.update({"baseline_seconds": statistics.median(times[1]), "baseline_times": times[1],
                    "baseline_metrics": _test_metrics(base_logits.float().cpu().numpy(), test, train)})
    return out


def stage_gauss_store(device: str, workdir: str, rows: int, dim: int) -> dict:
    """Write the seeded Gaussian store of :func:`_gauss_store` (untimed: a fixture)."""
    url, _ = _gauss_store(workdir, rows, dim)
    return {"url": url}


def stage_head_pair(device: str, url: str, name: str, epochs: int, repeats: int, warmup: int) -> dict:
    """A minibatch head fit and the plain loop, side by side in this one process (issue 13).

    ``make_method(name, {"seed": 0, "device": ..., "solver": "sgd", "epochs": epochs, "min_steps":
    0}).fit(train, val)`` against :func:`plain_ce_loop` with the head's batch size, lr and weight
    decay on the same train tensors: ``warmup`` untimed rounds, then rounds of (plain loop, head)
    until ``repeats`` uncontended rounds (:func:`_quiet_rounds`); the best time of each. Peak
    memory: ``ru_maxrss`` right after the first fit of each (warm-up included), the plain loop
    first, so the plain figure is its own peak and the head's is its own too whenever it is the
    larger (``head_rss_bound``: the head did not raise the high-water mark, so its peak is at most
    that figure). Test balanced accuracy of the last fit of each (untimed).
    """
    import resource

    import torch

    from longtail.stages.registry import make_method

    def maxrss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    sets = _read_all(url)
    train, val, test = sets["train"], sets.get("val"), sets["test"]
    params = {"seed": 0, "device": device, "epochs": int(epochs), "solver": "sgd", "min_steps": 0}
    inner = _inner_params(make_method(name, dict(params)))
    fit_base = plain_ce_loop(train, device, int(epochs), int(inner["batch_size"]), float(inner["lr"]),
                             float(inner["weight_decay"]))
    rss = {"read": maxrss()}

    def first_rss(key, fn):
        def run():
            out = fn()
            rss.setdefault(key, maxrss())
            return out
        return run

    fns = [first_rss("plain", fit_base), first_rss("head", lambda: make_method(name, dict(params)).fit(train, val))]
    for _ in range(warmup):
        for fn in fns:
            fn()
    (t_base, t_head), (model, method) = _quiet_rounds(fns, repeats, device)
    with torch.inference_mode():
        base_logits = model(torch.from_numpy(test.features).to(next(model.parameters()).device))
    return {"seconds": min(t_head), "times": t_head, "baseline_seconds": min(t_base), "baseline_times": t_base,
            "epochs": int(epochs), "batch_size": int(inner["batch_size"]), "lr": float(inner["lr"]),
            "weight_decay": float(inner["weight_decay"]), "rows": len(train), "dim": train.dim,
            "classes": train.num_classes, "read_rss_mib": rss["read"], "baseline_rss_mib": rss["plain"],
            "rss_mib": rss["head"], "head_rss_bound": rss["head"] <= rss["plain"],
            "metrics": _test_metrics(method.logits(test.features), test, train),
            "baseline_metrics": _test_metrics(base_logits.float().cpu().numpy(), test, train)}


def stage_plain_ce(device: str, url: str, epochs: int, batch_size: int, lr: float, weight_decay: float,
                   repeats: int, warmup: int, name: str = "plain CE") -> dict:
    """The baseline alone in its own process: its absolute time and its peak memory."""
    import torch

    sets = _read_all(url)
    train, test = sets["train"], sets["test"]
    fit = plain_ce_loop(train, device, epochs, batch_size, lr, weight_decay)
    holder = {}

    def run():
        holder["model"] = fit()

    med, times = _median_time(run, repeats, device, warmup=warmup)
    model = holder["model"]
    with torch.inference_mode():
        logits = model(torch.from_numpy(test.features).to(next(model.parameters()).device)).float().cpu().numpy()
    return {"seconds": med, "times": times, "epochs": epochs, "batch_size": batch_size,
            "metrics": _test_metrics(logits, test, train)}


def stage_evaluate(device: str, url: str, logits_path: str, repeats: int) -> dict:
    """``stages.evaluate.evaluate`` on saved test logits."""
    import numpy as np

    from longtail.stages.evaluate import evaluate
    from longtail.storage.featurestore import open_store

    fs = open_store(url)
    test = fs.read("test")
    logits = np.load(logits_path)
    med, times = _median_time(lambda: evaluate(logits, test.labels, fs.class_counts), repeats, device,
                              warmup=1)
    return {"seconds": med, "times": times, "rows": int(logits.shape[0]), "classes": int(logits.shape[1])}


def stage_synth_write(device: str, workdir: str) -> dict:
    """Generate the synthetic set chunk by chunk and write it with FeatureStoreWriter; only the
    writer calls are timed (generation is reported separately)."""
    import numpy as np

    from longtail.storage.featurestore import FeatureStoreWriter

    sizes, profile = synthetic_class_sizes()
    means = synthetic_means()
    labels = {s: synthetic_labels(s) for s in SYN_SPLIT_IDS}
    spec = {"name": SYNTH, "classes": SYN_CLASSES, "dim": SYN_DIM, "seed": SYN_SEED, "scale": SYN_MEAN_SCALE}
    url = os.path.join(workdir, "synthetic.zarr")
    write_s = gen_s = 0.0
    t0 = time.perf_counter()
    w = FeatureStoreWriter(
        url, class_names=[f"c{c:04d}" for c in range(SYN_CLASSES)], class_counts=sizes.tolist(),
        backbone={"kind": "synthetic", "name": SYNTH}, backbone_hash="synthetic",
        dataset_fingerprint=json.dumps(spec, sort_keys=True), feature_dim=SYN_DIM,
        splits={s: len(v) for s, v in labels.items()}, extra_attrs={"dataset": SYNTH},
    )
    write_s += time.perf_counter() - t0
    for split, lab in labels.items():
        t0 = time.perf_counter()
        w.begin_split(split)
        write_s += time.perf_counter() - t0
        chunks = synthetic_chunks(split, means, lab)
        while True:
            t0 = time.perf_counter()
            item = next(chunks, None)
            gen_s += time.perf_counter() - t0
            if item is None:
                break
            start, x, yl = item
            t0 = time.perf_counter()
            w.write_chunk(split, x, yl, index=np.arange(start, start + len(yl), dtype=np.int64))
            write_s += time.perf_counter() - t0
            del x, item
        t0 = time.perf_counter()
        w.end_split(split)
        write_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    w.finish()
    write_s += time.perf_counter() - t0
    rows = sum(len(v) for v in labels.values())
    nbytes = rows * (SYN_DIM * 4 + 8 + 8)  # features + labels + index
    disk = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(url) for f in fs)
    return {"seconds": write_s, "generate_s": gen_s, "rows": rows, "bytes": nbytes, "disk_bytes": disk,
            "splits": {s: len(v) for s, v in labels.items()}, "profile": profile,
            "shots": {"many": int((sizes > 100).sum()), "medium": int(((sizes >= 20) & (sizes <= 100)).sum()),
                      "few": int((sizes < 20).sum())}}


def stage_synth_npsave(device: str, workdir: str) -> dict:
    """Baseline: np.save of the same arrays; each split is generated in memory (untimed, one
    split at a time), then saved (timed)."""
    import numpy as np

    means = synthetic_means()
    out = os.path.join(workdir, "synthetic_npy")
    os.makedirs(out, exist_ok=True)
    save_s = 0.0
    rows = nbytes = 0
    for split in SYN_SPLIT_IDS:
        lab = synthetic_labels(split)
        feats = synthetic_features(split, lab, means)
        index = np.arange(len(lab), dtype=np.int64)
        t0 = time.perf_counter()
        np.save(os.path.join(out, f"{split}_features.npy"), feats)
        np.save(os.path.join(out, f"{split}_labels.npy"), lab)
        np.save(os.path.join(out, f"{split}_index.npy"), index)
        save_s += time.perf_counter() - t0
        rows += len(lab)
        nbytes += feats.nbytes + lab.nbytes + index.nbytes
        del feats
    return {"seconds": save_s, "rows": rows, "bytes": nbytes}


STAGES = {
    "idle": stage_idle,
    "digits_train": stage_digits_train,
    "digits_extract": stage_digits_extract,
    "digits_store_write": stage_digits_store_write,
    "digits_npsave": stage_digits_npsave,
    "store_read": stage_store_read,
    "store_read_train": stage_store_read_train,
    "npload": stage_npload,
    "head": stage_head,
    "plain_ce": stage_plain_ce,
    "gauss_store": stage_gauss_store,
    "head_pair": stage_head_pair,
    "evaluate": stage_evaluate,
    "synth_write": stage_synth_write,
    "synth_npsave": stage_synth_npsave,
}


# ===================================================================================== driver
def machine_facts(device: str) -> dict:
    import numpy as np
    import torch
    import zarr

    from longtail.stages.device import resolve_device

    dev = resolve_device(device)
    facts = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "cores": cores(),
        "torch_threads": THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "device": str(dev),
        "load_before": os.getloadavg()[0],
    }
    if dev.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(dev)
    return facts


def default_heads() -> list[str]:
    from longtail.stages.registry import known_methods

    return known_methods() + ["ce+pc"]


def _run_head(**kwargs) -> dict:
    """A head's stage; a head that fails (others may be editing it) is reported, not fatal."""
    try:
        return run_stage("head", **kwargs)
    except Exception as exc:  # noqa: BLE001  (any error of the head's fit is reported as such)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"  head {kwargs['name']} FAILED: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
        return {"error": f"{type(exc).__name__}: {first}"}


def _optim_key(epochs: int | None, name: str) -> tuple:
    """(epochs, batch size, lr, weight decay) that head ``name`` trains with: its baseline's."""
    from longtail.stages.registry import make_method

    p = _inner_params(make_method(name, _head_params("cpu", epochs)))
    return int(p["epochs"]), int(p["batch_size"]), float(p["lr"]), float(p["weight_decay"])


def _run_plain_ce(device: str, url: str, key: tuple, repeats: int = 1, warmup: int = 0) -> dict:
    return run_stage("plain_ce", device=device, url=url, epochs=key[0], batch_size=key[1], lr=key[2],
                     weight_decay=key[3], repeats=repeats, warmup=warmup, name=f"{key[0]} ep, bs {key[1]}")


def _standalone_baselines(heads: dict, device: str, url: str, repeats: int, warmup: int) -> dict:
    """The plain-CE loop alone in its own process, once per distinct (epochs, batch size, lr,
    weight decay) among the heads: its absolute time and its own peak memory."""
    out = {}
    for h in heads.values():
        if "error" in h:
            continue
        key = (h["epochs"], h["batch_size"], h["lr"], h["weight_decay"])
        if key not in out:
            out[key] = _run_plain_ce(device, url, key, repeats=repeats, warmup=warmup)
    return out


def bench_digits(workdir: str, device: str, heads: list[str], repeats: int) -> dict:
    print(f"== {DIGITS}", flush=True)
    r = {}
    r["train"] = run_stage("digits_train", device=device, workdir=workdir, repeats=max(1, min(repeats, 3)))
    r["extract"] = run_stage("digits_extract", device=device, workdir=workdir, repeats=repeats * 2)
    r["write"] = run_stage("digits_store_write", device=device, workdir=workdir, repeats=repeats)
    r["npsave"] = run_stage("digits_npsave", device=device, workdir=workdir, repeats=repeats)
    url = os.path.join(workdir, "digits.zarr")
    folder = os.path.join(workdir, "digits_npy")
    r["read"] = run_stage("store_read", device=device, url=url, folder=folder, repeats=repeats * 2)
    r["npload"] = run_stage("npload", device=device, folder=folder, repeats=repeats * 2)  # its own peak RSS
    r["heads"] = {h: _run_head(device=device, url=url, name=h, epochs=None, repeats=repeats, warmup=1)
                  for h in heads}
    r["baselines"] = _standalone_baselines(r["heads"], device, url, repeats=repeats, warmup=1)
    return r


def bench_synthetic(workdir: str, device: str, heads: list[str], epochs: int, repeats: int) -> dict:
    print(f"== {SYNTH}", flush=True)
    r = {}
    r["write"] = run_stage("synth_write", device=device, workdir=workdir)
    r["npsave"] = run_stage("synth_npsave", device=device, workdir=workdir)
    url = os.path.join(workdir, "synthetic.zarr")
    big = max(1, min(repeats, 3))  # about 1.2 GB per read: three runs, no warm-up
    folder = os.path.join(workdir, "synthetic_npy")
    # one warm-up round (a read is under half a second now): the first touches the page cache
    r["read"] = run_stage("store_read", device=device, url=url, folder=folder, repeats=big, warmup=1)
    r["npload"] = run_stage("npload", device=device, folder=folder, repeats=big, warmup=0)  # its own peak RSS
    r["read_train"] = run_stage("store_read_train", device=device, workdir=workdir, rows=100_000, dim=512,
                                repeats=big)
    # the baseline runs before and after the heads, in its own process each time; the faster run
    # is the one least slowed by other processes (a shared machine only ever slows a run down)
    keys = {_optim_key(epochs=epochs, name=h) for h in heads}
    before = {k: _run_plain_ce(device, url, k) for k in keys}
    r["heads"] = {}
    logits = {}
    for h in heads:
        logits[h] = os.path.join(workdir, f"synthetic_logits_{h}.npy")
        r["heads"][h] = _run_head(device=device, url=url, name=h, epochs=epochs, repeats=1, warmup=0,
                                  paired=False, logits_path=logits[h])
    after = {k: _run_plain_ce(device, url, k) for k in keys}
    r["baselines"] = {k: min(before[k], after[k], key=lambda b: b["seconds"]) for k in keys}
    r["baseline_runs"] = {k: (before[k]["seconds"], after[k]["seconds"]) for k in keys}
    done = [h for h in logits if "error" not in r["heads"][h]]
    eval_head = "ce" if "ce" in done else next(iter(done), None)
    if eval_head is not None:
        r["evaluate"] = run_stage("evaluate", device=device, url=url, logits_path=logits[eval_head],
                                  repeats=repeats)
        r["evaluate"]["head"] = eval_head
    return r


def bench_head_pairs(workdir: str, device: str, heads: list[str], large_heads: list[str], epochs: int,
                     repeats: int, rows: int) -> dict:
    """``--heads-only``: every head of ``heads`` on the seeded ``rows`` x 512 store and every head of
    ``large_heads`` on the ImageNet-LT-shaped one, each timed against the plain loop in its own
    process (:func:`stage_head_pair`: a warm-up round on the small set, none on the large one)."""
    r: dict = {"gauss": {}, "synth": {}, "epochs": epochs}
    if heads:
        print(f"== heads on {rows:,} x {PAIR_DIM}", flush=True)
        url = run_stage("gauss_store", device=device, workdir=workdir, rows=rows, dim=PAIR_DIM)["url"]
        for h in heads:
            r["gauss"][h] = _run_pair(device=device, url=url, name=h, epochs=epochs, repeats=repeats, warmup=1)
    if large_heads:
        print(f"== heads on {SYNTH}", flush=True)
        url = os.path.join(workdir, "synthetic.zarr")
        if not os.path.exists(url):  # --dataset all wrote it already (same seed, same arrays)
            run_stage("synth_write", device=device, workdir=workdir)
        for h in large_heads:
            r["synth"][h] = _run_pair(device=device, url=url, name=h, epochs=epochs, repeats=repeats, warmup=0)
    return r


def _run_pair(**kwargs) -> dict:
    """A head's paired stage; a head that fails is reported, not fatal."""
    try:
        return run_stage("head_pair", **kwargs)
    except Exception as exc:  # noqa: BLE001  (any error of the head's fit is reported as such)
        first = (str(exc).splitlines() or [""])[0]
        print(f"  head {kwargs['name']} FAILED: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
        return {"error": f"{type(exc).__name__}: {first}"}


# ------------------------------------------------------------------------------- rendering
def fmt_n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"  # b > 0 guards a zero baseline time


def fmt_mib(r: dict) -> str:
    s = f"{r['rss_mib']:,.0f}"
    if "gpu_peak_mib" in r:
        s += f" (GPU {r['gpu_peak_mib']:,.0f})"
    return s


def fmt_acc(m: dict) -> tuple[str, str]:
    def pct(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    return pct(m["balanced_accuracy"]), f"{pct(m['many'])} / {pct(m['medium'])} / {pct(m['few'])}"


def _head_rows(res: dict, per_epoch: bool) -> list[str]:
    rows = []
    for name, h in res["heads"].items():
        if "error" in h:
            rows.append(f"| `{name}` | | failed: {h['error'].replace('|', '/')} | | | | | |")
            continue
        key = (h["epochs"], h["batch_size"], h["lr"], h["weight_decay"])
        hs = h["seconds"]
        bs = h["baseline_seconds"] if "baseline_seconds" in h else res["baselines"][key]["seconds"]
        if per_epoch:
            hs, bs = hs / h["epochs"], bs / h["epochs"]
        bal, groups = fmt_acc(h["metrics"])
        training = ("L-BFGS" if h.get("solver") == "lbfgs" else f"{h['epochs']} epoch{'s' if h['epochs'] != 1 else ''}"
                    + (f", at least {h['min_steps']:,} steps" if h.get("min_steps") else ""))
        rows.append(f"| `{name}` | {training} | {fmt_s(hs)}{mark(h)} | {fmt_s(bs)} | **{fmt_ratio(hs, bs)}** | "
                    f"{bal} | {groups} | {fmt_mib(h)} |")
    for key, b in res["baselines"].items():
        bs = b["seconds"] / b["epochs"] if per_epoch else b["seconds"]
        bal, groups = fmt_acc(b["metrics"])
        rows.append(f"| plain CE loop alone (own process) | {key[0]} epoch{'s' if key[0] != 1 else ''} | {fmt_s(bs)}{mark(b)} | — | — | {bal} | "
                    f"{groups} | {fmt_mib(b)} |")
    return rows


def is_contended(r: dict) -> bool:
    """Whether the runs reported for stage ``r`` competed with other processes for the CPU."""
    if r.get("checked"):
        return bool(r.get("noisy_kept"))
    return r.get("others_cores", 0.0) > CONTENDED_CORES


def mark(r: dict) -> str:
    return " †" if is_contended(r) else ""


def _contended(results: list[dict]) -> str:
    out = ""
    discarded = sum(r.get("discarded_runs", 0) for r in results)
    waited = sum(r.get("waited_s", 0.0) for r in results)
    if discarded or waited >= 1.5 * len(results):
        out += (f" The machine is shared: the script waited {waited / 60:.1f} minutes in all for other processes to "
                f"leave the CPU before starting stages, and threw away and reran {discarded} timed run(s) during "
                f"which others used more than {CONTENDED_CORES} cores.")
    if any(is_contended(r) for r in results):
        out += (" †: measured while other processes competed for the CPU (no quiet run within the retry budget, or "
                "a single long run that was contended): its time is inflated, and so is the ratio of a † head on "
                f"{SYNTH} (the {DIGITS} head ratios are timed in pairs and suffer much less).")
    return out


def _io_row(label: str, r: dict, base: dict | None, base_label: str) -> str:
    mb = r["bytes"] / 1e6
    thr = f"{fmt_n(r['rows'] / r['seconds'])} rows/s, {fmt_n(mb / r['seconds'])} MB/s"
    ratio = f"**{fmt_ratio(r['seconds'], base['seconds'])}** {base_label}" if base else "1.00x (baseline)"
    return f"| {label} | {fmt_s(r['seconds'])}{mark(r)} | {thr} | {ratio} | {fmt_mib(r)} |"


def _read_rows(label: str, r: dict) -> list[str]:
    """The store-read row and its ``np.load`` baseline: both timed side by side in the read's
    process (best of its rounds); the baseline's peak RSS from its own process."""
    read = r["read"]
    base = {**r["npload"], **read["npload"]} if "npload" in read else r["npload"]
    n = len(read["times"])
    return [_io_row(f"{label}; best of {n}, alternating with `np.load` in one process)", read, base, "`np.load`"),
            _io_row("`np.load` of the same arrays (same process; peak RSS: its own)", base, None, "")]


def _read_train_rows(r: dict) -> list[str]:
    """The train-only read of the seeded ``rows`` x ``dim`` store and its ``np.load`` baseline."""
    label = (f"store read, train split only: {r['rows']:,} x {r['dim']} float32, seeded Gaussians (best of "
             f"{len(r['times'])}, alternating with `np.load` in one process)")
    return [_io_row(label, r, r["npload"], "`np.load`"),
            _io_row("`np.load` of the same array (same process)", {**r["npload"], "rss_mib": r["rss_mib"]}, None, "")]


HEAD_HEADER = ("| head | training | {t} | {b} | ratio | test bal. acc. (%) | many / medium / few (%) "
               "| peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|")


def _all_results(*sets: dict | None) -> list[dict]:
    out = []
    for res in sets:
        if not res:
            continue
        for key, value in res.items():
            if key in ("heads", "baselines"):
                out.extend(v for v in value.values() if "error" not in v)
            else:
                out.append(value)
    return out


def render(facts: dict, idle: dict, digits: dict | None, synth: dict | None, args, total_s: float,
           default_synth: bool = True) -> str:
    gpu = f", GPU {facts['gpu']}" if "gpu" in facts else ""
    flags = []
    if args.device != "auto":
        flags.append(f"--device {args.device}")
    if args.epochs != 1:
        flags.append(f"--epochs {args.epochs}")
    if args.heads:
        flags.append(f"--heads {args.heads}")
    if args.threads:
        flags.append(f"--threads {args.threads}")
    run = f" (this run: `--dataset {args.dataset} {' '.join(flags)}`)".replace("  ", " ") if (
        flags or args.dataset != "all") else ""
    lines = [
        f"_Measured {facts['date']} on {facts['cores']} CPU cores ({facts['cpu']}; torch threads "
        f"{facts['torch_threads']}){gpu}, device `{facts['device']}`; Python {facts['python']}, "
        f"torch {facts['torch']}, "
        f"numpy {facts['numpy']}, zarr {facts['zarr']}; 1-minute load average {facts['load_before']:.1f} before the "
        f"run; {total_s / 60:.1f} minutes in all. Reproduce with `{COMMAND}`{run}._",
        "",
        "Ratio = time / baseline time (above 1: slower than the baseline). Heads are timed against a plain torch "
        "loop (`nn.Linear` + `F.cross_entropy`, SGD with momentum, same epochs, batch size, lr and weight decay, "
        f"same tensors; on {DIGITS} in the same process, alternating with the head). "
        "Peak RSS is `ru_maxrss` of a fresh process that ran only that stage: the whole process, Python and torch "
        f"included; an idle process that only imports torch peaks at {idle['rss_mib']:,.0f} MiB, subtract that for "
        f"the stage's own memory. Short stages: median of at least {args.repeats} runs ({2 * args.repeats} for "
        "extraction) after a warm-up; store reads: the best run, alternating with `np.load` of the same arrays in "
        "one process; store I/O goes through the page cache (no fsync)."
        + _contended(_all_results(digits, synth)),
    ]
    if digits:
        d = digits
        tr, ex = d["train"], d["extract"]
        lines += [
            "",
            f"**{DIGITS}**, default config: {tr['train_images']} train images (8x8), val 200, test 500; "
            f"{ex['dim']}-d features.",
            "",
            "| stage | time | throughput | vs baseline | peak RSS (MiB) |",
            "|---|---|---|---|---|",
            f"| stage 1: train the small CNN ({tr['epochs']} epochs, batch {tr['batch_size']}; median of "
            f"{len(tr['times'])}) | {fmt_s(tr['seconds'])}{mark(tr)} | "
            f"{fmt_n(tr['train_images'] * tr['epochs'] / tr['seconds'])} images/s | n/a | {fmt_mib(tr)} |",
            f"| extract features (all {ex['images']:,} images, batch {ex['batch_size']}) | "
            f"{fmt_s(ex['seconds'])}{mark(ex)} | "
            f"{fmt_n(ex['images_per_s'])} images/s | n/a | {fmt_mib(ex)} |",
            _io_row("store write (`FeatureStoreWriter`, 256-row chunks, 3 splits)", d["write"], d["npsave"],
                    "`np.save`"),
            _io_row("`np.save` of the same arrays", d["npsave"], None, ""),
            *_read_rows("store read (`open_store(...).read`, 3 splits", d),
            "",
            f"Heads on {DIGITS}: `make_method(name, {{\"seed\": 0, \"device\": ...}}).fit(train, val)` at their "
            "defaults, median fit time; test accuracies after that fit. \"L-BFGS\": the head is solved to "
            "convergence by full-batch L-BFGS (the convex heads' default); otherwise minibatch SGD for the epochs "
            "and steps the column gives; the baseline is the plain loop at the heads' default epochs.",
            "",
            HEAD_HEADER.format(t="fit time", b="plain CE, same process"),
            *_head_rows(d, per_epoch=False),
        ]
    if synth:
        s = synth
        w = s["write"]
        sp = w["splits"]
        lines += [
            "",
            f"**{SYNTH}**: synthetic features shaped like ImageNet-LT: train {sp['train']:,} x {SYN_DIM:,} float32, "
            f"{SYN_CLASSES:,} classes, {SYN_MAX:,} down to {SYN_MIN} per class (Pareto profile, "
            f"{w['shots']['many']} many- / {w['shots']['medium']} medium- / {w['shots']['few']} few-shot classes; "
            f"benchmarks/README.md), balanced val {sp['val']:,} ({SYN_VAL_PER_CLASS} per class) and test "
            f"{sp['test']:,} ({SYN_TEST_PER_CLASS} per class); class-conditional Gaussians. The store takes "
            f"{w['disk_bytes'] / 1e6:,.0f} MB on disk for {w['bytes'] / 1e6:,.0f} MB of arrays; generating the data "
            f"took another {fmt_s(w['generate_s'])}, not counted in the write.",
            "",
            "| stage | time | throughput | vs baseline | peak RSS (MiB) |",
            "|---|---|---|---|---|",
            _io_row("store write (`FeatureStoreWriter`, 4,096-row chunks, 3 splits)", w, s["npsave"], "`np.save`"),
            _io_row("`np.save` of the same arrays", s["npsave"], None, ""),
            *_read_rows("store read (`open_store(...).read`, 3 splits", s),
            *(_read_train_rows(s["read_train"]) if "read_train" in s else []),
        ]
        if "evaluate" in s:
            e = s["evaluate"]
            lines.append(f"| `stages.evaluate.evaluate` on {e['rows']:,} x {e['classes']:,} test logits | "
                         f"{fmt_s(e['seconds'])}{mark(e)} | {fmt_n(e['rows'] / e['seconds'])} rows/s | n/a | "
                         f"{fmt_mib(e)} |")
        lines += [
            "",
            f"Heads on {SYNTH}, `epochs={args.epochs}` of minibatch SGD (`solver: sgd`, `min_steps: 0`; at their "
            "defaults the convex heads solve to convergence with L-BFGS, and `cosine` and `ldam-drw` take at least "
            "5,000 steps), one run each: seconds per epoch (fit time / epochs), "
            "against the plain-CE loop run alone before and after the heads ("
            + "; ".join(f"{fmt_s(b0 / k[0])} and {fmt_s(b1 / k[0])} per epoch"
                        for k, (b0, b1) in s.get("baseline_runs", {}).items())
            + "; the faster is the baseline). "
            + ("A representative subset by default (every sampler, classifier module and two-stage variant; "
               "the others only change `ce`'s loss or wrap it), which keeps this table near 10 minutes on "
               "a quiet 2-core machine; `--heads` runs any list. "
               if default_synth else "")
            + "A fit also computes the feature moments and standardises the features once, which a 1-epoch run does "
            "not amortise; `lws` trains two stages of `epochs` each (classifier, then scales) and `tau-norm` adds a "
            "search over 21 values of tau on val. Accuracies after so short a training are a sanity check, not "
            "results.",
            "",
            HEAD_HEADER.format(t="time / epoch", b="plain CE, own process"),
            *_head_rows(s, per_epoch=True),
        ]
    return "\n".join(lines)


def _pair_rows(label: str, res: dict) -> list[str]:
    rows = []
    for name, h in res.items():
        if "error" in h:
            rows.append(f"| {label} | `{name}` | | failed: {h['error'].replace('|', '/')} | | | | | |")
            continue
        bound = "≤ " if h["head_rss_bound"] else ""
        bal, _ = fmt_acc(h["metrics"])
        base_bal, _ = fmt_acc(h["baseline_metrics"])
        rows.append(
            f"| {label} | `{name}` | {h['epochs']} | {fmt_s(h['seconds'])}{mark(h)} | {fmt_s(h['baseline_seconds'])} | "
            f"**{fmt_ratio(h['seconds'], h['baseline_seconds'])}** | {bound}{h['rss_mib']:,.0f} / "
            f"{h['baseline_rss_mib']:,.0f} | **{bound}{fmt_ratio(h['rss_mib'], h['baseline_rss_mib'])}** | "
            f"{h['read_rss_mib']:,.0f} | {bal} / {base_bal} |")
    return rows


def _pair_contended(runs: list[dict]) -> str:
    discarded = sum(r.get("discarded_runs", 0) for r in runs)
    waited = sum(r.get("waited_s", 0.0) for r in runs)
    out = ""
    if discarded or waited >= 1.5 * len(runs):
        out += (f" The machine is shared: the script waited {waited / 60:.1f} minutes in all for other processes to "
                f"leave the CPU before starting stages, and threw away and reran {discarded} timed round(s) during "
                f"which others used more than {CONTENDED_CORES} cores.")
    if any(is_contended(r) for r in runs):
        out += (" †: no quiet round within the retry budget, so contended rounds count too; the head and the plain "
                "loop alternate, so both are slowed and the ratio suffers less than the times.")
    return out


def render_heads(facts: dict, idle: dict, res: dict, args, total_s: float, load_during: float | None) -> str:
    """The ``--heads-only`` block: minibatch head fits side by side with the plain loop."""
    gpu = f", GPU {facts['gpu']}" if "gpu" in facts else ""
    flags = [f for f, on in ((f"--device {args.device}", args.device != "auto"),
                             (f"--threads {args.threads}", bool(args.threads)),
                             (f"--epochs {args.epochs}", args.epochs not in (None, PAIR_EPOCHS)),
                             (f"--heads {args.heads}", bool(args.heads)),
                             (f"--large-heads {args.large_heads or chr(34) * 2}", args.large_heads is not None),
                             (f"--pair-rows {args.pair_rows}", args.pair_rows != PAIR_ROWS),
                             (f"--repeats {args.repeats}", args.repeats not in (None, 3))) if on]
    run = f"; this run added `{' '.join(flags)}`" if flags else ""
    load = (f"; the rest of the machine used {load_during:.2f} cores on average meanwhile"
            if load_during is not None else "")
    all_runs = [h for part in ("gauss", "synth") for h in res[part].values() if "error" not in h]
    n_rounds = sorted({len(h["times"]) for h in all_runs})
    lines = [
        f"_Head fits measured {facts['date']} on {facts['cores']} CPU cores ({facts['cpu']}; torch threads "
        f"{facts['torch_threads']}){gpu}, device `{facts['device']}`; Python {facts['python']}, "
        f"torch {facts['torch']}, numpy {facts['numpy']}; 1-minute load average {facts['load_before']:.1f} "
        f"before the run{load}; "
        f"{total_s / 60:.1f} minutes in all. Reproduce with `{HEADS_COMMAND}` (this block alone) or "
        f"`{COMMAND}` (this block and the table after it){run}._",
        "",
        "Minibatch head fits (`solver: sgd`, `min_steps: 0`, batch 256, lr 0.1, weight decay 5e-4, seed 0; "
        "`make_method(name, ...).fit(train, val)`, which includes the class-balanced feature moments and the "
        "standardisation: of each batch on the CPU, of the device copy on an accelerator) against the plain "
        "torch loop (`nn.Linear` + `F.cross_entropy`, SGD with momentum 0.9, the same epochs, batch size, lr and "
        "weight decay, on the same train tensors, no standardisation, no schedule), both in one process, "
        "alternating (plain loop, head, plain loop, head ...): "
        f"the best of {n_rounds[0] if n_rounds else 'n/a'} or more runs each, after one untimed round on the "
        f"{args.pair_rows:,} x {PAIR_DIM} set and none on the ImageNet-LT shape. Peak RSS: `ru_maxrss` of that "
        "process right after the first fit of each, the plain loop first (the whole process: Python, torch and "
        f"the store's three splits, read before any fit: the column \"after the read\"; an idle process that "
        f"imports torch peaks at {idle['rss_mib']:,.0f} MiB); \"≤\": the head never raised the process's high-water "
        "mark above the plain loop's. Targets (issue 13): time ratio at most 1.3x, memory ratio at most 1.5x. "
        f"Accuracies after {res.get('epochs', PAIR_EPOCHS)} epochs are a sanity check, not results (the "
        f"Gaussian features carry no class signal: 1% is chance there)."
        + _pair_contended(all_runs),
        "",
        "| features | head | epochs | head fit | plain loop | ratio | peak RSS head / plain (MiB) | ratio "
        "| RSS after the read (MiB) | test bal. acc. head / plain (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *_pair_rows(f"{args.pair_rows:,} x {PAIR_DIM}, 100 classes (seeded Gaussians)", res["gauss"]),
        *_pair_rows(f"{SYNTH}: 115,846 x 2,048, 1,000 classes", res["synth"]),
    ]
    return "\n".join(lines)


def _insert_heads_block(text: str | None, block: str) -> str:
    """README.md without the perf-heads markers: the block right before the perf-table (or at the end)."""
    if text is None:
        return f"## Performance\n\n{block}\n"
    at = text.find(START_MARKER)
    if at == -1:
        return text.rstrip("\n") + f"\n\n{block}\n"
    return text[:at] + block + "\n\n" + text[at:]


def _append_performance(text: str | None, block: str) -> str:
    """README.md without the perf-table markers: a Performance section at the end (or a new file)."""
    if text is None:
        return f"## Performance\n\n{block}\n"
    print("README.md has no perf-table markers: appending a Performance section", file=sys.stderr)
    return text.rstrip("\n") + f"\n\n## Performance\n\n{block}\n"


def write_readme(table: str) -> None:
    """Replace only the text between the markers (README.md is re-read right before writing)."""
    from readme import write_section  # benchmarks/readme.py (this folder is on sys.path)

    write_section(START_MARKER, END_MARKER, table, if_missing=_append_performance)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=[DIGITS, SYNTH, "all"], default="all")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: CUDA when present)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs of every head on {SYNTH}, reported per epoch (default 1); with --heads-only, "
                        f"the epochs of every paired fit (default {PAIR_EPOCHS})")
    p.add_argument("--heads", default=None,
                   help=f"comma-separated heads to run on both data sets (default: every registered head plus "
                        f"ce+pc on {DIGITS}, {', '.join(SYNTH_DEFAULT_HEADS)} on {SYNTH})")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each short stage; the median is reported (default 5); with --heads-only, the "
                        "timed rounds of each pair, the best is reported (default 3)")
    p.add_argument("--heads-only", action="store_true",
                   help=f"only the minibatch head fits side by side with the plain loop ({PAIR_EPOCHS} epochs): "
                        f"{', '.join(PAIR_HEADS)} (or --heads) on a seeded {PAIR_ROWS:,} x {PAIR_DIM} store and "
                        f"{', '.join(PAIR_LARGE_HEADS)} (or --large-heads) on the {SYNTH} store; --write-readme "
                        "writes that block between the perf-heads markers")
    p.add_argument("--large-heads", default=None,
                   help=f"with --heads-only or --dataset all: comma-separated paired heads on {SYNTH} (default "
                        f"{','.join(PAIR_LARGE_HEADS)}; an empty string skips that set)")
    p.add_argument("--pair-rows", type=int, default=PAIR_ROWS,
                   help=f"with --heads-only or --dataset all: train rows of the seeded Gaussian store (default {PAIR_ROWS:,})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the number of cores)")
    p.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S,
                   help="seconds to wait before each stage for other processes to leave the CPU "
                        f"(at most {QUIET_WAIT_TOTAL_S:.0f} s in all; 0: never wait)")
    p.add_argument("--write-readme", action="store_true",
                   help="write the table into README.md between the perf-table markers (--heads-only: the "
                        "head-fit block between the perf-heads markers; --dataset all: both)")
    args = p.parse_args(argv)
    for key in ("epochs", "repeats", "threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error("--epochs, --repeats and --threads must be >= 1")
    if args.pair_rows < 200:
        p.error("--pair-rows must be at least 200 (100 classes, and a val and test split of 1/20 and 1/10)")
    if not args.heads_only:
        args.epochs = 1 if args.epochs is None else args.epochs
        args.repeats = 5 if args.repeats is None else args.repeats
    return args


def heads_block(args, facts: dict, idle: dict, heads: list[str], large: list[str], device: str,
                workdir: str) -> str:
    """The paired head fits (``--heads-only``, and the last part of ``--dataset all``), rendered."""
    t_start = time.perf_counter()
    epochs = PAIR_EPOCHS if args.epochs is None else args.epochs
    repeats = 3 if args.repeats is None else args.repeats
    res = bench_head_pairs(workdir, device, heads, large, epochs, repeats, args.pair_rows)
    total = time.perf_counter() - t_start
    runs = [h for part in ("gauss", "synth") for h in res[part].values() if "others_cores" in h]
    wall = sum(h["wall_s"] for h in runs)
    load = sum(h["others_cores"] * h["wall_s"] for h in runs) / wall if wall > 0 else None  # wall > 0 guards
    return render_heads(facts, idle, res, args, total, load)


def write_heads_block(table: str) -> None:
    from readme import write_section  # benchmarks/readme.py (this folder is on sys.path)

    write_section(HEADS_START, HEADS_END, table, if_missing=_insert_heads_block)
    print("README.md: head-fit block updated")


def main(argv=None) -> int:
    global THREADS, QUIET_WAIT_S

    args = parse_args(argv)
    t_start = time.perf_counter()
    THREADS = args.threads or cores()
    QUIET_WAIT_S = max(0.0, args.quiet_wait)
    workdir = tempfile.mkdtemp(prefix="longtail-bench-")
    for var, sub in (("TMPDIR", "tmp"), ("MPLCONFIGDIR", "mpl"), ("PREFECT_HOME", "prefect")):
        path = os.path.join(workdir, sub)
        os.makedirs(path, exist_ok=True)
        os.environ[var] = path  # inherited by every spawned child
    tempfile.tempdir = os.environ["TMPDIR"]
    try:
        from longtail.stages.registry import known_methods, make_method
        from longtail.stages.errors import LongtailError

        try:
            facts = machine_facts(args.device)
            if args.heads:
                heads = [h.strip() for h in args.heads.split(",") if h.strip()]
                synth_heads = heads
            else:
                heads = default_heads()
                synth_heads = [h for h in SYNTH_DEFAULT_HEADS if h in known_methods()]
            large = [h.strip() for h in (args.large_heads if args.large_heads is not None
                                          else ",".join(PAIR_LARGE_HEADS)).split(",") if h.strip()]
            for h in heads + (large if args.heads_only or args.dataset == "all" else []):
                make_method(h, {})
        except LongtailError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        device = facts["device"]
        print("longtail stage benchmarks")
        for k, v in facts.items():
            print(f"  {k:<14s} {v}")
        print(f"  registered     {', '.join(known_methods())}")
        if args.heads_only:
            print(f"  paired heads   {', '.join(heads if args.heads else PAIR_HEADS)} on {args.pair_rows:,} x "
                  f"{PAIR_DIM}; {', '.join(large) or 'none'} on {SYNTH}", flush=True)
        elif args.dataset in (DIGITS, "all"):
            print(f"  heads {DIGITS:<8s} {', '.join(heads)}")
        if args.dataset in (SYNTH, "all") and not args.heads_only:
            print(f"  heads synthetic {', '.join(synth_heads)} (epochs={args.epochs})", flush=True)

        idle = run_stage("idle", device=device)
        pair_heads = heads if args.heads else list(PAIR_HEADS)
        if args.heads_only:
            block = heads_block(args, facts, idle, pair_heads, large, device, workdir)
            print()
            print(block)
            print(f"\ntotal benchmark time: {time.perf_counter() - t_start:.0f} s", flush=True)
            if args.write_readme:
                write_heads_block(block)
            return 0
        digits = synth = None
        if args.dataset in (DIGITS, "all"):
            digits = bench_digits(workdir, device, heads, args.repeats)
        if args.dataset in (SYNTH, "all"):
            synth = bench_synthetic(workdir, device, synth_heads, args.epochs, args.repeats)
        total = time.perf_counter() - t_start
        table = render(facts, idle, digits, synth, args, total, default_synth=not args.heads)
        print()
        print(table)
        block = None
        if args.dataset == "all":  # the paired head fits too: one command regenerates the whole section
            pair_args = argparse.Namespace(**{**vars(args), "epochs": None, "repeats": None})
            block = heads_block(pair_args, facts, idle, pair_heads, large, device, workdir)
            print()
            print(block)
        print(f"\ntotal benchmark time: {time.perf_counter() - t_start:.0f} s", flush=True)
        if args.write_readme:
            write_readme(table)
            print("README.md: performance table updated")
            if block is not None:
                write_heads_block(block)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
