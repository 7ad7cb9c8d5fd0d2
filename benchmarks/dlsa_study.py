#!/usr/bin/env python
"""DLSA against its own head: the 100-class synthetic set and ``digits-lt``, val choices, separation per split.

Usage (from the repository root)::

    python benchmarks/dlsa_study.py                  # print the section
    python benchmarks/dlsa_study.py --write-readme   # also write it into README.md

A script, not a test: it is seeded and reproducible (the same machine and thread count give the
same accuracies), and nothing in it asserts a time. Parts:

1. **Data.** (a) ``synthetic-100``: 100 class-conditional Gaussians in D = 64 (class means
   ``N(0, 0.53^2 I)``, unit noise), exponential train counts 300 -> 3 (6,540 rows, the shape of the
   set issue 11 measured DLSA on), class-balanced val (10 per class) and test (30 per class), held
   in memory as :class:`~stages.data.FeatureSet` objects. (b) ``digits-lt``: the project's
   ``digits-lt`` store (the built-in stage-1 CNN's features), extracted once by the pipeline into a
   temporary directory (``--digits-store`` reuses one). (c) ``modes-20``: the case built to show
   what the cluster-aided classifiers add: 20 classes, each a mixture of 3 Gaussian modes in
   D = 16 (mode centres ``N(0, I)``, noise standard deviation 0.5), exponential train counts
   300 -> 10, balanced val (20 per class) and test (50 per class): a linear head cannot draw a
   class made of separate modes, while the flows' clusters find the modes and the cluster prior
   ``P(y | k)`` names their class.
2. **DLSA against its head.** For every set, seed (``--seeds``, default 0 1 2: the heads', the
   cascade's and the classifiers' seeds; the data stay fixed, as with a config's ``seeds``) and head
   ``X`` in ``ce``, ``balanced-softmax`` (their defaults): test balanced accuracy of ``X`` and of
   ``dlsa+X`` at its defaults (flows stopped on val likelihood, ``classifier_input: auto``, the val
   gate), and the ungated variants that show what the gate protects from: ``gate: false`` with the
   authors' input ``x`` and with the paper's ``xz``. One cascade per set and seed serves every head
   and variant; each ``dlsa+X`` wraps the same fitted ``X`` (``Frozen``).
3. **Cross-fitted routes** (``route_folds: 3``: each train sample routed, with its cluster prior, by
   a cascade fitted on the other two folds): the same ``dlsa+X`` rows on such a cascade, with their
   **val** balanced accuracy beside the default's: kept as a default only if it helps on val.
4. **Separation** of the default cascade on train, val and test (seed 0): the tail-vs-head AUC of
   each filter's likelihood and the share of tail / head samples each sends out
   (:func:`stages.dlsa.separation`; tail = at most 50 train samples on ``synthetic-100``, the
   rarer half of the classes on ``digits-lt``), and the epochs the flows ran.
5. **Cost at scale** is ``bench_dlsa.py``'s: the whole default cascade at the ImageNet-LT shape, measured.

Threads: ``--threads`` (default 1; on a shared 2-core machine a second intra-op thread made every
fit slower). ``--quick`` shrinks everything for a smoke run (one seed, 3 flow epochs, no digits); ``--write-readme`` refuses it. ``--save FILE`` keeps the measured numbers as JSON and
``--load FILE`` renders (and writes) the section from them without measuring again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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

from benchlib import (  # noqa: E402  (the ImageNet-LT-shaped generator, cores and load)
    busy_seconds, cores, cpu_name, own_cpu_s)
from readme import README, write_section  # noqa: E402

import longtail.stages.dlsa as dlsa  # noqa: E402
from longtail.stages.base import Frozen  # noqa: E402
from longtail.stages.data import FeatureSet  # noqa: E402
from longtail.stages.datasets import exponential_profile  # noqa: E402
from longtail.stages.evaluate import evaluate  # noqa: E402
from longtail.stages.registry import make_method  # noqa: E402

START_MARKER = "<!-- dlsa-study:start -->"
END_MARKER = "<!-- dlsa-study:end -->"
HEADING = "### DLSA on synthetic features"
ANCHOR = "perf-table:end"
COMMAND = "python benchmarks/dlsa_study.py --write-readme"

# ----------------------------------------------------------------------------- the 100-class set
NUM_CLASSES = 100
DIM = 64
N_MAX, N_MIN = 300, 3
#: per-dimension standard deviation of the class means (unit noise): means ~6 noise SDs apart
MEAN_SCALE = 0.53
VAL_PER_CLASS, TEST_PER_CLASS = 10, 30
SEED = 0
SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
HEADS = ("ce", "balanced-softmax")
#: the multi-modal set: classes, modes per class, dimension, train counts, noise, val/test per class
MODES_CLASSES, MODES_PER_CLASS, MODES_DIM, MODES_MAX, MODES_MIN, MODES_NOISE = 20, 3, 16, 300, 10, 0.5
MODES_VAL, MODES_TEST = 20, 50
TAIL = dlsa.TAIL_THRESHOLD  # tail classes: at most 50 train samples
FOLDS = 3
#: the rows of part 2 and 3: (key, label, dlsa parameters besides the seed, the cascade they use)
VARIANTS = (
    ("default", "`dlsa+X` (defaults: auto input, val gate)", {}, "plain"),
    ("ungated_x", "`gate: false`, `classifier_input: x`", {"gate": False, "classifier_input": "x"}, "plain"),
    ("ungated_xz", "`gate: false`, `classifier_input: xz` (the paper)", {"gate": False, "classifier_input": "xz"},
     "plain"),
    ("cf_default", f"`route_folds: {FOLDS}` (cross-fitted routes), defaults", {"route_folds": FOLDS}, "cf"),
    ("cf_ungated_x", f"`route_folds: {FOLDS}`, `gate: false`, `classifier_input: x`",
     {"route_folds": FOLDS, "gate": False, "classifier_input": "x"}, "cf"),
)


# ============================================================================== helpers
class Clock:
    """Wall seconds of a block and the cores the rest of the machine used meanwhile (``others``)."""

    def __enter__(self) -> "Clock":
        _sync()
        self.busy0 = busy_seconds()
        self.own0 = own_cpu_s()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync()
        self.seconds = time.perf_counter() - self.t0
        busy1, own1 = busy_seconds(), own_cpu_s()
        self.others = None
        if self.busy0 is not None and busy1 is not None and self.seconds > 0.05:  # guards the division
            self.others = max(0.0, busy1 - self.busy0 - (own1 - self.own0)) / self.seconds


def _sync() -> None:
    """Wait for queued GPU work, so that a block's time includes it (a no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _secs(x: float) -> str:
    return f"{x:.2f}" if x < 10 else (f"{x:.1f}" if x < 100 else f"{x:,.0f}")


def _others(c: dict) -> str:
    return "n/a" if c["others"] is None else f"{c['others']:.1f}"


def _mean_sd(values: list[float]) -> str:
    """``mean ± sd`` in points (% units) over seeds; the mean alone for one seed."""
    m = 100 * statistics.fmean(values)
    return f"{m:.1f}" if len(values) < 2 else f"{m:.1f} ± {100 * statistics.stdev(values):.1f}"


# ============================================================================== 1. data
def make_study_sets(seed: int = SEED, num_classes: int = NUM_CLASSES, dim: int = DIM,
                    n_max: int = N_MAX, n_min: int = N_MIN, mean_scale: float = MEAN_SCALE,
                    val_per_class: int = VAL_PER_CLASS, test_per_class: int = TEST_PER_CLASS):
    """``(train, val, test)`` FeatureSets: Gaussian classes, exponential train counts ``n_max -> n_min``.

    Class ``c`` has mean ``mu_c ~ N(0, mean_scale^2 I_D)`` (drawn once) and samples ``mu_c + N(0, I_D)``;
    train counts ``round(n_max * (n_max / n_min) ** (-c / (C - 1)))``; val and test are class-balanced.
    Each split has its own generator (seeded from ``seed`` and the split), rows in a random order.
    """
    counts = exponential_profile(n_max, num_classes, n_max / n_min)
    means = np.random.default_rng([seed, 0]).standard_normal((num_classes, dim)).astype(np.float32)
    means *= np.float32(mean_scale)
    names = tuple(f"class{c:03d}" for c in range(num_classes))
    sizes = {"train": counts, "val": np.full(num_classes, val_per_class), "test": np.full(num_classes, test_per_class)}
    out = []
    for split, per_class in sizes.items():
        rng = np.random.default_rng([seed, SPLIT_IDS[split]])
        labels = np.repeat(np.arange(num_classes), per_class)
        labels = labels[rng.permutation(len(labels))]
        features = rng.standard_normal((len(labels), dim), dtype=np.float32) + means[labels]
        out.append(FeatureSet(features, labels, counts, names, name=split, source="synthetic-lt-100"))
    return tuple(out)


def modes_sets(seed: int = SEED):
    """``(train, val, test)`` of ``modes-20``: class ``c`` is a mixture of ``MODES_PER_CLASS``
    equally likely Gaussian modes ``mu_{c,m} ~ N(0, I_D)`` (drawn once) with noise ``N(0, 0.5^2 I)``;
    exponential train counts ``MODES_MAX -> MODES_MIN``, class-balanced val and test."""
    counts = exponential_profile(MODES_MAX, MODES_CLASSES, MODES_MAX / MODES_MIN)
    centres = np.random.default_rng([seed, 10]).standard_normal(
        (MODES_CLASSES, MODES_PER_CLASS, MODES_DIM)).astype(np.float32)
    names = tuple(f"class{c:02d}" for c in range(MODES_CLASSES))
    sizes = {"train": counts, "val": np.full(MODES_CLASSES, MODES_VAL), "test": np.full(MODES_CLASSES, MODES_TEST)}
    out = []
    for split, per_class in sizes.items():
        rng = np.random.default_rng([seed, 10 + SPLIT_IDS[split]])
        labels = np.repeat(np.arange(MODES_CLASSES), per_class)
        labels = labels[rng.permutation(len(labels))]
        mode = rng.integers(MODES_PER_CLASS, size=len(labels))
        noise = rng.standard_normal((len(labels), MODES_DIM), dtype=np.float32) * np.float32(MODES_NOISE)
        out.append(FeatureSet(noise + centres[labels, mode], labels, counts, names, name=split, source="modes-20"))
    return tuple(out)


def digits_sets(store_dir: str | None):
    """``(train, val, test)`` of the ``digits-lt`` store the pipeline extracts (the built-in CNN),
    in ``store_dir`` (reused when complete) or a temporary directory."""
    from longtail.pipeline.config import parse_config
    from longtail.pipeline.extract import run_extract
    from longtail.pipeline.stores import open_features

    out = store_dir or tempfile.mkdtemp(prefix="dlsa-study-")
    cfg = parse_config({"store": os.path.join(out, "features.zarr"), "dataset": "digits-lt",
                        "backbone": {"kind": "builtin"}, "methods": ["ce"], "output": out,
                        "artifacts": os.path.join(out, "cache")}, source="dlsa-study")
    info = run_extract(cfg)
    fs = open_features(cfg, info)
    return tuple(fs.read(s) for s in ("train", "val", "test"))


def tail_threshold(train: FeatureSet) -> int:
    """At most 50 train samples (the paper's tail), or the median train count when no class has
    more than 50 (a small set: then the rarer half of the classes is the tail)."""
    counts = np.asarray(train.class_counts)
    return TAIL if counts.max() > TAIL else int(np.median(counts))


# ============================================================================== 2-4. DLSA against its head
def balanced(method, split: FeatureSet) -> float:
    pred = method.logits(split.features).argmax(1)
    return float(np.mean([(pred[split.labels == c] == c).mean() for c in np.unique(split.labels)]))


def run_set(name: str, sets, seeds: list[int], device: str, flow_epochs: int | None,
            head_epochs: int | None = None) -> dict:
    train, val, test = sets
    tail = tail_threshold(train)
    _log(f"[{name}] {len(train):,} train, {len(val):,} val, {len(test):,} test, D = {train.dim}, "
         f"{train.num_classes} classes, tail <= {tail}")
    extra = {} if flow_epochs is None else {"flow_epochs": flow_epochs}
    results: dict = {h: {"head": {"test": [], "val": []}, **{v[0]: {"test": [], "val": []} for v in VARIANTS}}
                     for h in HEADS}
    choices: dict = {h: {"inputs": [], "open": []} for h in HEADS}
    timing = {"cascade": [], "cf": [], "head": {h: [] for h in HEADS}, "dlsa": {h: [] for h in HEADS}}
    separation = flows = None
    for seed in seeds:
        base = {"seed": seed, "device": device, "tail_threshold": tail, **extra}
        _log(f"[{name}] seed {seed}: cascade ...")
        with Clock() as c:
            plain = dlsa.FlowCascade(**{k: v for k, v in base.items() if k != "tail_threshold"}).fit(train, val)
        timing["cascade"].append(c.seconds)
        _log(f"    {c.seconds:.1f} s; cross-fitted cascade ({FOLDS} folds) ...")
        with Clock() as c:
            cf = dlsa.FlowCascade(**{k: v for k, v in base.items() if k != "tail_threshold"},
                                  route_folds=FOLDS).fit(train, val)
        timing["cf"].append(c.seconds)
        _log(f"    {c.seconds:.1f} s")
        cascades = {"plain": plain, "cf": cf}
        if separation is None:
            separation = {s: dlsa.separation(plain, split, train.class_counts, tail)
                          for s, split in (("train", train), ("val", val), ("test", test))}
            flows = dlsa.flow_stopping(plain)
        head_params = {"seed": seed, "device": device, **({} if head_epochs is None else {"epochs": head_epochs})}
        for head_name in HEADS:
            with Clock() as c:
                head = make_method(head_name, head_params).fit(train, val)
            timing["head"][head_name].append(c.seconds)
            results[head_name]["head"]["test"].append(balanced(head, test))
            results[head_name]["head"]["val"].append(balanced(head, val))
            for key, _, params, which in VARIANTS:
                method = make_method(f"dlsa+{head_name}", {**head_params, "dlsa": {**base, **params}})
                with Clock() as c:
                    method = method.with_base(Frozen(head)).set_cascade(cascades[which]).fit(train, val)
                if key == "default":
                    timing["dlsa"][head_name].append(c.seconds)
                    sel = method.selection()
                    choices[head_name]["inputs"].append(sel["classifier_input"]["chosen"])
                    choices[head_name]["open"].append(sum(g["uses"] == "classifier" for g in sel["groups"]))
                results[head_name][key]["test"].append(balanced(method, test))
                results[head_name][key]["val"].append(balanced(method, val))
            r = results[head_name]
            _log(f"    {head_name}: head {_pct(r['head']['test'][-1])}, dlsa {_pct(r['default']['test'][-1])}, "
                 f"ungated x {_pct(r['ungated_x']['test'][-1])}, xz {_pct(r['ungated_xz']['test'][-1])}, "
                 f"cross-fitted {_pct(r['cf_default']['test'][-1])} / ungated x {_pct(r['cf_ungated_x']['test'][-1])}")
    return {"name": name, "n": (len(train), len(val), len(test)), "dim": train.dim, "classes": train.num_classes,
            "tail": tail, "results": results, "choices": choices, "separation": separation, "flows": flows,
            "timing": timing, "seeds": list(seeds), "num_filters": plain.params.num_filters,
            "k": plain.num_clusters_}


# ============================================================================== 5. report
def _delta(results: dict, key: str, split: str = "test") -> float:
    """Mean over seeds of (variant - head), in points."""
    return 100 * statistics.fmean(a - b for a, b in zip(results[key][split], results["head"][split]))


def render_sets(sets: list[dict]) -> list[str]:
    lines = [
        "Balanced accuracy (%) on the test split, mean ± standard deviation over seeds "
        + ", ".join(f"{s['name']}: {len(s['seeds'])}" for s in sets)
        + " (each seed refits the head, the cascade and the classifiers; the data stay fixed). "
          "Δ is `dlsa+X` at its defaults minus `X`, per seed, averaged.",
        "",
        "| set | X | `X` | `dlsa+X` (defaults) | Δ | " + " | ".join(v[1] for v in VARIANTS[1:]) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * (len(VARIANTS) - 1),
    ]
    for s in sets:
        for h in HEADS:
            r = s["results"][h]
            lines.append(f"| {s['name']} | `{h}` | {_mean_sd(r['head']['test'])} | {_mean_sd(r['default']['test'])} | "
                         f"{_delta(r, 'default'):+.1f} | " + " | ".join(_mean_sd(r[v[0]]['test']) for v in VARIANTS[1:])
                         + " |")
    lines += [
        "",
        "The same rows on the **val** split (every choice of the defaults is made there; the cross-fitted routes "
        "would be kept only if they beat the default on val):",
        "",
        "| set | X | `X` | `dlsa+X` (defaults) | " + " | ".join(v[1] for v in VARIANTS[1:]) + " |",
        "|---|---|---:|---:|" + "---:|" * (len(VARIANTS) - 1),
    ]
    for s in sets:
        for h in HEADS:
            r = s["results"][h]
            lines.append(f"| {s['name']} | `{h}` | {_mean_sd(r['head']['val'])} | {_mean_sd(r['default']['val'])} | "
                         + " | ".join(_mean_sd(r[v[0]]['val']) for v in VARIANTS[1:]) + " |")
    lines += [
        "",
        "What val chose in the default `dlsa+X` (over seeds): the classifier input, and how many of the "
        "filters' groups kept their cluster-aided classifier (the rest use the head):",
        "",
        "| set | X | input chosen | groups using their classifier, per seed |",
        "|---|---|---|---|",
    ]
    for s in sets:
        nf = s["num_filters"]
        for h in HEADS:
            c = s["choices"][h]
            inputs = ", ".join(f"{k} ×{c['inputs'].count(k)}" for k in ("x", "xz") if c["inputs"].count(k))
            lines.append(f"| {s['name']} | `{h}` | {inputs} | " + ", ".join(f"{o} of {nf}" for o in c["open"]) + " |")
    lines += [
        "",
        "Head-tail separation of the default cascade (seed 0) on train, val and test: AUC of each filter's "
        "likelihood as a tail detector among the samples reaching it (0.5 = none), and the share of tail / head "
        "samples it sends out (%); the flow epoch kept (best val likelihood) of the epochs run:",
        "",
        "| set | filter | AUC train | AUC val | AUC test | tail / head out, train | val | test | flow epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sets:
        sep = s["separation"]
        for f, stop in enumerate(s["flows"]):
            cells = [sep[k]["filters"][f] for k in ("train", "val", "test")]
            auc = " | ".join("n/a" if c["auc"] is None else f"{c['auc']:.3f}" for c in cells)
            out = " | ".join(f"{_pct(c['tail_out_rate'])} / {_pct(c['head_out_rate'])}" for c in cells)
            lines.append(f"| {s['name']} | {f + 1} | {auc} | {out} | {stop['best_epoch']} of {stop['epochs_run']} |")
    lines += ["", "Fit seconds, mean over seeds (a shared 2-core machine; one torch thread): "
              + "; ".join(f"{s['name']}: cascade {_secs(statistics.fmean(s['timing']['cascade']))}, cross-fitted "
                          f"cascade {_secs(statistics.fmean(s['timing']['cf']))}, "
                          + ", ".join(f"`{h}` {_secs(statistics.fmean(s['timing']['head'][h]))} + DLSA classifiers "
                                      f"{_secs(statistics.fmean(s['timing']['dlsa'][h]))}" for h in HEADS)
                          for s in sets) + "."]
    return lines


def paragraph(sets: list[dict]) -> str:
    """The discussion, written from the numbers (no sentence here is a fixed claim about the outcome)."""
    pairs = [(s, h) for s in sets for h in HEADS]
    deltas = [_delta(s["results"][h], "default") for s, h in pairs]
    parts = [
        f"**Accuracy.** At its defaults `dlsa+X` is between {min(deltas):+.1f} and {max(deltas):+.1f} points from "
        f"`X` over the {len(pairs)} set/head pairs"
        + (": never more than 1 point below its head." if min(deltas) >= -1.0 else
           ": more than 1 point below its head in "
           + ", ".join(f"{s['name']} `{h}`" for (s, h), d in zip(pairs, deltas) if d < -1.0) + "."),
        "Without the gate the cluster-aided classifiers change the head's balanced accuracy by "
        + "; ".join(f"{s['name']} `{h}` {_delta(s['results'][h], 'ungated_x'):+.1f} (x) / "
                    f"{_delta(s['results'][h], 'ungated_xz'):+.1f} (xz)" for s, h in pairs)
        + " points.",
    ]
    opened = sum(sum(s["choices"][h]["open"]) for s, h in pairs)
    total = sum(len(s["choices"][h]["open"]) * s["num_filters"] for s, h in pairs)
    parts.append(f"Val kept a cluster-aided classifier in {opened} of the {total} groups of the default fits"
                 + (" and gave every other group back to the head." if opened else
                    ": every group went back to the head, so the default `dlsa+X` predicts exactly as `X`."))
    xz_better = [(s, h) for s, h in pairs if _delta(s["results"][h], "ungated_xz", "val")
                 > _delta(s["results"][h], "ungated_x", "val")]
    parts.append(f"Ungated, the paper's `[x, z]` input beats the authors' `x` on val in {len(xz_better)} of "
                 f"{len(pairs)} pairs.")
    cf = [(_delta(s["results"][h], "cf_ungated_x", "val") - _delta(s["results"][h], "ungated_x", "val"),
           _delta(s["results"][h], "cf_ungated_x") - _delta(s["results"][h], "ungated_x"), s, h) for s, h in pairs]
    helps = [c for c in cf if c[0] > 0]
    gated = [(s, h) for s, h in pairs if _delta(s["results"][h], "cf_default", "val")
             > _delta(s["results"][h], "default", "val")]
    parts.append(
        f"**Cross-fitted routes** (`route_folds: {FOLDS}`) change the ungated `x` DLSA by "
        + "; ".join(f"{s['name']} `{h}` {dv:+.1f} on val / {dt:+.1f} on test" for dv, dt, s, h in cf)
        + (" points: they do not help on val, so they stay off by default (`route_folds: 0`)."
           if not helps else
           f" points: they help on val in {len(helps)} of {len(cf)} cases"
           + (", not in most, so they stay off by default (`route_folds: 0`)." if len(helps) * 2 <= len(cf) else
              " (the default stays `route_folds: 0`: they triple the cascade's cost).")))
    parts.append(f"With the gate on, the cross-fitted default beats the plain default on val in {len(gated)} of "
                 f"{len(pairs)} pairs.")
    seps = []
    for s in sets:
        first = [s["separation"][k]["filters"][0] for k in ("train", "val", "test")]
        seps.append(f"{s['name']} " + " / ".join("n/a" if f["auc"] is None else f"{f['auc']:.2f}" for f in first))
    unseen = [s["separation"][k]["filters"][0]["auc"] for s in sets for k in ("val", "test")]
    weak = all(a is not None and abs(a - 0.5) < 0.1 for a in unseen)
    gap = max(((s["separation"]["train"]["filters"][f]["auc"] - s["separation"]["test"]["filters"][f]["auc"], s, f)
               for s in sets for f in range(s["num_filters"])
               if s["separation"]["train"]["filters"][f]["auc"] is not None
               and s["separation"]["test"]["filters"][f]["auc"] is not None), key=lambda t: t[0])
    parts.append(
        "**Separation.** Filter 1's tail-vs-head AUC on train / val / test: " + "; ".join(seps) + "."
        + (f" The largest gap between train and test is {gap[1]['name']}'s filter {gap[2] + 1} "
           f"({gap[1]['separation']['train']['filters'][gap[2]]['auc']:.2f} on train, "
           f"{gap[1]['separation']['test']['filters'][gap[2]]['auc']:.2f} on test): its flow scores the few train "
           "samples it was fitted on, not the tail, which is why the report shows val and test beside train."
           if gap[0] > 0.1 else "")
        + (" On unseen samples (val, test) the likelihood barely tells tail from head classes (AUC within 0.1 of "
           "0.5): the routes carry no head/tail information to the classifiers." if weak else ""))
    gain = [s for s in sets if any(sum(s["choices"][h]["open"]) for h in HEADS)]
    none = [s for s in sets if s not in gain]
    tick = (lambda group: " and ".join(f"`{s['name']}`" for s in group))
    text = "**Where DLSA helps and where it does not.** "
    if none:
        text += (f"On {tick(none)} the cluster-aided classifiers, each trained on the part of the data its filter "
                 "sends out, do not beat the head on the val samples routed to them, and the gate keeps the head: "
                 "DLSA adds cost, not accuracy. ")
    if gain:
        text += (f"On {tick(gain)} val keeps cluster-aided classifiers, and `dlsa+X` moves "
                 + "; ".join(f"{s['name']} `{h}` {_delta(s['results'][h], 'default'):+.1f}" for s in gain for h in HEADS)
                 + " points from `X` on test. ")
        if any(s["name"] == "modes-20" for s in gain):
            text += ("`modes-20` is built for it: a linear head cannot draw a class made of separate modes, while "
                     "the flows' clusters find the modes and the cluster prior `P(y | k)` names their class. ")
        dig = next((s for s in gain if s["name"] == "digits-lt"), None)
        if dig is not None:
            auc = dig["separation"]["test"]["filters"][0]["auc"]
            kept = ", ".join(str(o) for h in HEADS for o in dig["choices"][h]["open"])
            text += (f"On `digits-lt` the first filter finds the tail on unseen samples (test AUC {auc:.2f}) and val "
                     f"keeps {kept} of the {dig['num_filters']} groups' classifiers in the fits above; the heads "
                     "are solved to convergence at their defaults (L-BFGS), so the difference is not one of "
                     "training length. ")
    text += ("The gains of paper 004 come from large backbone features (ImageNet-LT, Places-LT). Run "
             "`longtail dlsa-diagnostics` on a store first and read the report's \"DLSA choices made on val\" "
             "table: if no group keeps its classifier, DLSA is the head at a higher cost.")
    parts.append(text)
    return " ".join(parts)


def render(sets: list[dict], args, total_s: float) -> str:
    syn = next((s for s in sets if s["name"] == "synthetic-100"), None)
    lines = []
    if syn is not None:
        lines.append(
            f"`synthetic-100`: {NUM_CLASSES} Gaussian classes in D = {DIM} (class means N(0, {MEAN_SCALE}^2 I), unit "
            f"noise), exponential train counts {N_MAX} -> {N_MIN} ({syn['n'][0]:,} rows), balanced val "
            f"{VAL_PER_CLASS} and test {TEST_PER_CLASS} per class; tail = at most {syn['tail']} train samples.")
    dig = next((s for s in sets if s["name"] == "digits-lt"), None)
    if dig is not None:
        lines.append(
            f"`digits-lt`: the store the pipeline extracts with the built-in CNN ({dig['n'][0]:,} / {dig['n'][1]:,} / "
            f"{dig['n'][2]:,} train / val / test rows, D = {dig['dim']}); tail = at most {dig['tail']} train samples "
            f"(the rarer half of the classes).")
    mod = next((s for s in sets if s["name"] == "modes-20"), None)
    if mod is not None:
        lines.append(
            f"`modes-20` (built to show what the cluster prior adds): {MODES_CLASSES} classes, each a mixture of "
            f"{MODES_PER_CLASS} Gaussian modes in D = {MODES_DIM} (centres N(0, I), noise sd {MODES_NOISE}), "
            f"exponential train counts {MODES_MAX} -> {MODES_MIN} ({mod['n'][0]:,} rows), balanced val {MODES_VAL} and "
            f"test {MODES_TEST} per class; tail = at most {mod['tail']} train samples.")
    lines.append(
        ("Heads at their defaults" if args.head_epochs is None else f"Heads at `epochs: {args.head_epochs}`")
        + "; DLSA at its defaults (3 filters, fraction 0.3, at most "
        f"{args.flow_epochs or dlsa.DEFAULTS.flow_epochs} flow epochs stopped on val likelihood with patience "
        f"{dlsa.DEFAULTS.patience}, hidden {dlsa.DEFAULTS.flow_hidden}, K automatic, `classifier_input: auto`, "
        "`gate: true`) but for the parameters each row names.")
    lines += [""] + render_sets(sets)
    lines += [
        "",
        paragraph(sets),
        "",
        f"Measured on {cpu_name()} ({cores()} cores shared with other work), {args.threads} torch thread(s), torch "
        f"{torch.__version__}; the whole script took {total_s / 60:.1f} min. `{COMMAND}` regenerates this section; "
        f"times vary with the machine's load, accuracies do not.",
    ]
    return "\n".join(lines)


def _insert_section(text: str | None, block: str) -> str:
    """README.md without the dlsa-study markers: the heading and ``block`` go after the
    performance table's caption, or at the end when there is no performance table."""
    if text is None:
        raise SystemExit(f"{README} not found")
    lines = text.split("\n")
    at = next((i for i, line in enumerate(lines) if ANCHOR in line), None)
    insert = ["", HEADING, "", block]
    if at is None:
        lines += insert + [""]
    else:
        j = at + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        at = j if j < len(lines) and not lines[j].startswith("#") else at
        lines[at + 1:at + 1] = insert
    return "\n".join(lines)


def write_readme(section: str) -> None:
    """Replace the text between the dlsa-study markers; README.md is re-read right before writing."""
    write_section(START_MARKER, END_MARKER, section, if_missing=_insert_section)


# ============================================================================== driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write-readme", action="store_true", help="write the section into README.md")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--sets", nargs="+", default=["synthetic-100", "digits-lt", "modes-20"],
                   choices=["synthetic-100", "digits-lt", "modes-20"])
    p.add_argument("--save", default=None, help="write the measured numbers to this JSON file")
    p.add_argument("--load", default=None, help="render from numbers saved with --save (no measuring)")
    p.add_argument("--digits-store", default=None, help="a directory for (or with) the digits-lt store")
    p.add_argument("--flow-epochs", type=int, default=None, help="at most this many flow epochs (default DLSA's)")
    p.add_argument("--head-epochs", type=int, default=None,
                   help="the heads' epochs (default theirs); the README's section is written at the defaults")
    p.add_argument("--quick", action="store_true", help="smoke run: one seed, 3 flow epochs, no digits")
    args = p.parse_args(argv)
    if (args.quick or args.head_epochs is not None) and args.write_readme:
        p.error("--quick and --head-epochs numbers do not go into the README")
    if args.quick:
        args.seeds, args.flow_epochs = [0], 3
        args.sets = [s for s in args.sets if s != "digits-lt"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    if args.load:
        with open(args.load, encoding="utf-8") as f:
            saved = json.load(f)
        sets, total_s, args.flow_epochs = saved["sets"], saved["total_s"], saved["flow_epochs"]
    else:
        sets = []
        for name in args.sets:
            data = (make_study_sets() if name == "synthetic-100" else modes_sets() if name == "modes-20"
                    else digits_sets(args.digits_store))
            sets.append(run_set(name, data, args.seeds, args.device, args.flow_epochs, args.head_epochs))
        total_s = time.perf_counter() - t0
        if args.save:
            with open(args.save, "w", encoding="utf-8") as f:
                json.dump({"sets": sets, "total_s": total_s, "flow_epochs": args.flow_epochs}, f)
    section = render(sets, args, total_s)
    print(section)
    if args.write_readme:
        write_readme(section)
        _log("README.md: DLSA section updated")
    _log(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
