"""Neighbour tables in the pipeline: computed once per store and table parameters, reused by
every run, epoch and method that asks for the same table.

A method that uses a table (``heuristic-cala`` and its ablations) exposes ``table_params()`` (``k``,
``metric``, ``index`` and the index's parameters) and ``set_table(table)``. Before such a method is
fitted, :func:`attach_table` runs (or loads) the table artifact and hands it over; the flow runs the
tables as a task of their own before the methods that need them (:func:`table_specs`).

An artifact of kind ``neighbours`` is keyed by the store fingerprint, the split, the table
parameters (defaults filled in; the device and chunk size left out, they do not change the table;
the seed only for approximate indexes, whose training sample it draws) and the source of
``stages/neighbours.py``. A changed store has another fingerprint, hence another key; a table whose
recorded fingerprint is not the store's is refused (:meth:`NeighbourTable.check_for`), never reused.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from longtail.pipeline.config import MethodSpec, RunConfig
from longtail.pipeline.keys import stable_hash, table_code_version
from longtail.pipeline.runner import MethodResult, StoreInfo, artifact_store, build_method, train_artifact
from longtail.stages.base import Method
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.neighbours import METRICS, NeighbourTable, build_table, check_k, index_params, table_fingerprint
from longtail.storage.artifacts import load_tensors, save_tensors
from longtail.storage.featurestore import open_store

KIND = "neighbours"
#: neighbours are train samples of train samples (paper 000, appendix B.II)
SPLIT = "train"
FILE = "table.safetensors"


def table_user(method: Method) -> Method | None:
    """The method itself or the method it wraps that uses a neighbour table, else None (a method
    whose ``table_params()`` returns None needs none with its parameters)."""
    m = method
    while m is not None:
        if callable(getattr(m, "table_params", None)) and m.table_params() is not None:
            return m
        m = getattr(m, "base", None)
    return None


def uses_table(cfg: RunConfig, spec: MethodSpec) -> bool:
    return table_user(build_method(cfg, spec)[0]) is not None


def table_specs(cfg: RunConfig) -> list[MethodSpec]:
    """One configured spec per distinct table (by the parameters its method asks for)."""
    out, seen = [], set()
    for spec in cfg.methods:
        user = table_user(build_method(cfg, spec)[0])
        if user is None:
            continue
        ident = stable_hash({k: v for k, v in user.table_params().items() if k != "device"})
        if ident not in seen:
            seen.add(ident)
            out.append(spec)
    return out


def _table_args(params: dict[str, Any], cfg: RunConfig, n_rows: int, seed: int | None = None) -> tuple[dict, dict]:
    """``(build_table keyword arguments, the parameters that decide the table)`` from a method's
    ``table_params()``; the seed and device are the ones it gives, else ``seed`` (the method's own),
    else the run's. LongtailError for a bad K, metric, index or index parameter."""
    p = dict(params)
    if "k" not in p:
        raise LongtailError("table_params() must give k")  # a bug in the method, worded for its author
    metric = p.pop("metric", "cosine")
    if metric not in METRICS:
        raise LongtailError(f"neighbour table: unknown metric {metric!r} (known: {', '.join(METRICS)})")
    k = check_k(p.pop("k"), n_rows)
    index = p.pop("index", "flat")
    device = p.pop("device", cfg.device)
    seed = p.pop("seed", cfg.seed if seed is None else seed)
    chunk = p.pop("chunk_rows", None)
    resolved = index_params(index, n_rows, p)
    decide = {"k": k, "metric": metric, "index": index, **resolved}
    if index != "flat":
        decide["seed"] = seed
    build = {"k": k, "index": index, "device": device, "seed": seed, **resolved}
    if chunk is not None:
        build["chunk_rows"] = chunk
    return build, decide


def table_key(store_fingerprint: str, decide: dict) -> str:
    return stable_hash(KIND, store_fingerprint, SPLIT, decide, table_code_version())


def run_neighbour_table(cfg: RunConfig, spec: MethodSpec, store: StoreInfo, force: bool = False,
                        train: FeatureSet | None = None) -> MethodResult:
    """Build (or reuse) the neighbour table that ``spec``'s method asks for, on the store's train
    split (``train``, when the caller has read it already); ``fit_seconds`` of the result is the
    build time (recorded when the table was built)."""
    method, _ = build_method(cfg, spec)
    user = table_user(method)
    if user is None:
        raise LongtailError(f"method {spec.name!r} uses no neighbour table")
    rows = open_store(store.url, storage_options=cfg.storage_options).num_rows(SPLIT)
    build, decide = _table_args(user.table_params(), cfg, rows, getattr(user, "seed", None))

    def pack(table: NeighbourTable) -> tuple[dict, dict]:
        files = {FILE: save_tensors({"indices": torch.from_numpy(table.indices),
                                     "similarities": torch.from_numpy(table.similarities)})}
        return files, {"params": decide, "k": table.k, "metric": table.metric, "index": table.index,
                       "fingerprint": table.fingerprint, "recall": table.recall, "rows": len(table),
                       "store_fingerprint": store.fingerprint, "split": SPLIT,
                       "code_version": table_code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    return train_artifact(
        cfg, store, KIND, table_key(store.fingerprint, decide), spec.name,
        lambda train: build_table(train.features, fingerprint=table_fingerprint(store.fingerprint, SPLIT), **build),
        pack, seconds_field="build_seconds", params=decide, force=force, train=train)


def load_table(cfg: RunConfig, key: str) -> NeighbourTable:
    """The table stored under ``key`` (safetensors, no pickle)."""
    artifacts = artifact_store(cfg)
    meta = artifacts.read_meta(KIND, key)
    where = artifacts.url(KIND, key)
    tensors = load_tensors(artifacts.read_file(KIND, key, FILE), where)
    try:
        return NeighbourTable(tensors["indices"].numpy(), tensors["similarities"].numpy(), int(meta["k"]),
                              meta["metric"], meta["index"], str(meta["fingerprint"]), meta.get("recall"))
    except KeyError as e:
        raise LongtailError(f"{where}: corrupt neighbour table (no {e})") from e


def attach_table(cfg: RunConfig, spec: MethodSpec, method: Method, store: StoreInfo,
                 train: FeatureSet | None = None) -> float:
    """Hand the cached table (built first if needed, from ``train`` when given) to the table user
    inside ``method``; returns the table's build time. LongtailError when the stored table does not
    belong to this store's train split or does not have the parameters the method asks for."""
    user = table_user(method)
    assert user is not None, "attach_table needs a method that uses a neighbour table"
    res = run_neighbour_table(cfg, spec, store, train=train)
    table = load_table(cfg, res.key)
    table.check_for(open_store(store.url, storage_options=cfg.storage_options).num_rows(SPLIT), table_fingerprint(store.fingerprint, SPLIT))
    got = {"k": table.k, "metric": table.metric, "index": table.index}
    want = {name: res.params[name] for name in got}
    if got != want:
        raise LongtailError(f"{artifact_store(cfg).url(KIND, res.key)}: neighbour table has "
                            f"{got}, the method asks for {want}: remove the corrupt artifact")
    user.set_table(table)
    return res.fit_seconds
