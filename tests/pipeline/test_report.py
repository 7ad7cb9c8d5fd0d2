"""Tests of the report pages and plots (pipeline/report): the comparison table, the plots and the md/html files."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import matplotlib.image as mpimg
import numpy as np
import pytest

from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import confusion, evaluate, per_class_accuracy, softmax
from longtail.pipeline.report.plots import plot_confusion, plot_per_class_accuracy, plot_reliability
from longtail.pipeline.report.render import render_report

C = 10
NAMES = [f"class_{i}" for i in range(C)]
COUNTS = np.round(500 * 0.01 ** (np.arange(C) / (C - 1))).astype(int)  # 500 ... 5


def _method_logits(seed: int, bias: float, temperature: float):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(C), 20)
    logits = rng.normal(size=(labels.size, C))
    logits[np.arange(labels.size), labels] += 2.0
    logits = (logits + bias * np.log(COUNTS / COUNTS.sum())) * temperature
    return logits, labels


def _metrics(**values):
    base = {"overall": 0.5, "balanced_accuracy": 0.5, "many": 0.6, "medium": 0.5, "few": 0.4,
            "mcc": 0.45, "nmi": 0.4, "ece": 0.1, "brier": 0.6, "nll": 1.5, "fit_seconds": 1.0}
    return base | values


def _results(**extra):
    return {
        "dataset": "toy-lt",
        "class_counts": COUNTS.tolist(),
        "methods": {
            "ce": _metrics(overall=0.61234, balanced_accuracy=0.41, ece=0.2, few=None),
            "balanced-softmax": _metrics(overall=0.60, balanced_accuracy=0.55675, ece=0.05, few=0.3),
            "ce+pc": _metrics(overall=0.58, balanced_accuracy=0.53, ece=0.08, few=float("nan")),
        },
    } | extra


def _table_rows(md: str) -> dict[str, list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "Method"
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip().strip("|").split(" | ")]
        if len(cells) == len(header):
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def _check_png(path: Path, min_side: int = 300):
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_side and image.shape[1] >= min_side
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas


# ---------------------------------------------------------------------------------- report
def test_report_table_has_a_row_per_method_and_bolds_the_best(tmp_path):
    md_path, html_path = render_report(_results(), tmp_path)
    assert md_path == tmp_path / "report.md" and html_path == tmp_path / "report.html"
    md = md_path.read_text()
    rows = _table_rows(md)
    assert set(rows) == {"ce", "balanced-softmax", "ce+pc"}
    # Percentages with two decimals.
    assert rows["ce"]["Overall (%)"] == "**61.23**"
    assert rows["balanced-softmax"]["Overall (%)"] == "60.00"
    # The best balanced accuracy (55.675 -> 55.67 or 55.68) is bold, and only it.
    assert re.fullmatch(r"\*\*55\.6[78]\*\*", rows["balanced-softmax"]["Balanced (%)"])
    assert rows["ce"]["Balanced (%)"] == "41.00"
    assert rows["ce+pc"]["Balanced (%)"] == "53.00"
    # Lower is better for ECE.
    assert rows["balanced-softmax"]["ECE"] == "**0.0500**"
    assert rows["ce"]["ECE"] == "0.2000"
    # null and NaN print n/a and are never best; the only remaining value is not "best of one".
    assert rows["ce"]["Few (%)"] == "n/a" and rows["ce+pc"]["Few (%)"] == "n/a"
    assert rows["balanced-softmax"]["Few (%)"] == "30.00"
    # Equal values are all bold (every method has mcc 0.45).
    assert all(r["MCC"] == "**0.4500**" for r in rows.values())


def test_report_header_names_the_data_set_counts_and_rule(tmp_path):
    md = render_report(_results(), tmp_path)[0].read_text()
    assert "toy-lt" in md
    assert f"{C} classes, {COUNTS.sum()} train samples" in md
    assert "absolute thresholds" in md and "many \\> 100" not in md
    assert "many: 4 classes" in md
    assert "How to read this" in md
    # A small data set without many-shot classes is split by thirds, and the report says why.
    small = _results(class_counts=[90, 80, 70, 60, 50, 40, 30, 20, 10, 5])
    md = render_report(small, tmp_path / "small")[0].read_text()
    assert "thirds of the classes sorted by train count" in md
    assert "would leave a group empty" in md
    assert "many: 4 classes (60-90 train samples)" in md


def test_report_embeds_existing_pngs_and_is_self_contained(tmp_path):
    pca, extra = {}, {}
    for k, (name, bias, temp) in enumerate([("ce", 1.0, 2.0), ("balanced-softmax", 0.0, 1.5), ("ce+pc", 0.2, 1.0)]):
        logits, labels = _method_logits(k, bias, temp)
        probs = softmax(logits)
        pred = probs.argmax(axis=1)
        pca[name] = per_class_accuracy(pred, labels, C)
        plot_reliability(probs, labels, name, tmp_path / "plots" / f"reliability_{name}.png")
        plot_confusion(confusion(pred, labels, C), NAMES, name, tmp_path / "plots" / f"confusion_{name}.png")
        extra[f"Reliability: {name}"] = f"plots/reliability_{name}.png"
        extra[f"Confusion: {name}"] = f"plots/confusion_{name}.png"
    plot_per_class_accuracy(pca, COUNTS, NAMES, tmp_path / "plots" / "per_class.png")
    plots = {"Per-class accuracy": "plots/per_class.png"} | extra
    results = _results(plots=plots, store={"url": "memory://store", "keys": {"features": "abc123"}})

    md_path, html_path = render_report(results, tmp_path)
    html_text = html_path.read_text()
    srcs = [unquote(s) for s in re.findall(r'<img src="([^"]+)"', html_text)]
    assert srcs == list(plots.values())
    for src in srcs:
        assert (tmp_path / src).is_file()
        _check_png(tmp_path / src)
    md_srcs = [unquote(s) for s in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())]
    assert md_srcs == list(plots.values())
    # Self-contained: no script, no network reference; the lineage is shown.
    assert "<script" not in html_text and "http://" not in html_text and "https://" not in html_text
    assert "keys.features" in html_text and "abc123" in html_text
    # One table row per method in the html too, with the best balanced accuracy in bold.
    assert html_text.count("<tr><td>") == 3 + 2  # 3 methods + 2 provenance rows
    assert re.search(r"<td>balanced-softmax</td><td[^>]*>60\.00</td><td[^>]*><strong>55\.6[78]</strong>", html_text)
    # No leftover temporary files in the report directory.
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_report_is_deterministic(tmp_path):
    a = render_report(_results(), tmp_path / "a")
    b = render_report(_results(), tmp_path / "b")
    assert a[0].read_bytes() == b[0].read_bytes()
    assert a[1].read_bytes() == b[1].read_bytes()


def test_report_escapes_method_names(tmp_path):
    results = _results()
    results["methods"]["a|b<script>"] = _metrics()
    md_path, html_path = render_report(results, tmp_path)
    assert "a\\|b\\<script>" in md_path.read_text()
    assert "a|b&lt;script&gt;" in html_path.read_text()
    assert len(_table_rows(md_path.read_text())) == 4


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda r: r.pop("methods"), "missing key 'methods'"),
        (lambda r: r["methods"]["ce"].pop("nmi"), "lacks key"),
        (lambda r: r["methods"]["ce"].update(ece="low"), "expected a number"),
        (lambda r: r.update(plots={"Missing": "nope.png"}), "not found"),
        (lambda r: r.update(plots={"Outside": "../x.png"}), "relative"),
        (lambda r: r.update(class_counts=[]), "class_counts"),
        (lambda r: r.update(shot_rule={"split_rule": "deciles"}), "split_rule"),
    ],
)
def test_report_rejects_bad_results(tmp_path, change, match):
    results = _results()
    change(results)
    with pytest.raises(LongtailError, match=match):
        render_report(results, tmp_path)


# ---------------------------------------------------------------------------------- plots
def test_plots_write_valid_pngs(tmp_path):
    logits, labels = _method_logits(0, 1.0, 2.0)
    probs = softmax(logits)
    pred = probs.argmax(axis=1)
    # Many methods and many classes: legend outside, moving average.
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 600, 150)
    curves = {f"method-{k}": rng.uniform(0, 1, 150) for k in range(6)}
    curves["method-0"][3] = np.nan  # a class without test samples
    out = plot_per_class_accuracy(curves, counts, [f"c{i}" for i in range(150)], tmp_path / "pca_large.png")
    _check_png(out)
    _check_png(plot_reliability(probs, labels, "ce", tmp_path / "rel.png"))
    _check_png(plot_confusion(confusion(pred, labels, C), NAMES, "ce", tmp_path / "cm.png"))
    big = np.random.default_rng(2).integers(0, 5, size=(60, 60))
    big[5] = 0  # a class without test samples is left blank, not a division by zero
    _check_png(plot_confusion(big, [f"c{i}" for i in range(60)], "ce", tmp_path / "cm_big.png"))


def test_plots_reject_bad_input(tmp_path):
    with pytest.raises(LongtailError, match=r"shape \(3,\)"):
        plot_per_class_accuracy({"ce": np.zeros(3)}, COUNTS, NAMES, tmp_path / "x.png")
    with pytest.raises(LongtailError, match="class_names"):
        plot_per_class_accuracy({"ce": np.zeros(C)}, COUNTS, NAMES[:-1], tmp_path / "x.png")
    with pytest.raises(LongtailError, match="square"):
        plot_confusion(np.zeros((3, 4)), ["a", "b", "c"], "ce", tmp_path / "x.png")
    with pytest.raises(LongtailError, match="outside"):
        plot_reliability(np.full((2, 2), 0.5), np.array([0, 2]), "ce", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_evaluate_feeds_the_report(tmp_path):
    """The evaluate() output plus fit_seconds is a valid methods entry, NaN groups included."""
    logits, labels = _method_logits(3, 1.0, 1.0)
    row = evaluate(logits, labels, COUNTS, split_rule="absolute", many_threshold=1000) | {"fit_seconds": 0.5}
    assert np.isnan(row["many"])
    md = render_report({"dataset": "d", "class_counts": COUNTS.tolist(), "methods": {"ce": row},
                        "shot_rule": {"split_rule": "absolute", "many_threshold": 1000, "few_threshold": 20}},
                       tmp_path)[0].read_text()
    assert _table_rows(md)["ce"]["Many (%)"] == "n/a"
    assert _table_rows(md)["ce"]["Overall (%)"] == f"{row['overall'] * 100:.2f}"
    assert "many: no class" in md
