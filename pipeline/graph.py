"""The stage graph, sequentially and without Prefect: extract -> shared artifacts -> methods
(heads, then wrapped methods) -> evaluate -> report. The flow in ``flows/`` schedules the same
functions as tasks; each stage's output is keyed by its inputs (:mod:`pipeline.keys`), so a rerun
with unchanged inputs recomputes nothing."""

from __future__ import annotations

import logging

from longtail.pipeline.config import RunConfig
from longtail.pipeline.evaluate import run_evaluate
from longtail.pipeline.extract import existing_store, run_extract
from longtail.pipeline.methods import MethodResult, run_method, validate_data, validate_methods
from longtail.pipeline.plan import method_plan, run_requirement_ref
from longtail.pipeline.preflight import preflight
from longtail.pipeline.report.build import render_report
from longtail.pipeline.combine import check_selections
from longtail.pipeline.stores import StoreInfo, open_features
from longtail.stages.errors import LongtailError
from longtail.storage.featurestore import store_status

log = logging.getLogger("longtail")


def run_all(cfg: RunConfig) -> dict:
    """The whole DAG, sequentially (the flow in ``flows/`` runs the same stages)."""
    validate_methods(cfg)
    store = run_extract(cfg)
    results = run_methods(cfg, store)
    metrics = run_evaluate(cfg, store, results)
    render_report(cfg.output, cfg.evaluation.ece_bins, force=False)
    return metrics


def run_methods(cfg: RunConfig, store: StoreInfo) -> list[MethodResult]:
    """The shared artifacts (each once), then every configured method, in config order."""
    check_selections(cfg, open_features(cfg, store).splits)
    validate_data(cfg, store)  # every method's data checks before the first fit
    for ref in method_plan(cfg).requirements:
        run_requirement_ref(cfg, ref, store)
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
    validate_methods(cfg, open_features(cfg, store).num_classes)
    validate_data(cfg, store)
    if name != "evaluate":
        method_name = name.removeprefix("method:")
        specs = [s for s in cfg.methods if s.label == method_name]
        if not specs:
            raise LongtailError(
                f"unknown stage {name!r}: use extract, evaluate, report or one of the configured methods "
                f"({', '.join(s.label for s in cfg.methods)})"
            )
        run_method(cfg, specs[0], store, force=force)
    metrics = run_evaluate(cfg, store, run_methods(cfg, store), force=force)
    render_report(cfg.output, cfg.evaluation.ece_bins, force=force)
    return metrics
