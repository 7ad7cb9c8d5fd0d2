"""Stage 1, extraction: the extraction plan (dataset, recorded inputs, key), the backbone
(loaded, or trained and cached), the store checks, and the chunked write of the features."""

from __future__ import annotations

import hashlib
import logging
import os

from longtail.pipeline.config import RunConfig
from longtail.pipeline.keys import extract_code_version, stable_hash
from longtail.pipeline.stores import StoreInfo, artifact_store
from longtail.stages import extract as ex
from longtail.stages.datasets import load_dataset
from longtail.stages.errors import LongtailError
from longtail.storage.artifacts import ArtifactStore
from longtail.storage.featurestore import FeatureStoreWriter, open_store, store_status

log = logging.getLogger("longtail")


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


def planned_dataset(cfg: RunConfig):
    d = cfg.dataset
    assert d is not None
    return load_dataset(d.name, seed=cfg.seed, **d.model_dump(exclude={"name"}, exclude_none=True))


#: set to 1 on a machine (a worker) to allow ``python`` backbones in every config it runs
ALLOW_CODE_ENV = "LONGTAIL_ALLOW_CODE"


def check_code_allowed(cfg: RunConfig) -> None:
    """A ``python`` backbone calls ``backbone.target`` with ``kwargs``: the config runs code. Only
    where its owner allowed it (``backbone.allow_code: true``) or the machine does
    (``LONGTAIL_ALLOW_CODE=1``)."""
    b = cfg.backbone
    if b.kind == "python" and not b.allow_code and os.environ.get(ALLOW_CODE_ENV) != "1":
        raise LongtailError(
            f"backbone: kind 'python' calls {b.target!r}, so this config runs code; it is refused unless "
            f"backbone.allow_code is true (configs you trust only) or {ALLOW_CODE_ENV}=1 is set on this machine")


def locate_module(target: str) -> str:
    """The source file of ``target``'s module (``package.module:function``), found on ``sys.path``
    without importing anything (not even its parent packages); LongtailError when there is none."""
    from importlib.machinery import PathFinder

    mod_name = target.partition(":")[0]
    path, spec = None, None
    parts = mod_name.split(".")
    for i in range(len(parts)):
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), path)
        if spec is None:
            break
        path = spec.submodule_search_locations
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise LongtailError(f"backbone target {target!r}: no source file of module {mod_name!r} on the Python path")
    return spec.origin


def python_source_hash(target: str) -> tuple[str, str]:
    """``(file, blake2b)`` of the module file of a python backbone, read, never imported."""
    path = locate_module(target)
    with open(path, "rb") as f:
        return path, hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def load_python_backbone(cfg: RunConfig) -> ex.Backbone:
    """The ``python`` backbone of ``cfg``, built (runs its code: checked allowed first); whatever it
    raises is a one-line error naming the target."""
    b = cfg.backbone
    check_code_allowed(cfg)
    try:
        return ex.load_python(b.target, b.kwargs, b.classifier)
    except LongtailError:
        raise
    except Exception as exc:  # the user's code: anything at all
        text = " ".join(str(exc).split()) or "no message"
        raise LongtailError(f"backbone target {b.target!r} raised {type(exc).__name__}: {text}") from exc


def _load_backbone(cfg: RunConfig, ds, artifacts: ArtifactStore, key: str) -> ex.Backbone:
    b = cfg.backbone
    if b.kind == "torchscript":
        return ex.load_torchscript(b.path, b.method)
    if b.kind == "python":
        return load_python_backbone(cfg)
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
        return load_python_backbone(cfg).weights_hash
    return None


def planned_extract(cfg: RunConfig, run_code: bool = True):
    """The dataset, the extraction inputs and the extraction key the config asks for (loads a user
    backbone, so an unreadable file fails here).

    ``run_code=False`` (``status``, ``deploy --dry-run``): a ``python`` backbone is not built (that
    would run its code); its module file is located and hashed instead, the inputs carry
    ``weights_hash: None`` and ``source`` (file and hash), and the key is None."""
    ds = planned_dataset(cfg)
    if not run_code and cfg.backbone.kind == "python":
        check_code_allowed(cfg)
        path, digest = python_source_hash(cfg.backbone.target)
        return ds, extract_inputs(cfg, ds.fingerprint, None) | {"source": {"file": path, "blake2b": digest}}, None
    inputs = extract_inputs(cfg, ds.fingerprint, _planned_weights(cfg))
    return ds, inputs, extract_key(inputs)


def complete_store(cfg: RunConfig, key: str | None, ds_fingerprint: str | None, verify: bool = True) -> StoreInfo:
    """A complete store the config may use: same extraction key, or no dataset in the config.

    With ``verify`` (what a run does when it first opens the store) its content is checked
    against its recorded fingerprints and class counts in one streaming pass
    (:meth:`FeatureStore.verify`): an edited or damaged store is a one-line error naming it, before
    anything is computed from it."""
    store = open_store(cfg.store, storage_options=cfg.storage_options)
    if key is None:
        if verify:
            store.verify()
        return StoreInfo(cfg.store, store.fingerprint, cached=True)
    made_by = store.attrs.get("extract_key")
    if made_by != key:
        raise LongtailError(
            f"store {cfg.store!r} is complete and is never overwritten, but it holds features of "
            f"another dataset, backbone or extraction code (dataset fingerprint "
            f"{store.dataset_fingerprint}, this config's {ds_fingerprint}): point `store` at a new "
            "path, or drop `dataset` from the config to use the store as it is"
        )
    if verify:
        store.verify()
    return StoreInfo(cfg.store, store.fingerprint, cached=True, extract_key=key)


def existing_store(cfg: RunConfig) -> StoreInfo:
    """The config's store, which must already be complete (for single-stage reruns)."""
    status = store_status(cfg.store, storage_options=cfg.storage_options)
    if status != "complete":
        raise LongtailError(f"store {cfg.store!r} is {status}: run `longtail stage extract` or `longtail run` first")
    if cfg.dataset is None:
        return complete_store(cfg, None, None)
    ds, _, key = planned_extract(cfg)
    return complete_store(cfg, key, ds.fingerprint)


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
        return complete_store(cfg, None, None)
    ds, inputs, key = planned_extract(cfg)
    if status == "complete":
        return complete_store(cfg, key, ds.fingerprint)

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
