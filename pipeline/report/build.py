"""The report stage: plots and pages from a run directory's ``metrics.json`` and
``evaluation.npz``, keyed like every stage (a report rendered from the same files by the same code
is kept as it is)."""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from longtail.pipeline.evaluate import evaluation_problem
from longtail.pipeline.io import drop_commit, read_commit, write_commit
from longtail.pipeline.keys import code_version, stable_hash
from longtail.pipeline.report import plots as rp
from longtail.pipeline.report.render import render_report as render_pages
from longtail.pipeline.report.sections import report_sections
from longtail.stages import evaluate as ev
from longtail.stages.errors import LongtailError

#: the report's commit record: its key and the hashes of report.md, report.html and every plot,
#: written last (a report whose files no longer match it is rendered again)
REPORT_KEY_FILE = ".report-key"
#: a plot file name made from a method name as it is (after ``+`` -> ``_``)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


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
    """The key recorded when the report in ``out_dir`` was last rendered, while its pages and
    plots are still those files (None: never rendered, interrupted, or a file changed since)."""
    return read_commit(out_dir, REPORT_KEY_FILE)[0]


def report_problem(out_dir: str) -> str | None:
    """Why the report of ``out_dir`` is not the one last rendered (None when it is)."""
    return read_commit(out_dir, REPORT_KEY_FILE)[1]


def _plot_file(kind: str, name: str) -> str:
    """``plots/KIND-NAME.png`` for a method name: the name as it is when it is a plain file name
    (``+`` written ``_``); any other name (a path separator, ``..``, spaces, brackets: method names
    come from ``metrics.json``, which a run directory may carry from anywhere) is reduced to
    letters, digits, ``-`` and ``_`` plus a hash of the name, so it stays unique and inside ``plots/``."""
    plain = name.replace("+", "_")
    if not _SAFE_NAME.match(plain) or len(plain) > 100:
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        plain = re.sub(r"[^A-Za-z0-9_-]+", "_", plain).strip("_")[:60] + f"-{digest}"
    return f"plots/{kind}-{plain}.png"


def _plots_dir(out_dir: str) -> str:
    """``OUT/plots``, created; refused when it is a link or leads outside the run directory."""
    plots = os.path.join(out_dir, "plots")
    if os.path.islink(plots) or (os.path.exists(plots) and not os.path.isdir(plots)):
        raise LongtailError(f"{plots!r} is a link or not a directory: the report writes its plots only inside the "
                            "run directory")
    os.makedirs(plots, exist_ok=True)
    if os.path.commonpath([os.path.realpath(plots), os.path.realpath(out_dir)]) != os.path.realpath(out_dir):
        raise LongtailError(f"{plots!r} leads outside the run directory {out_dir!r}")
    return plots


def draw_plots(metrics: dict, details, out_dir: str) -> dict[str, str]:
    """Every figure of the report, ``{caption: path relative to out_dir}`` in display order."""
    labels = details["labels"]
    counts = np.asarray(metrics["class_counts"])
    names = metrics.get("class_names") or [str(i) for i in range(len(counts))]
    C = len(counts)
    _plots_dir(out_dir)
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


def _load_run(out_dir: str):
    """``(metrics, details)`` of a run directory, checked enough to render: a malformed file or a
    method without its logits is a one-line error naming the directory."""
    mpath = os.path.join(out_dir, "metrics.json")
    dpath = os.path.join(out_dir, "evaluation.npz")
    try:
        with open(mpath, encoding="utf-8") as f:
            metrics = json.load(f)
        details = np.load(dpath, allow_pickle=False)
        if not hasattr(details, "files"):
            raise ValueError("evaluation.npz is a single array, not an .npz archive")
        details["labels"]
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError, KeyError, EOFError) as exc:
        raise LongtailError(f"{out_dir!r}: metrics.json or evaluation.npz is corrupt ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from None
    methods = metrics.get("methods") if isinstance(metrics, dict) else None
    if not isinstance(methods, dict) or not all(isinstance(m, dict) for m in methods.values()) or not isinstance(
            metrics.get("class_counts"), list):
        raise LongtailError(f"{out_dir!r}: metrics.json is malformed (no 'methods' mapping or 'class_counts' list)")
    missing = [n for n in methods if f"logits/{n}" not in details.files]
    if missing:
        raise LongtailError(f"{out_dir!r}: evaluation.npz has no logits for {', '.join(map(repr, missing[:3]))} "
                            "(metrics.json and evaluation.npz are from different runs): evaluate again")
    return metrics, details


def render_report(out_dir: str, ece_bins: int = 20, force: bool = True) -> tuple[str, str]:
    """(Re)render ``report.md``/``report.html`` and the plots from ``OUT/metrics.json`` and
    ``OUT/evaluation.npz``, which must be one committed evaluation
    (:func:`pipeline.evaluate.evaluation_problem`). With ``force=False`` (pipeline runs) a report
    rendered from the same metrics by the same code, its files unchanged, is kept as it is. The
    pages and plots are committed as one by :data:`REPORT_KEY_FILE`, written last."""
    out_dir = str(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LongtailError(f"{out_dir!r} is not a run directory (a file, no metrics.json in it)")
    mpath = os.path.join(out_dir, "metrics.json")
    dpath = os.path.join(out_dir, "evaluation.npz")
    for p in (mpath, dpath):
        if not os.path.isfile(p):
            raise LongtailError(f"{p!r} does not exist: run `longtail run` first")
    problem = evaluation_problem(out_dir)
    if problem is not None:
        raise LongtailError(f"{out_dir!r}: metrics.json and evaluation.npz are not one committed evaluation "
                            f"({problem}): evaluate again (`longtail stage evaluate --config CONFIG` or `longtail run`)")
    key = report_key(out_dir)
    if not force and key is not None and rendered_report_key(out_dir) == key:
        return os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")
    metrics, details = _load_run(out_dir)
    drop_commit(out_dir, REPORT_KEY_FILE)
    plots = draw_plots(metrics, details, out_dir)
    paths = render_pages(metrics | {"plots": plots, "store": metrics.get("lineage", {}),
                                    "sections": report_sections(metrics)}, out_dir)
    if key is not None:
        write_commit(out_dir, REPORT_KEY_FILE, key, ["report.md", "report.html", *plots.values()])
    return paths
