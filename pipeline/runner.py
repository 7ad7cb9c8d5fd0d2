"""The stage graph: extract -> methods (heads, then calibration wrappers) -> evaluate -> report.

Every function here runs without Prefect; ``flows/`` only schedules them. Each stage's output is
keyed by its inputs (see :mod:`pipeline.keys`), so a rerun with unchanged inputs recomputes
nothing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from longtail.pipeline import glt
from longtail.pipeline.config import MethodSpec, RunConfig
from longtail.pipeline.keys import (evaluate_code_version, extract_code_version, method_code_version,
                           report_code_version, stable_hash)
from longtail.stages.base import Method, SUFFIX_WRAPPERS, make_method, needs_full_split
from longtail.stages.data import FeatureSet
from longtail.stages.datasets import load_dataset
from longtail.stages.calibrate import logit_prior
from longtail.stages.dlsa import DLSA, FlowCascade, diagnostics
from longtail.stages.errors import LongtailError
from longtail.stages import extract as ex
from longtail.stages.label_shift import shifted_evaluation
from longtail.storage.artifacts import ArtifactStore, load_tensors, save_tensors
from longtail.storage.featurestore import FeatureStore, FeatureStoreWriter, open_store, store_status

log = logging.getLogger("longtail")

# ---------------------------------------------------------------------------- extraction
def backbone_spec(cfg: RunConfig) -> dict:
    """The backbone part of the config that determines the features."""
    b = cfg.backbone
    if b.kind == "builtin":
        return {"kind": "builtin", "name": "small-cnn", "epochs": b.epochs, "lr": b.lr,
                "batch_size": b.batch_size, "weight_decay": b.weight_decay, "width": b.width,
                "seed": cfg.seed}
    if b.kind == "torchscript":
        return {"kind": "torchscript", "method": b.method}  # the file is identified by its hash
    return {"kind": "python", "target": b.target, "kwargs": b.kwargs, "classifier": b.classifier}


def extract_inputs(cfg: RunConfig, dataset_fingerprint: str, weights_hash: str | None) -> dict:
    """What the features depend on; recorded in the store so `longtail status` can say what changed."""
    return {"dataset_fingerprint": dataset_fingerprint, "backbone": backbone_spec(cfg),
            "weights_hash": weights_hash, "code_version": extract_code_version()}


def extract_key(inputs: dict) -> str:
    i = inputs
    return stable_hash("extract", i["dataset_fingerprint"], i["backbone"], i["weights_hash"], i["code_version"])


@dataclass
class StoreInfo:
    url: str
    fingerprint: str
    cached: bool
    extract_key: str | None = None


def _dataset(cfg: RunConfig):
    d = cfg.dataset
    assert d is not None
    return load_dataset(d.name, seed=cfg.seed, **d.model_dump(exclude={"name"}, exclude_none=True))


def _load_backbone(cfg: RunConfig, ds, artifacts: ArtifactStore, key: str) -> ex.Backbone:
    b = cfg.backbone
    if b.kind == "torchscript":
        return ex.load_torchscript(b.path, b.method)
    if b.kind == "python":
        return ex.load_python(b.target, b.kwargs, b.classifier)
    if artifacts.exists("backbone", key):  # a resumed extraction reuses the trained CNN
        data = artifacts.read_file("backbone", key, "backbone.safetensors")
        meta = artifacts.read_meta("backbone", key)
        module = ex.load_small_cnn(data)
        return ex.Backbone(ex.FeaturesOf(module, None, "features"), meta["identity"], meta["weights_hash"])
    train = ds.splits["train"]
    bb = ex.train_small_cnn(train.images, train.labels, ds.num_classes, epochs=b.epochs, lr=b.lr,
                            batch_size=b.batch_size, weight_decay=b.weight_decay, width=b.width,
                            seed=cfg.seed, device=cfg.device)
    artifacts.write("backbone", key, {"backbone.safetensors": ex.save_small_cnn(bb.module.net)},
                    {"identity": bb.identity, "weights_hash": bb.weights_hash, "train_log": bb.train_log})
    return bb


def _planned_weights(cfg: RunConfig) -> str | None:
    """The user backbone's weights hash (loads it, so an unreadable file fails here); None for the
    builtin CNN, whose weights are determined by its spec and the seed."""
    b = cfg.backbone
    if b.kind == "torchscript":
        return ex.load_torchscript(b.path, b.method).weights_hash
    if b.kind == "python":
        return ex.load_python(b.target, b.kwargs, b.classifier).weights_hash
    return None


def artifact_store(cfg: RunConfig) -> ArtifactStore:
    """The config's artifact cache, with its storage options and lock timeout."""
    return ArtifactStore(cfg.artifacts_url, storage_options=cfg.storage_options, lock_timeout=cfg.lock_timeout)


def planned_extract(cfg: RunConfig):
    """The dataset, the extraction inputs and the extraction key the config asks for (loads a user
    backbone, so an unreadable file fails here)."""
    ds = _dataset(cfg)
    inputs = extract_inputs(cfg, ds.fingerprint, _planned_weights(cfg))
    return ds, inputs, extract_key(inputs)


def _complete_store(cfg: RunConfig, key: str | None, ds_fingerprint: str | None) -> StoreInfo:
    """A complete store the config may use: same extraction key, or no dataset in the config."""
    store = open_store(cfg.store, storage_options=cfg.storage_options)
    if key is None:
        return StoreInfo(cfg.store, store.fingerprint, cached=True)
    made_by = store.attrs.get("extract_key")
    if made_by != key:
        raise LongtailError(
            f"store {cfg.store!r} is complete and is never overwritten, but it holds features of "
            f"another dataset, backbone or extraction code (dataset fingerprint "
            f"{store.dataset_fingerprint}, this config's {ds_fingerprint}): point `store` at a new "
            "path, or drop `dataset` from the config to use the store as it is"
        )
    return StoreInfo(cfg.store, store.fingerprint, cached=True, extract_key=key)


def existing_store(cfg: RunConfig) -> StoreInfo:
    """The config's store, which must already be complete (for single-stage reruns)."""
    status = store_status(cfg.store, storage_options=cfg.storage_options)
    if status != "complete":
        raise LongtailError(f"store {cfg.store!r} is {status}: run `longtail stage extract` or `longtail run` first")
    if cfg.dataset is None:
        return _complete_store(cfg, None, None)
    ds, _, key = planned_extract(cfg)
    return _complete_store(cfg, key, ds.fingerprint)


def preflight(cfg: RunConfig) -> None:
    """Every check that can fail on user input, before anything is written."""
    validate_methods(cfg)
    if os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        raise LongtailError(f"output {cfg.output!r} exists and is not a directory")
    status = store_status(cfg.store, storage_options=cfg.storage_options)
    if cfg.dataset is None:
        if status != "complete":
            raise LongtailError(f"store {cfg.store!r} is {status} and the config names no dataset to extract it from")
        fs = open_store(cfg.store, storage_options=cfg.storage_options)
        validate_methods(cfg, fs.num_classes)
        glt.use_groups(cfg, fs.has_attributes("test"), f"store {cfg.store!r}")
        return
    ds, _, key = planned_extract(cfg)
    validate_methods(cfg, ds.num_classes)
    glt.use_groups(cfg, ds.splits["test"].attributes is not None, f"dataset {ds.name!r}")
    if status == "complete":
        _complete_store(cfg, key, ds.fingerprint)


def run_extract(cfg: RunConfig) -> StoreInfo:
    """Stage 1: make sure ``cfg.store`` holds complete features; extract them if needed.

    A complete store is never overwritten: if it holds other features than the config describes,
    that is an error naming the store. An interrupted store is resumed (or rebuilt by the writer).
    """
    status = store_status(cfg.store, storage_options=cfg.storage_options)
    if cfg.dataset is None:
        if status != "complete":
            raise LongtailError(
                f"store {cfg.store!r} is {status} and the config names no dataset to extract it from"
            )
        return _complete_store(cfg, None, None)
    ds, inputs, key = planned_extract(cfg)
    if status == "complete":
        return _complete_store(cfg, key, ds.fingerprint)

    artifacts = artifact_store(cfg)
    bb = _load_backbone(cfg, ds, artifacts, key)
    first = ds.splits["train"]
    probe = next(ex.extract_chunks(bb, first.images[:2], batch_size=2, device=cfg.device, desc="probe"))
    writer = FeatureStoreWriter(
        cfg.store,
        class_names=list(ds.class_names),
        class_counts=ds.class_counts.tolist(),
        backbone=bb.identity | {"extract_key": key},
        backbone_hash=bb.weights_hash,
        dataset_fingerprint=ds.fingerprint,
        feature_dim=int(probe.shape[1]),
        splits={name: len(split) for name, split in ds.splits.items()},
        has_attributes={name: split.attributes is not None for name, split in ds.splits.items()},
        extra_attrs={"extract_key": key, "dataset": ds.name,
                     "extract_inputs": inputs}
        | ({"attribute_names": list(ds.attribute_names)} if ds.attribute_names else {}),
        storage_options=cfg.storage_options,
        lock_timeout=cfg.lock_timeout,
        reuse_complete=True,  # another run may have completed it since the status check above
    )
    try:  # the writer holds the store's lock: release it whatever happens (the store stays resumable)
        bs = cfg.extraction.batch_size
        for name, split in ds.splits.items():
            if writer.split_done(name):
                log.info("extract: split %s already complete, resumed", name)
                continue
            writer.begin_split(name)
            start = 0
            for chunk in ex.extract_chunks(bb, split.images, batch_size=bs, device=cfg.device,
                                           desc=f"extract {name}"):
                stop = start + len(chunk)
                writer.write_chunk(
                    name, chunk, split.labels[start:stop],
                    attributes=None if split.attributes is None else split.attributes[start:stop],
                    index=split.index[start:stop],
                )
                start = stop
            writer.end_split(name)
        fingerprint = writer.finish()
    finally:
        writer.close()
    # reused: another run completed this very store while this one waited for its lock
    return StoreInfo(cfg.store, fingerprint, cached=writer.reused, extract_key=key)


# ---------------------------------------------------------------------------- methods
def split_wrappers(name: str) -> tuple[str, list[str]]:
    """``ce+pc`` -> (``ce``, [``pc``]): the fitted part and the post-hoc suffix wrappers."""
    parts = name.split("+")
    suffixes: list[str] = []
    while len(parts) > 1 and parts[-1] in SUFFIX_WRAPPERS:
        suffixes.insert(0, parts.pop())
    return "+".join(parts), suffixes


def _resolved_params(cfg: RunConfig, spec: MethodSpec, method: Method) -> dict:
    """Config params plus the run's seed and device for every method (and wrapper) that takes them."""
    params = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.params.items()}
    m = method
    while m is not None:
        own = params if getattr(m, "base", None) is None else params.setdefault(type(m).name, {})
        names = type(m)._param_names()
        for key, value in (("seed", cfg.seed), ("device", cfg.device)):
            if key in names and key not in own:
                own[key] = value
        m = getattr(m, "base", None)
    return params


def build_method(cfg: RunConfig, spec: MethodSpec) -> tuple[Method, dict]:
    method = make_method(spec.name, spec.params)
    params = _resolved_params(cfg, spec, method)
    return make_method(spec.name, params), params


def planned_method(cfg: RunConfig, spec: MethodSpec, store_fingerprint: str) -> tuple[Method, dict, str]:
    """``spec``'s method, its resolved parameters and the key of its artifact on that store."""
    method, params = build_method(cfg, spec)
    return method, params, method_key(store_fingerprint, spec.name, params, method)


def _without_device(params: dict) -> dict:
    """Parameters that decide a result: the device does not (a GPU fit is the same artifact)."""
    return {k: _without_device(v) if isinstance(v, dict) else v for k, v in params.items() if k != "device"}


def _with_device(params: dict, device: str) -> dict:
    """``params`` with every ``device`` entry (nested wrapper mappings too) set to ``device``."""
    return {k: device if k == "device" else _with_device(v, device) if isinstance(v, dict) else v
            for k, v in params.items()}


def method_key(store_fingerprint: str, spec_name: str, params: dict, method: Method) -> str:
    return stable_hash("method", store_fingerprint, spec_name, _without_device(params), method_code_version(method))


@dataclass
class MethodResult:
    name: str
    key: str
    cached: bool
    fit_seconds: float
    params: dict = field(default_factory=dict)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def validate_methods(cfg: RunConfig, num_classes: int | None = None) -> None:
    """Build every configured method once, so an unknown name or parameter fails before any work;
    with the number of classes, also the parameters that depend on it (a target prior's length)."""
    for spec in cfg.methods:
        method, _ = build_method(cfg, spec)
        if num_classes is not None:
            method.check_params(num_classes)


def run_method(cfg: RunConfig, spec: MethodSpec, store: StoreInfo, force: bool = False) -> MethodResult:
    """Fit one method on the cached train features (reusing a cached fit), store its logits.

    A name with suffix wrappers (``ce+pc``) reuses the cached fit of its base (``ce``) and only
    runs the wrapper on top of it.
    """
    artifacts = artifact_store(cfg)
    method, params, key = planned_method(cfg, spec, store.fingerprint)
    if artifacts.exists("method", key) and not force:
        meta = artifacts.read_meta("method", key)
        return MethodResult(spec.name, key, True, meta["fit_seconds"], params)

    fs = open_store(store.url, storage_options=cfg.storage_options)
    val = fs.read("val") if "val" in fs.splits else None
    base_name, suffixes = split_wrappers(spec.name)
    t0 = time.perf_counter()
    train = None
    if suffixes:
        base_params = {k: v for k, v in spec.params.items() if k not in suffixes}
        base_res = run_method(cfg, MethodSpec(name=base_name, params=base_params), store, force=False)
        _attach_fitted_base(method, load_method(cfg, base_res.key))
        t0 = time.perf_counter() - base_res.fit_seconds  # the wrapper's cost includes its base's fit
    elif isinstance(method, DLSA):
        # the head and the flow cascade are artifacts of their own, shared by every dlsa+<head>
        head_spec = MethodSpec(name=spec.name.split("+", 1)[1],
                               params={k: v for k, v in spec.params.items() if k != "dlsa"})
        head_res = run_method(cfg, head_spec, store, force=False)
        method.base = load_method(cfg, head_res.key)
        train = fit_split(method, fs)  # read once, for the fit and for a cascade still to fit
        cascade_res = run_dlsa_cascade(cfg, spec, store, train=train if needs_full_split(method) else None)
        method.set_cascade(load_cascade(cfg, method, cascade_res.key))
        t0 = time.perf_counter() - head_res.fit_seconds - cascade_res.fit_seconds
    else:
        from longtail.pipeline import tables  # (pipeline.tables imports this module)
        if tables.table_user(method) is not None:  # the neighbour table: an artifact of its own, shared
            train = fit_split(method, fs)  # read once, for the fit and for a table still to build
            t0 = time.perf_counter() - tables.attach_table(
                cfg, spec, method, store, train=train if needs_full_split(method) else None)
    if train is None:
        t_read = time.perf_counter()
        train = fit_split(method, fs)  # in full, or the class means for a wrapper of a fitted base
        t0 += time.perf_counter() - t_read  # reading is not fitting
    method.fit(train, val)
    fit_seconds = time.perf_counter() - t0
    files = {"state.safetensors": save_tensors(method.state_dict()),
             "logits_test.npy": _npy(split_logits(method, fs, "test"))}
    if val is not None:
        files["logits_val.npy"] = _npy(method.logits(val.features))
    meta = {"name": spec.name, "params": params, "fit_seconds": fit_seconds,
            "store_fingerprint": store.fingerprint, "code_version": method_code_version(method),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    artifacts.write("method", key, files, meta)
    return MethodResult(spec.name, key, False, fit_seconds, params)


def split_logits(method: Method, fs: FeatureStore, split: str, rows: int | None = None) -> np.ndarray:
    """``method``'s logits ``(N, C)`` float32 on ``split`` of the open store ``fs``, computed chunk by
    chunk (``rows`` per chunk, default the store's own chunk size): one chunk of features is in
    memory at a time, whatever the split's size; only the ``(N, C)`` result is whole."""
    parts = [method.logits(feats) for feats, _, _ in fs.iter_chunks(split, rows)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def fit_split(method: Method, fs: FeatureStore, split: str = "train", rows: int | None = None) -> FeatureSet:
    """The train split as ``method``'s fit needs it (:func:`stages.base.needs_full_split`): read in
    full, or, for a method whose fit uses only the split's metadata (a post-hoc wrapper around a
    fitted base), its class means: one row per class (the mean feature of its samples, float64
    sums over chunks of ``rows`` rows), labels ``0..C-1`` and the store's train class counts, so
    the dimension, the classes and the prior are those of the split."""
    if needs_full_split(method):
        return fs.read(split)
    C, D = fs.num_classes, fs.feature_dim
    sums, seen = np.zeros((C, D)), np.zeros(C, dtype=np.int64)
    for feats, labels, _ in fs.iter_chunks(split, rows):  # train is always labelled (the store checks)
        sums += np.eye(C)[labels].T @ feats.astype(np.float64)  # (C, n) one-hot @ (n, D)
        seen += np.bincount(labels, minlength=C)
    if (seen == 0).any():
        names = ", ".join(fs.class_names[i] for i in np.flatnonzero(seen == 0)[:5])
        raise LongtailError(f"{fs.url}: split {split!r}: class(es) with no train sample: {names}")
    return FeatureSet(features=(sums / seen[:, None]).astype(np.float32), labels=np.arange(C),  # seen > 0
                      class_counts=fs.class_counts, class_names=fs.class_names,
                      name=f"{split} (class means)", source=fs.url,
                      meta={"store_fingerprint": fs.fingerprint, "split_fingerprint": fs.split_fingerprint(split)})


def uses_dlsa(name: str) -> bool:
    return "dlsa" in name.split("+")


@dataclass
class MethodPlan:
    """The schedule of the method stage: the neighbour tables and DLSA cascades to build first (one
    spec per distinct set of parameters), the plain heads (independent; ``table_users`` wait for
    the tables), and the methods that reuse a cached base or cascade (suffix wrappers and
    ``dlsa+<head>``), which run after everything else."""

    tables: list[MethodSpec]
    cascades: list[MethodSpec]
    heads: list[MethodSpec]
    table_users: set[str]
    wrapped: list[MethodSpec]


def method_plan(cfg: RunConfig) -> MethodPlan:
    from longtail.pipeline import tables  # (pipeline.tables imports this module)

    cascades = [s for s in cfg.methods if uses_dlsa(s.name)]
    heads = [s for s in cfg.methods if not split_wrappers(s.name)[1] and s not in cascades]
    return MethodPlan(tables=tables.table_specs(cfg), cascades=cascades, heads=heads,
                      table_users={s.name for s in heads if tables.uses_table(cfg, s)},
                      wrapped=[s for s in cfg.methods if s not in heads])


def _cascade_key(store_fingerprint: str, method: DLSA) -> str:
    return stable_hash("dlsa-cascade", store_fingerprint, _without_device(method.cascade_params()),
                       method_code_version(method))


def train_artifact(cfg: RunConfig, store: StoreInfo, kind: str, key: str, name: str,
                   fit: Callable[[FeatureSet], Any], pack: Callable[[Any], tuple[dict, dict]], *,
                   seconds_field: str = "fit_seconds", params: dict | None = None, force: bool = False,
                   train: FeatureSet | None = None) -> MethodResult:
    """A keyed stage fitted on the store's train split (a DLSA cascade, a neighbour table): reuse
    the artifact ``kind``/``key`` unless ``force``, else read the split (unless given as ``train``),
    time ``fit(train)`` and write ``pack(fitted) -> (files, meta)`` with the time in
    ``meta[seconds_field]``; the result's ``fit_seconds`` is that time, recorded or measured."""
    artifacts = artifact_store(cfg)
    if artifacts.exists(kind, key) and not force:
        return MethodResult(name, key, True, artifacts.read_meta(kind, key)[seconds_field], params or {})
    if train is None:
        train = open_store(store.url, storage_options=cfg.storage_options).read("train")
    t0 = time.perf_counter()
    fitted = fit(train)
    seconds = time.perf_counter() - t0
    files, meta = pack(fitted)
    artifacts.write(kind, key, files, meta | {seconds_field: seconds})
    return MethodResult(name, key, False, seconds, params or {})


def run_dlsa_cascade(cfg: RunConfig, spec: MethodSpec, store: StoreInfo, force: bool = False,
                     train: FeatureSet | None = None) -> MethodResult:
    """Fit (or reuse) the DLSA flow cascade of a ``dlsa+<head>`` spec: one artifact per store and
    cascade parameters, whatever the wrapped head (paper 004 reuses one filter for all classifiers);
    ``train``: the store's train split, when the caller has read it already."""
    dlsa = _find_dlsa(build_method(cfg, spec)[0])
    return train_artifact(
        cfg, store, "dlsa-cascade", _cascade_key(store.fingerprint, dlsa), spec.name,
        lambda train: dlsa.make_cascade().fit(train),
        lambda cascade: ({"cascade.safetensors": save_tensors(cascade.state_dict())},
                         {"params": _without_device(dlsa.cascade_params()), "store_fingerprint": store.fingerprint}),
        force=force, train=train)


def load_cascade(cfg: RunConfig, method: DLSA, key: str) -> FlowCascade:
    data = artifact_store(cfg).read_file("dlsa-cascade", key, "cascade.safetensors")
    return method.make_cascade().load_state_dict(load_tensors(data))


def _find_dlsa(method: Method) -> DLSA | None:
    m = method
    while m is not None and not isinstance(m, DLSA):
        m = getattr(m, "base", None)
    return m


def _attach_fitted_base(method: Method, fitted: Method) -> None:
    """Replace the innermost ``base`` below the suffix wrappers with an already fitted method."""
    holder = method
    while getattr(holder.base, "base", None) is not None and type(holder.base).name in SUFFIX_WRAPPERS:
        holder = holder.base
    holder.base = fitted


def load_method(cfg: RunConfig, key: str) -> Method:
    """Rebuild a fitted method from its artifact (safetensors state, never pickle)."""
    artifacts = artifact_store(cfg)
    meta = artifacts.read_meta("method", key)
    # on this run's device: the key leaves the device out, so a fit made on a GPU machine is reused
    # on a CPU one (and the other way round), and must not ask for the device it was fitted on
    method = make_method(meta["name"], _with_device(meta["params"], cfg.device))
    method.load_state_dict(load_tensors(artifacts.read_file("method", key, "state.safetensors")))
    return method


def method_logits(cfg: RunConfig, key: str, split: str = "test") -> np.ndarray:
    return _from_npy(artifact_store(cfg).read_file("method", key, f"logits_{split}.npy"))


# ---------------------------------------------------------------------------- evaluate and report
def _write_atomic(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_clean(obj: Any) -> Any:
    """NaN (a shot group with no class under the absolute rule) becomes null in JSON."""
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate_inputs(cfg: RunConfig, store: StoreInfo, results: list[MethodResult]) -> dict:
    """What ``metrics.json`` depends on: the features, every method's artifact, the evaluation
    settings, the seed (shifted subsets) and the evaluation code."""
    return {"store_fingerprint": store.fingerprint, "artifacts": {r.name: r.key for r in results},
            "evaluation": cfg.evaluation.model_dump(mode="json"), "seed": cfg.seed,
            "code_version": evaluate_code_version()}


def evaluate_key(inputs: dict) -> str:
    """The key of ``metrics.json`` written from ``inputs`` (:func:`evaluate_inputs`)."""
    return stable_hash("evaluate", inputs)


def recorded_evaluate(metrics: dict | None) -> dict:
    """``lineage.evaluate`` (``{"key", "inputs"}``) of a ``metrics.json`` read back; {} when absent."""
    return ((metrics or {}).get("lineage") or {}).get("evaluate") or {}


def read_metrics(out_dir: str) -> dict | None:
    """``OUT/metrics.json`` of an earlier run, or None when absent or unreadable."""
    try:
        with open(os.path.join(out_dir, "metrics.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def run_evaluate(cfg: RunConfig, store: StoreInfo, results: list[MethodResult], force: bool = False) -> dict:
    """Evaluate every configured method on the test split; write ``metrics.json`` and the
    per-class details the report plots from (``evaluation.npz``).

    Keyed like every stage: when ``metrics.json`` was written from the same inputs (see
    :func:`evaluate_inputs`), it is returned as it is (NaN metrics read back as None)."""
    from longtail.stages import evaluate as ev

    inputs = evaluate_inputs(cfg, store, results)
    key = evaluate_key(inputs)
    previous = None if force else read_metrics(cfg.output)
    if (previous is not None and recorded_evaluate(previous).get("key") == key
            and os.path.isfile(os.path.join(cfg.output, "evaluation.npz"))):
        return previous
    fs = open_store(store.url, storage_options=cfg.storage_options)
    test = fs.read("test")
    labels = test.require_labels()
    e = cfg.evaluation
    metrics: dict[str, Any] = {
        "dataset": fs.attrs.get("dataset") or (cfg.dataset.name if cfg.dataset else "imported"),
        "class_counts": [int(c) for c in test.class_counts],
        "methods": {},
    }
    many, medium, few, rule = ev.shot_groups(test.class_counts, many_threshold=e.many_threshold,
                                             few_threshold=e.few_threshold, split_rule=e.split_rule)
    details: dict[str, np.ndarray] = {"labels": labels}
    val = fs.read("val") if "val" in fs.splits else None
    val_labels = val.labels if val is not None else None
    label_shift: dict[str, Any] = {}
    dlsa_diag: dict[str, Any] = {}
    train = None
    groups = glt.use_groups(cfg, test.attributes is not None, f"store {store.url!r}")
    for r in results:
        logits = method_logits(cfg, r.key, "test")
        m = ev.evaluate(logits, labels, test.class_counts, many_threshold=e.many_threshold,
                        few_threshold=e.few_threshold, split_rule=e.split_rule, ece_bins=e.ece_bins)
        m["fit_seconds"] = float(r.fit_seconds)
        m["classwise_ece"] = ev.classwise_ece(ev.softmax(logits), labels, e.ece_bins)
        if groups:
            m |= ev.group_metrics(logits, labels, test.attributes)
        metrics["methods"][r.name] = m
        details[f"logits/{r.name}"] = logits
        if not (e.shift_ratios or uses_dlsa(r.name)):
            continue
        method = load_method(cfg, r.key)  # once per method, for its logit prior and DLSA diagnostics
        if e.shift_ratios:
            val_logits = method_logits(cfg, r.key, "val") if val_labels is not None else None
            label_shift[r.name] = shifted_evaluation(
                logits, labels, test.class_counts, logit_prior(method),
                val_logits=val_logits, val_labels=val_labels, ratios=e.shift_ratios, seed=cfg.seed)
        wrapper = _find_dlsa(method)
        if wrapper is not None:
            train = train if train is not None else fs.read("train")  # read once for every DLSA method
            dlsa_diag[r.name] = wrapper.diagnostics(train)
    if label_shift:
        metrics["label_shift"] = label_shift
    if dlsa_diag:
        metrics["dlsa"] = dlsa_diag
    if groups:
        metrics["groups"] = glt.group_info(test, fs.attrs.get("attribute_names"))
    metrics["shot_rule"] = {"split_rule": e.split_rule, "many_threshold": e.many_threshold,
                            "few_threshold": e.few_threshold}
    metrics["shot_groups"] = {"rule": rule, "many": [int(i) for i in many],
                              "medium": [int(i) for i in medium], "few": [int(i) for i in few],
                              "many_threshold": e.many_threshold, "few_threshold": e.few_threshold}
    metrics["class_names"] = list(test.class_names)
    metrics["lineage"] = {"store": store.url, "store_fingerprint": store.fingerprint,
                          "backbone": fs.attrs.get("backbone"), "seed": cfg.seed,
                          "artifacts": {r.name: r.key for r in results},
                          "evaluate": {"key": key, "inputs": inputs}}
    os.makedirs(cfg.output, exist_ok=True)
    _write_atomic(os.path.join(cfg.output, "metrics.json"),
                  json.dumps(_json_clean(metrics), indent=2).encode())
    buf = io.BytesIO()
    np.savez_compressed(buf, **details)
    _write_atomic(os.path.join(cfg.output, "evaluation.npz"), buf.getvalue())
    return metrics


REPORT_KEY_FILE = ".report-key"


def report_key(out_dir: str) -> str | None:
    """Key of the report that ``OUT/metrics.json`` and ``OUT/evaluation.npz`` would give now."""
    import hashlib

    digests = []
    for name in ("metrics.json", "evaluation.npz"):
        try:
            with open(os.path.join(out_dir, name), "rb") as f:
                digests.append(hashlib.blake2b(f.read(), digest_size=16).hexdigest())
        except OSError:
            return None
    return stable_hash("report", digests, report_code_version())


def rendered_report_key(out_dir: str) -> str | None:
    """The key recorded when the report in ``out_dir`` was last rendered (None: never, or gone)."""
    if not all(os.path.isfile(os.path.join(out_dir, n)) for n in ("report.md", "report.html")):
        return None
    try:
        with open(os.path.join(out_dir, REPORT_KEY_FILE), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def render_report(out_dir: str, ece_bins: int = 20, force: bool = True) -> tuple[str, str]:
    """(Re)render ``report.md``/``report.html`` and the plots from ``OUT/metrics.json`` and
    ``OUT/evaluation.npz``. With ``force=False`` (pipeline runs) a report rendered from the same
    metrics by the same code is kept as it is."""
    from longtail.stages import evaluate as ev
    from longtail.stages import report as rp

    mpath = os.path.join(out_dir, "metrics.json")
    dpath = os.path.join(out_dir, "evaluation.npz")
    for p in (mpath, dpath):
        if not os.path.isfile(p):
            raise LongtailError(f"{p!r} does not exist: run `longtail run` first")
    key = report_key(out_dir)
    if not force and key is not None and rendered_report_key(out_dir) == key:
        return os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")
    try:
        with open(mpath, encoding="utf-8") as f:
            metrics = json.load(f)
        details = np.load(dpath, allow_pickle=False)
        labels = details["labels"]
    except (json.JSONDecodeError, OSError, ValueError, KeyError) as exc:
        raise LongtailError(f"{out_dir!r}: metrics.json or evaluation.npz is corrupt ({exc})") from None
    counts = np.asarray(metrics["class_counts"])
    names = metrics.get("class_names") or [str(i) for i in range(len(counts))]
    C = len(counts)
    plots_dir = os.path.join(out_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    per_class = {}
    plots: dict[str, str] = {}
    for name in metrics["methods"]:
        logits = details[f"logits/{name}"]
        pred = logits.argmax(1)
        per_class[name] = ev.per_class_accuracy(pred, labels, C)
        safe = name.replace("+", "_")
        rp.plot_reliability(ev.softmax(logits), labels, name, os.path.join(plots_dir, f"reliability-{safe}.png"))
        rp.plot_confusion(ev.confusion(pred, labels, C), names, name, os.path.join(plots_dir, f"confusion-{safe}.png"))
        plots[f"Reliability diagram: {name}"] = f"plots/reliability-{safe}.png"
        plots[f"Confusion matrix: {name}"] = f"plots/confusion-{safe}.png"
        if metrics.get("groups") and "group_accuracy" in metrics["methods"][name]:
            rp.plot_group_accuracy(metrics["methods"][name]["group_accuracy"], names,
                                   metrics["groups"]["attribute_names"], name,
                                   os.path.join(plots_dir, f"groups-{safe}.png"))
            plots[f"Accuracy per (class, attribute) group: {name}"] = f"plots/groups-{safe}.png"
    for name, diag in (metrics.get("dlsa") or {}).items():
        safe = name.replace("+", "_")
        rp.plot_dlsa(diag, name, os.path.join(plots_dir, f"dlsa-{safe}.png"))
        plots[f"DLSA filters: {name}"] = f"plots/dlsa-{safe}.png"
    rule = metrics.get("shot_rule", {})
    rp.plot_per_class_accuracy(per_class, counts, names, os.path.join(plots_dir, "per-class-accuracy.png"),
                               many_threshold=rule.get("many_threshold", 100),
                               few_threshold=rule.get("few_threshold", 20),
                               split_rule=rule.get("split_rule", "auto"))
    plots = {"Per-class accuracy against train count": "plots/per-class-accuracy.png"} | plots
    paths = rp.render_report(metrics | {"plots": plots, "store": metrics.get("lineage", {}),
                                        "sections": report_sections(metrics)}, out_dir)
    if key is not None:
        _write_atomic(os.path.join(out_dir, REPORT_KEY_FILE), key.encode())
    return paths


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def report_sections(metrics: dict) -> list[dict]:
    """The report's tables beyond the comparison: calibration, label shift, prior estimation."""
    methods = metrics["methods"]
    sections = [{
        "title": "Calibration",
        "text": "On the balanced test split. ECE and classwise ECE with equal-width bins; Brier and NLL "
                "as in the comparison. Lower is better. `NAME+ts` rows are temperature scaling fitted on val.",
        "columns": ["Method", "Accuracy (%)", "ECE", "Classwise ECE", "Brier", "NLL"],
        "rows": [[n, _pct(m["overall"]), f"{m['ece']:.4f}",
                  "n/a" if m.get("classwise_ece") is None else f"{m['classwise_ece']:.4f}",
                  f"{m['brier']:.4f}", f"{m['nll']:.4f}"] for n, m in methods.items()],
    }]
    group_section = glt.group_section(metrics)
    if group_section:
        sections.append(group_section)
    dlsa = metrics.get("dlsa") or {}
    if dlsa:
        rows = []
        for name, diag in dlsa.items():
            for f in diag["filters"]:
                rows.append([f"{name}: filter {f['filter']}", str(f["samples_in"]), str(f["samples_out"]),
                             _pct(f["tail_share_in"]), _pct(f["separation_accuracy"]),
                             "n/a" if f["cluster_size_entropy_ratio"] is None else f"{f['cluster_size_entropy_ratio']:.3f}",
                             f"{f['mean_purity']:.3f}", str(f["empty_clusters"])])
        first = next(iter(dlsa.values()))
        sections.append({
            "title": "DLSA flow filters",
            "text": f"Per filter on the train split (paper 004): separation accuracy is the share of tail-class "
                    f"samples (at most {first['tail_threshold']} train samples) among those the filter sends to "
                    "its cluster-aided classifier; it beats the tail share of the samples reaching the filter "
                    "when the filter enriches tail samples. Entropy ratio: cluster-size entropy over log K "
                    f"(1 = balanced clusters), K = {first['num_clusters']}. Purity: mean share of a cluster's "
                    "largest class.",
            "columns": ["Filter", "In", "Out", "Tail share in (%)", "Separation (%)", "Entropy ratio",
                        "Purity", "Empty clusters"],
            "rows": rows,
        })
    shift = metrics.get("label_shift")
    if not shift:
        return sections
    subsets = list(next(iter(shift.values())))
    header = ["Method"] + [s.replace("forward-", "fwd ").replace("backward-", "bwd ") for s in subsets]
    rows = []
    for name, per in shift.items():
        rows.append([name] + [_pct(per[s]["accuracy"]) for s in subsets])
        rows.append([f"{name} + PC (true prior)"] + [_pct(per[s]["accuracy_true_prior"]) for s in subsets])
        rows.append([f"{name} + PC (EM prior)"] + [_pct(per[s]["accuracy_em"]) for s in subsets])
        if "accuracy_bbse" in per[subsets[0]]:
            rows.append([f"{name} + PC (BBSE prior)"] + [_pct(per[s].get("accuracy_bbse")) for s in subsets])
    sizes = ", ".join(f"{s}: {shift[next(iter(shift))][s]['n']}" for s in subsets)
    sections.append({
        "title": "Shifted test label distributions",
        "text": "Top-1 accuracy (%) on long-tailed subsets of the balanced test split (paper 002, Sec. 4.3 "
                "and Table 6): forward sets follow the train order with the given imbalance ratio, "
                "backward sets reverse it. PC rows post-compensate each method from the prior its "
                "logits carry to the subset's true prior, or to the prior estimated from the subset's "
                f"unlabelled logits by EM or BBSE. Subset sizes: {sizes}.",
        "columns": header,
        "rows": rows,
    })
    err_rows = []
    for name, per in shift.items():
        err_rows.append([f"{name}: EM"] + [f"{per[s]['em_error']:.3f}" for s in subsets])
        if "bbse_error" in per[subsets[0]]:
            err_rows.append([f"{name}: BBSE"] + [f"{per[s]['bbse_error']:.3f}" for s in subsets])
    sections.append({
        "title": "Deployment prior estimation error",
        "text": "Total-variation distance between the estimated and the true label prior of each shifted "
                "test set (0 = exact). EM: Saerens et al. 2002 on the method's posteriors; BBSE: Lipton "
                "et al. 2018 with the confusion matrix of the val split.",
        "columns": header,
        "rows": err_rows,
    })
    return sections


# ---------------------------------------------------------------------------- everything
def run_all(cfg: RunConfig) -> dict:
    """The whole DAG, sequentially, without Prefect (the flow in ``flows/`` runs the same stages)."""
    validate_methods(cfg)
    store = run_extract(cfg)
    results = run_methods(cfg, store)
    metrics = run_evaluate(cfg, store, results)
    render_report(cfg.output, cfg.evaluation.ece_bins, force=False)
    return metrics


def run_methods(cfg: RunConfig, store: StoreInfo) -> list[MethodResult]:
    return [run_method(cfg, spec, store) for spec in cfg.methods]


def run_stage(cfg: RunConfig, name: str, force: bool = False) -> dict | None:
    """Bring one stage up to date on cached features, then what depends on it; returns the metrics.

    ``extract``; a configured method name (or ``method:NAME``); ``evaluate``; ``report``. Upstream
    artifacts are reused; the stage itself is recomputed when its inputs changed, or always with
    ``force`` (and then its dependents too, since their keys do not see a forced refit).
    """
    if name in ("extract", "import"):
        if name == "import" or cfg.dataset is None:
            raise LongtailError(f"stage {name!r}: this config's store is imported (no `dataset`); "
                                "rebuild it with `longtail import-features` into a new path")
        if force and store_status(cfg.store, storage_options=cfg.storage_options) == "complete":
            raise LongtailError(
                f"store {cfg.store!r} is complete and is never overwritten: point `store` at a new path "
                "to extract again"
            )
        preflight(cfg)
        info = run_extract(cfg)
        log.warning("extract: %s (%s)", "cached, nothing to do" if info.cached else "written", info.url)
        metrics = run_evaluate(cfg, info, run_methods(cfg, info))
        render_report(cfg.output, cfg.evaluation.ece_bins, force=False)
        return metrics
    if name == "report":
        render_report(cfg.output, cfg.evaluation.ece_bins, force=True)
        return None
    store = existing_store(cfg)
    validate_methods(cfg, open_store(store.url, storage_options=cfg.storage_options).num_classes)
    if name != "evaluate":
        method_name = name.removeprefix("method:")
        specs = [s for s in cfg.methods if s.name == method_name]
        if not specs:
            raise LongtailError(
                f"unknown stage {name!r}: use extract, evaluate, report or one of the configured methods "
                f"({', '.join(s.name for s in cfg.methods)})"
            )
        run_method(cfg, specs[0], store, force=force)
    metrics = run_evaluate(cfg, store, run_methods(cfg, store), force=force)
    render_report(cfg.output, cfg.evaluation.ece_bins, force=force)
    return metrics


# ---------------------------------------------------------------------------- deployment priors


def _same_backbone(source, target) -> bool:
    """Stores made by longtail's extraction carry a weights hash; imported stores do not know their
    backbone, so for them only the feature dimension can be checked."""
    kinds = {(source.backbone or {}).get("kind"), (target.backbone or {}).get("kind")}
    if "imported" in kinds:
        return True
    return source.backbone_hash == target.backbone_hash


def run_calibrate(cfg: RunConfig, target_url: str, how: str = "em", split: str = "test",
                  out_dir: str | None = None) -> dict:
    """Estimate the deployment label prior of ``target_url``'s ``split`` from its features and
    post-compensate every configured method to it; write ``OUT/calibration.json``.

    ``estimated_prior`` is the estimate of the first configured method (``estimated_priors`` has
    each method's own); each method's ``accuracy_estimated_prior`` uses its own estimate. Accuracies
    are null when the target split has no labels.
    """
    from longtail.stages.calibrate import post_compensate
    from longtail.stages.evaluate import accuracy
    from longtail.stages.priors import ESTIMATORS
    from longtail.stages.label_shift import estimate_prior, positive_prior, total_variation

    if how not in ESTIMATORS:
        raise LongtailError(f"--method {how!r}: use one of {', '.join(ESTIMATORS)}")
    out_dir = out_dir or cfg.output
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LongtailError(f"--out {out_dir!r} exists and is not a directory")
    validate_methods(cfg)
    source = existing_store(cfg)
    src = open_store(source.url, storage_options=cfg.storage_options)
    tgt = open_store(target_url, storage_options=cfg.storage_options)
    if split not in tgt.splits:
        raise LongtailError(f"target store {target_url!r} has no split {split!r} (it has {', '.join(tgt.splits)})")
    if tgt.feature_dim != src.feature_dim:
        raise LongtailError(f"target store {target_url!r} has features of dimension {tgt.feature_dim}, "
                            f"the model's store {cfg.store!r} {src.feature_dim}")
    if not _same_backbone(src, tgt):
        raise LongtailError(f"target store {target_url!r} was extracted with another backbone (weights "
                            f"{tgt.backbone_hash}) than the model's store {cfg.store!r} ({src.backbone_hash})")
    if tgt.num_classes != src.num_classes:
        raise LongtailError(f"target store {target_url!r} has {tgt.num_classes} classes, the model's store {src.num_classes}")
    # the target's features are only ever read chunk by chunk (split_logits); its labels whole
    labels = [y for _, y, _ in tgt.iter_chunks(split)] if tgt.has_labels(split) else None
    target_labels = None if labels is None else np.concatenate(labels)
    if how == "bbse" and "val" not in src.splits:
        raise LongtailError(f"--method bbse needs a labelled val split in {cfg.store!r}")
    val = src.read("val") if "val" in src.splits else None
    results = run_methods(cfg, source)
    true_prior = None
    if target_labels is not None:
        true_prior = np.bincount(target_labels, minlength=src.num_classes).astype(np.float64)
        true_prior /= true_prior.sum()  # labels is non-empty (FeatureSet refuses empty splits)

    def acc(z):
        return None if target_labels is None else accuracy(z, target_labels)

    out: dict[str, Any] = {"method": how, "split": split, "estimated_prior": None, "methods": {},
                           "estimated_priors": {}, "target": target_url}
    if true_prior is not None:
        out["true_prior"] = true_prior.tolist()
        out["estimation_error"] = {}
    for r in results:
        method = load_method(cfg, r.key)
        logits = split_logits(method, tgt, split)
        lp = logit_prior(method)
        val_logits = method_logits(cfg, r.key, "val") if val is not None else None
        est = estimate_prior(how, logits, lp, val_logits, None if val is None else val.labels)
        entry = {"accuracy_uncompensated": acc(logits),
                 "accuracy_estimated_prior": acc(post_compensate(logits, lp, positive_prior(est))),
                 "accuracy_true_prior": None if true_prior is None else acc(post_compensate(logits, lp, positive_prior(true_prior)))}
        out["methods"][r.name] = entry
        out["estimated_priors"][r.name] = est.tolist()
        if true_prior is not None:
            out["estimation_error"][r.name] = total_variation(est, true_prior)
        if out["estimated_prior"] is None:
            out["estimated_prior"] = est.tolist()
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, "calibration.json"), json.dumps(_json_clean(out), indent=2).encode())
    return out


# ---------------------------------------------------------------------------- DLSA feature evaluation
def run_dlsa_diagnostics(stores: list[str], out_dir: str, params: dict | None = None, seed: int = 0,
                         device: str = "auto") -> dict:
    """Head-tail separability of each store's features (paper 004's "feature evaluation"): fit (or
    reuse) one DLSA flow cascade per store with the same parameters and write
    ``OUT/dlsa_diagnostics.json`` = ``{"params": {...}, "stores": {URL: diagnostics}}`` and one
    plot per store, so that backbones can be compared on equal terms."""
    from longtail.stages import report as rp
    from longtail.pipeline.config import parse_config

    if not stores:
        raise LongtailError("dlsa-diagnostics: name at least one store")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LongtailError(f"--out {out_dir!r} exists and is not a directory")
    params = dict(params or {})
    cfgs = [parse_config({"store": url, "output": out_dir, "seed": seed, "device": device,
                          "artifacts": os.path.join(out_dir, "cache"),
                          "methods": [{"name": "dlsa+ce", "params": {"dlsa": params}}]}, source="dlsa-diagnostics")
            for url in stores]
    infos = []
    for cfg in cfgs:  # every check before any fit
        info = existing_store(cfg)
        validate_methods(cfg, open_store(info.url, storage_options=cfg.storage_options).num_classes)
        infos.append(info)
    out: dict[str, Any] = {"params": None, "stores": {}}
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    for i, (cfg, info) in enumerate(zip(cfgs, infos)):
        spec = cfg.methods[0]
        method, resolved = build_method(cfg, spec)
        train = open_store(info.url, storage_options=cfg.storage_options).read("train")  # once: fit and diagnostics
        res = run_dlsa_cascade(cfg, spec, info, train=train)
        diag = diagnostics(load_cascade(cfg, method, res.key), train, method.tail_threshold)
        diag["fit_seconds"] = res.fit_seconds
        out["params"] = _without_device(resolved["dlsa"])
        out["stores"][info.url] = diag
        rp.plot_dlsa(diag, f"store {i + 1}: {os.path.basename(info.url.rstrip('/'))}",
                     os.path.join(out_dir, "plots", f"dlsa-store{i + 1}.png"))
    _write_atomic(os.path.join(out_dir, "dlsa_diagnostics.json"), json.dumps(_json_clean(out), indent=2).encode())
    return out
