"""Shared artifacts: what a method declares it needs built once per store and reused (a neighbour
table, a DLSA flow cascade, ...), as :class:`stages.base.Requirement` objects.

The pipeline knows no artifact by kind: it keys each requirement by ``(kind, store fingerprint,
params less the device, the code version of the import closure of its modules)``, builds it on the
split ``req.split`` (train, or val for a meta set) with ``req.build`` (once, whatever the number of methods that declare it), stores
``req.save``'s tensors as safetensors and its meta as JSON, and hands ``req.load``'s object to the
method with ``req.attach`` before the fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from longtail.pipeline.config import RunConfig
from longtail.pipeline.keys import code_version, stable_hash, without_device
from longtail.pipeline.stores import StoreInfo, artifact_store, open_features
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.storage.artifacts import load_tensors, save_tensors

FILE = "tensors.safetensors"


@dataclass
class RequirementResult:
    kind: str
    key: str
    cached: bool
    #: build time, measured now or recorded when it was built
    build_seconds: float


def requirement_ident(req) -> str:
    """Two requirements with the same ident are the same artifact on any store."""
    return stable_hash(req.kind, without_device(dict(req.params)), sorted(req.modules))


def requirement_code_version(req) -> str:
    return code_version(req.modules)


def requirement_key(req, store_fingerprint: str) -> str:
    return stable_hash(req.kind, store_fingerprint, without_device(dict(req.params)), requirement_code_version(req))


def run_requirement(cfg: RunConfig, req, store: StoreInfo, force: bool = False,
                    train: FeatureSet | None = None) -> RequirementResult:
    """Build (or reuse) ``req``'s artifact on the store's split ``req.split`` (train unless the
    requirement names another, e.g. val for a meta set; ``train``, when the caller has read it
    already). A store without that split is a one-line error."""
    artifacts = artifact_store(cfg)
    key = requirement_key(req, store.fingerprint)
    if artifacts.exists(req.kind, key) and not force:
        return RequirementResult(req.kind, key, True, float(artifacts.read_meta(req.kind, key)["build_seconds"]))
    split = getattr(req, "split", "train")
    if train is None or split != "train":
        fs = open_features(cfg, store)
        check_split(req, fs.splits, store.url)
        train = fs.read(split)
    t0 = time.perf_counter()
    built = req.build(train)
    seconds = time.perf_counter() - t0
    tensors, meta = req.save(built)
    artifacts.write(req.kind, key, {FILE: save_tensors(tensors)},
                    {"kind": req.kind, "params": without_device(dict(req.params)), "meta": meta,
                     "modules": list(req.modules), "code_version": requirement_code_version(req),
                     "store_fingerprint": store.fingerprint, "build_seconds": seconds,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, replace=force)
    return RequirementResult(req.kind, key, False, seconds)


def check_split(req, splits, where: str) -> None:
    """A one-line error unless ``splits`` (a store's) has the split ``req`` is built from."""
    split = getattr(req, "split", "train")
    if split not in splits:
        params = ", ".join(f"{k}: {v}" for k, v in without_device(dict(req.params)).items())
        raise LongtailError(f"{where}: no {split!r} split to build the shared artifact {req.kind!r} ({params}) "
                            f"from; the store has {', '.join(splits)}")


def load_requirement(cfg: RunConfig, req, key: str) -> Any:
    """The object stored under ``key`` for ``req`` (safetensors and JSON, never pickle)."""
    artifacts = artifact_store(cfg)
    meta = artifacts.read_meta(req.kind, key)
    tensors = load_tensors(artifacts.read_file(req.kind, key, FILE), artifacts.url(req.kind, key))
    return req.load(tensors, meta["meta"])


def provide(cfg: RunConfig, req, store: StoreInfo, train: FeatureSet | None = None) -> float:
    """Build or reuse ``req``'s artifact, load it and attach it to its method; returns its build time."""
    res = run_requirement(cfg, req, store, train=train)
    req.attach(load_requirement(cfg, req, res.key))
    return res.build_seconds
