"""Neighbour tables: the K nearest train samples of every train sample, by cosine similarity.

Heuristic-CALA (paper 000, eq. 6-8 and appendix B.II) estimates its attribute term from each
sample's neighbourhood ``N_K(x)`` in feature space, measured by the cosine distance between deep
features ("we employ the cosine distance between the deep features of training samples to compute
the neighborhood of each sample", appendix B.II). On frozen cached features the neighbourhoods never
change, so a table is computed once and reused by every run, epoch and method.

:func:`build_table` computes it with faiss: inner product on L2-normalised rows (= cosine
similarity), queried ``chunk_rows`` rows at a time so that memory stays bounded (the ``(N, K)``
result arrays are the only O(N) outputs). Each row is queried for ``K + 1`` neighbours and its own
index is dropped wherever it appears (with exact duplicates another row can rank before it); when
it does not appear (more than ``K`` exact duplicates), the last one is dropped, so a row is never
its own neighbour.

Indexes (``index``):

``flat``
    Exact search. On CPU it is faiss' brute-force ``knn`` (the kernel ``IndexFlatIP.search``
    runs, BLAS inner products and a heap per query) straight on the normalised array, which spares
    the copy of the ``N x D`` matrix that ``IndexFlatIP.add`` makes; on GPU an ``IndexFlatIP``
    moved to the device with ``index_cpu_to_gpu``.
``ivf``
    ``IndexIVFFlat`` on inner product, ``nlist`` cells (default ``4 * sqrt(N)``, at most ``N / 39``
    so that each centroid has the 39 training points faiss asks for) trained by spherical k-means
    on a seeded sample of at most ``256 * nlist`` rows; ``nprobe`` cells searched per query
    (default 32). For stores beyond a million rows.
``hnsw``
    ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``: ``m`` links per node (default 32),
    ``ef_construction`` (default 40) and ``ef_search`` (default 64, at least ``K + 1``). CPU only
    (faiss has no GPU HNSW). Its multi-threaded construction is not bit-for-bit deterministic.

An approximate table records its ``recall``: recall@K against exact search on a seeded sample of
``RECALL_QUERIES`` rows (the share of the exact K neighbours that the approximate search found).

The GPU is used when faiss was built with GPU support (``faiss.get_num_gpus() > 0``) and the device
is CUDA; otherwise the CPU (faiss' OpenMP threads).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from longtail.stages.errors import LongtailError

log = logging.getLogger("longtail")

INDEXES = ("flat", "ivf", "hnsw")
METRICS = ("cosine",)
#: query rows per faiss search call (the ``(chunk, K + 1)`` results and faiss' own blocks are the
#: per-chunk memory)
CHUNK_ROWS = 65536
#: queries on which an approximate table's recall@K is measured against exact search
RECALL_QUERIES = 1000
#: index parameters and their defaults (``None``: computed from N)
INDEX_PARAMS: dict[str, dict[str, int | None]] = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": 32},
    "hnsw": {"m": 32, "ef_construction": 40, "ef_search": 64},
}
#: feature entries per block of :func:`normalise`'s norms (bounds its temporaries to a few MB)
_NORM_ELEMENTS = 1 << 20
#: faiss' GPU k-selection handles at most this many neighbours per query
_GPU_MAX_K = 2048


def table_fingerprint(store_fingerprint: str, split: str = "train") -> str:
    """What a table built on ``split`` of a store records as its ``fingerprint``."""
    return f"{store_fingerprint}:{split}"


@dataclass(frozen=True, eq=False)
class NeighbourTable:
    """The K nearest train samples of every train sample (self excluded).

    Attributes:
        indices: ``(N, K)`` int64 rows of the train split, by decreasing similarity.
        similarities: ``(N, K)`` float32 cosine similarities, non-increasing along each row.
        k: neighbours per row.
        metric: ``"cosine"``.
        index: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``.
        fingerprint: the features it was built on (:func:`table_fingerprint`; empty when built
            outside the pipeline).
        recall: recall@K against exact search on a sample of rows (approximate indexes), else None.
    """

    indices: np.ndarray
    similarities: np.ndarray
    k: int
    metric: str = "cosine"
    index: str = "flat"
    fingerprint: str = ""
    recall: float | None = None

    def __post_init__(self) -> None:
        idx = np.asarray(self.indices)
        sim = np.asarray(self.similarities, dtype=np.float32)
        if idx.ndim != 2 or idx.shape != sim.shape or idx.shape[1] != self.k:
            raise LongtailError(
                f"neighbour table: indices {idx.shape} and similarities {sim.shape} are not both (N, K = {self.k})"
            )
        if idx.dtype.kind not in "iu":
            raise LongtailError(f"neighbour table: indices must be integers, got dtype {idx.dtype}")
        if self.metric not in METRICS:
            raise LongtailError(f"neighbour table: unknown metric {self.metric!r} (known: {', '.join(METRICS)})")
        if self.index not in INDEXES:
            raise LongtailError(f"neighbour table: unknown index {self.index!r} (known: {', '.join(INDEXES)})")
        object.__setattr__(self, "indices", idx.astype(np.int64, copy=False))
        object.__setattr__(self, "similarities", sim)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def check_for(self, n_rows: int, fingerprint: str | None = None) -> None:
        """LongtailError unless this table belongs to a train split of ``n_rows`` rows (and, when
        ``fingerprint`` is given, to exactly those features: a stale table is never reused)."""
        if fingerprint is not None and self.fingerprint != fingerprint:
            raise LongtailError(
                f"neighbour table was built for other features (fingerprint {self.fingerprint or 'none'!r}, "
                f"these features {fingerprint!r}): rebuild it"
            )
        if len(self) != n_rows:
            raise LongtailError(f"neighbour table has {len(self)} rows, the train split {n_rows}: rebuild it")
        if len(self) and (self.indices.min() < 0 or self.indices.max() >= n_rows):
            raise LongtailError(f"neighbour table has indices outside [0, {n_rows}): rebuild it")



def table_tensors(table: NeighbourTable) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, meta)`` of ``table`` for an artifact: ``indices`` and ``similarities`` as torch
    tensors (safetensors), ``k``, ``metric``, ``index``, ``fingerprint``, ``recall`` and ``rows`` as
    JSON (the reverse: :func:`table_from_tensors`)."""
    import torch

    return ({"indices": torch.from_numpy(np.ascontiguousarray(table.indices)),
             "similarities": torch.from_numpy(np.ascontiguousarray(table.similarities))},
            {"k": table.k, "metric": table.metric, "index": table.index, "fingerprint": table.fingerprint,
             "recall": table.recall, "rows": len(table)})


def table_from_tensors(tensors: dict[str, Any], meta: dict[str, Any]) -> NeighbourTable:
    """The table :func:`table_tensors` saved; a LongtailError for a missing entry."""
    try:
        return NeighbourTable(tensors["indices"].numpy(), tensors["similarities"].numpy(), int(meta["k"]),
                              meta["metric"], meta["index"], str(meta["fingerprint"]), meta.get("recall"))
    except KeyError as e:
        raise LongtailError(f"corrupt neighbour table (no {e})") from e

# ---------------------------------------------------------------------------------------- helpers
def normalise(features: np.ndarray) -> np.ndarray:
    """Row-wise L2-normalised float32 copy of ``(N, D)`` features (checked: 2-D, non-empty, finite).

    A zero row stays zero (its norm guards the division; it is then equally far from every row,
    similarity 0)."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise LongtailError(f"neighbour table: features must be a non-empty (N, D) array, got shape {x.shape}")
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    # norms a block of rows at a time: np.linalg.norm's (N, D) temporaries would double the memory
    # of a large store and dominate the time (the same per-row reduction, so the same values)
    norms = np.empty((x.shape[0], 1), dtype=np.float32)
    step = max(1, _NORM_ELEMENTS // x.shape[1])
    for start in range(0, x.shape[0], step):
        norms[start:start + step] = np.linalg.norm(x[start:start + step], axis=1, keepdims=True)
    # a NaN or infinite entry makes its row's norm non-finite; only those rows are checked entry-wise
    # (a finite row can overflow to an infinite norm too)
    suspect = np.flatnonzero(~np.isfinite(norms[:, 0]))
    bad = int((~np.isfinite(x[suspect]).all(axis=1)).sum())
    if bad:
        raise LongtailError(f"neighbour table: {bad} row(s) have NaN or infinite features")
    np.divide(x, norms, out=x, where=norms > 0)  # guards zero rows
    return x


def check_k(k: Any, n_rows: int) -> int:
    """K as an int in ``[1, n_rows)``, else one LongtailError naming K and N."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) < n_rows:
        raise LongtailError(
            f"neighbour table: K = {k!r} must be an integer of at least 1 and smaller than the "
            f"{n_rows} train rows"
        )
    return int(k)


def index_params(index: str, n_rows: int, params: dict[str, Any]) -> dict[str, int]:
    """The index's parameters with their defaults filled in (``nlist`` from N); LongtailError for an
    unknown index, an unknown parameter or a value that is not a positive integer."""
    if index not in INDEXES:
        raise LongtailError(f"neighbour table: unknown index {index!r} (known: {', '.join(INDEXES)})")
    defaults = INDEX_PARAMS[index]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise LongtailError(
            f"neighbour table: unknown parameter(s) {', '.join(unknown)} for index {index!r} "
            f"(allowed: {', '.join(defaults) or 'none'})"
        )
    out = {}
    for key, default in defaults.items():
        value = params.get(key, default)
        if value is None and key == "nlist":
            # ~4 sqrt(N) cells (faiss' guideline), but at least 39 training points per centroid
            value = max(1, min(int(round(4 * math.sqrt(n_rows))), n_rows // 39))
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise LongtailError(f"neighbour table: {index} parameter {key} = {value!r} must be a positive integer")
        out[key] = int(value)
    if index == "ivf":
        if out["nlist"] > n_rows:
            raise LongtailError(f"neighbour table: ivf nlist = {out['nlist']} exceeds the {n_rows} train rows")
        out["nprobe"] = min(out["nprobe"], out["nlist"])
    return out


def _gpu_id(device: Any, k: int) -> int | None:
    """The CUDA device faiss should use, or None for the CPU."""
    import faiss

    from longtail.stages.device import resolve_device

    if str(device).strip().lower() == "cpu":  # (spares the import of torch)
        return None
    dev = resolve_device(device)
    if dev.type != "cuda":
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        log.info("neighbour table: this faiss has no GPU support (install faiss-gpu); searching on the CPU")
        return None
    if k + 1 > _GPU_MAX_K:
        log.info("neighbour table: K + 1 = %d exceeds faiss' GPU limit of %d; searching on the CPU", k + 1, _GPU_MAX_K)
        return None
    return dev.index if dev.index is not None else 0


def _drop_self(ids: np.ndarray, sims: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(m, K + 1)`` search results of query rows ``rows`` -> ``(m, K)`` without the row itself:
    its own index is dropped wherever it appears, else the last column."""
    m, k1 = ids.shape
    drop = ids == rows[:, None]
    drop[~drop.any(axis=1), k1 - 1] = True
    # duplicate ids never occur in one faiss result row, so exactly one entry per row is dropped
    keep = ~drop
    return ids[keep].reshape(m, k1 - 1), sims[keep].reshape(m, k1 - 1)


def _exact_search(x: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(len(rows), K)`` neighbours of ``x[rows]`` among all of ``x``, self excluded (CPU)."""
    import faiss

    sims, ids = faiss.knn(np.ascontiguousarray(x[rows]), x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return _drop_self(ids, sims, rows)


def _make_index(x: np.ndarray, k: int, index: str, params: dict[str, int], seed: int, gpu: int | None):
    """A filled faiss index over ``x`` (None for the exact CPU search, which needs no index)."""
    import faiss

    n, d = x.shape
    if index == "flat":
        if gpu is None:
            return None, None
        res = faiss.StandardGpuResources()
        cpu = faiss.IndexFlatIP(d)
        gpu_index = faiss.index_cpu_to_gpu(res, gpu, cpu)
        gpu_index.add(x)
        return gpu_index, res
    if index == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = int(seed)
        ivf.cp.spherical = True  # centroids on the unit sphere, like the data
        rng = np.random.default_rng([int(seed), 6])
        size = min(n, 256 * params["nlist"])
        sample = x if size == n else x[np.sort(rng.choice(n, size, replace=False))]
        ivf.train(np.ascontiguousarray(sample))
        ivf.nprobe = params["nprobe"]
        res = None
        if gpu is not None:
            res = faiss.StandardGpuResources()
            ivf = faiss.index_cpu_to_gpu(res, gpu, ivf)
            faiss.GpuParameterSpace().set_index_parameter(ivf, "nprobe", params["nprobe"])
        ivf.add(x)
        return ivf, res
    hnsw = faiss.IndexHNSWFlat(d, params["m"], faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = params["ef_construction"]
    hnsw.add(x)
    hnsw.hnsw.efSearch = max(params["ef_search"], k + 1)
    return hnsw, None


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=None, leave=False)


# ---------------------------------------------------------------------------------------- the table
def build_table(features: np.ndarray, k: int, *, index: str = "flat", device: str = "cpu",
                chunk_rows: int = CHUNK_ROWS, fingerprint: str = "", seed: int = 0,
                **index_params_: Any) -> NeighbourTable:
    """The K nearest neighbours (cosine) of every row of ``features`` ``(N, D)`` among the others.

    Args:
        features: ``(N, D)`` train features (any float dtype; checked finite).
        k: neighbours per row, ``1 <= K < N``.
        index: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"`` (approximate; see the module docstring).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; faiss uses its GPU index when it
            has GPU support and the device is CUDA.
        chunk_rows: query rows per search call (bounds the memory of the search, not the result).
        fingerprint: recorded in the table (:func:`table_fingerprint`).
        seed: the IVF training sample and k-means, and the recall sample.
        **index_params_: ``nlist``, ``nprobe`` (ivf); ``m``, ``ef_construction``, ``ef_search`` (hnsw).

    Returns:
        A :class:`NeighbourTable` with ``(N, K)`` indices and similarities, and for an approximate
        index its recall@K on ``min(N, RECALL_QUERIES)`` seeded rows.
    """
    import faiss

    if index not in INDEXES:  # before the copy of the features
        raise LongtailError(f"neighbour table: unknown index {index!r} (known: {', '.join(INDEXES)})")
    x = normalise(features)
    n = x.shape[0]
    k = check_k(k, n)
    params = index_params(index, n, index_params_)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise LongtailError(f"neighbour table: chunk_rows = {chunk_rows!r} must be a positive integer")
    gpu = _gpu_id(device, k) if index != "hnsw" else None
    faiss_index, _res = _make_index(x, k, index, params, seed, gpu)  # _res keeps the GPU memory alive

    indices = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    with _progress(n, f"neighbours ({index}, K={k})") as bar:
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            rows = np.arange(start, stop, dtype=np.int64)
            if faiss_index is None:
                d, i = faiss.knn(x[start:stop], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
            else:
                d, i = faiss_index.search(x[start:stop], k + 1)
            indices[start:stop], sims[start:stop] = _drop_self(i, d, rows)
            bar.update(stop - start)

    recall = None
    if index != "flat":
        # an IVF query whose probed cells hold fewer than K + 1 rows gets -1 ids: search those rows exactly
        short = np.flatnonzero((indices < 0).any(axis=1))
        if short.size:
            log.info("neighbour table: %d row(s) found fewer than K neighbours in their probed cells; "
                     "searched exactly", short.size)
            indices[short], sims[short] = _exact_search(x, short, k)
        rng = np.random.default_rng([int(seed), 7])
        q = np.sort(rng.choice(n, min(n, RECALL_QUERIES), replace=False))
        exact, _ = _exact_search(x, q, k)
        hits = sum(len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(indices[q], exact))
        recall = hits / float(q.size * k)  # q.size >= 1: n >= 2 since K < N
    return NeighbourTable(indices, sims, k, "cosine", index, fingerprint, recall)
