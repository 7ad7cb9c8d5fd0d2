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
from typing import Any

import numpy as np

from pipeline.config import MethodSpec, RunConfig
from pipeline.keys import extract_code_version, method_code_version, stable_hash
from stages.base import Method, SUFFIX_WRAPPERS, make_method
from stages.datasets import load_dataset
from stages.calibrate import logit_prior
from stages.dlsa import DLSA, FlowCascade, diagnostics
from stages.errors import LongtailError
from stages import extract as ex
from stages.label_shift import shifted_evaluation
from storage.artifacts import ArtifactStore, load_tensors, save_tensors
from storage.featurestore import FeatureStoreWriter, open_store, store_status

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


def extract_key(cfg: RunConfig, dataset_fingerprint: str, weights_hash: str | None) -> str:
    return stable_hash("extract", dataset_fingerprint, backbone_spec(cfg), weights_hash,
                       extract_code_version())


@dataclass
class StoreInfo:
    url: str
    fingerprint: str
    cached: bool
    extract_key: str | None = None


def _dataset(cfg: RunConfig):
    d = cfg.dataset
    assert d is not None
    return load_dataset(d.name, seed=cfg.seed, **d.model_dump(exclude={"name"}))


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


def _planned_key(cfg: RunConfig):
    """The dataset and the extraction key the config asks for (checks the backbone file)."""
    ds = _dataset(cfg)
    b = cfg.backbone
    weights = None  # the builtin CNN's weights are determined by its spec and the seed
    if b.kind == "torchscript":
        weights = ex.load_torchscript(b.path, b.method).weights_hash
    elif b.kind == "python":
        weights = ex.load_python(b.target, b.kwargs, b.classifier).weights_hash
    return ds, extract_key(cfg, ds.fingerprint, weights)


def _complete_store(cfg: RunConfig, key: str | None, ds_fingerprint: str | None) -> StoreInfo:
    """A complete store the config may use: same extraction key, or no dataset in the config."""
    store = open_store(cfg.store)
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
    status = store_status(cfg.store)
    if status != "complete":
        raise LongtailError(f"store {cfg.store!r} is {status}: run `longtail stage extract` or `longtail run` first")
    if cfg.dataset is None:
        return _complete_store(cfg, None, None)
    ds, key = _planned_key(cfg)
    return _complete_store(cfg, key, ds.fingerprint)


def preflight(cfg: RunConfig) -> None:
    """Every check that can fail on user input, before anything is written."""
    validate_methods(cfg)
    if os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        raise LongtailError(f"output {cfg.output!r} exists and is not a directory")
    status = store_status(cfg.store)
    if cfg.dataset is None:
        if status != "complete":
            raise LongtailError(f"store {cfg.store!r} is {status} and the config names no dataset to extract it from")
        _complete_store(cfg, None, None)
        validate_methods(cfg, open_store(cfg.store).num_classes)
        return
    ds, key = _planned_key(cfg)  # also loads a user backbone, so an unreadable file fails here
    validate_methods(cfg, ds.num_classes)
    if status == "complete":
        _complete_store(cfg, key, ds.fingerprint)


def run_extract(cfg: RunConfig) -> StoreInfo:
    """Stage 1: make sure ``cfg.store`` holds complete features; extract them if needed.

    A complete store is never overwritten: if it holds other features than the config describes,
    that is an error naming the store. An interrupted store is resumed (or rebuilt by the writer).
    """
    status = store_status(cfg.store)
    if cfg.dataset is None:
        if status != "complete":
            raise LongtailError(
                f"store {cfg.store!r} is {status} and the config names no dataset to extract it from"
            )
        return _complete_store(cfg, None, None)
    ds, key = _planned_key(cfg)
    if status == "complete":
        return _complete_store(cfg, key, ds.fingerprint)

    artifacts = ArtifactStore(cfg.artifacts_url)
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
        extra_attrs={"extract_key": key, "dataset": ds.name},
    )
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
    return StoreInfo(cfg.store, fingerprint, cached=False, extract_key=key)


# ---------------------------------------------------------------------------- methods
def split_wrappers(name: str) -> tuple[str, list[str]]:
    """``ce+pc`` -> (``ce``, [``pc``]): the fitted part and the post-hoc suffix wrappers."""
    parts = name.split("+")
    suffixes: list[str] = []
    while len(parts) > 1 and parts[-1] in SUFFIX_WRAPPERS and parts[-2] not in ():
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


def _without_device(params: dict) -> dict:
    """Parameters that decide a result: the device does not (a GPU fit is the same artifact)."""
    return {k: _without_device(v) if isinstance(v, dict) else v for k, v in params.items() if k != "device"}


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
    artifacts = ArtifactStore(cfg.artifacts_url)
    method, params = build_method(cfg, spec)
    key = method_key(store.fingerprint, spec.name, params, method)
    if artifacts.exists("method", key) and not force:
        meta = artifacts.read_meta("method", key)
        return MethodResult(spec.name, key, True, meta["fit_seconds"], params)

    fs = open_store(store.url)
    train = fs.read("train")
    val = fs.read("val") if "val" in fs.splits else None
    test = fs.read("test")
    base_name, suffixes = split_wrappers(spec.name)
    t0 = time.perf_counter()
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
        cascade_res = run_dlsa_cascade(cfg, spec, store)
        method.set_cascade(load_cascade(cfg, method, cascade_res.key))
        t0 = time.perf_counter() - head_res.fit_seconds - cascade_res.fit_seconds
    method.fit(train, val)
    fit_seconds = time.perf_counter() - t0
    files = {"state.safetensors": save_tensors(method.state_dict()),
             "logits_test.npy": _npy(method.logits(test.features))}
    if val is not None:
        files["logits_val.npy"] = _npy(method.logits(val.features))
    meta = {"name": spec.name, "params": params, "fit_seconds": fit_seconds,
            "store_fingerprint": store.fingerprint, "code_version": method_code_version(method),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    artifacts.write("method", key, files, meta)
    return MethodResult(spec.name, key, False, fit_seconds, params)


def uses_dlsa(name: str) -> bool:
    return "dlsa" in name.split("+")


def method_waves(cfg: RunConfig) -> tuple[list[MethodSpec], list[MethodSpec], list[MethodSpec]]:
    """The schedule of the method stage: plain heads (independent), the specs whose DLSA cascades
    must be fitted first (once per distinct set of cascade parameters), and the methods that reuse
    a cached base or cascade (suffix wrappers and ``dlsa+<head>``), which run after both."""
    dlsa = [s for s in cfg.methods if uses_dlsa(s.name)]
    heads = [s for s in cfg.methods if not split_wrappers(s.name)[1] and s not in dlsa]
    return heads, dlsa, [s for s in cfg.methods if s not in heads]


def _cascade_key(store_fingerprint: str, method: DLSA) -> str:
    return stable_hash("dlsa-cascade", store_fingerprint, _without_device(method.cascade_params()),
                       method_code_version(method))


def run_dlsa_cascade(cfg: RunConfig, spec: MethodSpec, store: StoreInfo, force: bool = False) -> MethodResult:
    """Fit (or reuse) the DLSA flow cascade of a ``dlsa+<head>`` spec: one artifact per store and
    cascade parameters, whatever the wrapped head (paper 004 reuses one filter for all classifiers)."""
    method, params = build_method(cfg, spec)
    dlsa = method if isinstance(method, DLSA) else _find_dlsa(method)
    key = _cascade_key(store.fingerprint, dlsa)
    artifacts = ArtifactStore(cfg.artifacts_url)
    if artifacts.exists("dlsa-cascade", key) and not force:
        return MethodResult(spec.name, key, True, artifacts.read_meta("dlsa-cascade", key)["fit_seconds"])
    train = open_store(store.url).read("train")
    t0 = time.perf_counter()
    cascade = dlsa.make_cascade().fit(train)
    seconds = time.perf_counter() - t0
    artifacts.write("dlsa-cascade", key, {"cascade.safetensors": save_tensors(cascade.state_dict())},
                    {"params": _without_device(dlsa.cascade_params()), "fit_seconds": seconds,
                     "store_fingerprint": store.fingerprint})
    return MethodResult(spec.name, key, False, seconds)


def load_cascade(cfg: RunConfig, method: DLSA, key: str) -> FlowCascade:
    data = ArtifactStore(cfg.artifacts_url).read_file("dlsa-cascade", key, "cascade.safetensors")
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
    artifacts = ArtifactStore(cfg.artifacts_url)
    meta = artifacts.read_meta("method", key)
    method = make_method(meta["name"], meta["params"])
    method.load_state_dict(load_tensors(artifacts.read_file("method", key, "state.safetensors")))
    return method


def method_logits(cfg: RunConfig, key: str, split: str = "test") -> np.ndarray:
    return _from_npy(ArtifactStore(cfg.artifacts_url).read_file("method", key, f"logits_{split}.npy"))


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


def run_evaluate(cfg: RunConfig, store: StoreInfo, results: list[MethodResult]) -> dict:
    """Evaluate every configured method on the test split; write ``metrics.json`` and the
    per-class details the report plots from (``evaluation.npz``)."""
    from stages import evaluate as ev

    fs = open_store(store.url)
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
    for r in results:
        logits = method_logits(cfg, r.key, "test")
        m = ev.evaluate(logits, labels, test.class_counts, many_threshold=e.many_threshold,
                        few_threshold=e.few_threshold, split_rule=e.split_rule, ece_bins=e.ece_bins)
        m["fit_seconds"] = float(r.fit_seconds)
        m["classwise_ece"] = ev.classwise_ece(ev.softmax(logits), labels, e.ece_bins)
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
    metrics["shot_rule"] = {"split_rule": e.split_rule, "many_threshold": e.many_threshold,
                            "few_threshold": e.few_threshold}
    metrics["shot_groups"] = {"rule": rule, "many": [int(i) for i in many],
                              "medium": [int(i) for i in medium], "few": [int(i) for i in few],
                              "many_threshold": e.many_threshold, "few_threshold": e.few_threshold}
    metrics["class_names"] = list(test.class_names)
    metrics["lineage"] = {"store": store.url, "store_fingerprint": store.fingerprint,
                          "backbone": fs.attrs.get("backbone"), "seed": cfg.seed,
                          "artifacts": {r.name: r.key for r in results}}
    os.makedirs(cfg.output, exist_ok=True)
    _write_atomic(os.path.join(cfg.output, "metrics.json"),
                  json.dumps(_json_clean(metrics), indent=2).encode())
    buf = io.BytesIO()
    np.savez_compressed(buf, **details)
    _write_atomic(os.path.join(cfg.output, "evaluation.npz"), buf.getvalue())
    return metrics


def render_report(out_dir: str, ece_bins: int = 20) -> tuple[str, str]:
    """(Re)render ``report.md``/``report.html`` and the plots from ``OUT/metrics.json`` and
    ``OUT/evaluation.npz``."""
    from stages import evaluate as ev
    from stages import report as rp

    mpath = os.path.join(out_dir, "metrics.json")
    dpath = os.path.join(out_dir, "evaluation.npz")
    for p in (mpath, dpath):
        if not os.path.isfile(p):
            raise LongtailError(f"{p!r} does not exist: run `longtail run` first")
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
    return rp.render_report(metrics | {"plots": plots, "store": metrics.get("lineage", {}),
                                       "sections": report_sections(metrics)}, out_dir)


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
    render_report(cfg.output, cfg.evaluation.ece_bins)
    return metrics


def run_methods(cfg: RunConfig, store: StoreInfo) -> list[MethodResult]:
    return [run_method(cfg, spec, store) for spec in cfg.methods]


def run_stage(cfg: RunConfig, name: str, force: bool = False) -> dict | None:
    """Rerun one stage on cached features and what depends on it; returns metrics when evaluated.

    ``extract``; a configured method name (or ``method:NAME``); ``evaluate``; ``report``.
    """
    if name == "extract":
        if force and store_status(cfg.store) == "complete":
            raise LongtailError(
                f"store {cfg.store!r} is complete and is never overwritten: point `store` at a new path "
                "to extract again"
            )
        preflight(cfg)
        info = run_extract(cfg)
        log.warning("extract: %s (%s)", "cached, nothing to do" if info.cached else "written", info.url)
        return None
    if name == "report":
        render_report(cfg.output, cfg.evaluation.ece_bins)
        return None
    store = existing_store(cfg)
    validate_methods(cfg, open_store(store.url).num_classes)
    if name != "evaluate":
        method_name = name.removeprefix("method:")
        specs = [s for s in cfg.methods if s.name == method_name]
        if not specs:
            raise LongtailError(
                f"unknown stage {name!r}: use extract, evaluate, report or one of the configured methods "
                f"({', '.join(s.name for s in cfg.methods)})"
            )
        run_method(cfg, specs[0], store, force=force)
    metrics = run_evaluate(cfg, store, run_methods(cfg, store))
    render_report(cfg.output, cfg.evaluation.ece_bins)
    return metrics


# ---------------------------------------------------------------------------- deployment priors
ESTIMATORS = ("em", "bbse")


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
    from stages.calibrate import post_compensate
    from stages.label_shift import estimate_prior, positive_prior, total_variation

    if how not in ESTIMATORS:
        raise LongtailError(f"--method {how!r}: use one of {', '.join(ESTIMATORS)}")
    out_dir = out_dir or cfg.output
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LongtailError(f"--out {out_dir!r} exists and is not a directory")
    validate_methods(cfg)
    source = existing_store(cfg)
    src = open_store(source.url)
    tgt = open_store(target_url)
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
    target = tgt.read(split)
    if how == "bbse" and "val" not in src.splits:
        raise LongtailError(f"--method bbse needs a labelled val split in {cfg.store!r}")
    val = src.read("val") if "val" in src.splits else None
    results = run_methods(cfg, source)
    true_prior = None
    if target.labels is not None:
        true_prior = np.bincount(target.labels, minlength=src.num_classes).astype(np.float64)
        true_prior /= true_prior.sum()  # labels is non-empty (FeatureSet refuses empty splits)

    def acc(z):
        return None if target.labels is None else float(np.mean(z.argmax(axis=1) == target.labels))

    out: dict[str, Any] = {"method": how, "split": split, "estimated_prior": None, "methods": {},
                           "estimated_priors": {}, "target": target_url}
    if true_prior is not None:
        out["true_prior"] = true_prior.tolist()
        out["estimation_error"] = {}
    for r in results:
        method = load_method(cfg, r.key)
        logits = method.logits(target.features)
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
    from stages import report as rp
    from pipeline.config import parse_config

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
        validate_methods(cfg, open_store(info.url).num_classes)
        infos.append(info)
    out: dict[str, Any] = {"params": None, "stores": {}}
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    for i, (cfg, info) in enumerate(zip(cfgs, infos)):
        spec = cfg.methods[0]
        method, resolved = build_method(cfg, spec)
        res = run_dlsa_cascade(cfg, spec, info)
        cascade = load_cascade(cfg, method, res.key)
        diag = diagnostics(cascade, open_store(info.url).read("train"), method.tail_threshold)
        diag["fit_seconds"] = res.fit_seconds
        out["params"] = _without_device(resolved["dlsa"])
        out["stores"][info.url] = diag
        rp.plot_dlsa(diag, f"store {i + 1}: {os.path.basename(info.url.rstrip('/'))}",
                     os.path.join(out_dir, "plots", f"dlsa-store{i + 1}.png"))
    _write_atomic(os.path.join(out_dir, "dlsa_diagnostics.json"), json.dumps(_json_clean(out), indent=2).encode())
    return out
