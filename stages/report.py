"""The human report: comparison table, plots, ``report.md`` and ``report.html``.

Everything here works on in-memory results and writes only into paths the caller gives (a local
directory); uploading the directory to the artifact store is the pipeline's job.

Figures are drawn with matplotlib's object API on an explicit Agg canvas
(:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`), never through ``pyplot``: nothing
global is switched (importing this module does not change the backend of a notebook or of the
caller), figures are not registered with pyplot so nothing needs closing or can leak, and plotting
from several Prefect worker threads at once is safe. Every file is written to a temporary name in
its directory and renamed into place, so a reader never sees half a file.

``results`` (the ``metrics.json`` content) accepted by :func:`render_report`::

    {
      "dataset": str,
      "class_counts": [int, ...],                 # per-class TRAIN counts, length C
      "methods": {NAME: {"overall", "balanced_accuracy", "many", "medium", "few", "mcc",
                         "nmi", "ece", "brier", "nll", "fit_seconds"}},   # floats or null
      # optional:
      "class_names": [str, ...],                  # length C; used to list the counts
      "shot_rule": {"split_rule": "auto", "many_threshold": 100, "few_threshold": 20},
                                                  # what evaluate() was called with (these are
                                                  # the defaults); the report recomputes the rule
                                                  # used and the group sizes from class_counts
      "plots": {caption: "relative/path.png"},    # relative to out_dir, must exist; shown in order
      "store": {key: value or {key: value}},      # lineage (store URL, cache keys, code version),
                                                  # shown as a provenance table, nested keys dotted
      "sections": [{"title": str, "text": str,    # further tables (label shift, calibration, ...),
                    "columns": [str, ...],        # cells already formatted as strings; shown after
                    "rows": [[str, ...], ...]}],  # the comparison, in order
    }

A metric that is ``null`` or NaN (an empty shot group; the JSON writer stores NaN as ``null``)
is printed "n/a" and never counts as best.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import METRIC_KEYS, _ece_from_bins, reliability_bins, shot_groups

__all__ = [
    "REPORT_COLUMNS",
    "plot_dlsa",
    "plot_group_accuracy",
    "plot_per_class_accuracy",
    "plot_reliability",
    "plot_confusion",
    "render_report",
    "render_tables",
]

DPI = 120
_GROUP_COLOURS = {"many": "#dbe9f6", "medium": "#fdf0d5", "few": "#f9dcdc"}

#: Table columns: (metrics key, header, format, better). ``pct``: a fraction shown as a percentage
#: with 2 decimals; ``f4`` / ``f2``: 4 / 2 decimals. ``better`` is ``max`` or ``min``.
REPORT_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("overall", "Overall (%)", "pct", "max"),
    ("balanced_accuracy", "Balanced (%)", "pct", "max"),
    ("many", "Many (%)", "pct", "max"),
    ("medium", "Medium (%)", "pct", "max"),
    ("few", "Few (%)", "pct", "max"),
    ("mcc", "MCC", "f4", "max"),
    ("nmi", "NMI", "f4", "max"),
    ("ece", "ECE", "f4", "min"),
    ("brier", "Brier", "f4", "min"),
    ("nll", "NLL", "f4", "min"),
    ("fit_seconds", "Fit (s)", "f2", "min"),
)
_REQUIRED_METHOD_KEYS = tuple(METRIC_KEYS) + ("fit_seconds",)


# ---------------------------------------------------------------------------------- file writing
def _atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, no global backend
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    return _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


# ---------------------------------------------------------------------------------- plots
def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean that skips NaN (a class without test samples); NaN where all are."""
    finite = ~np.isnan(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(np.float64), kernel, mode="same")
    out = np.full(values.shape, np.nan)
    out[count > 0] = total[count > 0] / count[count > 0]  # guards windows with no finite value
    return out


def plot_per_class_accuracy(
    per_class_acc: Mapping[str, np.ndarray],
    class_counts: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    path: str | os.PathLike,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    split_rule: str = "auto",
) -> Path:
    """Per-class test accuracy of every method, classes sorted by train count (largest first).

    Top panel: one line per method (accuracy in %), on a background shaded by shot group
    (:func:`stages.evaluate.shot_groups` with the given rule). Bottom panel: the train count of
    each class (log scale). With more than 60 classes the raw per-class values are faint dots
    and the line is a centred moving average (window ``max(5, C // 25)``), said in the title.

    Args:
        per_class_acc: method name -> ``(C,)`` per-class accuracy as a fraction (NaN for a class
            with no test sample, as :func:`stages.evaluate.per_class_accuracy` returns).
        class_counts: ``(C,)`` train counts.
        class_names: ``C`` names (tick labels when ``C <= 40``).
        path: the PNG to write.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.size == 0:
        raise LongtailError(f"class_counts: expected a non-empty 1-D array, got shape {counts.shape}")
    c = counts.size
    names = [str(n) for n in class_names]
    if len(names) != c:
        raise LongtailError(f"class_names: {len(names)} names for {c} classes")
    if not per_class_acc:
        raise LongtailError("per_class_acc: no method to plot")
    curves = {}
    for method, acc in per_class_acc.items():
        arr = np.asarray(acc, dtype=np.float64)
        if arr.shape != (c,):
            raise LongtailError(f"per_class_acc[{method!r}]: shape {arr.shape}, expected ({c},)")
        curves[str(method)] = arr
    groups = shot_groups(
        counts, many_threshold=many_threshold, few_threshold=few_threshold, split_rule=split_rule
    )
    rule = groups[3]

    order = np.argsort(-counts.astype(np.int64), kind="stable")
    rank = np.empty(c, dtype=np.int64)
    rank[order] = np.arange(c)
    x = np.arange(c)
    smooth = c > 60
    window = max(5, c // 25)

    many_methods = len(curves) > 4
    fig = _new_figure(10.5 if many_methods else 9.0, 6.0)
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})

    # Shot-group background: groups are contiguous runs of the count ranking under both rules.
    group_handles = []
    for label, idx in zip(("many", "medium", "few"), groups[:3]):
        group_handles.append(Patch(color=_GROUP_COLOURS[label], label=f"{label} ({idx.size} classes)"))
        if idx.size == 0:
            continue
        lo, hi = rank[idx].min() - 0.5, rank[idx].max() + 0.5
        for a in (ax, ax_n):
            a.axvspan(lo, hi, color=_GROUP_COLOURS[label], zorder=0, lw=0)
    if rule == "absolute":
        rule_note = (f"shot groups by train count: > {many_threshold} / "
                     f"{few_threshold}-{many_threshold} / < {few_threshold}")
    else:
        rule_note = "shot groups: thirds of the classes by train count"
    group_legend = ax.legend(handles=group_handles, title=rule_note, loc="lower center",
                             bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, fontsize=9,
                             title_fontsize=9)
    ax.add_artist(group_legend)

    # Ten colours; past ten methods the line style changes so that no two series look alike.
    styles = ("-", "--", ":", "-.")
    for i, (method, acc) in enumerate(curves.items()):
        colour, style = f"C{i % 10}", styles[(i // 10) % len(styles)]
        y = acc[order] * 100.0
        if smooth:
            ax.plot(x, y, ".", color=colour, alpha=0.25, ms=3, zorder=2)
            ax.plot(x, _moving_average(y, window), style, color=colour, lw=2, label=method, zorder=3)
        else:
            ax.plot(x, y, style, marker="o", color=colour, lw=1.5, ms=4, label=method, zorder=3)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", alpha=0.4)
    title = "Per-class accuracy, classes sorted by train count"
    if smooth:
        title += f"\n(lines: moving average over {window} classes; dots: single classes)"
    fig.suptitle(title, y=0.985)
    if many_methods:
        ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(title="method", loc="lower left", framealpha=0.9)

    ax_n.bar(x, counts[order], width=0.85 if c <= 200 else 1.0, color="#7f7f7f")
    ax_n.set_yscale("log")
    ax_n.set_ylabel("train count")
    ax_n.grid(axis="y", alpha=0.4, which="major")
    if c <= 40:
        ax_n.set_xticks(x)
        ax_n.set_xticklabels([names[i] for i in order], rotation=60, ha="right", fontsize=8)
        ax_n.set_xlabel("class")
    else:
        ax_n.set_xlabel("class rank by train count (0 = largest)")
    ax_n.set_xlim(-0.5, c - 0.5)
    top = 0.80 if smooth else 0.84
    fig.subplots_adjust(left=0.08, right=0.80 if many_methods else 0.97, top=top, bottom=0.2 if c <= 40 else 0.1)
    return _save_figure(fig, path)


def plot_reliability(
    probs: np.ndarray,
    labels: np.ndarray,
    method_name: str,
    path: str | os.PathLike,
    *,
    n_bins: int = 20,
) -> Path:
    """Reliability diagram of top-1 confidence (paper 002, figure 4 style), with ECE in the title.

    Top panel: accuracy per confidence bin (bars) against the diagonal of perfect calibration,
    the gap to each bin's mean confidence hatched. Bottom panel: share of samples per bin.
    Bins and ECE come from :func:`stages.evaluate.reliability_bins`, so they match the table.

    Args:
        probs: ``(N, C)`` class probabilities.
        labels: ``(N,)`` true class indices.
        method_name: shown in the title.
        path: the PNG to write.
        n_bins: equal-width confidence bins (20 as in paper 002).
    """
    bins = reliability_bins(probs, labels, n_bins)
    ece = _ece_from_bins(bins)
    edges, count = bins["edges"], bins["count"]
    width = edges[1] - edges[0]
    filled = count > 0
    acc = np.where(filled, bins["accuracy"], 0.0)
    conf = np.where(filled, bins["confidence"], 0.0)

    fig = _new_figure(6.0, 6.6)
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    ax.bar(edges[:-1][filled], acc[filled], width=width, align="edge", color="#4c72b0",
           edgecolor="#1f3b63", lw=0.6, label="accuracy", zorder=2)
    gap_bottom = np.minimum(acc, conf)[filled]
    gap_height = np.abs(conf - acc)[filled]
    ax.bar(edges[:-1][filled], gap_height, bottom=gap_bottom, width=width, align="edge",
           fill=False, edgecolor="#c44e52", hatch="///", lw=0.8,
           label="gap to mean confidence", zorder=3)
    ax.plot([0, 1], [0, 1], "--", color="#333333", lw=1.2, label="perfect calibration", zorder=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"Reliability: {method_name}\nECE = {ece:.4f} ({len(edges) - 1} bins, N = {int(count.sum())})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9, framealpha=0.9)

    share = count / count.sum() * 100.0  # count.sum() = N >= 1
    ax_n.bar(edges[:-1], share, width=width, align="edge", color="#8c8c8c", edgecolor="#555555", lw=0.4)
    ax_n.set_ylabel("samples (%)")
    ax_n.set_xlabel("top-1 confidence")
    ax_n.grid(alpha=0.3)
    fig.subplots_adjust(left=0.13, right=0.96, top=0.9, bottom=0.09)
    return _save_figure(fig, path)


def plot_confusion(
    confusion: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    method_name: str,
    path: str | os.PathLike,
) -> Path:
    """Row-normalised confusion matrix (each true class sums to 1) as a heat map.

    Args:
        confusion: ``(C, C)`` counts, row = true class, column = predicted class (as
            :func:`stages.evaluate.confusion` returns). Rows without samples are left blank.
        class_names: ``C`` names (tick labels when ``C <= 40``; cells annotated when ``C <= 12``).
        method_name: shown in the title.
        path: the PNG to write.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise LongtailError(f"confusion: expected a square (C x C) matrix, got shape {cm.shape}")
    if not np.isfinite(cm).all() or (cm < 0).any():
        raise LongtailError("confusion: entries must be finite non-negative counts")
    c = cm.shape[0]
    names = [str(n) for n in class_names]
    if len(names) != c:
        raise LongtailError(f"class_names: {len(names)} names for a {c} x {c} confusion matrix")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.full_like(cm, np.nan)
    has = rows[:, 0] > 0  # guards the division: a class with no test sample stays blank
    norm[has] = cm[has] / rows[has]

    side = float(np.clip(0.32 * c + 3.0, 5.5, 12.0))
    fig = _new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(norm), cmap="Blues", vmin=0.0, vmax=1.0,
                      interpolation="nearest", aspect="equal")
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("fraction of the true class")
    if c <= 40:
        ticks = np.arange(c)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        size = 9 if c <= 15 else 7
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=size)
        ax.set_yticklabels(names, fontsize=size)
    if c <= 12:
        for i in range(c):
            for j in range(c):
                v = norm[i, j]
                if np.isfinite(v) and v >= 0.005:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v > 0.55 else "#222222")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion (row-normalised): {method_name}\nN = {int(cm.sum())}, diagonal = per-class recall")
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_group_accuracy(
    accuracy: Any,
    class_names: list[str] | tuple[str, ...],
    attribute_names: list[str] | tuple[str, ...],
    method_name: str,
    path: str | os.PathLike,
) -> Path:
    """Test accuracy per (class, attribute) group as a heat map (generalized long tail).

    Args:
        accuracy: ``(C, A)`` fractions, NaN or None for a group without test samples (left blank),
            as ``metrics.json``'s ``group_accuracy`` holds them.
        class_names, attribute_names: ``C`` and ``A`` tick labels (cells annotated when ``C <= 20``).
        method_name: shown in the title, with the average- and worst-group accuracy.
        path: the PNG to write.
    """
    acc = np.array([[np.nan if v is None else float(v) for v in row] for row in accuracy], dtype=np.float64)
    if acc.ndim != 2 or acc.size == 0:
        raise LongtailError(f"group accuracy: expected a (C x A) table, got shape {acc.shape}")
    c, a = acc.shape
    if len(class_names) != c or len(attribute_names) != a:
        raise LongtailError(f"group accuracy: {len(class_names)} class and {len(attribute_names)} attribute names "
                            f"for a {c} x {a} table")
    fig = _new_figure(float(np.clip(1.1 * a + 3.0, 4.5, 12.0)), float(np.clip(0.32 * c + 2.0, 4.0, 12.0)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(acc), cmap="RdYlGn", vmin=0.0, vmax=1.0, interpolation="nearest",
                      aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).set_label("test accuracy of the group")
    ax.set_xticks(np.arange(a))
    ax.set_xticklabels([str(n) for n in attribute_names], fontsize=9)
    if c <= 40:
        ax.set_yticks(np.arange(c))
        ax.set_yticklabels([str(n) for n in class_names], fontsize=9 if c <= 15 else 7)
    if c <= 20:
        for i in range(c):
            for j in range(a):
                if np.isfinite(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8, color="#222222")
    present = acc[np.isfinite(acc)]
    ax.set_xlabel("attribute")
    ax.set_ylabel("class")
    summary = (f"average {present.mean():.3f}, worst {present.min():.3f}" if present.size else "no test samples")
    ax.set_title(f"Accuracy per (class, attribute) group: {method_name}\n{summary}")
    fig.tight_layout()
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------- report
def plot_dlsa(diag: Mapping[str, Any], method_name: str, path: str | os.PathLike) -> Path:
    """DLSA filter diagnostics (``stages.dlsa.diagnostics``): cluster sizes per filter (sorted,
    largest first) and, per filter, separation accuracy against the tail share it receives."""
    fig = _new_figure(10.5, 4.0)
    ax_sizes, ax_sep = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    filters = diag["filters"]
    for f in filters:
        sizes = np.sort(np.asarray(f["cluster_sizes"], dtype=float))[::-1]
        ratio = f["cluster_size_entropy_ratio"]
        label = f"filter {f['filter']} (entropy ratio {ratio:.2f})" if ratio is not None else f"filter {f['filter']}"
        ax_sizes.plot(np.arange(1, sizes.size + 1), np.maximum(sizes, 0.5), label=label)
    ax_sizes.set_yscale("log")
    ax_sizes.set_xlabel("cluster rank (largest first)")
    ax_sizes.set_ylabel("train samples in cluster (0 drawn at 0.5)")
    ax_sizes.set_title(f"Cluster sizes, K = {diag['num_clusters']}")
    ax_sizes.grid(alpha=0.3)
    ax_sizes.legend(fontsize=8)
    x = np.arange(len(filters))
    tail_in = [100 * (f["tail_share_in"] or 0.0) for f in filters]
    sep = [100 * (f["separation_accuracy"] or 0.0) for f in filters]
    ax_sep.bar(x - 0.2, tail_in, width=0.4, color="#bbbbbb", label="tail share reaching the filter")
    ax_sep.bar(x + 0.2, sep, width=0.4, color="#3b6ea8", label="tail share sent out (separation)")
    ax_sep.set_xticks(x, [f"filter {f['filter']}" for f in filters])
    ax_sep.set_ylabel("% of samples from tail classes")
    ax_sep.set_title(f"Head-tail separation (tail: <= {diag['tail_threshold']} train samples)")
    ax_sep.legend(fontsize=8)
    ax_sep.grid(axis="y", alpha=0.3)
    fig.suptitle(f"DLSA flow filters: {method_name}")
    fig.tight_layout()
    return _save_figure(fig, path)


def _number(value: Any, where: str) -> float:
    """A metric as float; None (JSON null) and NaN both mean "not available" (NaN)."""
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise LongtailError(f"{where}: expected a number or null, got {value!r}")
    return float(value)


def _format(value: float, kind: str) -> str:
    if math.isnan(value):
        return "n/a"
    if kind == "pct":
        return f"{value * 100.0:.2f}"
    if kind == "f2":
        return f"{value:.2f}"
    return f"{value:.4f}"


def _table(methods: dict[str, dict[str, float]]) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of (text, is_best) cells; best is decided on the displayed (rounded) value."""
    header = ["Method"] + [h for _, h, _, _ in REPORT_COLUMNS]
    texts = {m: [_format(v[k], kind) for k, _, kind, _ in REPORT_COLUMNS] for m, v in methods.items()}
    best_cols: list[set[str]] = []
    for col, (key, _, kind, better) in enumerate(REPORT_COLUMNS):
        shown = {m: float(t[col]) for m, t in texts.items() if t[col] != "n/a"}
        if len(shown) < 2:  # one value (or none) is not a comparison: nothing in bold
            best_cols.append(set())
            continue
        target = max(shown.values()) if better == "max" else min(shown.values())
        best_cols.append({m for m, v in shown.items() if v == target})
    rows = []
    for m, cells in texts.items():
        rows.append([(m, False)] + [(t, m in best_cols[i]) for i, t in enumerate(cells)])
    return header, rows


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out.append((name, ", ".join(str(v) for v in value)))
        else:
            out.append((name, str(value)))
    return out


def _md_escape(text: str) -> str:
    for ch in "\\`*_|<[]":
        text = text.replace(ch, "\\" + ch)
    return text


def _validate_sections(sections_in: Any) -> list[dict[str, Any]]:
    sections = []
    for i, sec in enumerate(sections_in):
        if not isinstance(sec, Mapping) or not {"title", "columns", "rows"} <= set(sec):
            raise LongtailError(f"results: sections[{i}] needs 'title', 'columns' and 'rows'")
        columns = [str(c) for c in sec["columns"]]
        rows = [[str(c) for c in row] for row in sec["rows"]]
        if any(len(row) != len(columns) for row in rows):
            raise LongtailError(f"results: sections[{i}] ({sec['title']!r}) has rows of another width than its columns")
        sections.append({"title": str(sec["title"]), "text": str(sec.get("text", "")),
                         "columns": columns, "rows": rows})
    return sections


def _validate_results(results: Any, out_dir: Path) -> dict[str, Any]:
    if not isinstance(results, Mapping):
        raise LongtailError(f"results: expected a mapping (the metrics.json content), got {type(results).__name__}")
    for key in ("dataset", "class_counts", "methods"):
        if key not in results:
            raise LongtailError(f"results: missing key {key!r}")
    counts = np.asarray(results["class_counts"])
    if counts.ndim != 1 or counts.size == 0 or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise LongtailError("results: 'class_counts' must be a non-empty list of non-negative integers")
    c = counts.size
    names = results.get("class_names")
    if names is not None and len(names) != c:
        raise LongtailError(f"results: 'class_names' has {len(names)} names for {c} classes")
    methods_in = results["methods"]
    if not isinstance(methods_in, Mapping) or not methods_in:
        raise LongtailError("results: 'methods' must be a non-empty mapping of method name -> metrics")
    methods: dict[str, dict[str, float]] = {}
    for name, metrics in methods_in.items():
        if not isinstance(metrics, Mapping):
            raise LongtailError(f"results: methods[{name!r}] must be a mapping of metrics")
        missing = [k for k in _REQUIRED_METHOD_KEYS if k not in metrics]
        if missing:
            raise LongtailError(f"results: methods[{name!r}] lacks key(s) {', '.join(missing)}")
        methods[str(name)] = {k: _number(metrics[k], f"results: methods[{name!r}][{k!r}]")
                              for k in _REQUIRED_METHOD_KEYS}
    rule = dict(results.get("shot_rule") or {})
    unknown = set(rule) - {"split_rule", "many_threshold", "few_threshold"}
    if unknown:
        raise LongtailError(f"results: 'shot_rule' has unknown key(s) {', '.join(sorted(unknown))}")
    plots: list[tuple[str, str]] = []
    for caption, rel in (results.get("plots") or {}).items():
        rel_path = Path(str(rel))
        if rel_path.is_absolute() or ".." in rel_path.parts:
            raise LongtailError(f"results: plot {caption!r} must be a path relative to the report directory, got {rel!r}")
        if not (out_dir / rel_path).is_file():
            raise LongtailError(f"results: plot {caption!r}: file {rel!r} not found in the report directory")
        plots.append((str(caption), rel_path.as_posix()))
    store = results.get("store") or {}
    if not isinstance(store, Mapping):
        raise LongtailError("results: 'store' must be a mapping of lineage fields")
    return {
        "sections": _validate_sections(results.get("sections") or []),
        "dataset": str(results["dataset"]),
        "counts": counts.astype(np.int64),
        "names": [str(n) for n in names] if names is not None else None,
        "methods": methods,
        "rule": {
            "split_rule": rule.get("split_rule", "auto"),
            "many_threshold": rule.get("many_threshold", 100),
            "few_threshold": rule.get("few_threshold", 20),
        },
        "plots": plots,
        "store": _flatten(store),
    }


def _describe(r: dict[str, Any]) -> dict[str, Any]:
    """Sentences of the report header (plain text, escaped later per format)."""
    counts = r["counts"]
    c = counts.size
    total = int(counts.sum())
    largest, smallest = int(counts.max()), int(counts.min())
    ratio = f"{largest / smallest:.1f}" if smallest > 0 else "n/a (a class has no train sample)"
    many, medium, few, used = shot_groups(counts, **r["rule"])
    hi, lo = r["rule"]["many_threshold"], r["rule"]["few_threshold"]

    def span(idx: np.ndarray) -> str:
        if idx.size == 0:
            return "no class"
        a, b = int(counts[idx].min()), int(counts[idx].max())
        return f"{idx.size} classes ({a} train samples)" if a == b else f"{idx.size} classes ({a}-{b} train samples)"

    if used == "absolute":
        rule = (f"absolute thresholds (Liu et al.; Kang et al.): many > {hi}, medium {lo}-{hi}, "
                f"few < {lo} train samples")
    else:
        why = (" because the absolute thresholds (many > {hi}, few < {lo}) would leave a group empty"
               .format(hi=hi, lo=lo) if r["rule"]["split_rule"] == "auto" else "")
        rule = f"thirds of the classes sorted by train count (ties kept in the higher group){why}"
    counts_line = None
    if c <= 50:
        labels = r["names"] or [str(i) for i in range(c)]
        counts_line = ", ".join(f"{n} {int(k)}" for n, k in zip(labels, counts))
    return {
        "summary": (f"{c} classes, {total} train samples; largest class {largest}, smallest {smallest}, "
                    f"imbalance ratio {ratio}."),
        "counts_line": counts_line,
        "rule": rule,
        "groups": f"many: {span(many)}; medium: {span(medium)}; few: {span(few)}.",
        "how": ("How to read this: accuracies are top-1 test accuracies in percent; Balanced is the mean "
                "per-class recall, and Many / Medium / Few average the per-class accuracy inside each "
                "shot group; MCC and NMI are in [-1, 1] and [0, 1], higher is better; ECE (equal-width bins "
                "of top-1 confidence), Brier (sum over classes, mean over samples) and NLL (mean, natural "
                "log) are calibration errors, lower is better; Fit is the wall time to fit the method. "
                "Bold marks the best value of each column among the methods; n/a means the metric is "
                "undefined (e.g. a shot group with no class)."),
    }


def _section_md(sec: dict[str, Any]) -> list[str]:
    """Markdown lines of one validated section (:func:`_validate_sections`), a blank line last."""
    lines = [f"## {_md_escape(sec['title'])}", ""]
    if sec["text"]:
        lines += [_md_escape(sec["text"]), ""]
    lines.append("| " + " | ".join(_md_escape(c) for c in sec["columns"]) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(sec["columns"]) - 1)) + "|")
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in sec["rows"]]
    return lines + [""]


def _section_html(sec: dict[str, Any]) -> list[str]:
    """HTML lines of one validated section (:func:`_validate_sections`)."""
    e = html.escape
    out = [f"<h2>{e(sec['title'])}</h2>"]
    if sec["text"]:
        out.append(f'<p class="how">{e(sec["text"])}</p>')
    out.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in sec["columns"]) + "</tr></thead><tbody>")
    for first, *rest in sec["rows"]:
        out.append(f"<tr><td>{e(first)}</td>" + "".join(f'<td class="num">{e(c)}</td>' for c in rest) + "</tr>")
    out.append("</tbody></table>")
    return out


def _render_md(r: dict[str, Any], d: dict[str, Any]) -> str:
    lines = [f"# Long-tail report: {_md_escape(r['dataset'])}", ""]
    lines.append(f"- **Data set:** {_md_escape(r['dataset'])}")
    lines.append(f"- **Train class counts:** {_md_escape(d['summary'])}")
    if d["counts_line"]:
        lines.append(f"- **Per class:** {_md_escape(d['counts_line'])}")
    lines.append(f"- **Shot groups:** {_md_escape(d['rule'])}.")
    lines.append(f"- **Group sizes:** {_md_escape(d['groups'])}")
    lines += ["", "## Comparison", ""]
    header, rows = _table(r["methods"])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        cells = [f"**{_md_escape(t)}**" if best else _md_escape(t) for t, best in row]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", d["how"].replace("_", "\\_"), ""]
    for sec in r["sections"]:
        lines += _section_md(sec)
    if r["plots"]:
        lines += ["## Plots", ""]
        for caption, rel in r["plots"]:
            url = quote(rel, safe="/+")
            lines += [f"### {_md_escape(caption)}", "", f"![{_md_escape(caption)}]({url})", ""]
    if r["store"]:
        lines += ["## Provenance", "", "| Field | Value |", "|:---|:---|"]
        lines += [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in r["store"]]
        lines.append("")
    return "\n".join(lines)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td strong { color: #0b5394; }
tbody tr:nth-child(even) { background: #fafafa; }
p.how { color: #555; font-size: .92em; max-width: 60em; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
ul.meta li { margin: .2em 0; }
"""


def _html_head(title: str) -> list[str]:
    """The opening lines of an HTML page titled ``title``, through its ``<h1>``."""
    e = html.escape
    return ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(title)}</title>",
            f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>"]


def _render_html(r: dict[str, Any], d: dict[str, Any]) -> str:
    e = html.escape
    out = _html_head(f"Long-tail report: {r['dataset']}") + [
        '<ul class="meta">',
        f"<li><b>Data set:</b> {e(r['dataset'])}</li>",
        f"<li><b>Train class counts:</b> {e(d['summary'])}</li>",
    ]
    if d["counts_line"]:
        out.append(f"<li><b>Per class:</b> {e(d['counts_line'])}</li>")
    out += [
        f"<li><b>Shot groups:</b> {e(d['rule'])}.</li>",
        f"<li><b>Group sizes:</b> {e(d['groups'])}</li>",
        "</ul>",
        "<h2>Comparison</h2>",
        "<table>",
    ]
    header, rows = _table(r["methods"])
    out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        (name, _), *cells = row
        tds = "".join(
            f'<td class="num"><strong>{e(t)}</strong></td>' if best else f'<td class="num">{e(t)}</td>'
            for t, best in cells
        )
        out.append(f"<tr><td>{e(name)}</td>{tds}</tr>")
    out += ["</tbody>", "</table>", f'<p class="how">{e(d["how"])}</p>']
    for sec in r["sections"]:
        out += _section_html(sec)
    if r["plots"]:
        out.append("<h2>Plots</h2>")
        for caption, rel in r["plots"]:
            out.append(
                f'<figure><img src="{e(quote(rel, safe="/+"))}" alt="{e(caption)}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
    if r["store"]:
        out += ["<h2>Provenance</h2>", "<table>", "<thead><tr><th>Field</th><th>Value</th></tr></thead>", "<tbody>"]
        out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in r["store"]]
        out += ["</tbody>", "</table>"]
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def render_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for ``results`` into ``out_dir``.

    Args:
        results: the ``metrics.json`` content, optionally with ``class_names``, ``shot_rule``,
            ``plots`` and ``store`` (see the module docstring). Plot paths are relative to
            ``out_dir`` and must exist (draw them first with the ``plot_*`` functions).
        out_dir: a local directory (created if missing); nothing is written outside it.

    Returns:
        ``(md_path, html_path)``. The HTML is self-contained (inline CSS, no network); images are
        referenced by relative path, so the directory can be moved or uploaded as a whole. The
        output depends only on ``results`` (no timestamps), so the same results give the same bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = _validate_results(results, out)
    d = _describe(r)
    md_path = _atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(_render_md(r, d), encoding="utf-8"))
    html_path = _atomic_write(out / "report.html", lambda tmp: Path(tmp).write_text(_render_html(r, d), encoding="utf-8"))
    return md_path, html_path


def render_tables(title: str, intro: list[str], sections: list[Mapping[str, Any]],
                  out_dir: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """Write ``STEM.md`` and ``STEM.html``: a title, paragraphs and tables (``sections`` as in
    :func:`render_report`: title, text, columns, rows of strings), for summaries across runs such
    as ``longtail glt``'s protocols."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secs = _validate_sections(sections)
    md = [f"# {_md_escape(title)}", ""] + [line for p in intro for line in (_md_escape(p), "")]
    ht = _html_head(title) + [f'<p class="how">{html.escape(p)}</p>' for p in intro]
    for sec in secs:
        md += _section_md(sec)
        ht += _section_html(sec)
    ht += ["</body>", "</html>", ""]
    md_path = _atomic_write(out / f"{stem}.md", lambda tmp: Path(tmp).write_text("\n".join(md), encoding="utf-8"))
    html_path = _atomic_write(out / f"{stem}.html", lambda tmp: Path(tmp).write_text("\n".join(ht), encoding="utf-8"))
    return md_path, html_path
