"""The report's tables beyond the comparison, built from ``metrics.json``: calibration, (class,
attribute) groups, DLSA flow filters, shifted test label distributions, prior estimation error.
Each is ``{"title", "text", "columns", "rows"}`` with cells already formatted as strings."""

from __future__ import annotations

from longtail.pipeline.io import pct
from longtail.pipeline.report.meta import meta_sections


def _f(v, digits: int) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def calibration_section(metrics: dict) -> dict:
    return {
        "title": "Calibration",
        "text": "On the balanced test split. ECE and classwise ECE with equal-width bins; Brier and NLL "
                "as in the comparison. Lower is better. `NAME+ts` rows are temperature scaling fitted on val.",
        "columns": ["Method", "Accuracy (%)", "ECE", "Classwise ECE", "Brier", "NLL"],
        "rows": [[n, pct(m["overall"]), _f(m["ece"], 4), _f(m.get("classwise_ece"), 4),
                  _f(m["brier"], 4), _f(m["nll"], 4)] for n, m in metrics["methods"].items()],
    }


def group_section(metrics: dict) -> dict | None:
    """The report's table of group metrics, or None when the run has none."""
    groups = metrics.get("groups")
    methods = {n: m for n, m in metrics["methods"].items() if "worst_group" in m}
    if not groups or not methods:
        return None
    names = groups["attribute_names"]
    classes = metrics.get("class_names") or [str(c) for c in range(len(metrics["class_counts"]))]
    rows = []
    for name, m in methods.items():
        table = m["group_accuracy"]
        worst = min(((v, c, a) for c, row in enumerate(table) for a, v in enumerate(row) if v is not None),
                    default=None)
        where = "n/a" if worst is None else f"{classes[worst[1]]} / {names[worst[2]]}"
        rows.append([name, pct(m["overall"]), pct(m["macro_precision"]), pct(m["average_group"]),
                     pct(m["worst_group"]), where])
    sizes = sorted({n for row in groups["test_counts"] for n in row if n > 0})
    size = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"
    return {
        "title": "Generalized long tail: (class, attribute) groups",
        "text": "Test accuracy (%) per (class, attribute) group (paper 000, Tables 3, 4 and A-2): average-group "
                "is the mean over the groups with test samples, worst-group the lowest of them (the last "
                "column names it, class / attribute); macro precision is the mean per-class precision, a "
                f"class never predicted counting 0. Attributes: {', '.join(names)}; {size} test samples "
                "per group.",
        "columns": ["Method", "Accuracy (%)", "Macro precision (%)", "Average-group (%)", "Worst-group (%)",
                    "Worst group"],
        "rows": rows,
    }


def dlsa_section(metrics: dict) -> dict | None:
    """The table of ``metrics.json``'s ``dlsa`` section (per method, per flow filter), or None."""
    dlsa = metrics.get("dlsa") or {}
    if not dlsa:
        return None
    rows = []
    for name, diag in dlsa.items():
        for f in diag["filters"]:
            rows.append([f"{name}: filter {f['filter']}", str(f["samples_in"]), str(f["samples_out"]),
                         pct(f["tail_share_in"]), pct(f["separation_accuracy"]),
                         _f(f["cluster_size_entropy_ratio"], 3), _f(f["mean_purity"], 3), str(f["empty_clusters"])])
    first = next(iter(dlsa.values()))
    return {
        "title": "DLSA flow filters",
        "text": f"Per filter on the train split (paper 004): separation accuracy is the share of tail-class "
                f"samples (at most {first['tail_threshold']} train samples) among those the filter sends to "
                "its cluster-aided classifier; it beats the tail share of the samples reaching the filter "
                "when the filter enriches tail samples. Entropy ratio: cluster-size entropy over log K "
                f"(1 = balanced clusters), K = {first['num_clusters']}. Purity: mean share of a cluster's "
                "largest class.",
        "columns": ["Filter", "In", "Out", "Tail share in (%)", "Separation (%)", "Entropy ratio",
                    "Purity", "Empty clusters"],
        "rows": rows,
    }


def shift_sections(metrics: dict) -> list[dict]:
    """The shifted-test-set accuracies and the prior estimation errors, or [] without them."""
    shift = metrics.get("label_shift")
    if not shift:
        return []
    subsets = list(next(iter(shift.values())))
    header = ["Method"] + [s.replace("forward-", "fwd ").replace("backward-", "bwd ") for s in subsets]
    rows = []
    for name, per in shift.items():
        rows.append([name] + [pct(per[s]["accuracy"]) for s in subsets])
        rows.append([f"{name} + PC (true prior)"] + [pct(per[s]["accuracy_true_prior"]) for s in subsets])
        rows.append([f"{name} + PC (EM prior)"] + [pct(per[s]["accuracy_em"]) for s in subsets])
        if "accuracy_em_bcts" in per[subsets[0]]:
            rows.append([f"{name} + BCTS + PC (EM prior)"] + [pct(per[s]["accuracy_em_bcts"]) for s in subsets])
        if "accuracy_bbse" in per[subsets[0]]:
            rows.append([f"{name} + PC (BBSE prior)"] + [pct(per[s].get("accuracy_bbse")) for s in subsets])
    sizes = ", ".join(f"{s}: {shift[next(iter(shift))][s]['n']}" for s in subsets)
    err_rows = []
    for name, per in shift.items():
        err_rows.append([f"{name}: EM"] + [f"{per[s]['em_error']:.3f}" for s in subsets])
        if "em_bcts_error" in per[subsets[0]]:
            err_rows.append([f"{name}: EM after BCTS"] + [f"{per[s]['em_bcts_error']:.3f}" for s in subsets])
        if "bbse_error" in per[subsets[0]]:
            err_rows.append([f"{name}: BBSE"] + [f"{per[s]['bbse_error']:.3f}" for s in subsets])
    return [{
        "title": "Shifted test label distributions",
        "text": "Top-1 accuracy (%) on long-tailed subsets of the balanced test split (paper 002, Sec. 4.3 "
                "and Table 6): forward sets follow the train order with the given imbalance ratio, "
                "backward sets reverse it. PC rows post-compensate each method from the prior its "
                "logits carry to the subset's true prior, or to the prior estimated from the subset's "
                "unlabelled logits by EM (on the method's posteriors, or on posteriors first calibrated by "
                f"BCTS on the val split) or BBSE. Subset sizes: {sizes}.",
        "columns": header,
        "rows": rows,
    }, {
        "title": "Deployment prior estimation error",
        "text": "Total-variation distance between the estimated and the true label prior of each shifted "
                "test set (0 = exact). EM: Saerens et al. 2002 on the method's posteriors; EM after BCTS: "
                "the same on posteriors calibrated by bias-corrected temperature scaling fitted on the val "
                "split (Alexandari et al. 2020); BBSE: Lipton et al. 2018 with the confusion matrix of "
                "the val split.",
        "columns": header,
        "rows": err_rows,
    }]


def selection_sections(metrics: dict) -> list[dict]:
    """The val-selected sweeps: what val chose, then the members' test scores as a marked oracle."""
    sel = metrics.get("selection")
    if not sel:
        return []
    rows, oracle = [], []
    for label, entry in sel.items():
        for member, score in entry["val_balanced_accuracy"].items():
            rows.append([label, member, pct(score), "chosen" if member == entry["chosen"] else ""])
            oracle.append([label, member, pct(entry["test_oracle"][member])])
    return [{
        "title": "Sweeps chosen on val",
        "text": "Each sweep (a method entry with a `grid`) fits every combination and keeps, under its label, "
                "the one with the best balanced accuracy (%) on the val split; the method tables above show "
                "that one.",
        "columns": ["Label", "Combination", "Val balanced acc.", ""],
        "rows": rows,
    }, {
        "title": "Test-set oracle of the sweeps (not used to choose)",
        "text": "Balanced accuracy (%) of every combination on the test split, for reference only: choosing "
                "by it would tune on the test split. The choice above used val alone.",
        "columns": ["Label", "Combination", "Test balanced acc. (oracle)"],
        "rows": oracle,
    }]


def report_sections(metrics: dict) -> list[dict]:
    """The report's tables beyond the comparison, in order."""
    found = [calibration_section(metrics), group_section(metrics), dlsa_section(metrics)]
    return [s for s in found if s] + meta_sections(metrics) + shift_sections(metrics) + selection_sections(metrics)
