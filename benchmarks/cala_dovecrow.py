#!/usr/bin/env python
"""Heuristic-CALA on the dove/crow story of paper 000, beside logit adjustment and a plain reference.

Usage (from the repository root)::

    python benchmarks/cala_dovecrow.py                  # 3 seeds, prints the table
    python benchmarks/cala_dovecrow.py --variants       # also the ablations of each default and reading

The set is :func:`longtail.stages.synthetic.dove_crow` (head class ``dove`` whose rare ``dark``
attribute lies towards the tail class ``crow``; val and test balanced in classes and attributes).
Rows of the table, each fitted on the train split and scored on the test split (overall accuracy
and worst (class, attribute) group accuracy, in %, mean over seeds):

* ``logit-adjust``: the product's head at its defaults;
* ``logit-adjust (converged, L-BFGS)``: the same loss solved to convergence by full-batch L-BFGS on the same
  class-balanced standardised features (:func:`reference_logit_adjust`), so that a CALA margin
  over logit adjustment is not a margin over under-training;
* ``heuristic-cala``: the product at its defaults (the neighbour table built by the method);
* ``reference``: :func:`reference_cala`, a plain transcription of eq. 5 and 8 with Algorithm A-1's
  MixUp (below), on the same standardised features and the same cosine neighbourhoods.

The reference is written from the paper, independently of ``stages/losses/cala.py`` (dense
``(N, C)`` tables, no support trick, no chunks), and is what the tests compare the product's loss
with on a fixed batch (:func:`reference_adjustment`, :func:`reference_loss`). Its readings of the
paper are the product's (``stages/losses/cala.py`` states them): ``N_K(x) = {x}`` plus the K nearest
other train samples (cosine, raw features; ``N_0(x) = {x}``, section "Heuristic-CALA Framework");
``p_mx`` the mean MixUp label over ``N_K(x)``; ``p_pr`` the mean softmax prediction over ``N_K(x)``;
eq. A.11's smoothing with class averages inside the neighbourhood; a class without label mass in the
neighbourhood gets ``p_mx`` floored at one member's share ``1 / (K + 1)``.

A script, not a test: seeded, reproducible on one machine; nothing asserts a time.
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# ---------------------------------------------------------------------- the reference (eq. 5 and 8)
def reference_neighbourhoods(x: np.ndarray, k: int) -> torch.Tensor:
    """``(N, K + 1)``: each row itself, then its K nearest other rows by cosine similarity."""
    z = torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float64), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-math.inf)
    others = sim.topk(k, dim=1).indices
    return torch.cat([torch.arange(len(z))[:, None], others], 1)


def reference_adjustment(nb: torch.Tensor, y: torch.Tensor, q: torch.Tensor, partner: torch.Tensor,
                         lam: torch.Tensor, log_prior: torch.Tensor, *, tau1: float, tau2: float,
                         smoothing: float, absent_zero: bool = False) -> torch.Tensor:
    """``tau1 log p_tr(c) + tau2 v(x, c)``, ``(N, C)`` float64, ``v`` of eq. 8 smoothed by eq. A.11.

    ``nb`` ``(N, M)`` neighbourhoods (members, self included); ``q`` ``(N, C)`` predictions;
    ``partner``/``lam`` the MixUp partner label and own-label weight of every row."""
    n, c = q.shape
    m = nb.shape[1]
    onehot = F.one_hot(y, c).double()
    mix = lam[:, None].double() * onehot + (1 - lam[:, None].double()) * F.one_hot(partner, c).double()
    p_mx = mix[nb].mean(1)                       # (N, C): mean MixUp label of the members
    p_pr = q.double()[nb].mean(1)                # (N, C): mean prediction of the members
    # eq. A.11: class average, over the class-c members x', of x''s own value p(y_x' | N(x'))
    own_mx = p_mx.gather(1, y[:, None]).squeeze(1)
    own_pr = p_pr.gather(1, y[:, None]).squeeze(1)
    member_class = onehot[nb]                    # (N, M, C)
    count = member_class.sum(1)
    avg_mx = (member_class * own_mx[nb][:, :, None]).sum(1) / count.clamp_min(1)
    avg_pr = (member_class * own_pr[nb][:, :, None]).sum(1) / count.clamp_min(1)
    p_mx = torch.where(count > 0, smoothing * avg_mx + (1 - smoothing) * p_mx, p_mx)
    p_pr = torch.where(count > 0, smoothing * avg_pr + (1 - smoothing) * p_pr, p_pr)
    log_pr = torch.log(p_pr.clamp_min(1e-12))
    # no label mass: p_mx = one member's share 1 / M, p_pr floored at it (v = 0 without evidence);
    # absent_zero: v = 0 there (the product before issue 11)
    v_absent = torch.zeros_like(log_pr) if absent_zero else (log_pr + math.log(m)).clamp_min(0.0)
    v = torch.where(p_mx > 0, log_pr - torch.log(p_mx.clamp_min(1e-300)), v_absent)
    return tau1 * log_prior.double()[None, :] + tau2 * v


def reference_loss(logits: torch.Tensor, y: torch.Tensor, adj: torch.Tensor, partner: torch.Tensor,
                   lam: float) -> torch.Tensor:
    """Eq. 5 with the MixUp criterion: ``lam CE(f + adj, y) + (1 - lam) CE(f + adj, y')``."""
    a = logits + adj.to(logits.dtype)
    return lam * F.cross_entropy(a, y) + (1 - lam) * F.cross_entropy(a, partner)


def _standardised(train_x: np.ndarray, train_y: np.ndarray, c: int):
    means = np.stack([train_x[train_y == k].mean(0) for k in range(c)])
    mu = means.mean(0)
    var = np.stack([((train_x[train_y == k] - mu) ** 2).mean(0) for k in range(c)]).mean(0)
    sd = np.sqrt(np.maximum(var, 1e-12))
    return lambda x: torch.as_tensor((x - mu) / sd, dtype=torch.float32)


def reference_cala(train_x, train_y, c, *, k, tau1, tau2=1.0, smoothing=0.05, alpha=0.2, epochs=100,
                   lr=0.1, batch_size=256, weight_decay=5e-4, seed=0, absent_zero=False, self_in=True):
    """Algorithm A-1 on a linear head (SGD with momentum 0.9 and a cosine schedule, as the product's
    heads): returns a function from features to logits. ``alpha = 0``: no MixUp; ``self_in=False``
    and ``absent_zero=True``: the neighbourhood without the sample and ``v = 0`` for a class without
    label mass (the product's readings before issue 11, for the ablation)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    std = _standardised(train_x, train_y, c)
    x, y = std(train_x), torch.as_tensor(train_y)
    n = len(y)
    nb = reference_neighbourhoods(train_x, k)
    if not self_in:
        nb = nb[:, 1:]
    log_prior = torch.log(torch.bincount(y, minlength=c).double() / n)
    head = torch.nn.Linear(x.shape[1], c)
    with torch.no_grad():  # initialised from the seed (not the global generator): reproducible in any order
        bound = 1.0 / math.sqrt(x.shape[1])
        head.weight.copy_((2 * torch.rand(c, x.shape[1], generator=g) - 1) * bound)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    q, partner, lam_row = None, y.clone(), torch.ones(n)
    for epoch in range(epochs):
        if q is None:  # first epoch: no predictions yet, v = 0
            adj = (tau1 * log_prior).expand(n, c)
        else:
            adj = reference_adjustment(nb, y, q, partner, lam_row, log_prior, tau1=tau1, tau2=tau2,
                                       smoothing=smoothing, absent_zero=absent_zero)
        q = torch.empty(n, c)
        for rows in torch.randperm(n, generator=g).split(batch_size):
            lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0  # alpha = 0: no MixUp
            lam = max(lam, 1 - lam)
            perm = torch.randperm(len(rows), generator=g)
            z = head(x[rows])
            mixed = lam * z + (1 - lam) * z[perm]  # a linear head: mixing logits = mixing features
            loss = reference_loss(mixed, y[rows], adj[rows], y[rows][perm], lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            q[rows] = torch.softmax(z.detach(), 1)
            partner[rows], lam_row[rows] = y[rows][perm], lam
    return lambda feats: head(std(feats)).detach().numpy()


def reference_logit_adjust(train_x, train_y, c, *, tau=1.0, weight_decay=5e-4):
    """The logit-adjusted loss (Menon et al. 2021) solved by full-batch L-BFGS to convergence, with
    the heads' L2 penalty ``weight_decay / 2 |W|^2``."""
    std = _standardised(train_x, train_y, c)
    x, y = std(train_x).double(), torch.as_tensor(train_y)
    log_prior = torch.log(torch.bincount(y, minlength=c).double() / len(y))
    w = torch.zeros(x.shape[1], c, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=2000, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b + tau * log_prior, y) + 0.5 * weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda feats: (std(feats).double() @ w + b).detach().numpy()


# ---------------------------------------------------------------------- the study
def scores(logits: np.ndarray, labels: np.ndarray, attributes: np.ndarray, c: int) -> tuple[float, float]:
    pred = logits.argmax(1)
    acc = float((pred == labels).mean())
    groups = [float((pred[m] == labels[m]).mean()) for k in range(c) for a in (0, 1)
              if (m := (labels == k) & (attributes == a)).any()]
    return acc, min(groups)


def run_seed(seed: int, variants: bool = False) -> dict[str, tuple[float, float]]:
    from longtail.stages.cala import K, default_tau1
    from longtail.stages.registry import make_method
    from longtail.stages.synthetic import dove_crow

    data = dove_crow(seed)
    c = len(data.class_names)
    tr, te = data.splits["train"], data.splits["test"]
    x, y = tr["features"], tr["labels"]
    train = data.feature_set("train")
    tau1 = default_tau1(data.class_counts)
    out = {}

    def score(name, fn):
        out[name] = scores(fn(te["features"]), te["labels"], te["attributes"], c)

    def product(name, params=None):
        return make_method(name, {"seed": seed, "device": "cpu", **(params or {})}).fit(train).logits

    score("logit-adjust", product("logit-adjust"))
    score("logit-adjust (converged, L-BFGS)", reference_logit_adjust(x, y, c))
    score("heuristic-cala", product("heuristic-cala"))
    score("reference", reference_cala(x, y, c, k=K, tau1=tau1, seed=seed))
    if variants:
        score("logit-adjust (300 epochs)", product("logit-adjust", {"epochs": 300}))
        score("heuristic-cala, parameters before issue 11 (tau1 1.5, K 30, 30 epochs)",
              product("heuristic-cala", {"tau1": 1.5, "k": 30, "epochs": 30, "min_steps": 0}))
        score("heuristic-cala, tau1 = 1.5", product("heuristic-cala", {"tau1": 1.5}))
        score("heuristic-cala, 30 epochs, no step budget", product("heuristic-cala", {"epochs": 30, "min_steps": 0}))
        score("heuristic-cala, 100 epochs, no step budget (min_steps: 0)",
              product("heuristic-cala", {"min_steps": 0}))
        score("heuristic-cala, 1,000 epochs", product("heuristic-cala", {"epochs": 1000}))
        for k in (10, 40):
            score(f"heuristic-cala, K = {k}", product("heuristic-cala", {"k": k}))
        score("heuristic-cala, no MixUp (alpha = 0)", product("heuristic-cala", {"alpha": 0}))
        score("cala-no-v (tau2 = 0)", product("cala-no-v"))
        score("reference, self excluded and v = 0 without label mass (readings before issue 11)",
              reference_cala(x, y, c, k=K, tau1=tau1, seed=seed, absent_zero=True, self_in=False))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", action="store_true", help="also the ablations of the defaults and readings")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    per_seed = [run_seed(s, args.variants) for s in seeds]
    names = list(per_seed[0])
    print(f"dove/crow set, seeds {seeds}: test accuracy and worst-group accuracy (%), mean (min to max)")
    print("| method | accuracy | worst group |")
    print("|---|---:|---:|")
    for name in names:
        acc = 100 * np.array([r[name][0] for r in per_seed])
        worst = 100 * np.array([r[name][1] for r in per_seed])
        print(f"| `{name}` | {acc.mean():.1f} ({acc.min():.1f} to {acc.max():.1f}) "
              f"| {worst.mean():.1f} ({worst.min():.1f} to {worst.max():.1f}) |")
    base = "logit-adjust (converged, L-BFGS)"
    for name in ("heuristic-cala", "reference"):
        d_acc = 100 * np.array([r[name][0] - r[base][0] for r in per_seed])
        d_worst = 100 * np.array([r[name][1] - r[base][1] for r in per_seed])
        print(f"`{name}` minus `{base}`, per seed: accuracy {', '.join(f'{v:+.1f}' for v in d_acc)}; "
              f"worst group {', '.join(f'{v:+.1f}' for v in d_worst)}")
    print(f"({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} torch thread(s), torch {torch.__version__})")


if __name__ == "__main__":
    main()
