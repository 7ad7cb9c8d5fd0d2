"""The Prefect DAG: extract -> shared artifacts -> heads (independent tasks) -> wrapped methods ->
evaluate -> report.

Thin by design: every task calls one function of :mod:`longtail.pipeline`. Caching is the
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
from longtail.pipeline.config import MethodSpec, RunConfig, parse_config
from longtail.pipeline.evaluate import run_evaluate
from longtail.pipeline.extract import check_code_allowed, run_extract
from longtail.pipeline.methods import MethodResult, run_method, validate_data, validate_methods
from longtail.pipeline.plan import RequirementRef, method_plan, run_requirement_ref
from longtail.pipeline.report.build import render_report
from longtail.pipeline.requirements import RequirementResult
from longtail.pipeline.combine import check_selections
from longtail.pipeline.stores import StoreInfo, open_features
from longtail.stages.errors import LongtailError


@task(name="extract", cache_policy=NO_CACHE)
def extract_task(cfg: RunConfig) -> StoreInfo:
    return run_extract(cfg)


@task(name="requirement", cache_policy=NO_CACHE, task_run_name="{ref.kind}:{ref.spec.label}")
def requirement_task(cfg: RunConfig, ref: RequirementRef, store: StoreInfo) -> RequirementResult:
    """One shared artifact (a neighbour table, a DLSA cascade, ...), built once for every method that declares it."""
    return run_requirement_ref(cfg, ref, store)


@task(name="method", cache_policy=NO_CACHE, task_run_name="method:{spec.label}")
def method_task(cfg: RunConfig, spec: MethodSpec, store: StoreInfo) -> MethodResult:
    return run_method(cfg, spec, store)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: RunConfig, store: StoreInfo, results: list[MethodResult]) -> dict:
    return run_evaluate(cfg, store, results)


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg: RunConfig, metrics: dict) -> tuple[str, str]:
    return render_report(cfg.output, cfg.evaluation.ece_bins, force=False)


@flow(name="longtail-stages", validate_parameters=False)
def stages_flow(cfg: RunConfig) -> dict:
    """The stage graph of one validated config, on the task runner given by ``with_options``."""
    store = extract_task(cfg)
    check_selections(cfg, open_features(cfg, store).splits)  # before any fit
    validate_data(cfg, store)
    plan = method_plan(cfg)
    # each shared artifact once, before the methods that declare it
    built = {ref.ident: requirement_task.submit(cfg, ref, store) for ref in plan.requirements}
    head_futures = [method_task.submit(cfg, s, store, wait_for=[built[i] for i in plan.needs[s.label]])
                    for s in plan.heads]
    # wrapped methods reuse cached fits (their inner method's, the artifacts'), so they wait for all of it
    wrap_futures = [method_task.submit(cfg, s, store, wait_for=head_futures + list(built.values()))
                    for s in plan.wrapped]
    by_name = {r.name: r for r in (f.result() for f in head_futures + wrap_futures)}
    results = [by_name[s.label] for s in cfg.methods]
    metrics = evaluate_task(cfg, store, results)
    report_task(cfg, metrics)
    return metrics


def deployment_defaults() -> dict[str, Any] | None:
    """The parameters stored with the deployment this flow run was created from (what
    ``longtail deploy`` registered), read from the API; None outside a deployment run."""
    from prefect.runtime import deployment

    dep_id = deployment.id
    if not dep_id:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return dict(client.read_deployment(dep_id).parameters or {})


def check_run_config(config: dict[str, Any], defaults: dict[str, Any] | None) -> None:
    """A deployment's flow run runs the deployment's own config: a run created with another one
    (any client of the Prefect API can pass parameters) is refused, unless the stored deployment
    says ``allow_config_override: true`` (``longtail deploy --allow-config-override``). The flag the
    run itself carries does not count."""
    if defaults is None or defaults.get("allow_config_override") is True:
        return
    if config != defaults.get("config"):
        raise LongtailError("this flow run's config differs from its deployment's, and the deployment does not accept "
                            "config overrides (redeploy with --allow-config-override to allow them)")


@flow(name="longtail", validate_parameters=False)
def longtail_flow(config: dict[str, Any], allow_config_override: bool = False) -> dict:
    """The full pipeline for one config mapping (the YAML contents). In a deployment run, a config
    other than the deployment's is refused unless the deployment allows overrides
    (:func:`check_run_config`; ``allow_config_override`` is recorded by ``deploy`` and only the
    stored deployment's value is trusted)."""
    defaults = deployment_defaults()
    check_run_config(config, defaults)
    if defaults is not None and config != defaults.get("config") and isinstance(config.get("backbone"), dict):
        # an allowed override: its own allow_code does not count, only the deployment's or the worker's
        own = ((defaults.get("config") or {}).get("backbone") or {}).get("allow_code") is True
        config = {**config, "backbone": {**config["backbone"], "allow_code": own}}
    cfg = parse_config(config)
    check_code_allowed(cfg)
    validate_methods(cfg)
    return stages_flow.with_options(task_runner=make_task_runner(cfg.runner))(cfg)
