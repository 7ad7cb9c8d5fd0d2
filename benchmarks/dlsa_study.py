#!/usr/bin/env python
"""DLSA on synthetic long-tailed features: accuracy, the loss ablations, and the flow filter's cost.

Usage (from the repository root)::

    python benchmarks/dlsa_study.py                  # print the section
    python benchmarks/dlsa_study.py --write-readme   # also write it into README.md

A script, not a test: it is seeded and reproducible (the same machine and thread count give the
same accuracies), and nothing in it asserts a time. Four parts:

1. **Data.** A synthetic long-tailed feature set held in memory as :class:`~stages.data.FeatureSet`
   objects: 100 classes, D = 128, exponential train counts 500 -> 5
   (:func:`stages.datasets.exponential_profile`, 10,899 samples), class-conditional Gaussians
   (class means ``N(0, 0.3^2 I)``, unit noise: two means are about ``0.3 * sqrt(2 * 128) = 4.8``
   noise standard deviations apart, so classes overlap and a few-shot class is hard to place), a
   class-balanced val split (10 per class) and test split (30 per class).
2. **Accuracy.** ``balanced-softmax`` and ``dlsa+balanced-softmax`` with the same head parameters
   (the head's defaults) and the default DLSA parameters (3 filters, 30 flow epochs, hidden 256,
   K automatic = 500): balanced accuracy and many / medium / few (:func:`stages.evaluate.evaluate`
   with the train counts: > 100, 20..100, < 20 train samples), fit seconds. The cascade is fitted
   once (:class:`~stages.dlsa.FlowCascade`) and handed to the wrapper with ``set_cascade``; the
   wrapper's fit time is the cascade's plus the classifiers'. The same cascade also serves a third
   row, ``classifier_samples = "all"`` (the documented variant: cluster-aided classifiers trained
   on every train sample instead of those their filter sends out). The test samples are broken
   down by the group the cascade sends them to, with every method's accuracy on each group.
3. **Ablations** (one parameter each, the rest default): ``lambda_bal = 0`` and
   ``lambda_pure = 0`` against the default cascade, on the first filter
   (:func:`stages.dlsa.diagnostics`, tail = at most 50 train samples): cluster-size entropy over
   ``log K``, mean cluster purity, separation accuracy (share of tail samples among the train
   samples the filter sends out) against the tail share of the train split.
4. **Timing** on the ImageNet-LT-shaped synthetic train features of ``bench_stages.py``
   (115,846 x 2,048 float32, 1,000 classes, 1,280 -> 5; generated chunk by chunk with that
   script's seeded generator, ``benchlib.py``, imported, not copied): one filter for one epoch
   (``num_filters = 1``, ``flow_epochs = 1``, the other cascade parameters default), reported as
   seconds per filter epoch and as the whole ``FlowCascade.fit``; the default cascade (3 filters x
   30 epochs) is **extrapolated** from them, not measured. The baseline is one epoch of a plain
   torch linear head with cross-entropy over the same features (``bench_stages.plain_ce_loop``:
   ``nn.Linear`` + ``F.cross_entropy``, SGD with momentum, batch 256 as the flow's batches).

Threads: ``--threads`` and ``--timing-threads`` (default 1 each). On a shared 2-core machine a
second intra-op thread made things slower, not faster: while another process kept both cores busy,
one step of the flow filter at D = 2,048 took 0.29-0.50 s with one thread and 2.1-2.6 s with two
(every parallel region waits for a descheduled thread), and the 100-class head fitted in 4 s with
one thread against 12-38 s with two. Raise them on a quiet or larger machine. Every timed block
also records how many cores the rest of the machine used meanwhile (``/proc/stat``), printed
beside the time. ``--quick`` shrinks everything (2 flow epochs, 20,000 rows for the timing) for a
smoke run; its numbers are not for the README, and ``--write-readme`` refuses it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_stages import plain_ce_loop  # noqa: E402  (the plain-CE baseline of the stage benchmark)
from benchlib import (  # noqa: E402  (the ImageNet-LT-shaped generator, cores and load)
    SYN_CLASSES, busy_seconds, cores, cpu_name, own_cpu_s, synthetic_features, synthetic_labels)
from readme import README, write_section  # noqa: E402

import longtail.stages.dlsa as dlsa  # noqa: E402
from longtail.stages.registry import make_method  # noqa: E402
from longtail.stages.data import FeatureSet  # noqa: E402
from longtail.stages.datasets import exponential_profile  # noqa: E402
from longtail.stages.evaluate import evaluate  # noqa: E402
from longtail.stages.heads import BATCH_SIZE, EPOCHS, LR, WEIGHT_DECAY  # noqa: E402

START_MARKER = "<!-- dlsa-study:start -->"
END_MARKER = "<!-- dlsa-study:end -->"
HEADING = "### DLSA on synthetic features"
ANCHOR = "perf-table:end"
COMMAND = "python benchmarks/dlsa_study.py --write-readme"

# ----------------------------------------------------------------------------- the 100-class set
NUM_CLASSES = 100
DIM = 128
N_MAX, N_MIN = 500, 5
#: per-dimension standard deviation of the class means (unit noise): means ~4.8 noise SDs apart
MEAN_SCALE = 0.3
VAL_PER_CLASS, TEST_PER_CLASS = 10, 30
SEED = 0
SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
HEAD = "balanced-softmax"
TAIL = dlsa.TAIL_THRESHOLD  # tail classes: at most 50 train samples


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


def _others(c: Clock) -> str:
    return "n/a" if c.others is None else f"{c.others:.1f}"


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


# ============================================================================== 2. accuracy
def _metrics(logits: np.ndarray, test: FeatureSet, counts: np.ndarray) -> dict:
    m = evaluate(logits, test.labels, counts)
    return {k: m[k] for k in ("balanced_accuracy", "many", "medium", "few")}


def run_accuracy(train, val, test, device: str, flow_epochs: int) -> dict:
    head_params = {"seed": SEED, "device": device}
    dlsa_params = {"seed": SEED, "device": device, "flow_epochs": flow_epochs}
    _log(f"[2] {HEAD} ...")
    with Clock() as c_head:
        head = make_method(HEAD, dict(head_params)).fit(train, val)
    head_logits = head.logits(test.features)
    _log(f"    {c_head.seconds:.1f} s")

    wrapper = make_method(f"dlsa+{HEAD}", {**head_params, "dlsa": dict(dlsa_params)})
    _log(f"[2] flow cascade (default parameters, flow_epochs={flow_epochs}) ...")
    with Clock() as c_cascade:
        cascade = wrapper.make_cascade().fit(train)
    _log(f"    {c_cascade.seconds:.1f} s")
    _log(f"[2] dlsa+{HEAD} classifiers (head + cluster-aided, routed samples) ...")
    with Clock() as c_cls:
        wrapper.set_cascade(cascade).fit(train, val)
    _log(f"    {c_cls.seconds:.1f} s")
    # the documented variant: cluster-aided classifiers trained on every train sample (same cascade)
    wrapper_all = make_method(f"dlsa+{HEAD}", {**head_params, "dlsa": {**dlsa_params, "classifier_samples": "all"}})
    _log(f"[2] dlsa+{HEAD} classifiers, classifier_samples = 'all' ...")
    with Clock() as c_all:
        wrapper_all.set_cascade(cascade).fit(train, val)
    _log(f"    {c_all.seconds:.1f} s")

    counts = train.class_counts
    logits = {"head": head_logits, "routed": wrapper.logits(test.features), "all": wrapper_all.logits(test.features)}
    rows = [
        {"method": f"`{HEAD}`", "key": "head", "fit_s": c_head.seconds},
        {"method": f"`dlsa+{HEAD}` (default)", "key": "routed", "fit_s": c_cascade.seconds + c_cls.seconds,
         "cascade_s": c_cascade.seconds},
        {"method": f"`dlsa+{HEAD}`, `classifier_samples: all`", "key": "all",
         "fit_s": c_cascade.seconds + c_all.seconds, "cascade_s": c_cascade.seconds},
    ]
    for r in rows:
        r["metrics"] = _metrics(logits[r["key"]], test, counts)
    # where the test samples go, and how each method does on them
    stage = wrapper.routing(test.features)
    train_stage = wrapper.routing(train.features)
    y = test.labels
    is_tail = counts[y] <= TAIL
    train_tail = counts[train.labels] <= TAIL
    groups = []
    for g in range(cascade.num_filters + 1):
        sel = stage == g
        seen = np.zeros(train.num_classes, dtype=bool)
        seen[train.labels[train_stage == g] if g < cascade.num_filters else train.labels] = True
        row = {"group": g, "n": int(sel.sum()), "train_n": int((train_stage == g).sum()),
               # of all the tail-class samples of a split, the share this group gets (train vs test)
               "tail_train": float((train_stage[train_tail] == g).mean()),
               "tail_test": float((stage[is_tail] == g).mean())}
        if row["n"]:
            row.update({"tail_share": float(is_tail[sel].mean()), "unseen": float((~seen[y[sel]]).mean())})
            row.update({k: float((v[sel].argmax(1) == y[sel]).mean()) for k, v in logits.items()})
        groups.append(row)
    # the flow's generalisation gap: filter 1's class-balanced mean log-likelihood per dimension (the mean
    # over classes of each class's mean, so that train's long tail and test's balance compare), train vs test
    dims = int(cascade.active_.sum())  # >= 1: fit rejects features without a non-constant dimension
    ll = {}
    for split in (train, test):
        first_ll = cascade.route(split.features).log_likelihood[:, 0].double().cpu().numpy()
        per_class = np.bincount(split.labels, first_ll, train.num_classes) / np.bincount(split.labels, None,
                                                                                        train.num_classes)
        ll[split.name] = float(per_class.mean()) / dims  # every class has a sample in both splits
    return {"rows": rows, "groups": groups, "cascade": cascade, "loglik": ll,
            "train_tail_share": float((counts[train.labels] <= TAIL).mean()),
            "test_tail_share": float(is_tail.mean()), "dlsa_params": wrapper.cascade_params()}


# ============================================================================== 3. ablations
def _first_filter(diag: dict) -> dict:
    f = diag["filters"][0]
    return {"entropy_ratio": f["cluster_size_entropy_ratio"], "mean_purity": f["mean_purity"],
            "weighted_purity": f["weighted_purity"], "separation": f["separation_accuracy"],
            "tail_share_in": f["tail_share_in"], "empty": f["empty_clusters"], "k": diag["num_clusters"]}


def run_ablations(train, default_cascade, default_seconds: float) -> list[dict]:
    base = default_cascade.get_params()
    rows = [{"name": "default", "change": f"lambda_bal = {base['lambda_bal']:g}, lambda_pure = {base['lambda_pure']:g}",
             "fit_s": default_seconds, **_first_filter(dlsa.diagnostics(default_cascade, train, TAIL))}]
    for key in ("lambda_bal", "lambda_pure"):
        _log(f"[3] flow cascade with {key} = 0 ...")
        with Clock() as c:
            cascade = dlsa.FlowCascade(**{**base, key: 0.0}).fit(train)
        _log(f"    {c.seconds:.1f} s")
        rows.append({"name": f"{key} = 0", "change": f"{key} = 0", "fit_s": c.seconds,
                     **_first_filter(dlsa.diagnostics(cascade, train, TAIL))})
    return rows


# ============================================================================== 4. timing
def imagenet_lt_train(max_rows: int | None = None) -> tuple[FeatureSet, float]:
    """The ImageNet-LT-shaped synthetic train split of ``bench_stages.py``, built in memory chunk by
    chunk from its seeded generator (float32, no second copy); ``max_rows`` keeps the first rows
    (``--quick`` only). Returns the split and the generation seconds."""
    t0 = time.perf_counter()
    labels = synthetic_labels("train")
    n = len(labels) if max_rows is None else min(len(labels), int(max_rows))
    features = synthetic_features("train", labels[:n])
    counts = np.bincount(labels[:n], minlength=SYN_CLASSES)
    if max_rows is not None:  # a truncated split may miss a class; keep the classes it has
        keep = counts > 0
        remap = np.cumsum(keep) - 1
        lab, counts = remap[labels[:n]], counts[keep]
    else:
        lab = labels
    names = tuple(f"class{c:04d}" for c in range(len(counts)))
    train = FeatureSet(features, lab, counts, names, name="train", source="imagenet-lt-synthetic")
    return train, time.perf_counter() - t0


def run_timing(device: str, threads: int, quick: bool) -> dict:
    torch.set_num_threads(threads)
    _log("[4] generating the ImageNet-LT-shaped train features ...")
    train, gen_s = imagenet_lt_train(20_000 if quick else None)
    _log(f"    {len(train):,} x {train.dim:,} in {gen_s:.1f} s")

    # time train_filter (the epoch) inside FlowCascade.fit by wrapping the module function
    epochs_timed: list[float] = []
    original = dlsa.train_filter

    def timed_train_filter(*args, **kwargs):
        _sync()
        t = time.perf_counter()
        out = original(*args, **kwargs)
        _sync()
        epochs_timed.append(time.perf_counter() - t)
        return out

    params = {"num_filters": 1, "flow_epochs": 1, "seed": SEED, "device": device}
    _log("[4] flow cascade, 1 filter x 1 epoch ...")
    dlsa.train_filter = timed_train_filter
    try:
        with Clock() as c_fit:
            cascade = dlsa.FlowCascade(**params).fit(train)
    finally:
        dlsa.train_filter = original
    _log(f"    {c_fit.seconds:.1f} s (filter epoch {epochs_timed[0]:.1f} s)")
    _log("[4] routing the train features through the fitted filter ...")
    with Clock() as c_route:
        cascade.route(train.features)
    _log(f"    {c_route.seconds:.1f} s")

    _log("[4] plain linear CE head, 1 epoch ...")
    fit_plain = plain_ce_loop(train, device, epochs=1, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY)
    with Clock() as c_plain:
        fit_plain()
    _log(f"    {c_plain.seconds:.1f} s")

    # extrapolation to the default cascade: filter f is fitted on the n_f samples that reach it
    defaults = dlsa.FlowCascade()
    sizes = dlsa.filter_sizes(len(train), defaults.num_filters, defaults.filter_fraction)
    reach = sum(n for n, _ in sizes) / len(train)  # sum_f n_f / N (1 + 0.7 + 0.49 = 2.19)
    epoch_s = epochs_timed[0]
    overhead_s = c_fit.seconds - epoch_s  # moments, standardisation, fingerprint, filter 1's evaluation
    extrapolated = (overhead_s + epoch_s * defaults.flow_epochs * reach
                    + c_route.seconds * (reach - 1.0))  # filters 2..F evaluate their n_f samples
    return {"rows": len(train), "dim": train.dim, "classes": train.num_classes, "gen_s": gen_s,
            "k": cascade.num_clusters_, "epoch": epoch_s, "fit": c_fit, "route": c_route, "plain": c_plain,
            "overhead_s": overhead_s, "reach": reach, "extrapolated_s": extrapolated,
            "default_filters": defaults.num_filters, "default_epochs": defaults.flow_epochs,
            "hidden": cascade.flow_hidden, "batch": cascade.flow_batch_size, "threads": threads}


# ============================================================================== 5. report
def _change(before: float, after: float) -> str:
    """How a diagnostic moved, in words a reader can check against the table."""
    d = after - before
    if abs(d) < 0.01:
        return f"barely moves ({before:.3f} -> {after:.3f})"
    return f"{'drops' if d < 0 else 'rises'} ({before:.3f} -> {after:.3f})"


def paragraph(acc: dict, abl: list[dict]) -> str:
    """The discussion, written from the numbers (no sentence here is a fixed claim about the outcome)."""
    head, routed, every = (r["metrics"] for r in acc["rows"])
    groups = acc["groups"]
    nf = len(groups) - 1

    def delta(m: dict, key: str) -> str:
        return f"{100 * (m[key] - head[key]):+.1f}"

    def verdict(m: dict) -> str:
        d = 100 * (m["balanced_accuracy"] - head["balanced_accuracy"])
        return "above" if d > 0.5 else "below" if d < -0.5 else "level with"

    parts = [
        f"**Accuracy.** On these features the default `dlsa+{HEAD}` is {verdict(routed)} `{HEAD}` alone: "
        f"{delta(routed, 'balanced_accuracy')} points of balanced accuracy (many {delta(routed, 'many')}, "
        f"medium {delta(routed, 'medium')}, few {delta(routed, 'few')}); with `classifier_samples: all` it is "
        f"{verdict(every)} it ({delta(every, 'balanced_accuracy')}; few {delta(every, 'few')})."
    ]
    routed_groups = [g for g in groups[:nf] if g["n"]]
    if routed_groups:
        lose = [g for g in routed_groups if g["routed"] < g["head"]]
        lose_all = [g for g in routed_groups if g["all"] < g["head"]]
        worst = max(routed_groups, key=lambda g: g["unseen"])
        first = groups[0]
        count = ("every filter group" if len(lose) == len(routed_groups) else
                 f"{len(lose)} of {len(routed_groups)} filter groups")
        n_out = sum(g["n"] for g in routed_groups)  # >= 1: routed_groups only holds groups with samples
        gap = {k: 100 * sum(g["n"] * (g[k] - g["head"]) for g in routed_groups) / n_out for k in ("routed", "all")}
        parts.append(
            f"On the same test samples the default, routed cluster-aided classifiers are worse than the head in "
            f"{count} ({gap['routed']:+.1f} points over the {n_out:,} test samples the filters send out; the samples "
            f"past every filter go to the head itself), the `all` classifiers, with the same cascade and the same "
            f"`[x, z, P(y | k)]` inputs, {gap['all']:+.1f} points"
            + (": what hurts is the routed classifiers' training data, not the cluster features. "
               if abs(gap["all"]) < abs(gap["routed"]) / 3 else ". ")
            + (f"The route does not generalise from train to test: the first filter takes "
               f"{_pct(first['tail_train'])}% of the tail-class train samples (the flow was fitted on these very "
               f"samples, with the large weights of eq. 6) but only {_pct(first['tail_test'])}% of the tail-class "
               f"test samples, so a routed classifier learns a class mix its test samples do not have, and up to "
               if first["tail_train"] > first["tail_test"] + 0.05 else
               f"The first filter takes {_pct(first['tail_train'])}% of the tail-class train samples and "
               f"{_pct(first['tail_test'])}% of the tail-class test samples; up to ")
            + f"{_pct(worst['unseen'])}% of a "
            f"group's test samples (filter {worst['group'] + 1}) belong to classes its classifier never saw. "
            + (f"The flow also fits its own train samples better than unseen ones (filter 1's class-balanced mean "
               f"log-likelihood per dimension {acc['loglik']['train']:.3f} on train, {acc['loglik']['test']:.3f} on "
               f"test): the classifiers are trained on the routes and latents of samples the flow has fitted, "
               f"not of unseen ones."
               if acc["loglik"]["train"] - acc["loglik"]["test"] > 0.02 else
               f"Filter 1's class-balanced mean log-likelihood per dimension is about the same on train and test "
               f"({acc['loglik']['train']:.3f} and {acc['loglik']['test']:.3f})."))
    first = groups[0]
    if first["n"]:
        enrich = first["tail_share"] - acc["test_tail_share"]
        parts.append(
            f"On the balanced test split the first filter's {first['n']:,} samples are "
            f"{_pct(first['tail_share'])}% tail samples against {_pct(acc['test_tail_share'])}% of the split "
            + ("(hardly any enrichment)." if abs(enrich) < 0.05 else "." ))
    dflt, no_bal, no_pure = abl
    sep, share = dflt["separation"], dflt["tail_share_in"]
    parts.append(
        f"**Where it helps: as a feature diagnostic.** On train, the first filter sends out {_pct(sep)}% tail "
        f"samples against a tail share of {_pct(share)}% ({sep / share:.1f}x enrichment): the likelihood carries "
        f"head/tail information about the features it was fitted on"
        if share and sep > share else
        f"**As a feature diagnostic** the first filter does not enrich tail samples here ({_pct(sep)}% of the "
        f"samples it sends out against a tail share of {_pct(share)}%)")
    parts[-1] += (
        f". Without the balancedness loss the cluster-size entropy ratio "
        f"{_change(dflt['entropy_ratio'], no_bal['entropy_ratio'])}"
        f" (the paper's figure 5); without the purity loss the mean purity "
        f"{_change(dflt['mean_purity'], no_pure['mean_purity'])} (figure 6 expects a drop).")
    if no_pure["separation"] is not None and no_pure["separation"] > sep + 0.01:
        parts.append(f"Turning the purity loss off raises the separation accuracy to {_pct(no_pure['separation'])}%.")
    if no_bal["mean_purity"] > dflt["mean_purity"] + 0.05:
        parts.append(f"Without the balancedness loss the mean purity rises to {no_bal['mean_purity']:.3f}: the "
                     f"samples collapse into fewer clusters ({no_bal['empty']} of {no_bal['k']} empty), and small "
                     f"clusters are pure by default.")
    parts.append(f"**Cost.** The default DLSA fit took {_secs(acc['rows'][1]['fit_s'])} s against "
                 f"{_secs(acc['rows'][0]['fit_s'])} s for the head, {_secs(acc['rows'][1]['cascade_s'])} s of it "
                 f"the flow cascade.")
    return " ".join(parts)


def render(acc: dict, abl: list[dict], tim: dict | None, args, total_s: float) -> str:
    p = acc["dlsa_params"]
    train_n = int(exponential_profile(N_MAX, NUM_CLASSES, N_MAX / N_MIN).sum())
    lines = [
        f"{NUM_CLASSES} Gaussian classes in D = {DIM} (class means N(0, {MEAN_SCALE}^2 I), unit noise), "
        f"exponential train counts {N_MAX} -> {N_MIN} ({train_n:,} samples; tail = at most {TAIL} train samples: "
        f"{_pct(acc['train_tail_share'])}% of train), balanced val {VAL_PER_CLASS} and test {TEST_PER_CLASS} "
        f"per class. "
        f"Head parameters are `{HEAD}`'s defaults; DLSA's are the defaults too ({p['num_filters']} filters, "
        f"fraction {p['filter_fraction']:g}, {p['flow_epochs']} flow epochs, hidden {p['flow_hidden']}, "
        f"K = {acc['cascade'].num_clusters_}, lambda_bal {p['lambda_bal']:g}, lambda_pure {p['lambda_pure']:g}); "
        f"both DLSA rows share one fitted cascade. Seed {SEED}. Accuracies in % on the test split "
        f"(many > 100, medium 20-100, few < 20 train samples).",
        "",
        "| method | balanced acc. | many | medium | few | fit (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in acc["rows"]:
        m = r["metrics"]
        fit = _secs(r["fit_s"]) + (f" (cascade {_secs(r['cascade_s'])})" if "cascade_s" in r else "")
        lines.append(f"| {r['method']} | {_pct(m['balanced_accuracy'])} | {_pct(m['many'])} | "
                     f"{_pct(m['medium'])} | {_pct(m['few'])} | {fit} |")
    lines += ["", "Test samples by the group the cascade sends them to; top-1 accuracy in % of each method on the "
              "same samples. \"Tail samples here\": of all the tail-class samples of the split, the share this "
              "group gets; "
              "\"unseen\": the share of the group's test samples whose class has no train sample in the group "
              "(the default, routed classifier never saw it):", "",
              f"| group | train / test samples | tail share (test) | tail samples here, train / test | unseen "
              f"| `{HEAD}` | `dlsa+{HEAD}` | `dlsa+{HEAD}`, all |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    nf = len(acc["groups"]) - 1
    for g in acc["groups"]:
        name = f"filter {g['group'] + 1} (cluster-aided)" if g["group"] < nf else "past every filter (the head)"
        if not g["n"]:
            lines.append(f"| {name} | {g['train_n']:,} / 0 | n/a | {_pct(g['tail_train'])} / 0.0 | n/a | n/a | n/a "
                         f"| n/a |")
            continue
        lines.append(f"| {name} | {g['train_n']:,} / {g['n']:,} | {_pct(g['tail_share'])} | "
                     f"{_pct(g['tail_train'])} / {_pct(g['tail_test'])} | {_pct(g['unseen'])} | "
                     f"{_pct(g['head'])} | {_pct(g['routed'])} | {_pct(g['all'])} |")
    lines += ["", f"Ablations, one parameter each (first filter, train split, K = {abl[0]['k']}):", "",
              "| cascade | cluster-size entropy / log K | empty clusters | mean purity | weighted purity "
              "| separation acc. (tail share out) | tail share in | cascade fit (s) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in abl:
        name = f"default ({r['change']})" if r["name"] == "default" else f"`{r['change']}`"
        lines.append(f"| {name} | {r['entropy_ratio']:.3f} | {r['empty']} | {r['mean_purity']:.3f} | "
                     f"{r['weighted_purity']:.3f} | {_pct(r['separation'])}% | {_pct(r['tail_share_in'])}% | "
                     f"{_secs(r['fit_s'])} |")
    if tim is not None:
        plain = tim["plain"].seconds
        ratio = (lambda s: f"{s / plain:.1f}x") if plain > 0 else (lambda s: "n/a")  # guards a zero baseline
        lines += [
            "",
            f"Cost on the ImageNet-LT-shaped synthetic train features of `bench_stages.py` ({tim['rows']:,} x "
            f"{tim['dim']:,} float32, {tim['classes']:,} classes, 1,280 -> 5), K = {tim['k']}, hidden {tim['hidden']}, "
            f"batch {tim['batch']}, {tim['threads']} torch thread(s). Measured: one filter for one epoch "
            f"(`num_filters: 1, flow_epochs: 1`). Baseline: one epoch of a plain torch `nn.Linear` + cross-entropy "
            f"head (SGD, batch {BATCH_SIZE}) over the same features.",
            "",
            "| what | seconds | vs plain CE epoch | others' load (cores) |",
            "|---|---:|---:|---:|",
            f"| plain linear CE head, 1 epoch (baseline) | {_secs(plain)} | 1.0x | {_others(tim['plain'])} |",
            f"| flow filter, 1 epoch (`train_filter`) | {_secs(tim['epoch'])} | {ratio(tim['epoch'])} | "
            f"{_others(tim['fit'])} |",
            f"| `FlowCascade.fit`, 1 filter x 1 epoch (whole fit) | {_secs(tim['fit'].seconds)} | "
            f"{ratio(tim['fit'].seconds)} | {_others(tim['fit'])} |",
            f"| routing the train split through 1 filter | {_secs(tim['route'].seconds)} | "
            f"{ratio(tim['route'].seconds)} | {_others(tim['route'])} |",
            f"| **extrapolated, not measured**: default cascade, {tim['default_filters']} filters x "
            f"{tim['default_epochs']} epochs | ~{_secs(tim['extrapolated_s'])} "
            f"(~{tim['extrapolated_s'] / 60:.0f} min) | "
            f"~{ratio(tim['extrapolated_s'])} | |",
            "",
            f"The extrapolation is the measured fit without its epoch ({_secs(tim['overhead_s'])} s: moments, "
            f"standardisation, evaluating the filter), plus {tim['default_epochs']} epochs on each filter's share "
            f"of the samples (the filters see 1 + 0.7 + 0.49 = {tim['reach']:.2f} x N samples), plus the routing time "
            f"for filters 2-{tim['default_filters']}; it assumes an epoch costs in proportion to its samples. "
            f"For scale: the heads' default schedule is {EPOCHS} epochs, about {_secs(EPOCHS * plain)} s of the plain "
            f"loop here, so the default cascade alone would cost about "
            + (f"{tim['extrapolated_s'] / (EPOCHS * plain):.0f}" if plain > 0 else "n/a")  # guards a zero baseline
            + " such head fits.",
        ]
    lines += [
        "",
        paragraph(acc, abl),
        "",
        f"Measured on {cpu_name()} ({cores()} cores shared with other work; the load column is the CPU the "
        f"rest of the machine used meanwhile), {args.threads} torch thread(s) for the study, torch "
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
    """Replace the text between the dlsa-study markers; README.md is re-read right before writing.

    Without the markers, a ``### DLSA on synthetic features`` heading and the markers are inserted
    after the line containing ``perf-table:end`` and the next non-blank line (the performance
    table's caption), or appended at the end when there is no performance table.
    """
    write_section(START_MARKER, END_MARKER, section, if_missing=_insert_section)


# ============================================================================== driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write-readme", action="store_true", help="write the section into README.md")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the 100-class study (default 1)")
    p.add_argument("--timing-threads", type=int, default=1,
                   help="torch threads for the ImageNet-LT-shaped timing (default 1, see the module docstring)")
    p.add_argument("--flow-epochs", type=int, default=dlsa.FLOW_EPOCHS,
                   help=f"flow epochs of the study's cascades (default {dlsa.FLOW_EPOCHS}, DLSA's default)")
    p.add_argument("--skip-timing", action="store_true", help="leave out the ImageNet-LT-shaped timing")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 flow epochs, 20,000 rows for the timing")
    args = p.parse_args(argv)
    if args.quick and args.write_readme:
        p.error("--quick numbers do not go into the README")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    flow_epochs = 2 if args.quick else args.flow_epochs
    train, val, test = make_study_sets()
    _log(f"[1] {len(train):,} train, {len(val):,} val, {len(test):,} test samples, D = {train.dim}, "
         f"{train.num_classes} classes")
    acc = run_accuracy(train, val, test, args.device, flow_epochs)
    abl = run_ablations(train, acc["cascade"], acc["rows"][1]["cascade_s"])
    del train, val, test
    tim = None if args.skip_timing else run_timing(args.device, args.timing_threads, args.quick)
    section = render(acc, abl, tim, args, time.perf_counter() - t0)
    print(section)
    if args.write_readme:
        write_readme(section)
        _log("README.md: DLSA section updated")
    _log(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
