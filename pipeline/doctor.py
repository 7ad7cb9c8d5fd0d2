"""``longtail doctor``: is this machine (or container) ready to run the pipeline on its device?

:func:`environment` reports the versions that matter (Python, torch and the CUDA it was built for,
numpy, zarr, faiss, prefect), the CUDA devices torch sees (name, compute capability, memory), how
many GPUs faiss can use, and the device that ``--device`` resolves to
(:func:`stages.device.resolve_device`: a device that cannot be had is a user error, exit status 2).

:func:`smoke` then runs a tiny end-to-end job on that device in a temporary directory, one step at
a time, each with a check that can fail:

``store``
    a synthetic long-tailed feature set (5 Gaussian classes in 16 dimensions, 80 train rows with
    counts 40..4, 50 balanced test rows) written to a Zarr feature store in chunks of 16 rows,
    reopened, its fingerprints recomputed (:meth:`FeatureStore.verify`) and read back unchanged;
``fit``
    a ``ce`` head fitted on the train split on the device (its parameters must live there);
``logits``
    the head's test logits computed chunk by chunk from the store
    (:func:`longtail.pipeline.methods.split_logits`): finite, ``(N, C)``, equal to the logits of the whole
    split at once;
``knn``
    an exact cosine kNN search with faiss (its GPU index when faiss has GPUs and the device is
    CUDA), checked against a brute-force matrix multiply with torch on the device;
``metrics``
    :func:`stages.evaluate.evaluate` of the logits: balanced accuracy must be well above chance
    (the classes are separable by construction).

``--quick`` (the containers' health check) stops after the ``imports`` step. A step that fails
makes the later ones ``skipped``; the command exits 1 when any step did not pass.
"""

from __future__ import annotations

import importlib
import os
import platform
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import numpy as np

#: what the pipeline imports at run time (a missing one fails ``imports``)
MODULES = ("torch", "numpy", "zarr", "faiss", "prefect", "nflows", "sklearn", "safetensors", "fsspec")
#: the synthetic job: train counts per class (long-tailed), test rows per class, dimension
TRAIN_COUNTS = (40, 20, 10, 6, 4)
TEST_PER_CLASS = 10
DIM = 16
CHUNK_ROWS = 16
KNN_K = 5


@dataclass
class Step:
    name: str
    status: str  # "pass", "fail" or "skipped"
    seconds: float
    detail: str


def _version(name: str) -> str | None:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))
    except Exception:  # a broken install raises anything, not only ImportError
        return None


def _sanitised_url(url: str | None) -> str | None:
    """``url`` without a ``user:password@`` part (the report may be pasted into an issue)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def environment(device) -> dict[str, Any]:
    """Versions, CUDA devices, faiss GPUs and the selected ``device`` (a ``torch.device``)."""
    import torch

    cuda = {"available": torch.cuda.is_available(), "built_for": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "devices": []}
    if cuda["available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "memory_gib": round(p.total_memory / 2**30, 1)})
    faiss = {"version": _version("faiss"), "gpus": 0}
    if faiss["version"] is not None:
        import faiss as _faiss

        faiss["gpus"] = int(getattr(_faiss, "get_num_gpus", lambda: 0)())
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda,
        "faiss": faiss,
        "numpy": np.__version__,
        "zarr": _version("zarr"),
        "prefect": _version("prefect"),
        "env": {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "PREFECT_API_URL": _sanitised_url(os.environ.get("PREFECT_API_URL"))},
        "device": str(device),
    }


def _run_step(name: str, fn: Callable[[], str], steps: list[Step]) -> bool:
    """Run one step unless an earlier one failed; record pass/fail with its detail."""
    if any(s.status != "pass" for s in steps):
        steps.append(Step(name, "skipped", 0.0, "an earlier step failed"))
        return False
    t0 = time.perf_counter()
    try:
        detail, status = fn(), "pass"
    except Exception as exc:  # the doctor reports every failure as a step result, not a traceback
        last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" ({os.path.basename(last.filename)}:{last.lineno})" if last else ""
        first = (str(exc).strip().splitlines() or [""])[0]
        detail, status = f"{type(exc).__name__}: {first}{where}", "fail"
    steps.append(Step(name, status, round(time.perf_counter() - t0, 3), detail))
    return status == "pass"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _imports() -> str:
    missing = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken install raises anything, not only ImportError
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    _check(not missing, "cannot import " + "; ".join(missing))
    return f"{len(MODULES)} modules import"


def _synthetic(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Gaussian classes with means ``3 e_c`` (separable): long-tailed train, balanced test."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, counts in (("train", TRAIN_COUNTS), ("test", (TEST_PER_CLASS,) * len(TRAIN_COUNTS))):
        labels = np.repeat(np.arange(len(counts)), counts)
        feats = rng.normal(size=(len(labels), DIM)) + 3.0 * np.eye(len(counts), DIM)[labels]
        out[split] = (feats.astype(np.float32), labels.astype(np.int64))
    return out


def smoke(device, workdir: str) -> list[Step]:
    """The tiny end-to-end job on ``device`` (a ``torch.device``) in ``workdir``; one Step per stage."""
    import torch

    from longtail.pipeline.methods import split_logits
    from longtail.stages import evaluate as ev
    from longtail.stages.registry import make_method
    from longtail.storage.featurestore import FeatureStoreWriter, open_store

    steps: list[Step] = []
    ctx: dict[str, Any] = {}
    data = _synthetic()
    C = len(TRAIN_COUNTS)

    def store() -> str:
        url = os.path.join(workdir, "doctor.zarr")
        w = FeatureStoreWriter(url, class_names=[f"class{c}" for c in range(C)], class_counts=list(TRAIN_COUNTS),
                               backbone={"kind": "synthetic", "name": "doctor"}, backbone_hash="none",
                               dataset_fingerprint="doctor-synthetic", feature_dim=DIM,
                               splits={s: len(y) for s, (_, y) in data.items()}, chunk_rows=CHUNK_ROWS)
        for split, (x, y) in data.items():
            w.begin_split(split)
            for start in range(0, len(y), CHUNK_ROWS):
                w.write_chunk(split, x[start:start + CHUNK_ROWS], y[start:start + CHUNK_ROWS])
            w.end_split(split)
        w.finish()
        fs = open_store(url)
        fs.verify()
        for split, (x, y) in data.items():
            back = fs.read(split)
            _check(np.array_equal(back.features, x) and np.array_equal(back.labels, y),
                   f"split {split!r} reads back different from what was written")
        ctx["fs"] = fs
        return f"{sum(len(y) for _, y in data.values())} rows in chunks of {CHUNK_ROWS}, fingerprints verified"

    def fit() -> str:
        train = ctx["fs"].read("train")
        head = make_method("ce", {"epochs": 20, "batch_size": 16, "seed": 0, "device": str(device)})
        head.fit(train)
        where = next(head.module_.parameters()).device
        _check(where.type == device.type and (device.index is None or where.index == device.index),
               f"the head's parameters are on {where}, not on {device}")
        ctx["head"] = head
        return f"ce head on {where}"

    def logits() -> str:
        z = split_logits(ctx["head"], ctx["fs"], "test", rows=CHUNK_ROWS)
        whole = ctx["head"].logits(data["test"][0])
        _check(z.shape == (len(data["test"][1]), C) and np.isfinite(z).all(), f"logits of shape {z.shape}, or not finite")
        _check(np.allclose(z, whole, rtol=1e-5, atol=1e-5), "chunked logits differ from the logits of the whole split")
        ctx["logits"] = z
        return f"({z.shape[0]}, {z.shape[1]}) in chunks of {CHUNK_ROWS} rows, equal to the whole split at once"

    def knn() -> str:
        import faiss

        from longtail.stages.neighbours import build_table

        x = data["train"][0]
        table = build_table(x, KNN_K, device=str(device), chunk_rows=CHUNK_ROWS)  # the pipeline's own path
        xn = torch.nn.functional.normalize(torch.as_tensor(x, device=device), dim=1)
        sims = (xn @ xn.T).fill_diagonal_(-float("inf"))  # self excluded, as in the table
        ref = torch.topk(sims, KNN_K).values
        _check(np.allclose(table.similarities, ref.cpu().numpy(), atol=1e-4),
               "faiss neighbour table differs from a brute-force matrix multiply")
        use_gpu = device.type == "cuda" and faiss.get_num_gpus() > 0
        return (f"exact cosine top-{KNN_K} neighbour table on {'GPU ' + str(device.index or 0) if use_gpu else 'CPU'} "
                f"(faiss {faiss.__version__}) matches torch on {device}")

    def metrics() -> str:
        m = ev.evaluate(ctx["logits"], data["test"][1], np.asarray(TRAIN_COUNTS))
        _check(m["balanced_accuracy"] > 2.0 / C, f"balanced accuracy {m['balanced_accuracy']:.3f} is near chance ({1 / C:.2f})")
        return f"balanced accuracy {m['balanced_accuracy']:.3f}, ECE {m['ece']:.3f} (chance {1 / C:.2f})"

    for name, fn in (("store", store), ("fit", fit), ("logits", logits), ("knn", knn), ("metrics", metrics)):
        _run_step(name, fn, steps)
    return steps


def run_doctor(device: str = "auto", quick: bool = False) -> dict[str, Any]:
    """The whole report: ``{"ok": bool, "environment": {...}, "steps": [{name, status, seconds, detail}]}``.

    Raises LongtailError (before any work) when ``device`` names a device this machine cannot give.
    """
    from longtail.stages.device import resolve_device

    dev = resolve_device(device)
    steps: list[Step] = []
    _run_step("imports", _imports, steps)
    if not quick and steps[0].status == "pass":
        with tempfile.TemporaryDirectory(prefix="longtail-doctor-") as tmp:
            steps += smoke(dev, tmp)
    return {"ok": all(s.status == "pass" for s in steps), "environment": environment(dev),
            "steps": [asdict(s) for s in steps]}
