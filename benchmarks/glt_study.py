#!/usr/bin/env python
"""Every foundation head and Heuristic-CALA (with its ablations and Dynamic-LA) on ``digits-glt``
under the CLT, ALT and GLT protocols (issue 6; paper 000, Tables 4 and 5).

Usage (from the repository root)::

    python benchmarks/glt_study.py                  # print the section
    python benchmarks/glt_study.py --write-readme   # also write it into README.md

A script, not a test: seeded and reproducible (the same machine and thread count give the same
accuracies); nothing in it asserts a time. For each seed it runs what ``longtail glt --no-prefect``
runs (:func:`pipeline.glt.run_protocols` with :func:`pipeline.graph.run_all`): per protocol, the
digits-glt splits of that seed, the builtin small CNN (30 epochs) trained on the protocol's train
split, features extracted into the protocol's store, every method fitted on them with its default
parameters (the seed feeds the split, the CNN and the heads), and the evaluation with group metrics.
Heuristic-CALA uses its defaults (tau1 from the train imbalance ratio, tau2 = 1, K = 20, 100 epochs)
under every protocol. ``logit-adjust (300 epochs)`` is logit adjustment trained ten times longer than
its default, close to convergence: a CALA margin over logit adjustment should not be a margin over
under-training.

The test split has 450 images (15 per (class, attribute) group under Test-GBL; 3 to 32 under
CLT's Test-CBL): one image is 0.22 points of accuracy and 6.7 points of a 15-image group, so the
table gives the mean over seeds and the text the paired differences with their range over seeds.
"""

from __future__ import annotations

import argparse
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

from longtail.pipeline import glt  # noqa: E402
from longtail.pipeline.config import parse_config  # noqa: E402
from readme import write_section  # noqa: E402
from longtail.stages.registry import known_methods  # noqa: E402

START_MARKER = "<!-- glt-study:start -->"
END_MARKER = "<!-- glt-study:end -->"
COMMAND = "python benchmarks/glt_study.py --write-readme"

FOUNDATION = ["ce", "balanced-softmax", "logit-adjust", "cb-ce", "focal", "cosine", "ldam-drw", "crt",
              "tau-norm", "lws"]
CALA = ["heuristic-cala", "cala-no-u", "cala-no-v", "dynamic-la"]
#: logit adjustment near convergence (label, entry), beside the defaults
CONVERGED = ("logit-adjust (300 epochs)", {"name": "logit-adjust", "label": "logit-adjust (300 epochs)",
                                           "params": {"epochs": 300}})
PROTOCOLS = ["clt", "alt", "glt"]
#: (glt.json key, header) of the table, per protocol
COLUMNS = {"clt": [("accuracy", "acc."), ("macro_precision", "prec."), ("average_group", "avg-group"),
                   ("worst_group", "worst")],
           "alt": [("accuracy", "acc."), ("macro_precision", "prec."), ("worst_group", "worst")],
           "glt": [("accuracy", "acc."), ("macro_precision", "prec."), ("worst_group", "worst")]}


def run_seed(seed: int, methods: list[str], out: str) -> tuple[dict, float]:
    entries = [CONVERGED[1] if m == CONVERGED[0] else m for m in methods]
    cfg = parse_config({"store": os.path.join(out, "features.zarr"), "dataset": {"name": "digits-glt"},
                        "backbone": {"kind": "builtin"}, "methods": entries, "output": out, "seed": seed,
                        "device": "auto", "evaluation": {"shift_ratios": []}}, source="glt_study")
    t0 = time.perf_counter()
    summary = glt.run_protocols(cfg, PROTOCOLS)
    return summary, time.perf_counter() - t0


def _cell(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f}"


def _delta(a: list[float], b: list[float]) -> str:
    d = 100 * (np.asarray(a) - np.asarray(b))
    if len(d) == 1:
        return f"{d[0]:+.1f}"
    return f"{d.mean():+.1f} ({d.min():+.1f} to {d.max():+.1f})"


def section(results: list[dict], seeds: list[int], methods: list[str], missing: list[str], seconds: list[float],
            threads: int) -> str:
    def vals(method, p, key):
        return [r["methods"][method][p][key] for r in results]

    d = results[0]["dataset"]
    runs = results[0]["runs"]
    lines = [
        f"`digits-glt` with its defaults (class imbalance {d.get('imbalance_ratio', 20):g}, attribute imbalance "
        "10 inside each class, attributes original / inverted / thick, 15 test and 5 val images per "
        "(class, attribute) group under Test-GBL); train sizes: "
        + ", ".join(f"{p.upper()} {sum(runs[p]['train_class_counts'])}" for p in PROTOCOLS)
        + f" images. Builtin small CNN (30 epochs) per protocol, every method with its default parameters. "
        f"Mean over seeds {', '.join(map(str, seeds))} (the seed draws the split, the CNN and the heads); "
        "accuracies in % on the test split of each protocol. Under Test-GBL every group has 15 images, so "
        "the average-group accuracy equals the accuracy (left out for ALT and GLT).",
        "",
    ]
    header = ["method"] + [f"{p.upper()} {h}" for p in PROTOCOLS for _, h in COLUMNS[p]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" + "|---:" * (len(header) - 1) + "|")
    for m in methods:
        cells = [_cell(vals(m, p, k)) for p in PROTOCOLS for k, _ in COLUMNS[p]]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    lines.append("")
    if "heuristic-cala" in methods:
        best = {p: max((x for x in FOUNDATION if x in methods), key=lambda x: np.mean(vals(x, p, "accuracy")))
                for p in PROTOCOLS}
        lines.append("Paired differences, percentage points, mean over seeds (range over seeds in brackets):")
        lines.append("")
        lines.append("| `heuristic-cala` minus | " + " | ".join(f"{p.upper()} acc. | {p.upper()} worst" for p in PROTOCOLS)
                     + " |")
        lines.append("|---" + "|---:" * (2 * len(PROTOCOLS)) + "|")
        others = ["ce", "logit-adjust", CONVERGED[0]] + [x for x in ("cala-no-u", "cala-no-v", "dynamic-la") if x in methods]
        for o in others:
            if o not in methods:
                continue
            cells = [c for p in PROTOCOLS for c in (_delta(vals("heuristic-cala", p, "accuracy"), vals(o, p, "accuracy")),
                                                       _delta(vals("heuristic-cala", p, "worst_group"), vals(o, p, "worst_group")))]
            lines.append(f"| `{o}` | " + " | ".join(cells) + " |")
        cells = [c for p in PROTOCOLS for c in (
            _delta(vals("heuristic-cala", p, "accuracy"), vals(best[p], p, "accuracy")),
            _delta(vals("heuristic-cala", p, "worst_group"), vals(best[p], p, "worst_group")))]
        lines.append("| the most accurate foundation head (" + ", ".join(f"{p.upper()}: `{best[p]}`" for p in PROTOCOLS)
                     + ") | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("<!-- glt-study:findings -->")
    if missing:
        lines.append(f"Not registered when this ran, so not in the table: {', '.join(missing)}.")
    lines.append("")
    lines.append(f"Measured on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared), "
                 f"{threads} torch thread(s), torch {torch.__version__}; the three protocols took "
                 + ", ".join(f"{s:.0f} s" for s in seconds) + " per seed. "
                 f"`{COMMAND}` regenerates this section (the findings paragraph is kept).")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    """Replace the text between the glt-study markers (README.md re-read right before writing),
    keeping a findings paragraph that follows the ``glt-study:findings`` marker up to the first blank line."""
    tag = "<!-- glt-study:findings -->"

    def keep_findings(old: str) -> str:
        if tag in old:
            kept = old.split(tag, 1)[1].lstrip("\n").split("\n\n", 1)[0]
            if kept and not kept.startswith(("Not registered", "Measured on")):
                return text.replace(tag, f"{tag}\n{kept}", 1)
        return text

    write_section(START_MARKER, END_MARKER, keep_findings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--write-readme", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    known = set(known_methods())
    methods = [m for m in FOUNDATION + CALA if m in known]
    methods.insert(methods.index("logit-adjust") + 1, CONVERGED[0])
    missing = [m for m in FOUNDATION + CALA if m not in known]
    out = args.out or tempfile.mkdtemp(prefix="glt-study-")
    results, seconds = [], []
    for seed in seeds:
        res, sec = run_seed(seed, methods, os.path.join(out, f"seed{seed}"))
        results.append(res)
        seconds.append(sec)
        print(f"seed {seed}: {sec:.0f} s ({os.path.join(out, f'seed{seed}', 'glt.md')})", file=sys.stderr)
    text = section(results, seeds, methods, missing, seconds, args.threads)
    print(text)
    if args.write_readme:
        write_readme(text)


if __name__ == "__main__":
    main()
