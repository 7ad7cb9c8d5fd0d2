"""The report stage: plots and pages from a run directory's ``metrics.json`` and
``evaluation.npz``, keyed like every stage (a report rendered from the same files by the same code
is kept as it is)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from longtail.pipeline.io import write_bytes
from longtail.pipeline.keys import code_version, stable_hash
from longtail.pipeline.report import plots as rp
from longtail.pipeline.report.render import render_report as render_pages
from longtail.pipeline.report.sections import report_sections
from longtail.stages import evaluate as ev
from longtail.stages.errors import LongtailError

REPORT_KEY_FILE = ".report-key"


def report_code_version() -> str:
    """Source hash of the report: this module's import closure (plots, pages, tables)."""
    return code_version([__name__])


def report_key(out_dir: str) -> str | None:
    """Key of the report that ``OUT/metrics.json`` and ``OUT/evaluation.npz`` would give now."""
    digests = []
    for name in ("metrics.json", "evaluation.npz"):
        try:
            with open(os.path.join(out_dir, name), "rb") as f:
                digests.append(hashlib.blake2b(f.read(), digest_size=16).hexdigest())
        except OSError:
            return None
    return stable_hash("report", digests, report_code_version())


def rendered_report_key(out_dir: str) -> str | None:
    """The key recorded when the report in ``out_dir`` was last rendered (None: never, or gone)."""
    if not all(os.path.isfile(os.path.join(out_dir, n)) for n in ("report.md", "report.html")):
        return None
    try:
        with open(os.path.join(out_dir, REPORT_KEY_FILE), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _plot_file(kind: str, name: str) -> str:
    return f"plots/{kind}-{name.replace('+', '_')}.png"


def draw_plots(metrics: dict, details, out_dir: str) -> dict[str, str]:
    """Every figure of the report, ``{caption: path relative to out_dir}`` in display order."""
    labels = details["labels"]
    counts = np.asarray(metrics["class_counts"])
    names = metrics.get("class_names") or [str(i) for i in range(len(counts))]
    C = len(counts)
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    per_class = {}
    plots: dict[str, str] = {}
    for name, m in metrics["methods"].items():
        logits = details[f"logits/{name}"]
        pred = logits.argmax(1)
        per_class[name] = ev.per_class_accuracy(pred, labels, C)
        rel, conf = _plot_file("reliability", name), _plot_file("confusion", name)
        rp.plot_reliability(ev.softmax(logits), labels, name, os.path.join(out_dir, rel))
        rp.plot_confusion(ev.confusion(pred, labels, C), names, name, os.path.join(out_dir, conf))
        plots[f"Reliability diagram: {name}"] = rel
        plots[f"Confusion matrix: {name}"] = conf
        if metrics.get("groups") and "group_accuracy" in m:
            grp = _plot_file("groups", name)
            rp.plot_group_accuracy(m["group_accuracy"], names, metrics["groups"]["attribute_names"], name,
                                   os.path.join(out_dir, grp))
            plots[f"Accuracy per (class, attribute) group: {name}"] = grp
    for name, diag in (metrics.get("dlsa") or {}).items():
        path = _plot_file("dlsa", name)
        rp.plot_dlsa(diag, name, os.path.join(out_dir, path))
        plots[f"DLSA filters: {name}"] = path
    rule = metrics.get("shot_rule", {})
    rp.plot_per_class_accuracy(per_class, counts, names, os.path.join(out_dir, "plots", "per-class-accuracy.png"),
                               many_threshold=rule.get("many_threshold", 100),
                               few_threshold=rule.get("few_threshold", 20),
                               split_rule=rule.get("split_rule", "auto"))
    return {"Per-class accuracy against train count": "plots/per-class-accuracy.png"} | plots


def render_report(out_dir: str, ece_bins: int = 20, force: bool = True) -> tuple[str, str]:
    """(Re)render ``report.md``/``report.html`` and the plots from ``OUT/metrics.json`` and
    ``OUT/evaluation.npz``. With ``force=False`` (pipeline runs) a report rendered from the same
    metrics by the same code is kept as it is."""
    mpath = os.path.join(out_dir, "metrics.json")
    dpath = os.path.join(out_dir, "evaluation.npz")
    for p in (mpath, dpath):
        if not os.path.isfile(p):
            raise LongtailError(f"{p!r} does not exist: run `longtail run` first")
    key = report_key(out_dir)
    if not force and key is not None and rendered_report_key(out_dir) == key:
        return os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")
    try:
        with open(mpath, encoding="utf-8") as f:
            metrics = json.load(f)
        details = np.load(dpath, allow_pickle=False)
        details["labels"]
    except (json.JSONDecodeError, OSError, ValueError, KeyError) as exc:
        raise LongtailError(f"{out_dir!r}: metrics.json or evaluation.npz is corrupt ({exc})") from None
    plots = draw_plots(metrics, details, out_dir)
    paths = render_pages(metrics | {"plots": plots, "store": metrics.get("lineage", {}),
                                    "sections": report_sections(metrics)}, out_dir)
    if key is not None:
        write_bytes(os.path.join(out_dir, REPORT_KEY_FILE), key.encode())
    return paths
