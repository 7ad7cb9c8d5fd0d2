"""The report's figures: per-class accuracy against train counts, reliability diagrams, confusion
matrices, group accuracy, DLSA filters.

Figures are drawn with matplotlib's object API on an explicit Agg canvas
(:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`), never through ``pyplot``: nothing
global is switched (importing this module does not change the backend of a notebook or of the
caller), figures are not registered with pyplot so nothing needs closing or can leak, and plotting
from several Prefect worker threads at once is safe. Every file is written to a temporary name in
its directory and renamed into place (:func:`pipeline.io.atomic_write`), so a reader never sees
half a file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from longtail.pipeline.io import atomic_write
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import expected_calibration_error, reliability_bins, shot_groups

__all__ = ["plot_dlsa", "plot_group_accuracy", "plot_per_class_accuracy", "plot_reliability", "plot_confusion"]

DPI = 120
_GROUP_COLOURS = {"many": "#dbe9f6", "medium": "#fdf0d5", "few": "#f9dcdc"}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, no global backend
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


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
    ece = expected_calibration_error(probs, labels, n_bins)  # from the same bins
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
    largest first) and, per filter, the tail-vs-head AUC of its likelihood on train, val and test
    (``separation``; without it, separation accuracy against the tail share it receives)."""
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
    by_split = diag.get("separation") or {}
    if by_split:  # the tail-vs-head AUC of each filter's likelihood on every split (0.5: no separation)
        width = 0.8 / len(by_split)
        colours = {"train": "#bbbbbb", "val": "#e0a040", "test": "#3b6ea8"}
        for i, (split, sep) in enumerate(by_split.items()):
            auc = [np.nan if f["auc"] is None else f["auc"] for f in sep["filters"]]
            ax_sep.bar(x - 0.4 + width * (i + 0.5), auc, width=width, color=colours.get(split), label=split)
        ax_sep.axhline(0.5, color="#444444", lw=0.8, ls="--")
        ax_sep.set_ylim(0, 1)
        ax_sep.set_ylabel("AUC of the likelihood, tail vs head")
    else:
        tail_in = [100 * (f["tail_share_in"] or 0.0) for f in filters]
        sep = [100 * (f["separation_accuracy"] or 0.0) for f in filters]
        ax_sep.bar(x - 0.2, tail_in, width=0.4, color="#bbbbbb", label="tail share reaching the filter")
        ax_sep.bar(x + 0.2, sep, width=0.4, color="#3b6ea8", label="tail share sent out (separation)")
        ax_sep.set_ylabel("% of samples from tail classes")
    ax_sep.set_xticks(x, [f"filter {f['filter']}" for f in filters])
    ax_sep.set_title(f"Head-tail separation (tail: <= {diag['tail_threshold']} train samples)")
    ax_sep.legend(fontsize=8)
    ax_sep.grid(axis="y", alpha=0.3)
    fig.suptitle(f"DLSA flow filters: {method_name}")
    fig.tight_layout()
    return _save_figure(fig, path)
