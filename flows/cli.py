"""The ``longtail`` command line.

User mistakes (:class:`stages.errors.LongtailError`) become one line on stderr and exit status 2;
nothing already written is touched when the input is bad, because every check runs before work.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from typing import Callable, Optional

import typer

from longtail.stages.errors import LongtailError

# The local Prefect server must not try to phone home (clusters are often offline); a user's own
# setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary local server takes ~15 s to start on a small machine; Prefect gives up at 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Decoupled long-tail learning on cached backbone features: extract once, compare many methods.",
)


#: operating-system errors that are the machine's state or the user's input, not a bug: a full disk,
#: a path too long, a read-only or forbidden place. One line naming the file, like a LongtailError.
USER_OS_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG, errno.EROFS, errno.EACCES,
                            errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EMFILE})


def user_os_error(exc: BaseException) -> str | None:
    """The one line for an OSError of :data:`USER_OS_ERRORS` (``FILE: reason``), else None."""
    if not isinstance(exc, OSError) or exc.errno not in USER_OS_ERRORS:
        return None
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    text = exc.strerror or os.strerror(exc.errno)
    where = os.fsencode(str(where)).decode("utf-8", "backslashreplace") if where else ""
    return f"{where}: {text}" if where else text


class _DropUserErrors(logging.Filter):
    """Prefect logs a task's exception with its traceback; user errors are reported once, by us."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, LongtailError) or (exc is not None and user_os_error(exc) is not None):
            return False
        msg = record.getMessage()
        return "LongtailError" not in msg and not any(os.strerror(e) in msg for e in USER_OS_ERRORS)


def _quiet_user_errors() -> None:
    flt = _DropUserErrors()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.task_engine",
                 "prefect.flow_engine"):
        logging.getLogger(name).addFilter(flt)
    for handler in logging.getLogger("prefect").handlers + logging.getLogger().handlers:
        handler.addFilter(flt)


def _user_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LongtailError as exc:
            typer.echo(f"longtail: error: {' '.join(str(exc).split())}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            line = user_os_error(exc)
            if line is None:
                raise
            typer.echo(f"longtail: error: {line}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _run(cfg, use_prefect: bool) -> dict:
    from longtail.pipeline.graph import run_all
    from longtail.pipeline.preflight import preflight

    preflight(cfg)
    if not use_prefect:
        return run_all(cfg)
    from longtail.flows.pipeline_flow import longtail_flow
    from longtail.flows.runners import check_prefect_api, check_runner, temporary_prefect_server

    check_runner(cfg.runner)
    check_prefect_api()

    _quiet_user_errors()
    with temporary_prefect_server():  # without PREFECT_API_URL: a local server that dies with this run
        return longtail_flow(cfg.model_dump(mode="json"))


def _pct(v, digits: int = 2) -> str:
    from longtail.pipeline.io import pct

    return pct(v, digits)


def _echo_table(columns: list[tuple[str, int]], rows: list[list[str]]) -> None:
    """A fixed-width table, ``(title, width)`` per column: the first column left-aligned, the
    others right-aligned."""
    for row in [[title for title, _ in columns], *rows]:
        typer.echo("".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, (_, w)) in enumerate(zip(row, columns))))


def _summary(metrics: dict, out: str) -> None:
    _echo_table([("method", 22), ("overall", 9), ("balanced", 10), ("many", 8), ("medium", 8), ("few", 8), ("ece", 8)],
                [[name, _pct(m["overall"]), _pct(m["balanced_accuracy"]), _pct(m["many"]), _pct(m["medium"]),
                  _pct(m["few"]), f"{m['ece']:.4f}"] for name, m in metrics["methods"].items()])
    typer.echo(f"report: {os.path.join(out, 'report.md')} (and report.html); metrics: {os.path.join(out, 'metrics.json')}")


@app.command()
@_user_errors
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Run directory for the store, cache and report."),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Run as a Prefect flow (default) or plain Python."),
) -> None:
    """Run the full DAG on the built-in digits-lt dataset with every head, CALA, DLSA and calibration wrappers."""
    from longtail.pipeline.config import demo_config

    cfg = demo_config(out)
    _summary(_run(cfg, prefect), cfg.output)


@app.command()
@_user_errors
def run(
    config: str = typer.Argument(..., help="YAML config file."),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Run as a Prefect flow (default) or plain Python."),
) -> None:
    """Run the full pipeline for CONFIG (extraction is skipped when the store is complete)."""
    from longtail.pipeline.config import load_config

    cfg = load_config(config)
    _summary(_run(cfg, prefect), cfg.output)


@app.command()
@_user_errors
def stage(
    name: str = typer.Argument(..., help="extract, a configured method name (or method:NAME), evaluate or report."),
    config: str = typer.Option(..., "--config", "-c", help="YAML config file."),
    force: bool = typer.Option(False, "--force", help="Recompute the stage even if its artifact is cached."),
) -> None:
    """Rerun one stage on cached features, and what depends on it."""
    from longtail.pipeline.config import load_config
    from longtail.pipeline.graph import run_stage

    cfg = load_config(config)
    metrics = run_stage(cfg, name, force=force)
    if metrics is not None:
        _summary(metrics, cfg.output)


@app.command()
@_user_errors
def status(
    config: str = typer.Argument(..., help="YAML config file."),
    as_json: bool = typer.Option(False, "--json", help='Print {"stages": {STAGE: {"state", "reason"}}}.'),
) -> None:
    """List each stage of CONFIG as cached, stale (and which input changed) or missing; computes nothing."""
    from longtail.pipeline.config import load_config
    from longtail.pipeline.methods import validate_methods
    from longtail.pipeline.status import format_status, stage_status

    cfg = load_config(config)
    validate_methods(cfg)
    res = stage_status(cfg)  # runs no user code: a python backbone is hashed, not built
    typer.echo(json.dumps(res, indent=2) if as_json else format_status(res))


@app.command()
@_user_errors
def verify(
    target: str = typer.Argument(..., help="A feature store, a run directory or a YAML config."),
) -> None:
    """Check a store, a run directory or a config's outputs against their recorded fingerprints and
    hashes (store content and train class counts, every cached artifact, the evaluation's and the
    report's commit records); computes nothing. Exit status 2 when anything is corrupt."""
    from longtail.pipeline.status import verify_target

    results = verify_target(target)
    for r in results:
        typer.echo(f"{'ok' if r['ok'] else 'corrupt':<9}{r['what']}" + (f": {r['detail']}" if r["ok"] and r["detail"] else ""))
    bad = [r for r in results if not r["ok"]]
    if bad:
        raise LongtailError(f"{len(bad)} of {len(results)} checked corrupt: " + " | ".join(r["detail"] for r in bad))
    typer.echo(f"verify: all {len(results)} checked, nothing corrupt")


@app.command()
@_user_errors
def deploy(
    config: str = typer.Argument(..., help="YAML config file."),
    cron: str = typer.Option(..., "--cron", help='Cron schedule of the retraining runs, e.g. "0 3 * * *".'),
    name: Optional[str] = typer.Option(None, "--name", help="Deployment name (default longtail-<config file name>)."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Register with this Prefect work pool instead of serving from this process."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the deployment (name, schedule, parameters) and exit."),
    allow_config_override: bool = typer.Option(
        False, "--allow-config-override",
        help="Let flow runs of this deployment bring their own config (anyone who can reach the Prefect API "
             "can then choose what the worker runs)."),
) -> None:
    """Schedule the full pipeline for CONFIG as a Prefect deployment (batch retraining on a cron).

    Needs a Prefect server (PREFECT_API_URL). Without --pool this process serves the deployment
    and runs the scheduled flow runs until it is stopped; with --pool the deployment is registered
    and `prefect worker start --pool NAME` runs it."""
    from longtail.flows import deploy as dp
    from longtail.flows.runners import check_prefect_api, check_runner
    from longtail.pipeline.config import load_config
    from longtail.pipeline.preflight import preflight

    dp.check_cron(cron)
    cfg = load_config(config)
    preflight(cfg, run_code=not dry_run)  # a dry run builds no python backbone (runs no user code)
    check_runner(cfg.runner)
    dep = dp.build_deployment(cfg, cron, name or dp.default_name(config), pool, allow_override=allow_config_override)
    schedule = f"cron {cron!r}"
    if dry_run:
        typer.echo(f"deployment {dep.name} (flow longtail, entrypoint {dep.entrypoint}), {schedule}")
        typer.echo(json.dumps(dep.parameters, indent=2))
        return
    api = check_prefect_api()
    if api is None:
        # the temporary local server Prefect starts on its own runs no scheduler: nothing would ever run
        raise LongtailError("deploy needs a Prefect server: start one (`prefect server start`) and set "
                            "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    if pool:
        dep_id = dp.register(dep, pool)
        typer.echo(f"deployment longtail/{dep.name} ({dep_id}) registered with work pool {pool!r}, {schedule}; "
                   f"start a worker: prefect worker start --pool {pool}")
        return
    typer.echo(f"serving deployment longtail/{dep.name}, {schedule}, on {api}; Ctrl-C stops it")
    _quiet_user_errors()
    dp.serve(dep)


@app.command("import-features")
@_user_errors
def import_features(
    train: str = typer.Option(..., "--train", help="Train features (.npz or .h5 with features, labels[, attributes])."),
    test: str = typer.Option(..., "--test", help="Test features, same format."),
    out: str = typer.Option(..., "--out", help="URL or path of the feature store to create."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation features, same format."),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="Comma-separated class names."),
    extra: Optional[list[str]] = typer.Option(
        None, "--extra", metavar="NAME=FILE",
        help="An additional split NAME (lower-case, e.g. deploy) from FILE, labels optional; repeatable.",
    ),
) -> None:
    """Build a feature store from existing .npz/.h5 feature files.

    Train needs labels; val, test and --extra files without labels become unlabelled splits
    (for deployment-prior estimation)."""
    from longtail.storage.importers import import_features as do_import

    names = [n.strip() for n in class_names.split(",")] if class_names else None
    extra_files: dict[str, str] = {}
    for value in extra or []:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise LongtailError(f"--extra {value!r}: expected NAME=FILE, e.g. deploy=target.npz")
        if name in extra_files:
            raise LongtailError(f"--extra {value!r}: split {name!r} is given twice")
        extra_files[name] = path
    res = do_import(train=train, test=test, out=out, val=val, class_names=names, extra=extra_files or None)
    what = "already complete, built from the same files" if res.reused else "written"
    typer.echo(f"feature store {what}: {res.url} (fingerprint {res.store.fingerprint})")


@app.command()
@_user_errors
def calibrate(
    config: str = typer.Option(..., "--config", "-c", help="YAML config of the fitted methods."),
    target: str = typer.Option(..., "--target", help="Feature store holding the deployment features."),
    method: str = typer.Option("em", "--method", help="Prior estimator: em (Saerens et al.) or bbse (Lipton et al.)."),
    split: str = typer.Option("test", "--split", help="Split of the target store to estimate the prior of."),
    out: Optional[str] = typer.Option(None, "--out", help="Directory for calibration.json (default: the config's output)."),
    calibration: str = typer.Option("bcts", "--calibration",
                                    help="Calibration of the posteriors before EM: bcts (on the val split) or none."),
) -> None:
    """Estimate the deployment label prior from unlabelled features and post-compensate every method."""
    from longtail.pipeline.config import load_config
    from longtail.pipeline.deploy_prior import run_calibrate

    cfg = load_config(config)
    res = run_calibrate(cfg, target, how=method, split=split, out_dir=out, calibration=calibration)
    _echo_table([("method", 22), ("as is", 9), ("estimated", 11), ("true", 9)],
                [[name, _pct(m["accuracy_uncompensated"]), _pct(m["accuracy_estimated_prior"]),
                  _pct(m["accuracy_true_prior"])] for name, m in res["methods"].items()])
    typer.echo(f"estimated prior ({method}, {res['split']}): " + ", ".join(f"{p:.3f}" for p in res["estimated_prior"]))
    typer.echo(f"written: {os.path.join(out or cfg.output, 'calibration.json')}")


@app.command("dlsa-diagnostics")
@_user_errors
def dlsa_diagnostics(
    stores: list[str] = typer.Argument(..., help="One or more complete feature stores (one per backbone to compare)."),
    out: str = typer.Option(..., "--out", help="Directory for dlsa_diagnostics.json, plots and the cascade cache."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="A DLSA parameter, KEY=VALUE (repeatable), e.g. num_clusters=50."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Head-tail separability of the features in each store (DLSA flow filters only, no classifier)."""
    from longtail.pipeline.config import parse_set
    from longtail.pipeline.diagnostics import run_dlsa_diagnostics

    params = parse_set(set_ or [])
    res = run_dlsa_diagnostics(stores, out, params, seed=seed, device=device)
    _echo_table([("store", 40), ("filter", 7), ("tail in", 9), ("separation", 12), ("entropy", 9), ("purity", 8)],
                [[url[-40:], str(f["filter"]), _pct(f["tail_share_in"], 1), _pct(f["separation_accuracy"], 1),
                  "n/a" if f["cluster_size_entropy_ratio"] is None else f"{f['cluster_size_entropy_ratio']:.3f}",
                  f"{f['mean_purity']:.3f}"] for url, diag in res["stores"].items() for f in diag["filters"]])
    typer.echo(f"written: {os.path.join(out, 'dlsa_diagnostics.json')}")


@app.command()
@_user_errors
def glt(
    config: str = typer.Option(..., "--config", "-c", help="YAML config with a dataset that has attributes (digits-glt)."),
    protocols: Optional[str] = typer.Option(None, "--protocols", help="Comma-separated protocols (default clt,alt,glt)."),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Run as Prefect flows (default) or plain Python."),
) -> None:
    """Run the pipeline once per generalized long-tail protocol (CLT, ALT, GLT) and compare them."""
    import contextlib

    from longtail.flows.runners import temporary_prefect_server
    from longtail.pipeline import glt as g
    from longtail.pipeline.config import load_config

    cfg = load_config(config)
    protos = g.parse_protocols(protocols)
    with temporary_prefect_server() if prefect else contextlib.nullcontext():  # one server for every protocol
        res = g.run_protocols(cfg, protos, run=lambda c: _run(c, prefect))
    _echo_table([("method", 22)] + [c for p in res["protocols"] for c in ((p.upper() + " acc", 10), ("worst", 8))],
                [[name] + [v for p in res["protocols"] for v in (_pct(per[p]["accuracy"]), _pct(per[p]["worst_group"]))]
                 for name, per in res["methods"].items()])
    typer.echo(f"report: {res['report']['md']} (and glt.html); summary: {os.path.join(cfg.output, 'glt.json')}")


@app.command()
@_user_errors
def report(out_dir: str = typer.Argument(..., help="Run directory holding metrics.json.")) -> None:
    """Re-render report.md, report.html and the plots of a finished run."""
    from longtail.pipeline.report.build import render_report

    md, html = render_report(out_dir)
    typer.echo(f"report: {md} and {html}")


@app.command()
@_user_errors
def doctor(
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N: the device to check."),
    quick: bool = typer.Option(False, "--quick", help="Versions and imports only (the containers' health check)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Report torch, CUDA, faiss and the selected device, and run a tiny end-to-end job on it.

    Exit status 1 when a step fails, 2 when the device cannot be had on this machine."""
    from longtail.pipeline.doctor import run_doctor

    res = run_doctor(device, quick=quick)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        env = res["environment"]
        cuda, faiss = env["cuda"], env["faiss"]
        gpus = "; ".join(f"cuda:{d['index']} {d['name']} (capability {d['capability']}, {d['memory_gib']} GiB)"
                         for d in cuda["devices"]) or "none"
        rows = [("python", f"{env['python']} ({env['platform']})"),
                ("torch", f"{env['torch']} (built for CUDA {cuda['built_for'] or 'none: CPU build'}, "
                          f"{env['torch_threads']} threads)"),
                ("cuda", f"available, {len(cuda['devices'])} device(s): {gpus}" if cuda["available"] else "not available"),
                ("faiss", f"{faiss['version'] or 'not installed'} ({faiss['gpus']} GPU(s))"),
                ("numpy / zarr", f"{env['numpy']} / {env['zarr']}"),
                ("prefect", f"{env['prefect']} (PREFECT_API_URL={env['env']['PREFECT_API_URL'] or 'unset'})"),
                ("device", f"{env['device']} (--device {device}; CUDA_VISIBLE_DEVICES="
                           f"{env['env']['CUDA_VISIBLE_DEVICES'] if env['env']['CUDA_VISIBLE_DEVICES'] is not None else 'unset'})")]
        for key, value in rows:
            typer.echo(f"{key:<14}{value}")
        for s in res["steps"]:
            typer.echo(f"{s['status'].upper():<8}{s['name']:<9}{s['seconds']:>7.2f} s  {s['detail']}")
        bad = [s["name"] for s in res["steps"] if s["status"] != "pass"]
        typer.echo(f"doctor: {'all ' + str(len(res['steps'])) + ' step(s) passed' if not bad else 'FAILED: ' + ', '.join(bad)}"
                   f" on {env['device']}")
    if not res["ok"]:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
