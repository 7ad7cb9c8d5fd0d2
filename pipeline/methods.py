"""Stage 2, methods: build a configured method, key it, fit it on the cached features (reusing the
cached fit of the method it wraps and the shared artifacts it declares), store its state and
logits; load it back.

Nothing here knows a method by name or class: a name whose grammar has an outer wrapper
(``ce+pc``, ``dlsa+ce``; :func:`stages.registry.parse_name`) reuses the cached artifact of its
inner name, fitted first as a method of its own and handed in frozen
(``method.with_base(Frozen(loaded))``); what a method needs built once per store it declares
(``method.requirements()``, :mod:`pipeline.requirements`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from longtail.pipeline.config import MethodSpec, RunConfig, check_seed
from longtail.pipeline.io import from_npy, npy_bytes
from longtail.pipeline.keys import method_code_version, stable_hash, with_device, without_device
from longtail.pipeline.requirements import check_split, provide
from longtail.pipeline.stores import StoreInfo, artifact_store, open_features
from longtail.stages.base import Frozen, Method, Wrapper
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.registry import make_method, needs_full_split, parse_name
from longtail.storage.artifacts import CorruptArtifactError, load_tensors, save_tensors
from longtail.storage.featurestore import FeatureStore


@dataclass
class MethodResult:
    name: str
    key: str
    cached: bool
    fit_seconds: float
    params: dict = field(default_factory=dict)


def inner_spec(spec: MethodSpec) -> MethodSpec | None:
    """The spec of the method ``spec``'s outermost wrapper wraps (its own cached artifact), or None
    when the name has no wrapper: ``ce+pc`` -> ``ce``, ``dlsa+ce+pc`` -> ``dlsa+ce``; the wrapper's
    own parameters (nested under its name) are left out."""
    name = parse_name(spec.name)
    if name.outer is None:
        return None
    return MethodSpec(name=name.inner_name, params={k: v for k, v in spec.params.items() if k != name.outer},
                      target=spec.target, seed=spec.seed)


def resolved_params(cfg: RunConfig, spec: MethodSpec, method: Method) -> dict:
    """Config params plus the run's seed (the spec's own, one of ``seeds``, when it has one) and
    device for every method (and wrapper) of the chain that takes them; a wrapper's own parameters
    are nested under its name."""
    params = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.params.items()}
    seed = cfg.seed if spec.seed is None else spec.seed
    for m in method.chain():
        own = params.setdefault(type(m).name, {}) if isinstance(m, Wrapper) else params
        names = m.get_params()
        for key, value in (("seed", seed), ("device", cfg.device)):
            if key in names and key not in own:
                own[key] = value
    return params


def _check_seeds(label: str, params: dict, prefix: str = "") -> None:
    """Every ``seed`` in a method's (nested) parameters within the generators' range."""
    for key, value in params.items():
        if isinstance(value, dict):
            _check_seeds(label, value, f"{prefix}{key}.")
        elif key == "seed":
            try:
                check_seed(value, f"method {label!r}: params.{prefix}seed")
            except ValueError as e:
                raise LongtailError(str(e)) from None


def build_method(cfg: RunConfig, spec: MethodSpec) -> tuple[Method, dict]:
    """``spec``'s method, unfitted, with the run's seed and device, and its resolved parameters."""
    _check_seeds(spec.label, spec.params)
    method = make_method(spec.name, spec.params, target=spec.target)
    params = resolved_params(cfg, spec, method)
    return make_method(spec.name, params, target=spec.target), params


def method_key(store_fingerprint: str, spec: MethodSpec, params: dict, method: Method) -> str:
    parts = ["method", store_fingerprint, spec.name, without_device(params), method_code_version(method)]
    return stable_hash(*parts, *([spec.target] if spec.target else []))


def planned_method(cfg: RunConfig, spec: MethodSpec, store_fingerprint: str) -> tuple[Method, dict, str]:
    """``spec``'s method, its resolved parameters and the key of its artifact on that store."""
    method, params = build_method(cfg, spec)
    return method, params, method_key(store_fingerprint, spec, params, method)


def validate_methods(cfg: RunConfig, num_classes: int | None = None, splits: tuple[str, ...] | None = None) -> None:
    """Build every configured method once, so an unknown name, target or parameter fails before
    any work; with the number of classes, also the parameters that depend on it (a prior's length);
    with the store's split names, also a shared artifact built on a split the store lacks (a meta set
    drawn from val)."""
    for spec in cfg.methods:
        method, _ = build_method(cfg, spec)
        if num_classes is not None:
            method.check_params(num_classes)
        if splits is not None:
            for req in method.requirements():
                check_split(req, splits, f"method {spec.label!r} on store {cfg.store!r}")


def metadata_split(fs: FeatureStore, split: str = "train") -> FeatureSet:
    """``split``'s metadata as a FeatureSet, no row read: one zero row per class, labels ``0..C-1``,
    the store's train class counts and names (what :meth:`Method.check_data` looks at)."""
    C, D = fs.num_classes, fs.feature_dim
    return FeatureSet(features=np.zeros((C, D), dtype=np.float32), labels=np.arange(C), class_counts=fs.class_counts,
                      class_names=fs.class_names, name=f"{split} (metadata)", source=fs.url,
                      meta={"store_fingerprint": fs.fingerprint, "split_fingerprint": fs.split_fingerprint(split)})


def validate_data(cfg: RunConfig, store: StoreInfo) -> None:
    """Every configured method's checks against the store (class counts, dimension, whether there
    is a val split: ``+ts`` without one, a neighbour count above the train size), before the first
    fit of the run, so that a mistake in the last method does not surface after the others were fitted."""
    fs = open_features(cfg, store)
    train = metadata_split(fs)
    val = fs.read("val") if "val" in fs.splits else None
    for spec in cfg.methods:
        method, _ = build_method(cfg, spec)
        method.check_data(train, val)


def run_method(cfg: RunConfig, spec: MethodSpec, store: StoreInfo, force: bool = False) -> MethodResult:
    """Fit one method on the cached train features (reusing a cached fit), store its logits.

    A wrapped name reuses the cached fit of its inner name (fitted first if needed) and fits only
    the wrapper around it; the shared artifacts the method declares are built (or reused) and
    attached first. ``fit_seconds`` includes the inner fit and the artifacts' build times, not the
    reading of the features.
    """
    artifacts = artifact_store(cfg)
    method, params, key = planned_method(cfg, spec, store.fingerprint)
    if artifacts.exists("method", key) and not force:
        check_artifact(artifacts, "method", key, spec.label)
        meta = artifacts.read_meta("method", key)
        return MethodResult(spec.label, key, True, meta["fit_seconds"], params)
    code = method_code_version(method)  # of the whole chain, as the key (before a base is frozen)
    fs = open_features(cfg, store)
    val = fs.read("val") if "val" in fs.splits else None
    upstream = 0.0  # seconds of the cached work this fit stands on
    inner = inner_spec(spec)
    if inner is not None:
        inner_res = run_method(cfg, inner, store, force=False)
        method = method.with_base(Frozen(load_method(cfg, inner_res.key)))
        upstream += inner_res.fit_seconds
    train = fit_split(method, fs)  # in full, or the class means for a wrapper of a fitted base
    full = train if needs_full_split(method) else None  # a requirement builds on the full split
    for req in method.requirements():
        upstream += provide(cfg, req, store, train=full)
    t0 = time.perf_counter()
    method.fit(train, val)
    fit_seconds = upstream + time.perf_counter() - t0
    files = {"state.safetensors": save_tensors(method.state_dict()),
             "logits_test.npy": npy_bytes(split_logits(method, fs, "test"))}
    if val is not None:
        files["logits_val.npy"] = npy_bytes(method.logits(val.features))
    meta = {"name": spec.name, "params": params, "fit_seconds": fit_seconds,
            "store_fingerprint": store.fingerprint, "code_version": code,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if spec.target:
        meta["target"] = spec.target
    artifacts.write("method", key, files, meta, replace=force)
    return MethodResult(spec.label, key, False, fit_seconds, params)


def check_artifact(artifacts, kind: str, key: str, label: str) -> None:
    """A cached artifact's files against the hashes of its completion marker, before it is trusted;
    a corrupt one is a one-line error that says how to replace it."""
    try:
        artifacts.verify(kind, key)
    except CorruptArtifactError as e:
        raise CorruptArtifactError(f"{e}; `longtail stage {label} --force` replaces it") from None


def split_logits(method: Method, fs: FeatureStore, split: str, rows: int | None = None) -> np.ndarray:
    """``method``'s logits ``(N, C)`` float32 on ``split`` of the open store ``fs``, computed chunk by
    chunk (``rows`` per chunk, default the store's own chunk size): one chunk of features is in
    memory at a time, whatever the split's size; only the ``(N, C)`` result is whole."""
    parts = [method.logits(feats) for feats, _, _ in fs.iter_chunks(split, rows)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def fit_split(method: Method, fs: FeatureStore, split: str = "train", rows: int | None = None) -> FeatureSet:
    """The train split as ``method``'s fit needs it (:func:`stages.registry.needs_full_split`): read
    in full, or, for a method whose fit uses only the split's metadata (a post-hoc wrapper around a
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


def load_method(cfg: RunConfig, key: str) -> Method:
    """Rebuild a fitted method from its artifact (safetensors state, never pickle)."""
    artifacts = artifact_store(cfg)
    meta = artifacts.read_meta("method", key)
    # on this run's device: the key leaves the device out, so a fit made on a GPU machine is reused
    # on a CPU one (and the other way round), and must not ask for the device it was fitted on
    method = make_method(meta["name"], with_device(meta["params"], cfg.device), target=meta.get("target"))
    method.load_state_dict(load_tensors(artifacts.read_file("method", key, "state.safetensors")))
    return method


def method_logits(cfg: RunConfig, key: str, split: str = "test") -> np.ndarray:
    return from_npy(artifact_store(cfg).read_file("method", key, f"logits_{split}.npy"))
