"""The report pages: the comparison table and further sections as ``report.md`` and ``report.html``.

Everything here works on in-memory results and writes only into paths the caller gives (a local
directory); uploading the directory to the artifact store is the pipeline's job.

Every file is written to a temporary name in its directory and renamed into place, so a reader
never sees half a file. Plots are drawn first (:mod:`longtail.pipeline.report.plots`).

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
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import numpy as np

from longtail.pipeline.io import atomic_write
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import METRIC_KEYS, shot_groups

__all__ = ["REPORT_COLUMNS", "render_report", "render_tables"]

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


def _half_width(interval: tuple[float, float] | None, kind: str) -> str:
    if interval is None or math.isnan(interval[0]) or math.isnan(interval[1]):
        return ""
    hw = (interval[1] - interval[0]) / 2
    return " ± " + _format(hw, kind)


def _table(methods: dict[str, dict[str, float]],
           intervals: dict[str, dict[str, tuple[float, float]]] | None = None,
           ) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of (text, is_marked) cells.

    A column where every shown method has a 95% interval prints ``mean ± half-width`` and marks
    every method whose interval overlaps the best one's (not distinguishable from the best); a
    column without intervals marks the best displayed (rounded) value."""
    intervals = intervals or {}
    header = ["Method"] + [h for _, h, _, _ in REPORT_COLUMNS]
    values = {m: [_format(v[k], kind) for k, _, kind, _ in REPORT_COLUMNS] for m, v in methods.items()}
    texts = {m: [t + (_half_width(intervals.get(m, {}).get(k), kind) if t != "n/a" else "")
                 for t, (k, _, kind, _) in zip(cells, REPORT_COLUMNS)] for m, cells in values.items()}
    marked: list[set[str]] = []
    for col, (key, _, kind, better) in enumerate(REPORT_COLUMNS):
        shown = {m: float(t[col]) for m, t in values.items() if t[col] != "n/a"}
        if len(shown) < 2:  # one value (or none) is not a comparison: nothing in bold
            marked.append(set())
            continue
        target = max(shown.values()) if better == "max" else min(shown.values())
        best = [m for m, v in shown.items() if v == target]
        ivs = {m: intervals.get(m, {}).get(key) for m in shown}
        if all(iv is not None and not math.isnan(iv[0]) and not math.isnan(iv[1]) for iv in ivs.values()):
            lo, hi = ivs[best[0]]
            marked.append({m for m, (a, b) in ivs.items() if (b >= lo if better == "max" else a <= hi)})
        else:
            marked.append(set(best))
    rows = []
    for m, cells in texts.items():
        rows.append([(m, False)] + [(t, m in marked[i]) for i, t in enumerate(cells)])
    return header, rows


def _intervals(name: str, metrics: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """A method's optional ``ci95`` (``{metric: [low, high]}``, null bounds for n/a), checked."""
    raw = metrics.get("ci95")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise LongtailError(f"results: methods[{name!r}]['ci95'] must be a mapping of metric -> [low, high]")
    out = {}
    for key, bounds in raw.items():
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise LongtailError(f"results: methods[{name!r}]['ci95'][{key!r}] must be [low, high]")
        out[str(key)] = (_number(bounds[0], f"results: methods[{name!r}]['ci95'][{key!r}]"),
                         _number(bounds[1], f"results: methods[{name!r}]['ci95'][{key!r}]"))
    return out


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
    intervals: dict[str, dict[str, tuple[float, float]]] = {}
    seeds: dict[str, int] = {}
    for name, metrics in methods_in.items():
        if not isinstance(metrics, Mapping):
            raise LongtailError(f"results: methods[{name!r}] must be a mapping of metrics")
        missing = [k for k in _REQUIRED_METHOD_KEYS if k not in metrics]
        if missing:
            raise LongtailError(f"results: methods[{name!r}] lacks key(s) {', '.join(missing)}")
        methods[str(name)] = {k: _number(metrics[k], f"results: methods[{name!r}][{k!r}]")
                              for k in _REQUIRED_METHOD_KEYS}
        intervals[str(name)] = _intervals(str(name), metrics)
        n = metrics.get("seeds", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LongtailError(f"results: methods[{name!r}]['seeds'] must be a positive integer")
        seeds[str(name)] = n
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
        "intervals": intervals,
        "seeds": seeds,
        "rule": {
            "split_rule": rule.get("split_rule", "auto"),
            "many_threshold": rule.get("many_threshold", 100),
            "few_threshold": rule.get("few_threshold", 20),
        },
        "plots": plots,
        "store": _flatten(store),
    }


def _marking(r: dict[str, Any]) -> str:
    """How the table marks methods: by intervals where it has them, else the best value."""
    if not any(r["intervals"].values()):
        return "Bold marks the best value of each column among the methods;"
    n = sorted(set(r["seeds"].values()))
    over = (f"over {n[0]} seeds (Student-t)" if n == [max(n[0], 2)] else
            "over test samples (bootstrap, within each class)" if n == [1] else
            "over seeds (Student-t) for methods fitted with several seeds, over test samples (bootstrap) "
            "for the others")
    return ("± is the half-width of the 95% confidence interval " + over + "; bold marks every method "
            "whose interval overlaps that of the best in the column (not distinguishable from it), and "
            "a column without intervals marks the best value;")


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
                + _marking(r) + " n/a means the metric is undefined (e.g. a shot group with no class)."),
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
    header, rows = _table(r["methods"], r["intervals"])
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
    header, rows = _table(r["methods"], r["intervals"])
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
    md_path = atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(_render_md(r, d), encoding="utf-8"))
    html_path = atomic_write(out / "report.html", lambda tmp: Path(tmp).write_text(_render_html(r, d), encoding="utf-8"))
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
    md_path = atomic_write(out / f"{stem}.md", lambda tmp: Path(tmp).write_text("\n".join(md), encoding="utf-8"))
    html_path = atomic_write(out / f"{stem}.html", lambda tmp: Path(tmp).write_text("\n".join(ht), encoding="utf-8"))
    return md_path, html_path
