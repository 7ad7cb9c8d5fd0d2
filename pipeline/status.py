"""``longtail status``: each stage of a config as cached, stale (and which input changed), missing or
corrupt; ``longtail verify``: every stored output checked against its recorded hashes.

Nothing is computed and no user code runs: the keys the pipeline would use are compared with what
the store, the artifact cache and the run directory recorded when they were written (the store's
``extract_inputs``, each method artifact's ``meta.json``, ``metrics.json``'s ``lineage.evaluate``,
the report key), and what is stored is read back against its fingerprints and hashes (the store's
content, each cached artifact's files, the commit records of the evaluation and the report).
"""

from __future__ import annotations

from typing import Any

from longtail.pipeline.config import RunConfig
import os

from longtail.pipeline.evaluate import (
    evaluate_inputs,
    evaluate_key,
    evaluation_problem,
    read_metrics,
    recorded_evaluate,
)
from longtail.pipeline.extract import planned_extract
from longtail.pipeline.keys import method_code_version, without_device
from longtail.pipeline.methods import MethodResult, planned_method
from longtail.pipeline.report.build import rendered_report_key, report_key, report_problem
from longtail.pipeline.stores import StoreInfo, artifact_store
from longtail.stages.errors import LongtailError
from longtail.storage.artifacts import ArtifactStore, CorruptArtifactError
from longtail.storage.featurestore import CorruptStoreError, open_store, store_status
from longtail.storage.featurestore.status import root_attrs

CACHED, STALE, MISSING, CORRUPT = "cached", "stale", "missing", "corrupt"


def _entry(state: str, reason: str) -> dict:
    return {"state": state, "reason": reason}


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def diff_inputs(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two recorded input mappings: ``epochs 10 -> 20``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}{k}"
            if k not in old:
                out.append(f"{name} added ({_short(new[k])})")
            elif k not in new:
                out.append(f"{name} removed (was {_short(old[k])})")
            else:
                out.extend(diff_inputs(old[k], new[k], f"{name}."))
        return out
    same = old == new or (isinstance(old, (int, float)) and isinstance(new, (int, float)) and float(old) == float(new))
    return [] if same else [f"{prefix.rstrip('.') or 'value'} {_short(old)} -> {_short(new)}"]


_EXTRACT_WHAT = {"dataset_fingerprint": "dataset", "backbone": "backbone", "weights_hash": "backbone weights",
                 "code_version": "extraction code"}


def _extract_status(cfg: RunConfig) -> tuple[str, dict, str | None]:
    """(stage key, entry, the store fingerprint the methods would be keyed by or None)."""
    opts = cfg.storage_options
    status = store_status(cfg.store, storage_options=opts)
    if cfg.dataset is None:
        if status == "complete":
            try:
                store = open_store(cfg.store, storage_options=opts)
                store.verify()
            except CorruptStoreError as e:
                return "import", _entry(CORRUPT, str(e)), None
            fp = store.fingerprint
            return "import", _entry(CACHED, f"imported store {cfg.store} (fingerprint {fp})"), fp
        return "import", _entry(MISSING, f"store {cfg.store} is {status}: run `longtail import-features`"), None
    _, now, key = planned_extract(cfg, run_code=False)  # status runs no user code
    if status == "missing":
        return "extract", _entry(MISSING, f"no store at {cfg.store} yet"), None
    if status != "complete":
        return "extract", _entry(MISSING, f"store {cfg.store} is {status} (interrupted): a run resumes it"), None
    try:
        store = open_store(cfg.store, storage_options=opts)
        store.verify()
    except CorruptStoreError as e:
        return "extract", _entry(CORRUPT, str(e)), None
    recorded = store.attrs.get("extract_inputs")
    if key is None and isinstance(recorded, dict):  # a python backbone: compared without building it
        source = now.pop("source")
        changed = [_EXTRACT_WHAT.get(k, k) for k in now if k != "weights_hash" and now[k] != recorded.get(k)]
        if not changed:
            return "extract", _entry(CACHED, f"store {cfg.store} (fingerprint {store.fingerprint}); python backbone "
                                             f"not built by status, so its weights are not compared (source "
                                             f"{source['file']} blake2b {source['blake2b']})"), store.fingerprint
    if key is not None and store.attrs.get("extract_key") == key:
        return "extract", _entry(CACHED, f"store {cfg.store} (fingerprint {store.fingerprint})"), store.fingerprint
    now.pop("source", None)
    if isinstance(recorded, dict):
        changed = [_EXTRACT_WHAT.get(k, k) for k in now if now[k] != recorded.get(k)]
        details = diff_inputs(recorded.get("backbone"), now["backbone"], "backbone.")
        why = ", ".join(changed) + " changed" + (f" ({'; '.join(details)})" if details else "")
    else:
        why = "dataset, backbone or extraction code changed"
    return "extract", _entry(STALE, f"{why}; the complete store {cfg.store} is never overwritten: "
                                    "point `store` at a new path"), None


def _method_status(cfg: RunConfig, spec, fingerprint: str | None, upstream: dict,
                   artifacts, previous: list[dict]) -> tuple[dict, str | None]:
    """(entry, the artifact key when the method is cached, else None)."""
    mine = [m for m in previous if m.get("name") == spec.name]
    if fingerprint is None:
        if mine:
            return _entry(STALE, f"upstream {upstream['key']} is {upstream['state']}"), None
        return _entry(MISSING, f"never fitted (upstream {upstream['key']} is {upstream['state']})"), None
    method, params, key = planned_method(cfg, spec, fingerprint)
    if artifacts.exists("method", key):
        try:
            artifacts.verify("method", key)
        except CorruptArtifactError as e:
            return _entry(CORRUPT, f"{e}; `longtail stage {spec.label} --force` replaces it"), None
        return _entry(CACHED, f"artifact {key}"), key
    if not mine:
        return _entry(MISSING, "never fitted"), None
    last = max(mine, key=lambda m: str(m.get("created", "")))
    reasons = []
    if last.get("store_fingerprint") != fingerprint:
        reasons.append(f"features changed (store fingerprint {last.get('store_fingerprint')} -> {fingerprint})")
    changed = diff_inputs(without_device(last.get("params") or {}), without_device(params))
    if changed:
        reasons.append("params changed: " + "; ".join(changed))
    if last.get("code_version") != method_code_version(method):
        reasons.append("method code changed")
    return _entry(STALE, ", ".join(reasons) or "its inputs changed"), None


def stage_status(cfg: RunConfig) -> dict:
    """``{"stages": {STAGE: {"state": ..., "reason": ...}}}`` in pipeline order."""
    stages: dict[str, dict] = {}
    upstream_key, entry, fingerprint = _extract_status(cfg)
    stages[upstream_key] = entry
    upstream = {"key": upstream_key, "state": entry["state"]}
    artifacts = artifact_store(cfg)
    previous = []
    for k in artifacts.keys("method"):
        try:
            previous.append(artifacts.read_meta("method", k))
        except LongtailError:  # a corrupt artifact: its own entry says so
            pass
    results = []
    for spec in cfg.methods:
        stages[f"method:{spec.label}"], key = _method_status(cfg, spec, fingerprint, upstream, artifacts, previous)
        if key is not None:
            results.append(MethodResult(spec.label, key, True, 0.0))

    metrics = read_metrics(cfg.output)
    recorded = recorded_evaluate(metrics)
    not_cached = [k for k, v in stages.items() if v["state"] != CACHED]
    problem = evaluation_problem(cfg.output) if metrics is not None else None
    if metrics is None:
        stages["evaluate"] = _entry(MISSING, f"no metrics.json in {cfg.output}")
    elif problem is not None:
        state = CORRUPT if "changed since" in problem else STALE
        stages["evaluate"] = _entry(state, f"metrics.json and evaluation.npz are not one committed evaluation ({problem})")
    elif not_cached:
        stages["evaluate"] = _entry(STALE, "upstream " + ", ".join(not_cached) + " not cached")
    else:
        info = StoreInfo(cfg.store, fingerprint, True)
        inputs = evaluate_inputs(cfg, info, results)
        if recorded.get("key") == evaluate_key(inputs):
            stages["evaluate"] = _entry(CACHED, f"metrics.json of {len(results)} methods")
        else:
            changed = diff_inputs(recorded.get("inputs") or {}, inputs)
            stages["evaluate"] = _entry(STALE, "inputs changed: " + "; ".join(changed) if changed
                                        else "written by an older version")

    rendered = rendered_report_key(cfg.output)
    if rendered is None and all(os.path.exists(os.path.join(cfg.output, n)) for n in ("report.md", "report.html")):
        stages["report"] = _entry(STALE, f"the report in {cfg.output} is not the one last rendered "
                                         f"({report_problem(cfg.output)})")
    elif rendered is None:
        stages["report"] = _entry(MISSING, f"no report in {cfg.output}")
    elif stages["evaluate"]["state"] != CACHED:
        stages["report"] = _entry(STALE, f"upstream evaluate is {stages['evaluate']['state']}")
    elif rendered != report_key(cfg.output):
        stages["report"] = _entry(STALE, "metrics.json, evaluation.npz or the report code changed since it was rendered")
    else:
        stages["report"] = _entry(CACHED, f"{cfg.output}/report.md")
    return {"stages": stages}


def format_status(status: dict) -> str:
    rows = [(k, v["state"], v["reason"]) for k, v in status["stages"].items()]
    w = max(len(r[0]) for r in rows) + 2
    return "\n".join(f"{k:<{w}}{s:<8}{r}" for k, s, r in rows)



# ---------------------------------------------------------------------------------------- verify
def _check(results: list[dict], what: str, fn) -> None:
    try:
        detail = fn()
    except LongtailError as e:
        results.append({"what": what, "ok": False, "detail": str(e)})
    else:
        results.append({"what": what, "ok": True, "detail": detail or ""})


def _verify_store(url: str, storage_options: dict | None, results: list[dict]) -> None:
    def run() -> str:
        store = open_store(url, storage_options=storage_options)
        store.verify()
        rows = ", ".join(f"{s} {store.num_rows(s)}" for s in store.splits)
        return f"fingerprint {store.fingerprint[:16]}, {rows} rows"

    _check(results, f"store {url}", run)


def _verify_cache(url: str, storage_options: dict | None, results: list[dict]) -> None:
    from longtail.storage.fs import resolve

    fs, root = resolve(url, storage_options)
    if not fs.exists(root):
        return
    cache = ArtifactStore(url, storage_options=storage_options)
    for entry in sorted(fs.ls(root, detail=False)):
        kind = entry.rstrip("/").rsplit("/", 1)[-1]
        if kind.startswith(".") or not fs.isdir(entry):
            continue
        for key in cache.keys(kind):
            def one(kind: str = kind, key: str = key) -> str:
                cache.verify(kind, key)
                return f"{len(cache.files(kind, key))} file(s) and meta.json match {key[:12]}'s marker"

            _check(results, f"{kind} {cache.url(kind, key)}", one)


def _verify_outputs(out_dir: str, results: list[dict]) -> None:
    if not os.path.exists(os.path.join(out_dir, "metrics.json")):
        return

    def evaluation() -> str:
        problem = evaluation_problem(out_dir)
        if problem is not None:
            raise LongtailError(f"{out_dir}: metrics.json and evaluation.npz are not one committed evaluation "
                                f"({problem})")
        return "one committed evaluation"

    _check(results, f"metrics.json and evaluation.npz in {out_dir}", evaluation)
    if any(os.path.exists(os.path.join(out_dir, n)) for n in ("report.md", "report.html")):
        def report() -> str:
            problem = report_problem(out_dir)
            if problem is not None:
                raise LongtailError(f"{out_dir}: the report is not the one last rendered ({problem})")
            return "pages and plots as rendered"

        _check(results, f"report in {out_dir}", report)


def verify_target(target: str) -> list[dict]:
    """Checks everything stored under ``target`` against its recorded fingerprints and hashes,
    computing nothing: a feature store (its content, train labels against the class counts), a
    run directory (the store its ``metrics.json`` names, every artifact of ``cache/``, the commit
    records of the evaluation and the report) or a YAML config (its store, artifact cache and run
    directory). Returns ``[{"what", "ok", "detail"}]``; LongtailError when ``target`` is none of these."""
    from longtail.pipeline.config import load_config

    results: list[dict] = []
    target = str(target)
    if os.path.isfile(target) and target.endswith((".yaml", ".yml")):
        cfg = load_config(target)
        _verify_store(cfg.store, cfg.storage_options, results)
        _verify_cache(cfg.artifacts_url, cfg.storage_options, results)
        _verify_outputs(cfg.output, results)
        return results
    if not os.path.exists(target) and "://" not in target:
        raise LongtailError(f"{target!r} does not exist (give a feature store, a run directory or a config file)")
    try:
        is_store = root_attrs(target, None) is not None
    except LongtailError:
        is_store = False
    if is_store:
        _verify_store(target, None, results)
        return results
    if not os.path.isdir(target) or not (os.path.exists(os.path.join(target, "metrics.json"))
                                         or os.path.isdir(os.path.join(target, "cache"))):
        raise LongtailError(f"{target!r} is neither a feature store nor a run directory (no metrics.json or cache/)")
    metrics = read_metrics(target)
    store = ((metrics or {}).get("lineage") or {}).get("store") if isinstance(metrics, dict) else None
    if isinstance(store, str) and store:
        _verify_store(store, None, results)
    _verify_cache(os.path.join(target, "cache"), None, results)
    _verify_outputs(target, results)
    return results
