"""Generalized long tail (issue 6): the CLT / ALT / GLT protocol runs of ``longtail glt``.

The group metrics themselves are the evaluation's (:func:`pipeline.evaluate.use_groups`) and
their report table the report's (:func:`pipeline.report.sections.group_section`).

:func:`run_protocols` runs the configured pipeline once per protocol of Tang et al. 2022
(``dataset.protocol`` overridden): protocol ``P``'s store is the config's store with ``-P`` before
``.zarr``, its run directory ``OUTPUT/P``, and every protocol shares the config's artifact cache.
It then writes ``OUTPUT/glt.json``, ``glt.md`` and ``glt.html``: per method and protocol,
accuracy, macro precision, average- and worst-group accuracy.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from longtail.pipeline.config import RunConfig, parse_config
from longtail.pipeline.graph import run_all
from longtail.pipeline.io import pct, write_json
from longtail.pipeline.preflight import preflight
from longtail.pipeline.report.render import render_tables
from longtail.stages.datasets import GLT_PROTOCOLS, PROTOCOL_DATASETS
from longtail.stages.errors import LongtailError

#: ``glt.json``'s per-protocol metrics, and the ``metrics.json`` keys they come from.
SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("accuracy", "overall"),
    ("macro_precision", "macro_precision"),
    ("average_group", "average_group"),
    ("worst_group", "worst_group"),
    ("balanced_accuracy", "balanced_accuracy"),
)


# ---------------------------------------------------------------------------- protocols
def protocol_store(url: str, protocol: str) -> str:
    """Protocol ``P``'s store: ``.../features.zarr`` -> ``.../features-P.zarr`` (else ``URL-P``)."""
    base = url.rstrip("/")
    stem, dot, ext = base.rpartition(".")
    if dot and ext == "zarr":
        return f"{stem}-{protocol}.zarr"
    return f"{base}-{protocol}"


def parse_protocols(text: str | None) -> list[str]:
    """``clt,alt,glt`` -> the list, checked (unknown or repeated protocols are errors)."""
    if text is None:
        return list(GLT_PROTOCOLS)
    items = [p.strip().lower() for p in text.split(",") if p.strip()]
    if not items:
        raise LongtailError(f"--protocols {text!r}: name at least one of {', '.join(GLT_PROTOCOLS)}")
    for p in items:
        if p not in GLT_PROTOCOLS:
            raise LongtailError(f"--protocols: unknown protocol {p!r} (use {', '.join(GLT_PROTOCOLS)})")
    if len(set(items)) != len(items):
        raise LongtailError(f"--protocols {text!r}: a protocol is named twice")
    return items


def protocol_configs(cfg: RunConfig, protocols: list[str]) -> list[tuple[str, RunConfig]]:
    """One config per protocol: ``dataset.protocol``, the store and the output overridden, the
    artifact cache shared. An error when the config has no dataset with attributes."""
    if cfg.dataset is None:
        raise LongtailError(
            "longtail glt: the config names no dataset, so there are no protocols to draw: the GLT protocols "
            f"need a built-in dataset with attributes ({', '.join(PROTOCOL_DATASETS)}); for your own data, "
            "import one store per protocol (with 'attributes') and run each with evaluation.groups: true"
        )
    if cfg.dataset.name not in PROTOCOL_DATASETS:
        raise LongtailError(
            f"longtail glt: dataset {cfg.dataset.name!r} has no attributes, and the GLT protocols need them "
            f"(use {', '.join(PROTOCOL_DATASETS)})"
        )
    if cfg.evaluation.groups is False:
        raise LongtailError("longtail glt: evaluation.groups is false, but the protocols are compared by group metrics")
    base = cfg.model_dump(mode="json", exclude_none=True)
    out = []
    for p in protocols:
        data = json.loads(json.dumps(base))
        data["dataset"]["protocol"] = p
        data["store"] = protocol_store(cfg.store, p)
        data["output"] = os.path.join(cfg.output, p)
        data["artifacts"] = cfg.artifacts_url
        out.append((p, parse_config(data, source=f"glt protocol {p}")))
    return out


def run_protocols(cfg: RunConfig, protocols: list[str],
                  run: Callable[[RunConfig], dict] | None = None) -> dict:
    """Run the pipeline once per protocol (``run``, default :func:`pipeline.graph.run_all`), then
    write ``glt.json``, ``glt.md`` and ``glt.html`` into the config's output. Every protocol's
    checks run before any of them starts."""
    plan = protocol_configs(cfg, protocols)
    if os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        raise LongtailError(f"output {cfg.output!r} exists and is not a directory")
    for _, c in plan:
        preflight(c)
    run = run or run_all
    per_protocol = {p: run(c) for p, c in plan}
    return write_summary(cfg, plan, per_protocol)


def write_summary(cfg: RunConfig, plan: list[tuple[str, RunConfig]], per_protocol: dict[str, dict]) -> dict:
    """``OUTPUT/glt.json`` and the ``glt.md`` / ``glt.html`` tables from each protocol's metrics."""
    methods: dict[str, dict] = {}
    for p, metrics in per_protocol.items():
        for name, m in metrics["methods"].items():
            if "worst_group" not in m:  # run_evaluate adds it whenever the test split has attributes
                raise LongtailError(f"glt protocol {p}: method {name!r} has no group metrics")
            methods.setdefault(name, {})[p] = {k: m[src] for k, src in SUMMARY_KEYS}
    protocols = [p for p, _ in plan]
    summary = {
        "dataset": cfg.dataset.model_dump(mode="json", exclude_none=True, exclude={"protocol"}),
        "protocols": protocols,
        "methods": methods,
        "runs": {p: {"output": c.output, "store": c.store,
                     "store_fingerprint": per_protocol[p].get("lineage", {}).get("store_fingerprint"),
                     "train_class_counts": per_protocol[p]["class_counts"],
                     "groups": per_protocol[p].get("groups")} for p, c in plan},
    }
    os.makedirs(cfg.output, exist_ok=True)
    write_json(os.path.join(cfg.output, "glt.json"), summary)
    columns = ["Method"] + [f"{p.upper()} {h}" for p in protocols for h in ("acc.", "prec.", "avg-group", "worst-group")]
    rows = [[name] + [pct(per.get(p, {}).get(k)) for p in protocols
                      for k in ("accuracy", "macro_precision", "average_group", "worst_group")]
            for name, per in methods.items()]
    intro = [
        f"Dataset {cfg.dataset.name}; protocols of Tang et al. 2022 as paper 000 uses them: CLT trains long-tailed "
        "in classes and attributes and tests class-balanced with the train attribute distribution; ALT trains "
        "class-balanced with long-tailed attributes and tests balanced in classes and attributes; GLT trains "
        "long-tailed in both and tests balanced in both.",
        "Accuracy is top-1 test accuracy, precision the macro (per-class mean) precision, avg-group and "
        "worst-group the mean and the lowest accuracy over the (class, attribute) groups, all in %. "
        f"Each protocol's full report: {', '.join(f'{p}/report.md' for p in protocols)}.",
    ]
    section = {"title": "Methods under the protocols", "text": "", "columns": columns, "rows": rows}
    md, html = render_tables("Generalized long-tail protocols", intro, [section], cfg.output, "glt")
    summary["report"] = {"md": str(md), "html": str(html)}
    return summary
