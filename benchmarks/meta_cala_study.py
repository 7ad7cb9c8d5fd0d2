#!/usr/bin/env python
"""Meta-CALA (paper 000, Algorithm A-2) on ``digits-glt`` under the CLT, ALT and GLT protocols,
beside its special-case base ``logit-adjust`` with ``tau = tau1`` (what ``meta_lr: 0`` trains; tau1
from the train imbalance ratio, :func:`longtail.stages.cala.default_tau1`), plain ``logit-adjust``,
``heuristic-cala``, ``ce`` and ``crt``, with ablations of the meta set, the meta step size and the
neighbour statistics (specification §2.9 and §6).

Usage (from the repository root)::

    python benchmarks/meta_cala_study.py                           # print the study section
    python benchmarks/meta_cala_study.py --write-readme            # also write it into README.md
    nice python benchmarks/meta_cala_study.py --timing --write-readme   # the cost section instead
    python benchmarks/meta_cala_study.py --digits-lt --write-readme     # the digits-lt section instead

A script, not a test: seeded and reproducible (the same machine and thread count give the same
accuracies); nothing in it asserts a time. For each seed it runs what ``longtail glt --no-prefect``
runs, as ``benchmarks/glt_study.py`` does (the same splits, builtin CNN and features per seed), with
the methods below at their default parameters unless the label says otherwise, and reads each
Meta-CALA fit's diagnostics (``metrics.json``, section ``meta``): the mean size of the effective
adjustment ``tau2 |δ − mean_c δ|`` over the last epoch, so that "no gain" can be told apart from "the
meta step did nothing".

``--digits-lt`` runs what ``longtail run --no-prefect`` runs on ``digits-lt`` at imbalance ratios 10,
20 and 50 instead (same seeds; the builtin CNN per ratio and seed; the meta set 2 val rows per (class,
KMeans group), the store having no attributes) and reports balanced and few-shot accuracy.

``--timing`` measures the cost instead: CPU seconds per epoch of ``meta-cala`` against its non-meta
base ``logit-adjust`` (``tau = tau1``; same epochs, batch size, lr, seed) on the same features, with
the neighbour table and the meta set built once beforehand and handed over (what the pipeline does
with its shared artifacts): on ``digits-lt`` (the default stage-1 CNN's features, as
``benchmarks/bench_cala.py`` extracts them, plus the val split for the meta set) and on the
ImageNet-LT-shaped synthetic features of ``benchmarks/benchlib.py`` reduced to ``--fraction`` of the
train rows per class (at least 2), with its 10-per-class val split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from glt_study import PROTOCOLS, _cell, _delta  # noqa: E402
from longtail.pipeline import glt  # noqa: E402
from longtail.pipeline.config import parse_config  # noqa: E402
from readme import write_section  # noqa: E402

LT_START = "<!-- meta-cala-lt:start -->"
LT_END = "<!-- meta-cala-lt:end -->"
LT_COMMAND = "python benchmarks/meta_cala_study.py --digits-lt --write-readme"
RATIOS = (10, 20, 50)
TIMING_START = "<!-- meta-cala-bench:start -->"
TIMING_END = "<!-- meta-cala-bench:end -->"
TIMING_COMMAND = "nice python benchmarks/meta_cala_study.py --timing --write-readme"
START_MARKER = "<!-- meta-cala-study:start -->"
END_MARKER = "<!-- meta-cala-study:end -->"
COMMAND = "python benchmarks/meta_cala_study.py --write-readme"

#: (label, name, params): the meta set is 2 rows per (class, attribute) of val by default
METHODS = [
    ("ce", "ce", {}),
    ("crt", "crt", {}),
    ("logit-adjust", "logit-adjust", {}),
    ("logit-adjust[tau=tau1]", "logit-adjust", {}),  # tau: default_tau1 of the train counts (run_seed)
    ("heuristic-cala", "heuristic-cala", {}),
    ("meta-cala", "meta-cala", {}),
    ("meta-cala[kmeans]", "meta-cala", {"meta_groups": "kmeans"}),
    ("meta-cala[class-only]", "meta-cala", {"meta_groups": "kmeans", "groups": 1, "per_group": 6}),
    ("meta-cala[meta_lr=1e-2]", "meta-cala", {"meta_lr": 1e-2}),
    ("meta-cala[cached]", "meta-cala", {"neighbour_stats": "cached"}),
    # heuristic-cala trains 100 epochs by default: is the gap to it a matter of training length?
    ("logit-adjust[tau=tau1,epochs=100]", "logit-adjust", {"epochs": 100}),
    ("meta-cala[epochs=100]", "meta-cala", {"epochs": 100}),
]
META = [label for label, name, _ in METHODS if name == "meta-cala"]
#: digits-lt has no attributes: the default meta set is already KMeans-grouped
LT_METHODS = [m for m in METHODS if m[0] != "meta-cala[kmeans]"] + [("tau-norm", "tau-norm", {})]
#: what the meta-cala variants are compared with (paired differences)
BASES = ["logit-adjust[tau=tau1]", "logit-adjust", "heuristic-cala", "crt"]


def with_tau1(methods: list, counts) -> list[dict]:
    """The config entries, ``logit-adjust[tau=tau1]`` given meta-cala's default tau1 for ``counts``."""
    from longtail.stages.cala import default_tau1

    return [{"name": name, "label": label,
             "params": ({**params, "tau": default_tau1(counts)} if label.startswith("logit-adjust[tau=tau1")
                        else params)}
            for label, name, params in methods]


def run_seed(seed: int, out: str) -> tuple[dict, dict, float]:
    from longtail.stages.datasets import digits_glt

    # CLT and GLT share their long-tailed train split (under ALT u is a constant: any tau is ce)
    methods = with_tau1(METHODS, digits_glt(protocol="glt", seed=seed).class_counts)
    cfg = parse_config({"store": os.path.join(out, "features.zarr"), "dataset": {"name": "digits-glt"},
                        "backbone": {"kind": "builtin"}, "methods": methods, "output": out, "seed": seed,
                        "device": "auto", "evaluation": {"shift_ratios": []}}, source="meta_cala_study")
    t0 = time.perf_counter()
    summary = glt.run_protocols(cfg, PROTOCOLS)
    seconds = time.perf_counter() - t0
    diag = {}
    for p in PROTOCOLS:
        with open(os.path.join(summary["runs"][p]["output"], "metrics.json"), encoding="utf-8") as f:
            diag[p] = json.load(f).get("meta", {})
    return summary, diag, seconds


def section(results: list[dict], diags: list[dict], seeds: list[int], seconds: list[float], threads: int) -> str:
    def vals(label, p, key):
        return [r["methods"][label][p][key] for r in results]

    def adjust(label, p):  # the last epoch's mean effective adjustment, mean over seeds
        return float(np.mean([d[p][label]["delta_mean_abs"][-1] for d in diags]))

    lines = [
        "`digits-glt` with its defaults, the splits, builtin CNN and features per seed of "
        "`benchmarks/glt_study.py`; every method with its default parameters unless its label says "
        "otherwise (`meta-cala`: "
        "tau1 from the imbalance ratio (1.14 here) as `heuristic-cala`, tau2 = 1, K = 20, Adam at meta_lr = 1e-3, "
        "a meta set of 2 val rows per (class, attribute), 30 epochs of minibatch SGD as every head; "
        "`logit-adjust[tau=tau1]` is what it trains with `meta_lr: 0`). `[kmeans]`: 2 rows per (class, KMeans "
        "group of 6) instead "
        "of attributes; `[class-only]`: 6 rows per class, no groups; `[cached]`: the neighbours' "
        "characteristics from a table refreshed as rows are trained; `[epochs=100]`: as `heuristic-cala`'s "
        "default. "
        f"Mean over seeds {', '.join(map(str, seeds))}; accuracies in %.",
        "",
        "| method | " + " | ".join(f"{p.upper()} acc. | {p.upper()} worst" for p in PROTOCOLS)
        + " | adjustment (logits) CLT / ALT / GLT |",
        "|---" + "|---:" * (2 * len(PROTOCOLS) + 1) + "|",
    ]
    for label, _, _ in METHODS:
        cells = [_cell(vals(label, p, k)) for p in PROTOCOLS for k in ("accuracy", "worst_group")]
        size = " / ".join(f"{adjust(label, p):.2g}" for p in PROTOCOLS) if label in META else ""
        lines.append(f"| `{label}` | " + " | ".join(cells) + f" | {size} |")
    lines += ["", "Paired differences of `meta-cala`, percentage points, mean over seeds (range in brackets):", "",
              "| `meta-cala` minus | " + " | ".join(f"{p.upper()} acc. | {p.upper()} worst" for p in PROTOCOLS) + " |",
              "|---" + "|---:" * (2 * len(PROTOCOLS)) + "|"]
    for base in BASES + [m for m in META if m != "meta-cala"]:
        cells = [_delta(vals("meta-cala", p, key), vals(base, p, key))
                 for p in PROTOCOLS for key in ("accuracy", "worst_group")]
        lines.append(f"| `{base}` | " + " | ".join(cells) + " |")
    lines += ["", "<!-- meta-cala-study:findings -->", "",
              f"Measured on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared), "
              f"{threads} torch thread(s), torch {torch.__version__}; the three protocols took "
              + ", ".join(f"{s:.0f} s" for s in seconds) + " per seed (CNN and features included). "
              f"`{COMMAND}` regenerates this section (the findings paragraph is kept)."]
    return "\n".join(lines)


def write_readme(text: str, start: str = START_MARKER, end: str = END_MARKER,
                 tag: str = "<!-- meta-cala-study:findings -->") -> None:
    """Replace the text between the markers (README.md re-read right before writing), keeping a
    findings paragraph that follows the findings marker up to the first blank line."""

    def keep_findings(old: str) -> str:
        if tag in old:
            kept = old.split(tag, 1)[1].lstrip("\n").split("\n\n", 1)[0]
            if kept and not kept.startswith("Measured on"):
                return text.replace(tag, f"{tag}\n{kept}", 1)
        return text

    write_section(start, end, keep_findings)


# ---------------------------------------------------------------------------------------- digits-lt
def run_lt(ratio: int, seed: int, out: str) -> dict:
    from longtail.pipeline import graph
    from longtail.stages.datasets import digits_lt

    methods = with_tau1(LT_METHODS, digits_lt(imbalance_ratio=ratio, seed=seed).class_counts)
    cfg = parse_config({"store": os.path.join(out, "features.zarr"),
                        "dataset": {"name": "digits-lt", "imbalance_ratio": ratio},
                        "backbone": {"kind": "builtin"}, "output": out, "seed": seed, "device": "auto",
                        "evaluation": {"shift_ratios": []}, "methods": methods}, source="meta_cala_study")
    return graph.run_all(cfg)


def lt_section(results: dict[int, list[dict]], seeds: list[int], seconds: float, threads: int) -> str:
    lines = ["`digits-lt` (balanced test split, 50 images per class) at three imbalance ratios; per ratio and "
             "seed the builtin CNN and its features, every method with its defaults unless its label says "
             "otherwise (`meta-cala`: 2 val rows per (class, KMeans group of 6), 30 epochs of minibatch SGD; "
             "`logit-adjust[tau=tau1]` with its tau1 of the ratio: 1.01, 1.16, 1.36). "
             f"Balanced accuracy and few-shot accuracy in %, mean over seeds {', '.join(map(str, seeds))}; the "
             "adjustment: the last epoch's mean `tau2 |δ - mean δ|` in logits.", "",
             "| method | " + " | ".join(f"IF {r}: bal. acc. | IF {r}: few" for r in RATIOS)
             + " | adjustment IF 10 / 20 / 50 |",
             "|---" + "|---:" * (2 * len(RATIOS) + 1) + "|"]
    for label, name, _ in LT_METHODS:
        cells = []
        for r in RATIOS:
            cells += [_cell([m["methods"][label]["balanced_accuracy"] for m in results[r]]),
                      f"{100 * np.nanmean([m['methods'][label]['few'] for m in results[r]]):.1f}"]
        size = " / ".join(f"{np.mean([m['meta'][label]['delta_mean_abs'][-1] for m in results[r]]):.2g}"
                          for r in RATIOS) if name == "meta-cala" else ""
        lines.append(f"| `{label}` | " + " | ".join(cells) + f" | {size} |")
    lines += ["", "Paired differences of `meta-cala` in balanced accuracy, percentage points, mean over seeds "
              "(range in brackets):", "", "| `meta-cala` minus | " + " | ".join(f"IF {r}" for r in RATIOS) + " |",
              "|---" + "|---:" * len(RATIOS) + "|"]
    for base in ("logit-adjust[tau=tau1]", "logit-adjust", "heuristic-cala", "crt", "tau-norm"):
        cells = [_delta([m["methods"]["meta-cala"]["balanced_accuracy"] for m in results[r]],
                        [m["methods"][base]["balanced_accuracy"] for m in results[r]]) for r in RATIOS]
        lines.append(f"| `{base}` | " + " | ".join(cells) + " |")
    lines += ["", "<!-- meta-cala-lt:findings -->", "",
              f"Measured on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared), "
              f"{threads} torch thread(s), torch {torch.__version__}; {seconds:.0f} s in all (CNNs and features "
              f"included). `{LT_COMMAND}` regenerates this section (the findings paragraph is kept)."]
    return "\n".join(lines)


def digits_lt(args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or tempfile.mkdtemp(prefix="meta-cala-lt-")
    t0 = time.perf_counter()
    results = {r: [run_lt(r, s, os.path.join(out, f"if{r}-seed{s}")) for s in seeds] for r in RATIOS}
    text = lt_section(results, seeds, time.perf_counter() - t0, args.threads)
    print(text)
    if args.write_readme:
        write_readme(text, LT_START, LT_END, "<!-- meta-cala-lt:findings -->")


# ---------------------------------------------------------------------------------------- timing
def timing_sets(name: str, fraction: float, device: str):
    """``(train, val)`` of ``digits-lt`` (default stage-1 CNN features) or of the ImageNet-LT-shaped
    synthetic set (train reduced to ``fraction`` per class)."""
    from bench_cala import synthetic_sets
    from benchlib import synthetic_features, synthetic_labels, synthetic_means

    from longtail.pipeline.config import BackboneConfig, ExtractionConfig
    from longtail.stages import extract as ex
    from longtail.stages.data import FeatureSet
    from longtail.stages.datasets import digits_lt

    if name == "imagenet-lt-synthetic":
        train, _ = synthetic_sets(fraction)
        labels = synthetic_labels("val")
        val = FeatureSet(synthetic_features("val", labels, synthetic_means()), labels, train.class_counts,
                         train.class_names, name="val")
        return train, val
    ds, b = digits_lt(seed=0), BackboneConfig()
    split = ds.splits["train"]
    bb = ex.train_small_cnn(split.images, split.labels, ds.num_classes, epochs=b.epochs, lr=b.lr,
                            batch_size=b.batch_size, weight_decay=b.weight_decay, width=b.width, seed=0, device=device)
    backbone = ex.Backbone(ex.FeaturesOf(bb.module.net, None, "features"), {}, "")
    out = []
    for part in ("train", "val"):
        split = ds.splits[part]
        feats = np.concatenate(list(ex.extract_chunks(backbone, split.images, batch_size=ExtractionConfig().batch_size,
                                                      device=device, desc=part)))
        out.append(FeatureSet(feats, split.labels, ds.class_counts, ds.class_names, name=part))
    return tuple(out)


def time_fits(train, val, epochs: int, repeats: int, device: str) -> dict:
    """Median CPU seconds per epoch of ``logit-adjust`` (tau = tau1) and ``meta-cala`` (its artifacts
    handed over), alternating, after a warm-up fit of each."""
    from longtail.stages.meta.metaset import build_meta_set
    from longtail.stages.registry import make_method

    params = {"epochs": epochs, "seed": 0, "device": device}
    meta = make_method("meta-cala", params)
    table = meta.build_table(train)
    meta_set = build_meta_set(val, source="val", per_group=int(meta.per_group), seed=0, groups=meta._groups(val))
    out: dict[str, list[float]] = {"logit-adjust": [], "meta-cala": [], "meta-cala[cached]": []}
    for r in range(repeats + 1):
        for key in out:
            if key == "logit-adjust":
                method = make_method(key, {**params, "tau": meta.resolved_tau1(train.class_counts)})
            else:
                stats = {"neighbour_stats": "cached"} if key.endswith("[cached]") else {}
                method = make_method("meta-cala", {**params, **stats}).set_table(table).set_meta_set(meta_set)
            c0 = time.process_time()
            method.fit(train, val)
            if r:  # the first round warms up
                out[key].append((time.process_time() - c0) / epochs)
    return {key: float(np.median(v)) for key, v in out.items()} | {"rows": len(train), "dim": train.dim,
                                                                     "classes": train.num_classes,
                                                                     "meta_rows": len(meta_set.rows)}


def timing_section(results: dict, args) -> str:
    lines = ["CPU seconds per epoch (fit time over epochs, the fit's one-time set-up included; median of the "
             "repeats) of `meta-cala` against its non-meta base `logit-adjust` (`tau = tau1`) on the same "
             "features, default batch size (256), K = 20, the neighbour table and the meta set handed over "
             "(built once per store by the pipeline); in brackets the ratio to `logit-adjust`:", "",
             "| features | train rows x dim, classes | meta rows | `logit-adjust` | `meta-cala` "
             "| `meta-cala`, `neighbour_stats: cached` |",
             "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        base = r["logit-adjust"]
        lines.append(f"| {name} | {r['rows']} x {r['dim']}, {r['classes']} | {r['meta_rows']} | {base:.3g} s | "
                     + " | ".join(f"{r[k]:.3g} s ({r[k] / base:.1f}x)" for k in ("meta-cala", "meta-cala[cached]"))
                     + " |")
    lines += ["", f"Measured on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared), "
              f"{args.threads} torch thread(s), torch {torch.__version__}; digits-lt {args.epochs} epochs x "
              f"{args.repeats} repeats, the synthetic set at fraction {args.fraction:g}, {args.synthetic_epochs} "
              f"epoch(s) x {args.synthetic_repeats}. A meta step costs the look-ahead (a forward and backward with "
              "graph, the meta batch, a double backward) and the characteristics: with `exact` neighbour statistics "
              "(the default) the head runs on the batch's n x K neighbour rows, K times the batch's own forward "
              f"pass. `{TIMING_COMMAND}` regenerates this section."]
    return "\n".join(lines)


def timing(args) -> None:
    import faiss

    faiss.omp_set_num_threads(args.threads)  # the table is built outside the timed fits, but not on every core
    results = {}
    for name, epochs, repeats in (("digits-lt", args.epochs, args.repeats),
                                  ("imagenet-lt-synthetic", args.synthetic_epochs, args.synthetic_repeats)):
        train, val = timing_sets(name, args.fraction, args.device)
        results[name] = time_fits(train, val, epochs, repeats, args.device)
        print(name, results[name], file=sys.stderr, flush=True)
    text = timing_section(results, args)
    print(text)
    if args.write_readme:
        write_section(TIMING_START, TIMING_END, text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--write-readme", action="store_true")
    p.add_argument("--timing", action="store_true", help="measure the cost per epoch instead of the study")
    p.add_argument("--digits-lt", action="store_true", help="the digits-lt study instead (imbalance 10, 20, 50)")
    p.add_argument("--epochs", type=int, default=30, help="timing: digits-lt epochs per fit (30)")
    p.add_argument("--repeats", type=int, default=3, help="timing: digits-lt fits per method (3)")
    p.add_argument("--fraction", type=float, default=0.1, help="timing: share of the synthetic train rows (0.1)")
    p.add_argument("--synthetic-epochs", type=int, default=1, help="timing: synthetic epochs per fit (1)")
    p.add_argument("--synthetic-repeats", type=int, default=1, help="timing: synthetic fits per method (1)")
    p.add_argument("--device", default="cpu", help="timing: device (cpu)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.timing:
        timing(args)
        return
    if args.digits_lt:
        digits_lt(args)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or tempfile.mkdtemp(prefix="meta-cala-study-")
    results, diags, seconds = [], [], []
    for seed in seeds:
        res, diag, sec = run_seed(seed, os.path.join(out, f"seed{seed}"))
        results.append(res)
        diags.append(diag)
        seconds.append(sec)
        print(f"seed {seed}: {sec:.0f} s ({os.path.join(out, f'seed{seed}', 'glt.md')})", file=sys.stderr)
    text = section(results, diags, seeds, seconds, args.threads)
    print(text)
    if args.write_readme:
        write_readme(text)


if __name__ == "__main__":
    main()
