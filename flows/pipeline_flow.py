"""The Prefect DAG: extract -> heads (independent tasks) -> calibration wrappers -> evaluate -> report.

Thin by design: every task calls one function of :mod:`pipeline.runner`. Caching is the
pipeline's own (content keys in the artifact store), so Prefect's result cache is off.
``longtail_flow`` (what ``longtail run`` and deployments start) reads the config and runs the
stages as a subflow on the task runner the config names (threads, Dask or Ray, see
:mod:`flows.runners`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from longtail.flows.runners import make_task_runner
from longtail.pipeline import runner, tables
from longtail.pipeline.config import MethodSpec, RunConfig, parse_config


@task(name="extract", cache_policy=NO_CACHE)
def extract_task(cfg: RunConfig) -> runner.StoreInfo:
    return runner.run_extract(cfg)


@task(name="method", cache_policy=NO_CACHE, task_run_name="method:{spec.name}")
def method_task(cfg: RunConfig, spec: MethodSpec, store: runner.StoreInfo) -> runner.MethodResult:
    return runner.run_method(cfg, spec, store)


@task(name="dlsa-cascades", cache_policy=NO_CACHE)
def cascades_task(cfg: RunConfig, specs: list[MethodSpec], store: runner.StoreInfo) -> list[str]:
    """One flow cascade per distinct set of DLSA parameters, fitted once for every wrapped head."""
    return [runner.run_dlsa_cascade(cfg, s, store).key for s in specs]


@task(name="neighbour-tables", cache_policy=NO_CACHE)
def tables_task(cfg: RunConfig, specs: list[MethodSpec], store: runner.StoreInfo) -> list[str]:
    """One neighbour table per distinct set of table parameters, built once for every method using it."""
    return [tables.run_neighbour_table(cfg, s, store).key for s in specs]


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: RunConfig, store: runner.StoreInfo, results: list[runner.MethodResult]) -> dict:
    return runner.run_evaluate(cfg, store, results)


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg: RunConfig, metrics: dict) -> tuple[str, str]:
    return runner.render_report(cfg.output, cfg.evaluation.ece_bins, force=False)


@flow(name="longtail-stages", validate_parameters=False)
def stages_flow(cfg: RunConfig) -> dict:
    """The stage graph of one validated config, on the task runner given by ``with_options``."""
    store = extract_task(cfg)
    plan = runner.method_plan(cfg)
    # neighbour tables and DLSA cascades are built once each, before the methods that use them
    tables_done = [tables_task.submit(cfg, plan.tables, store)] if plan.tables else []
    head_futures = [method_task.submit(cfg, s, store, wait_for=tables_done if s.name in plan.table_users else [])
                    for s in plan.heads]
    prep = tables_done + ([cascades_task.submit(cfg, plan.cascades, store)] if plan.cascades else [])
    # wrappers reuse their base's cached fit (and DLSA its cascade), so they wait for all of it
    wrap_futures = [method_task.submit(cfg, s, store, wait_for=head_futures + prep) for s in plan.wrapped]
    by_name = {r.name: r for r in (f.result() for f in head_futures + wrap_futures)}
    results = [by_name[s.name] for s in cfg.methods]
    metrics = evaluate_task(cfg, store, results)
    report_task(cfg, metrics)
    return metrics


@flow(name="longtail", validate_parameters=False)
def longtail_flow(config: dict[str, Any]) -> dict:
    """The full pipeline for one config mapping (the YAML contents)."""
    cfg = parse_config(config)
    runner.validate_methods(cfg)
    return stages_flow.with_options(task_runner=make_task_runner(cfg.runner))(cfg)
