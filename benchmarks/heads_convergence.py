#!/usr/bin/env python
"""Do the heads converge at their defaults? Every head against a plain reference of its own loss.

Usage (from the repository root)::

    python benchmarks/heads_convergence.py                    # both tables (a few minutes on 2 cores)
    python benchmarks/heads_convergence.py --part gauss       # one part: gauss | digits | decay
    python benchmarks/heads_convergence.py --heads ce,lws

A script, not a test: seeded and reproducible, nothing in it asserts a time. Three parts:

1. **gauss**: a 100-class, 64-d long-tailed Gaussian set (train counts 500 -> 5, exponential,
   10,899 rows; class means ``N(0, 0.5^2 I)``, unit noise; val 10 and test 30 per class). Every
   head at its defaults (``make_method(name, {"seed": 0})``) against the **plain reference** of
   the same loss: the same class-balanced standardised features, the head's loss function from
   ``stages.losses`` on all rows at once (class-balanced sampling as its expectation: each class's
   mean loss, averaged over classes), the same regulariser, solved in float64 by SciPy's
   L-BFGS-B (the solver scikit-learn's ``LogisticRegression`` uses) to a gradient of 1e-7 or 5,000
   iterations; ``tau-norm``'s tau chosen on val from the same grid. Also scikit-learn's
   ``LogisticRegression`` (its defaults, ``C = 1``; logit adjustment by subtracting ``log p_s``
   from its logits) as an outside anchor. Test balanced accuracy, in %.
   Beside them: the head at ten times its default training (``max_iter`` x10 for L-BFGS heads,
   ``epochs`` and ``min_steps`` x10 for SGD heads) and the training before issue 11 (``solver:
   sgd``, ``min_steps: 0``: 30 epochs of minibatch SGD).
2. **digits**: ``digits-lt`` features from the built-in backbone (default config, seed 0): every
   head at its defaults, at ten times its default training, and as before issue 11; the gain.
3. **decay**: how the default L2 strength was chosen: val balanced accuracy of ``ce``,
   ``balanced-softmax`` and ``crt`` (L-BFGS) over a grid of ``weight_decay`` on two *other*
   synthetic sets (seeds 11 and 12; 50 classes of 32-d and 100 classes of 128-d), never on the
   sets reported above.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from longtail.stages.data import FeatureSet
from longtail.stages.datasets import exponential_profile
from longtail.stages.decoupled import TAU_GRID
from longtail.stages.evaluate import per_class_accuracy
from longtail.stages.heads import balanced_moments
from longtail.stages.losses import (
    balanced_softmax_loss, class_balanced_weights, cross_entropy, focal_loss, ldam_loss, logit_adjusted_loss,
)
from longtail.stages.losses.lade import lade_loss
from longtail.stages.registry import make_method

HEADS = ("ce", "balanced-softmax", "logit-adjust", "cb-ce", "focal", "crt", "tau-norm", "lws", "lade",
         "cosine", "ldam-drw")
DECAY_GRID = (1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)


# ============================================================================== data
def gauss_sets(seed: int = 0, num_classes: int = 100, dim: int = 64, n_max: int = 500, n_min: int = 5,
               mean_scale: float = 0.5, val_per_class: int = 10, test_per_class: int = 30):
    """``(train, val, test)``: class means ``N(0, mean_scale^2 I)``, unit Gaussian noise, exponential
    train counts ``n_max -> n_min``, class-balanced val and test."""
    counts = exponential_profile(n_max, num_classes, n_max / n_min)
    means = np.random.default_rng([seed, 0]).standard_normal((num_classes, dim)) * mean_scale
    names = tuple(f"c{c}" for c in range(num_classes))
    out = []
    for i, per_class in enumerate((counts, np.full(num_classes, val_per_class), np.full(num_classes, test_per_class))):
        rng = np.random.default_rng([seed, i + 1])
        y = rng.permutation(np.repeat(np.arange(num_classes), per_class))
        x = (rng.standard_normal((len(y), dim)) + means[y]).astype(np.float32)
        out.append(FeatureSet(x, y, counts, names, name=("train", "val", "test")[i]))
    return tuple(out)


def digits_sets(seed: int = 0):
    """``digits-lt`` (default dataset config) through the built-in small CNN (default config)."""
    from longtail.pipeline.config import BackboneConfig, DatasetConfig, ExtractionConfig
    from longtail.stages import extract as ex
    from longtail.stages.datasets import digits_lt

    d, b = DatasetConfig(), BackboneConfig()
    ds = digits_lt(imbalance_ratio=d.imbalance_ratio, test_per_class=d.test_per_class,
                   val_per_class=d.val_per_class, seed=seed)
    tr = ds.splits["train"]
    bb = ex.train_small_cnn(tr.images, tr.labels, ds.num_classes, epochs=b.epochs, lr=b.lr, batch_size=b.batch_size,
                            weight_decay=b.weight_decay, width=b.width, seed=seed, device="cpu")
    out = []
    for name in ("train", "val", "test"):
        split = ds.splits[name]
        x = np.concatenate(list(ex.extract_chunks(bb, split.images, batch_size=ExtractionConfig().batch_size,
                                                  device="cpu", desc=name)))
        out.append(FeatureSet(x.astype(np.float32), split.labels, ds.class_counts, tuple(ds.class_names), name=name))
    return tuple(out)


def bal_acc(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    return 100.0 * float(np.nanmean(per_class_accuracy(logits.argmax(1), labels, num_classes)))


# ============================================================================== the plain reference
def reference(name: str, train: FeatureSet, val: FeatureSet, test: FeatureSet, wd: float = 5e-4) -> float:
    """Test balanced accuracy (%) of ``name``'s loss solved to convergence by SciPy's L-BFGS-B in float64."""
    from scipy.optimize import minimize

    c, d = train.num_classes, train.dim
    mean, std = balanced_moments(train.features, train.labels, c)
    std = np.where(std > 1e-6 * std.max(), std, 1.0)
    prep = lambda f: torch.tensor((f - mean) / std)  # noqa: E731
    x, y, counts = prep(train.features), torch.tensor(train.labels), train.class_counts.astype(np.float64)
    cls_w = torch.tensor(len(y) / (c * counts))[y]  # class-balanced: mean over classes of each class's mean
    gen = torch.Generator().manual_seed(0)
    cosine = name in ("cosine", "ldam-drw")

    def solve(loss_of, shapes, decay, init=None, iters=5000):
        sizes = [math.prod(s) for s in shapes]
        theta0 = (np.concatenate([(torch.rand(n, generator=gen, dtype=torch.float64) - 0.5).numpy() * 0.2
                                  for n in sizes]) if init is None else init)

        def fun(theta):
            t = torch.tensor(theta, requires_grad=True)
            parts = [p.view(s) for p, s in zip(torch.split(t, sizes), shapes)]
            obj = loss_of(*parts) + 0.5 * wd * sum((p - a).square().sum() for p, a in zip(parts, decay) if a is not None)
            obj.backward()
            return float(obj), t.grad.numpy().astype(np.float64)

        res = minimize(fun, theta0, jac=True, method="L-BFGS-B", options={"maxiter": iters, "gtol": 1e-7,
                                                                          "ftol": 1e-14, "maxfun": 2 * iters})
        return [torch.tensor(p).view(s) for p, s in zip(np.split(res.x, np.cumsum(sizes)[:-1]), shapes)], res.x

    losses = {
        "ce": lambda z: cross_entropy(z, y), "balanced-softmax": lambda z: balanced_softmax_loss(z, y, counts),
        "logit-adjust": lambda z: logit_adjusted_loss(z, y, counts, 1.0),
        "cb-ce": lambda z: cross_entropy(z, y, weight=class_balanced_weights(counts, 0.99)),
        "focal": lambda z: focal_loss(z, y, 2.0), "lade": lambda z: lade_loss(z, y, counts, 0.1, 0.1),
        "crt": lambda z: (cls_w * F.cross_entropy(z, y, reduction="none")).mean(),
        "tau-norm": lambda z: cross_entropy(z, y), "lws": lambda z: cross_entropy(z, y),
    }
    if cosine:
        cos = lambda w, xx: F.linear(F.normalize(xx, dim=1), F.normalize(w, dim=1))  # noqa: E731
        if name == "cosine":  # the scale starts at the head's 16 and is not regularised (as in the head)
            init = np.concatenate([(torch.rand(c * d, generator=gen, dtype=torch.float64).numpy() - 0.5) * 0.2, [16.0]])
            (w, s), _ = solve(lambda w, s: cross_entropy(s * cos(w, x), y), [(c, d), ()], [0.0, None], init=init)
            return bal_acc((s * cos(w, prep(test.features))).numpy(), test.labels, c)
        weight = class_balanced_weights(counts, 0.9999)
        (w,), th = solve(lambda w: ldam_loss(cos(w, x), y, counts, 0.5, 30.0), [(c, d)], [0.0])
        (w,), _ = solve(lambda w: ldam_loss(cos(w, x), y, counts, 0.5, 30.0, weight=weight), [(c, d)], [0.0], init=th)
        return bal_acc(cos(w, prep(test.features)).numpy(), test.labels, c)
    bias = name != "tau-norm"
    shapes = [(c, d), (c,)] if bias else [(c, d)]
    params, _ = solve(lambda w, b=None: losses[name](F.linear(x, w, b)), shapes, [0.0] * len(shapes))
    zt = F.linear(prep(test.features), *params)
    if name == "tau-norm":
        w = params[0]
        zs = lambda f, t: F.linear(prep(f), w / w.norm(dim=1, keepdim=True) ** t)  # noqa: E731
        scores = [bal_acc(zs(val.features, t).numpy(), val.labels, c) for t in TAU_GRID]
        zt = zs(test.features, TAU_GRID[int(np.argmax(scores))])
    if name == "lws":
        z0 = F.linear(x, *params).detach()
        (s,), _ = solve(lambda s: (cls_w * F.cross_entropy(z0 * s, y, reduction="none")).mean(), [(c,)], [1.0],
                        init=np.ones(c))
        zt = zt * s
    return bal_acc(zt.detach().numpy(), test.labels, c)


def sklearn_anchor(train: FeatureSet, test: FeatureSet, adjust: bool) -> float:
    """scikit-learn's LogisticRegression at its defaults on the same standardised features; with
    ``adjust``, logit adjustment by subtracting ``log p_s`` from its decision function."""
    from sklearn.linear_model import LogisticRegression

    mean, std = balanced_moments(train.features, train.labels, train.num_classes)
    lr = LogisticRegression(max_iter=5000).fit((train.features - mean) / std, train.labels)
    z = lr.decision_function((test.features - mean) / std)
    if adjust:
        z = z - np.log(train.class_counts / train.class_counts.sum())
    return bal_acc(z, test.labels, train.num_classes)


# ============================================================================== the parts
def fit_head(name, train, val, test, **params):
    t0 = time.perf_counter()
    m = make_method(name, {"seed": 0, "device": "cpu", **params}).fit(train, val)
    return bal_acc(m.logits(test.features), test.labels, train.num_classes), time.perf_counter() - t0


def times_ten(name: str) -> dict:
    head = make_method(name, {})
    if head.resolved_solver() == "lbfgs":
        return {"max_iter": 10 * head.max_iter}
    return {"epochs": 10 * head.epochs, "min_steps": 10 * head.min_steps}


def old_default(name: str) -> dict:
    """The training before issue 11: 30 epochs of minibatch SGD."""
    head = make_method(name, {})
    return {"solver": "sgd", "min_steps": 0} if "solver" in head.get_params() else {}


def part_gauss(heads) -> list[str]:
    train, val, test = gauss_sets()
    rows = ["| head | solver | default (%) | plain reference (%) | difference | x10 training (%) | "
            "before (30 SGD epochs) (%) | fit time |", "|---|---|---|---|---|---|---|---|"]
    for name in heads:
        acc, sec = fit_head(name, train, val, test)
        ref = reference(name, train, val, test)
        acc10, _ = fit_head(name, train, val, test, **times_ten(name))
        old, _ = fit_head(name, train, val, test, **old_default(name))
        solver = make_method(name, {}).resolved_solver()
        rows.append(f"| `{name}` | {solver} | {acc:.1f} | {ref:.1f} | {acc - ref:+.1f} | {acc10:.1f} | {old:.1f} "
                    f"| {sec:.1f} s |")
        print(rows[-1], flush=True)
    rows.append(f"| scikit-learn `LogisticRegression()` (C = 1) | lbfgs | | {sklearn_anchor(train, test, False):.1f} "
                "| | | | |")
    rows.append(f"| the same, logit-adjusted (- log p_s) | lbfgs | | {sklearn_anchor(train, test, True):.1f} | | | | |")
    print("\n".join(rows[-2:]), flush=True)
    return rows


def part_digits(heads) -> list[str]:
    train, val, test = digits_sets()
    rows = ["| head | solver | default (%) | x10 training (%) | gain | x10 is | before (30 SGD epochs) (%) |",
            "|---|---|---|---|---|---|---|"]
    for name in heads:
        acc, _ = fit_head(name, train, val, test)
        more = times_ten(name)
        acc10, _ = fit_head(name, train, val, test, **more)
        old, _ = fit_head(name, train, val, test, **old_default(name))
        solver = make_method(name, {}).resolved_solver()
        what = ", ".join(f"{k} {v}" for k, v in more.items())
        rows.append(f"| `{name}` | {solver} | {acc:.1f} | {acc10:.1f} | {acc10 - acc:+.1f} | {what} | {old:.1f} |")
        print(rows[-1], flush=True)
    return rows


def part_decay(heads) -> list[str]:
    sets = {"50 classes, 32-d (seed 11)": gauss_sets(seed=11, num_classes=50, dim=32, mean_scale=0.7),
            "100 classes, 128-d (seed 12)": gauss_sets(seed=12, dim=128, mean_scale=0.35)}
    rows = ["| set | head | " + " | ".join(f"{g:g}" for g in DECAY_GRID) + " |", "|---" * (2 + len(DECAY_GRID)) + "|"]
    for label, (train, val, _) in sets.items():
        for name in [h for h in heads if make_method(h, {}).resolved_solver() == "lbfgs"]:
            accs = [fit_head(name, train, val, val, weight_decay=g)[0] for g in DECAY_GRID]
            rows.append(f"| {label} | `{name}` | " + " | ".join(f"{a:.1f}" for a in accs) + " |")
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "gauss", "digits", "decay"), default="all")
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    heads = [h for h in args.heads.split(",") if h]
    t0 = time.perf_counter()
    for part, fn in (("decay", lambda: part_decay(heads)), ("gauss", lambda: part_gauss(heads)),
                     ("digits", lambda: part_digits(heads))):
        if args.part in ("all", part):
            print(f"\n## {part}\n", flush=True)
            print("\n".join(fn()), flush=True)
    print(f"\n{(time.perf_counter() - t0) / 60:.1f} minutes, torch threads {args.threads}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
