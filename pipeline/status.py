"""``longtail status``: each stage of a config as cached, stale (and which input changed) or missing.

Nothing is computed: the keys the pipeline would use are compared with what the store, the artifact
cache and the run directory recorded when they were written (the store's ``extract_inputs``, each
method artifact's ``meta.json``, ``metrics.json``'s ``lineage.evaluate``, the report key).
"""

from __future__ import annotations

from typing import Any

from longtail.pipeline.config import RunConfig
from longtail.pipeline.evaluate import evaluate_inputs, evaluate_key, read_metrics, recorded_evaluate
from longtail.pipeline.extract import planned_extract
from longtail.pipeline.keys import method_code_version, without_device
from longtail.pipeline.methods import MethodResult, planned_method
from longtail.pipeline.report.build import rendered_report_key, report_key
from longtail.pipeline.stores import StoreInfo, artifact_store
from longtail.storage.featurestore import open_store, store_status

CACHED, STALE, MISSING = "cached", "stale", "missing"


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
            fp = open_store(cfg.store, storage_options=opts).fingerprint
            return "import", _entry(CACHED, f"imported store {cfg.store} (fingerprint {fp})"), fp
        return "import", _entry(MISSING, f"store {cfg.store} is {status}: run `longtail import-features`"), None
    _, now, key = planned_extract(cfg)
    if status == "missing":
        return "extract", _entry(MISSING, f"no store at {cfg.store} yet"), None
    if status != "complete":
        return "extract", _entry(MISSING, f"store {cfg.store} is {status} (interrupted): a run resumes it"), None
    store = open_store(cfg.store, storage_options=opts)
    if store.attrs.get("extract_key") == key:
        return "extract", _entry(CACHED, f"store {cfg.store} (fingerprint {store.fingerprint})"), store.fingerprint
    recorded = store.attrs.get("extract_inputs")
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
    previous = [artifacts.read_meta("method", k) for k in artifacts.keys("method")]
    results = []
    for spec in cfg.methods:
        stages[f"method:{spec.label}"], key = _method_status(cfg, spec, fingerprint, upstream, artifacts, previous)
        if key is not None:
            results.append(MethodResult(spec.label, key, True, 0.0))

    metrics = read_metrics(cfg.output)
    recorded = recorded_evaluate(metrics)
    not_cached = [k for k, v in stages.items() if v["state"] != CACHED]
    if metrics is None:
        stages["evaluate"] = _entry(MISSING, f"no metrics.json in {cfg.output}")
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
    if rendered is None:
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

