#!/usr/bin/env python
"""``meta-cb`` (paper 003) and ``metalad`` (paper 001) on ``digits-lt``, beside their special-case bases,
``crt`` and ``tau-norm``, with the specification's ablations, and their cost per epoch.

Usage (from the repository root)::

    python benchmarks/meta_study.py                  # print the section
    python benchmarks/meta_study.py --write-readme   # also write it into README.md

A script, not a test: seeded and reproducible (the same machine and thread count give the same
accuracies); nothing in it asserts a time. Two parts:

1. **Accuracy.** For every imbalance ratio (10, 20, 50) and seed (0, 1, 2), what ``longtail run
   --no-prefect`` runs (:func:`pipeline.graph.run_all`): the ``digits-lt`` splits of that seed, the
   builtin small CNN (30 epochs) on the long-tailed train split, features extracted, then every
   method below fitted on them (the head defaults: 30 epochs, lr 0.1, batch 256, cosine schedule;
   the meta methods' meta set: 10 of the 20 val images per class, drawn once per store), and the
   evaluation on the balanced test split (50 images per class). The table gives balanced accuracy
   (= accuracy on this balanced test split), many-shot (> 100 train images... none at these sizes:
   the head classes have 104 or fewer, so the columns are the shot groups of ``split_rule: auto``)
   and few-shot accuracy, mean over seeds, and for the meta methods what the meta step moved
   (``eps_scale``: mean ``|ε|`` / mean class weight, its largest value over the meta stage;
   ``λ moved``: the largest change of a coefficient from 1).
2. **Cost.** Seconds per training epoch of each meta method against its non-meta base (``cb-ce``
   for ``meta-cb``, ``logit-adjust`` for ``metalad``) with ``meta_start: 0`` (every epoch a meta
   epoch), on the ratio-20 seed-0 features (fits repeated, the median kept), and on the
   ImageNet-LT-shaped synthetic train features of ``bench_stages.py`` (115,846 x 2,048, 1,000
   classes; ``benchlib.py``): there a fit of three epochs on 5,120 of the rows (every class present)
   gives seconds per step (set-up included), **extrapolated** to the 453 steps of a full epoch, and MetaLAD's variance
   refresh (one pass over all rows) is timed on its own and added once per ``stats_interval`` steps.
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

from readme import write_section  # noqa: E402

from longtail.pipeline import graph  # noqa: E402
from longtail.pipeline.config import parse_config  # noqa: E402
from longtail.stages.registry import make_method  # noqa: E402
from longtail.storage.featurestore import open_store  # noqa: E402

START_MARKER = "<!-- meta-study:start -->"
END_MARKER = "<!-- meta-study:end -->"
COMMAND = "python benchmarks/meta_study.py --write-readme"
RATIOS = (10, 20, 50)

#: (label, registry name, params): the bases, then each method beside its special case and ablations
METHODS = [
    ("ce", "ce", {}),
    ("cb-ce", "cb-ce", {}),
    ("crt", "crt", {}),
    ("tau-norm", "tau-norm", {}),
    ("logit-adjust", "logit-adjust", {"tau": 1.0}),
    # meta-cb: J1 (= cb-ce with beta (N-1)/N), "CE then CB-CE" (tau 0), the tau grid of spec §1.2
    ("meta-cb[tau=0,start=0]", "meta-cb", {"tau": 0.0, "meta_start": 0.0}),
    ("meta-cb[tau=0]", "meta-cb", {"tau": 0.0}),
    ("meta-cb", "meta-cb", {}),
    ("meta-cb[tau=1e3]", "meta-cb", {"tau": 1e3}),
    ("meta-cb[tau=1e4]", "meta-cb", {"tau": 1e4}),
    ("meta-cb[tau=1e5]", "meta-cb", {"tau": 1e5}),
    ("meta-cb[tau=1e4,start=0.5]", "meta-cb", {"tau": 1e4, "meta_start": 0.5}),
    ("meta-cb[tau=1e2,start=0]", "meta-cb", {"tau": 1e2, "meta_start": 0.0}),
    ("meta-cb[tau=1e3,start=0]", "meta-cb", {"tau": 1e3, "meta_start": 0.0}),
    ("meta-cb[tau=1e4,start=0]", "meta-cb", {"tau": 1e4, "meta_start": 0.0}),
    # metalad: L10 (fixed coefficients), the eta2 grid, the Table VII ablations
    ("metalad[eta2=0]", "metalad", {"eta2": 0.0}),
    ("metalad[eta2=1e2]", "metalad", {"eta2": 1e2}),
    ("metalad", "metalad", {}),
    ("metalad[eta2=1e4]", "metalad", {"eta2": 1e4}),
    ("metalad[P]", "metalad", {"terms": ["proportion"]}),
    ("metalad[V]", "metalad", {"terms": ["variance"]}),
    ("metalad[G]", "metalad", {"terms": ["distance"]}),
    ("metalad[eta2=0,start=0]", "metalad", {"eta2": 0.0, "meta_start": 0.0}),
    ("metalad[start=0]", "metalad", {"meta_start": 0.0}),
    ("metalad[eta2=1e4,start=0]", "metalad", {"eta2": 1e4, "meta_start": 0.0}),
    ("metalad[P,start=0]", "metalad", {"terms": ["proportion"], "meta_start": 0.0}),
    ("metalad[V,start=0]", "metalad", {"terms": ["variance"], "meta_start": 0.0}),
    ("metalad[G,start=0]", "metalad", {"terms": ["distance"], "meta_start": 0.0}),
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_one(ratio: int, seed: int, out: str) -> dict:
    cfg = parse_config({"store": os.path.join(out, "features.zarr"),
                        "dataset": {"name": "digits-lt", "imbalance_ratio": ratio},
                        "backbone": {"kind": "builtin"}, "output": out, "seed": seed, "device": "cpu",
                        "evaluation": {"shift_ratios": []},
                        "methods": [{"name": n, "label": label, "params": p} for label, n, p in METHODS]},
                       source="meta_study")
    return graph.run_all(cfg)


def _moved(diag: dict | None) -> str:
    if not diag:
        return ""
    for key, name in (("eps_scale", "eps_scale"), ("lambda_moved", "λ moved")):
        vals = [v for v in diag.get(key) or [] if v is not None]
        if vals:
            return f"{name} {max(vals):.2g}"
    return ""


def accuracy_table(results: dict[int, list[dict]]) -> list[str]:
    lines = ["| method | " + " | ".join(f"IF {r}: bal. acc. | IF {r}: few" for r in RATIOS) + " | moved (IF 20) |",
             "|---" + "|---:" * (2 * len(RATIOS)) + "|---|"]
    for label, _, _ in METHODS:
        cells = []
        for r in RATIOS:
            acc = [m["methods"][label]["balanced_accuracy"] for m in results[r]]
            few = [m["methods"][label]["few"] for m in results[r]]
            cells += [f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc):.1f}", f"{100 * np.nanmean(few):.1f}"]
        diag = [m.get("meta", {}).get(label) for m in results[20]]
        moved = " / ".join(x for x in (_moved(d) for d in diag) if x)
        lines.append(f"| `{label}` | " + " | ".join(cells) + f" | {moved} |")
    return lines


def eps_pattern(results: dict[int, list[dict]], label: str) -> str:
    """Per-class mean conditional weight over the meta stage (fig. 3), averaged over seeds, IF 20."""
    rows = []
    for m in results[20]:
        eps = np.array([[np.nan if v is None else v for v in row] for row in m["meta"][label]["eps_class_mean"]])
        rows.append(np.nanmean(eps, axis=0))
    mean = np.mean(rows, axis=0)
    return ", ".join(f"{v:+.3f}" for v in mean)


def paired(results: dict[int, list[dict]], a: str, b: str) -> str:
    cells = []
    for r in RATIOS:
        d = 100 * np.array([m["methods"][a]["balanced_accuracy"] - m["methods"][b]["balanced_accuracy"]
                            for m in results[r]])
        cells.append(f"IF {r}: {d.mean():+.1f} ({d.min():+.1f} to {d.max():+.1f})")
    return "; ".join(cells)


# ----------------------------------------------------------------------------- cost
def _fit_seconds(name: str, params: dict, train, val, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        head = make_method(name, {**params, "device": "cpu"})
        t0 = time.perf_counter()
        head.fit(train, val)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


PAIRS = [("cb-ce", {}, "meta-cb", {"tau": 1e4, "meta_start": 0.0}),
         ("logit-adjust", {"tau": 1.0}, "metalad", {"meta_start": 0.0})]


def digits_cost(store_url: str) -> list[tuple[str, float, float]]:
    fs = open_store(store_url)
    train, val = fs.read("train"), fs.read("val")
    out = []
    for base, bp, meta, mp in PAIRS:
        epochs = 30
        b = _fit_seconds(base, {**bp, "epochs": epochs}, train, val) / epochs
        m = _fit_seconds(meta, {**mp, "epochs": epochs}, train, val) / epochs
        out.append((f"{meta} vs {base}", b, m))
    return out


def large_cost(rows: int = 5120) -> tuple[list[tuple[str, float, float]], float]:
    from benchlib import synthetic_features, synthetic_labels, synthetic_means

    from longtail.stages.data import FeatureSet
    from longtail.stages.meta.metalad import pair_statistics, variance_term

    labels = synthetic_labels("train")
    means = synthetic_means()
    _log("generating the ImageNet-LT-shaped train features ...")
    x = synthetic_features("train", labels, means)
    vlab = synthetic_labels("val")
    xv = synthetic_features("val", vlab, means)
    c = int(labels.max()) + 1
    rng = np.random.default_rng(0)
    first = np.unique(labels, return_index=True)[1]  # one row of every class
    rest = rng.choice(np.setdiff1d(np.arange(len(labels)), first), rows - len(first), replace=False)
    pick = np.sort(np.concatenate([first, rest]))
    counts = np.bincount(labels[pick], minlength=c)
    names = tuple(str(i) for i in range(c))
    train = FeatureSet(x[pick], labels[pick], counts, names, name="train")
    val = FeatureSet(xv, vlab, counts, names, name="val")
    epochs = 3
    steps = epochs * -(-rows // 256)
    out = []
    for base, bp, meta, mp in PAIRS:
        extra = {"stats_interval": 10 ** 9} if meta == "metalad" else {}  # the refresh is timed below
        b = _fit_seconds(base, {**bp, "epochs": epochs}, train, val, repeats=1) / steps
        m = _fit_seconds(meta, {**mp, **extra, "epochs": epochs}, train, val, repeats=1) / steps
        out.append((f"{meta} vs {base}", b, m))
    # one refresh of MetaLAD's variance term on all rows (standardisation aside: same cost)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(labels)
    cnt = torch.bincount(yt, minlength=c)
    centred = pair_statistics(xt, yt, cnt)["centred"]
    W = torch.randn(c, x.shape[1]) * 0.01
    t0 = time.perf_counter()
    variance_term(centred, yt, cnt, W)
    refresh = time.perf_counter() - t0
    return out, refresh


# ----------------------------------------------------------------------------- the section
def section(results, seeds, digits, large, refresh, threads, seconds) -> str:
    lines = [
        f"`digits-lt` at imbalance ratios {', '.join(map(str, RATIOS))}, seeds {', '.join(map(str, seeds))} (the "
        "seed draws the split, the builtin CNN and the heads); every head with the shared defaults (30 epochs, "
        "lr 0.1, batch 256, cosine schedule), the meta set 10 of the 20 val images per class. Balanced test "
        "accuracy in % (mean ± std over seeds) and few-shot accuracy; \"moved\": per seed, the largest "
        "`eps_scale` (mean |ε| / mean class weight) or the largest change of a MetaLAD coefficient "
        "during the meta stage, at IF 20.",
        "",
        *accuracy_table(results),
        "",
        "Paired differences in balanced accuracy, percentage points, mean over seeds (range):",
        "",
        f"- `meta-cb[tau=1e4]` minus `cb-ce`: {paired(results, 'meta-cb[tau=1e4]', 'cb-ce')}",
        f"- `meta-cb[tau=1e4]` minus `meta-cb[tau=0]` (its own base, CE then CB-CE): "
        f"{paired(results, 'meta-cb[tau=1e4]', 'meta-cb[tau=0]')}",
        f"- `meta-cb[tau=1e3,start=0]` minus `meta-cb[tau=0,start=0]` (= `cb-ce` with beta (N-1)/N, J1): "
        f"{paired(results, 'meta-cb[tau=1e3,start=0]', 'meta-cb[tau=0,start=0]')}",
        f"- `metalad` (default) minus `logit-adjust`: {paired(results, 'metalad', 'logit-adjust')}",
        f"- `metalad[start=0]` minus `logit-adjust`: {paired(results, 'metalad[start=0]', 'logit-adjust')}",
        f"- `metalad[start=0]` minus `metalad[eta2=0,start=0]` (fixed coefficients): "
        f"{paired(results, 'metalad[start=0]', 'metalad[eta2=0,start=0]')}",
        f"- `metalad` (default) minus `metalad[eta2=0]` (fixed coefficients): "
        f"{paired(results, 'metalad', 'metalad[eta2=0]')}",
        "",
        "Per-class mean conditional weight ε over the meta stage (paper 003, fig. 3), classes 0 (head) to 9 "
        f"(tail), IF 20, mean over seeds: `meta-cb[tau=1e4]`: {eps_pattern(results, 'meta-cb[tau=1e4]')}; "
        f"`meta-cb[tau=1e5]`: {eps_pattern(results, 'meta-cb[tau=1e5]')}; "
        f"`meta-cb[tau=1e3,start=0]`: {eps_pattern(results, 'meta-cb[tau=1e3,start=0]')}.",
        "",
        "<!-- meta-study:findings -->",
        "",
        "Cost, seconds per training epoch (every epoch a meta epoch, `meta_start: 0`):",
        "",
        "| features | pair | base s/epoch | meta s/epoch | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for what, b, m in digits:
        lines.append(f"| digits-lt IF 20 (measured, 30 epochs) | {what} | {b:.4f} | {m:.4f} | {m / b:.1f} |")
    if large:
        for what, b, m in large:
            steps = -(-115_846 // 256)
            extra = f" + {refresh:.1f} s per variance refresh" if what.startswith("metalad") else ""
            lines.append(f"| ImageNet-LT-shaped, 115,846 x 2,048, 1,000 classes (per step x {steps} steps, "
                         f"extrapolated) | {what} | {b * steps:.1f} | {m * steps:.1f}{extra} | {m / b:.1f} |")
        lines.append("")
        lines.append(f"MetaLAD refreshes its variance term every `stats_interval` meta steps (default 1) at "
                     f"{refresh:.1f} s here (one pass over all train rows, `N·D·C` flops): on a set of this size "
                     "set `stats_interval` to about the steps of an epoch (453), or the refreshes dominate.")
    lines.append("")
    lines.append(f"Measured on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared with "
                 f"other jobs), {threads} torch thread(s), torch {torch.__version__}; the accuracy runs took "
                 f"{min(seconds):.0f} to {max(seconds):.0f} s per (ratio, seed), builtin CNN included (0 s: a rerun "
                 f"on the same `--out`, every stage cached). `{COMMAND}` regenerates this section (the findings "
                 "paragraph is kept).")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    tag = "<!-- meta-study:findings -->"

    def keep_findings(old: str) -> str:
        if tag in old:
            kept = old.split(tag, 1)[1].lstrip("\n").split("\n\n", 1)[0]
            if kept and not kept.startswith(("Cost,", "Measured on")):
                return text.replace(tag, f"{tag}\n{kept}", 1)
        return text

    write_section(START_MARKER, END_MARKER, keep_findings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-large", action="store_true", help="skip the ImageNet-LT-shaped timing")
    p.add_argument("--write-readme", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or tempfile.mkdtemp(prefix="meta-study-")
    results: dict[int, list[dict]] = {r: [] for r in RATIOS}
    seconds = []
    for r in RATIOS:
        for s in seeds:
            t0 = time.perf_counter()
            results[r].append(run_one(r, s, os.path.join(out, f"if{r}-seed{s}")))
            seconds.append(time.perf_counter() - t0)
            _log(f"IF {r} seed {s}: {seconds[-1]:.0f} s")
    digits = digits_cost(os.path.join(out, f"if20-seed{seeds[0]}", "features.zarr"))
    large, refresh = ([], 0.0) if args.no_large else large_cost()
    text = section(results, seeds, digits, large, refresh, args.threads, seconds)
    print(text)
    if args.write_readme:
        write_readme(text)


if __name__ == "__main__":
    main()
