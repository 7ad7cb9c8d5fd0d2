#!/usr/bin/env python
"""The whole default DLSA cascade at the ImageNet-LT shape, measured (issue 13).

Usage (from the repository root)::

    python benchmarks/bench_dlsa.py                  # print the section
    python benchmarks/bench_dlsa.py --write-readme   # also write it into README.md
    python benchmarks/bench_dlsa.py --quick          # a smoke run on 10 classes (refuses --write-readme)

Data: the ImageNet-LT-shaped synthetic features of ``bench_stages.py`` (benchlib: 115,846 x 2,048
float32 train rows, 1,000 classes, 1,280 down to 5 a class; balanced val of 10 and test of 20 a
class), generated in memory from their seeded generator. What is timed, in one process:

1. **Baseline**: one epoch of the plain torch linear CE loop of ``bench_stages.py`` over the train
   features (the unit every stage-2 figure of the README is a ratio of).
2. **Flow step against plain nflows**: one epoch of the first filter's training on the first
   ``--ref-rows`` train rows, as the product runs it (:func:`stages.dlsa.flow.maf_forward`, fused
   Adam) and as a plain reference of the same maths runs it (nflows' own ``flow(x)``, torch's default
   Adam), alternating, best of two each. Same seed, same weights, same first batch: the first step's
   losses agree to float rounding. Later steps drift apart (fused Adam and the fast forward round
   differently), and the epoch's mean loss with them: single steps spike (eq. 10's purity term is
   unbounded below), so the section gives the first step's loss, the epoch's median and its mean.
3. **The whole default cascade**: ``FlowCascade(seed=0).fit(train, val)`` at every default (3
   filters, fraction 0.3, K = 500, hidden 256, batch 256, at most 30 epochs stopped on val likelihood
   with patience 5): wall time of the whole fit and of each filter's training, the epochs each ran
   and kept, then the routing of the test split and the first filter's tail-vs-head AUC there.

Nothing is extrapolated. Peak RSS is ``ru_maxrss`` of this process. ``--threads`` sets torch's
intra-op threads (default 1: on a shared 2-core machine a second thread made fits slower);
``--device cuda`` runs the same on a GPU. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_stages import plain_ce_loop  # noqa: E402
from benchlib import SYN_CLASSES, cores, cpu_name, synthetic_features, synthetic_labels  # noqa: E402
from dlsa_study import Clock, _log, _others, _secs  # noqa: E402
from readme import write_section  # noqa: E402

import longtail.stages.dlsa as dlsa  # noqa: E402
import longtail.stages.dlsa.cascade as cascade_module  # noqa: E402
import longtail.stages.dlsa.flow as flow_module  # noqa: E402
import longtail.stages.train.engine as engine  # noqa: E402
from longtail.stages.data import FeatureSet  # noqa: E402
from longtail.stages.device import resolve_device  # noqa: E402
from longtail.stages.heads import BATCH_SIZE, LR, WEIGHT_DECAY  # noqa: E402
from longtail.stages.losses.dlsa import flow_class_weights  # noqa: E402

START_MARKER = "<!-- dlsa-bench:start -->"
END_MARKER = "<!-- dlsa-bench:end -->"
HEADING = "### DLSA at the ImageNet-LT shape"
BEFORE = "### Heuristic-CALA training cost"
COMMAND = "python benchmarks/bench_dlsa.py --write-readme"
#: train rows of the flow-step comparison (part 2)
REF_ROWS = 16_384
#: ``--quick``: every this many classes is kept (10 classes), at most this many flow epochs
QUICK_CLASS_STEP, QUICK_EPOCHS, QUICK_REF_ROWS = 100, 2, 512


def make_sets(class_step: int = 1) -> tuple[FeatureSet, FeatureSet, FeatureSet, float]:
    """Train, val and test of the ImageNet-LT shape; ``class_step > 1`` keeps every
    ``class_step``-th class (all of its rows in every split, renumbered). Returns the generation seconds too."""
    t0 = time.perf_counter()
    kept = np.arange(0, SYN_CLASSES, class_step)
    remap = np.full(SYN_CLASSES, -1)
    remap[kept] = np.arange(kept.size)
    names = tuple(f"class{c:04d}" for c in kept)
    out = []
    for split in ("train", "val", "test"):
        labels = synthetic_labels(split)
        features = synthetic_features(split, labels)
        if class_step > 1:
            rows = np.flatnonzero(remap[labels] >= 0)
            features, labels = features[rows], labels[rows]
        lab = remap[labels]
        out.append(FeatureSet(features, lab, np.bincount(lab, minlength=kept.size), names, name=split,
                              source="imagenet-lt-synthetic"))
    return out[0], out[1], out[2], time.perf_counter() - t0


def filter_epoch(train: FeatureSet, rows: int, device: str, reference: bool) -> tuple[float, dict[str, float]]:
    """One epoch of the first filter's training on the first ``rows`` train rows at the default
    parameters; ``reference``: nflows' own forward pass and torch's default Adam. Returns
    ``(seconds, losses)``: eq. 11's total at the first step, and the median and mean over the epoch's
    steps."""
    p = dlsa.DEFAULTS
    dev = resolve_device(device)
    x = torch.from_numpy(np.ascontiguousarray(train.features[:rows])).to(dev)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.from_numpy(train.labels[:rows]).to(dev)
    counts = torch.bincount(y, minlength=train.num_classes).cpu().numpy()
    weights = torch.as_tensor(flow_class_weights(counts, p.q), dtype=torch.float32, device=dev)
    k = dlsa.cascade.auto_num_clusters(rows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        filt = dlsa.GaussianMixtureFlowFilter(train.dim, k, p.flow_blocks, p.flow_hidden, p.eta)
        filt.centres.normal_(0.0, dlsa.default_sigma(train.dim))
    filt = filt.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    fast_forward, fusable, step_loss = flow_module.maf_forward, engine._fusable, flow_module.FlowObjective.loss
    steps: list[torch.Tensor] = []

    def recorded(self, module, batch, state):
        out = step_loss(self, module, batch, state)
        steps.append(out.loss.detach())
        return out

    flow_module.FlowObjective.loss = recorded
    if reference:
        flow_module.maf_forward = lambda flow, v, cols: flow(v)
        engine._fusable = lambda groups: False
    try:
        with Clock() as c:
            history, _ = flow_module.train_filter(
                filt, x, y, weights, epochs=1, lr=p.flow_lr, batch_size=p.flow_batch_size, lambda_bal=p.lambda_bal,
                lambda_pure=p.lambda_pure, generator=gen)
    finally:
        flow_module.maf_forward, engine._fusable, flow_module.FlowObjective.loss = fast_forward, fusable, step_loss
    totals = torch.stack(steps).double().cpu()
    return c.seconds, {"first": float(totals[0]), "median": float(totals.median()), "mean": float(history[-1]["total"])}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    step = QUICK_CLASS_STEP if args.quick else 1
    _log("[1] generating the ImageNet-LT-shaped features ...")
    train, val, test, gen_s = make_sets(step)
    _log(f"    train {len(train):,} x {train.dim:,}, val {len(val):,}, test {len(test):,} in {gen_s:.1f} s")

    _log("[1] plain linear CE head, 1 epoch ...")
    fit_plain = plain_ce_loop(train, args.device, epochs=1, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY)
    with Clock() as c_plain:
        fit_plain()
    _log(f"    {c_plain.seconds:.1f} s")

    ref_rows = min(len(train), QUICK_REF_ROWS if args.quick else args.ref_rows)
    _log(f"[2] one filter epoch on {ref_rows:,} rows: product and nflows reference, alternating ...")
    fast, ref = [], []
    for _ in range(2):
        ref.append(filter_epoch(train, ref_rows, args.device, reference=True))
        fast.append(filter_epoch(train, ref_rows, args.device, reference=False))
        _log(f"    reference {ref[-1][0]:.1f} s, product {fast[-1][0]:.1f} s")

    params = {"seed": 0, "device": args.device}
    if args.quick:
        params["flow_epochs"] = QUICK_EPOCHS
    per_filter: list[float] = []
    original = cascade_module.train_filter

    def timed_train_filter(*a, **kw):
        with Clock() as c:
            out = original(*a, **kw)
        per_filter.append(c.seconds)
        _log(f"    filter {len(per_filter)}: {len(out[0])} epoch(s) in {c.seconds:.1f} s")
        return out

    _log("[3] the default cascade, fitted with val early stopping ...")
    cascade_module.train_filter = timed_train_filter
    try:
        with Clock() as c_fit:
            cascade = dlsa.FlowCascade(**params).fit(train, val)
    finally:
        cascade_module.train_filter = original
    _log(f"    {c_fit.seconds:.1f} s")
    with Clock() as c_route:
        cascade.route(test.features)
    sep = dlsa.separation(cascade, test, train.class_counts)
    stops = dlsa.flow_stopping(cascade)
    sizes, _ = cascade.plan(len(train))
    filters = [{"reaching": n, "routed": m, "seconds": s, "epochs_run": st["epochs_run"], "best_epoch": st["best_epoch"],
                "auc_test": f.get("auc")} for (n, m), s, st, f in zip(sizes, per_filter, stops, sep["filters"])]
    return {
        "rows": len(train), "dim": train.dim, "classes": train.num_classes, "val": len(val), "test": len(test),
        "gen_s": gen_s, "plain": {"seconds": c_plain.seconds, "others": c_plain.others},
        "ref_rows": ref_rows, "ref": [r[0] for r in ref], "fast": [r[0] for r in fast],
        "ref_loss": [r[1] for r in ref], "fast_loss": [r[1] for r in fast],
        "fit": {"seconds": c_fit.seconds, "others": c_fit.others},
        "route": {"seconds": c_route.seconds, "others": c_route.others},
        "k": cascade.num_clusters_, "filters": filters, "max_epochs": cascade.params.flow_epochs,
        "patience": cascade.params.patience, "hidden": cascade.params.flow_hidden,
        "batch": cascade.params.flow_batch_size, "threads": args.threads, "device": args.device,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "quick": bool(args.quick),
        "cpu": cpu_name(), "cores": cores(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def _losses(ref: dict[str, float], fast: dict[str, float]) -> str:
    """The sentence comparing the two paths' eq. 11 losses (reference first; a ``--save`` file of
    before the first-step loss holds the epoch means alone)."""
    if not isinstance(ref, dict):
        return f"Mean losses {ref:.4f} and {fast:.4f}."
    text = (f"Eq. 11's loss at the first step (same weights, same batch) {ref['first']:.6f} and {fast['first']:.6f}; "
            f"over the epoch, median {ref['median']:.4f} and {fast['median']:.4f}, mean {ref['mean']:.4f} and "
            f"{fast['mean']:.4f}")
    if abs(fast["mean"] - ref["mean"]) <= 1e-3 * max(1.0, abs(ref["mean"])):
        return text + "."
    return (text + ": the two paths round differently, so their trajectories drift apart, and the mean follows a "
            "few spiking steps (the purity term, eq. 10, is unbounded below).")


def render(r: dict, total_s: float) -> str:
    plain = r["plain"]["seconds"]
    ratio = (lambda s: f"{s / plain:.1f}x") if plain > 0 else (lambda s: "n/a")  # guards a zero baseline
    ref, fast = min(r["ref"]), min(r["fast"])
    step_ratio = f"{fast / ref:.2f}x" if ref > 0 else "n/a"
    lines = [
        f"The whole default cascade, measured (not extrapolated) on the ImageNet-LT-shaped synthetic features of "
        f"`bench_stages.py`: train {r['rows']:,} x {r['dim']:,} float32, {r['classes']:,} classes, val {r['val']:,}, "
        f"test {r['test']:,}. `FlowCascade(seed=0).fit(train, val)` at every default: {len(r['filters'])} filters, "
        f"K = {r['k']}, hidden {r['hidden']}, batch {r['batch']}, at most {r['max_epochs']} epochs per filter, "
        f"stopped on val likelihood with patience {r['patience']}; {r['threads']} torch thread(s), device "
        f"`{r['device']}`. Baseline: one epoch of the plain torch `nn.Linear` + cross-entropy loop over the train "
        f"features.",
        "",
        "| what | seconds | vs plain CE epoch | others' load (cores) |",
        "|---|---:|---:|---:|",
        f"| plain linear CE head, 1 epoch (baseline) | {_secs(plain)} | 1.0x | {_others(r['plain'])} |",
    ]
    for f, row in enumerate(r["filters"], 1):
        lines.append(
            f"| filter {f}: trained on {row['reaching']:,} rows, {row['epochs_run']} epochs run, weights of epoch "
            f"{row['best_epoch']} kept | {_secs(row['seconds'])} | {ratio(row['seconds'])} | |")
    lines += [
        f"| **whole default cascade fit** (moments, {len(r['filters'])} filters, their routing of train and val) | "
        f"**{_secs(r['fit']['seconds'])}** ({r['fit']['seconds'] / 60:.0f} min) | {ratio(r['fit']['seconds'])} | "
        f"{_others(r['fit'])} |",
        f"| routing the test split ({r['test']:,} rows) | {_secs(r['route']['seconds'])} | "
        f"{ratio(r['route']['seconds'])} | {_others(r['route'])} |",
        "",
        f"Filter epoch against a plain reference of the same maths (the first filter on the first {r['ref_rows']:,} "
        f"train rows, one epoch, alternating, best of two): nflows' own forward pass and torch's default Adam "
        f"{_secs(ref)}, the product (`maf_forward`: contiguous scale and shift, the first MADE layer on the "
        f"{r['hidden']} input columns its mask uses; fused Adam) {_secs(fast)}: **{step_ratio}**. "
        + _losses(r['ref_loss'][0], r['fast_loss'][0]),
        "",
        "Tail-vs-head AUC of each filter's likelihood on the test samples reaching it: "
        + ", ".join(f"filter {f} {'n/a' if row['auc_test'] is None else format(row['auc_test'], '.3f')}"
                    for f, row in enumerate(r["filters"], 1))
        + " (0.5 = no separation).",
        "",
        f"Measured {r['date']} on {r['cpu']} ({r['cores']} cores), torch {r['torch']}; peak RSS "
        f"{r['peak_rss_mib']:,.0f} MiB; generating the features took {r['gen_s']:.0f} s, not counted; the whole "
        f"script took {total_s / 60:.1f} min. `{COMMAND}` regenerates this section.",
    ]
    return "\n".join(lines)


def _insert_section(text: str | None, block: str) -> str:
    if text is None or BEFORE not in text:
        raise SystemExit(f"README.md has no {BEFORE!r} heading to put the section before")
    i = text.index(BEFORE)
    return text[:i] + f"{HEADING}\n\n{block}\n\n" + text[i:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--ref-rows", type=int, default=REF_ROWS, help=f"rows of the flow-step comparison ({REF_ROWS:,})")
    p.add_argument("--quick", action="store_true", help="10 classes, 2 flow epochs: a smoke run")
    p.add_argument("--write-readme", action="store_true", help="write the section into README.md")
    p.add_argument("--save", metavar="FILE", help="keep the measured numbers as JSON")
    p.add_argument("--load", metavar="FILE", help="render from a --save file instead of measuring")
    args = p.parse_args(argv)
    if args.threads < 1 or args.ref_rows < 256:
        p.error("--threads must be at least 1 and --ref-rows at least 256")
    if args.quick and args.write_readme:
        p.error("--quick measures a smoke run: it does not write the README")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.load:
        with open(args.load, encoding="utf-8") as f:
            r = json.load(f)
        total = r.get("total_s", 0.0)
        if r.get("quick") and args.write_readme:
            raise SystemExit(f"{args.load} holds a --quick run: it does not write the README")
    else:
        r = run(args)
        total = r["total_s"] = time.perf_counter() - t0
        if args.save:
            with open(args.save, "w", encoding="utf-8") as f:
                json.dump(r, f, indent=1)
    section = render(r, total)
    print(section)
    if args.write_readme:
        write_section(START_MARKER, END_MARKER, section, if_missing=_insert_section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
