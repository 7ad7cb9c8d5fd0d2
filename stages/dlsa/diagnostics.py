"""DLSA's head-tail separability diagnostics of a fitted flow cascade (paper 004's "feature evaluation")."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from longtail.stages.base import check_number
from longtail.stages.data import FeatureSet
from longtail.stages.dlsa.cascade import FlowCascade

#: the tail of the diagnostics: classes with at most this many train samples (Sec. 1, Fig. 2)
TAIL_THRESHOLD = 50


def diagnostics(cascade: FlowCascade, train: FeatureSet, tail_threshold: int = TAIL_THRESHOLD) -> dict[str, Any]:
    """Head-tail separability of a fitted cascade on its train split (the paper's "feature evaluation").

    Tail classes have at most ``tail_threshold`` train samples (``train.class_counts``). Per filter,
    over the train samples that reach it:

    * ``samples_in``, ``samples_out``: samples reaching the filter / sent to its classifier;
    * ``tail_share_in``: share of tail samples among those reaching it (the baseline to beat);
    * ``separation_accuracy``: share of tail samples among those it sends out (above
      ``tail_share_in`` when the filter enriches tail samples, as the weighted MLE intends);
    * ``cluster_sizes``: ``K`` sizes (by ``k^``, eq. 4), ``cluster_size_entropy`` (nats) and its ratio
      to ``log K`` (1 = balanced), ``empty_clusters``;
    * ``mean_purity``: mean over non-empty clusters of the share of their largest class (Sec. 3.3's
      ``Purity(k)``), ``weighted_purity``: the same weighted by cluster size;
    * ``threshold``: the log-likelihood threshold.

    Plain Python numbers and lists (JSON-friendly); shares are ``None`` where nothing is counted.
    """
    check_number("dlsa diagnostics", "tail_threshold", tail_threshold, integer=True, low=0)
    labels = train.require_labels()
    route = cascade.route(train.features)
    counts = np.asarray(train.class_counts)
    is_tail = counts <= int(tail_threshold)
    tail_sample = torch.as_tensor(is_tail[labels], device=route.stage.device)
    y = torch.as_tensor(labels, device=route.stage.device)
    k, c = cascade.num_clusters_, train.num_classes
    out: dict[str, Any] = {
        "tail_threshold": int(tail_threshold),
        "num_tail_classes": int(is_tail.sum()),
        "num_clusters": int(k),
        "samples": len(train),
        "tail_share": float(is_tail[labels].mean()),
        "filters": [],
    }
    for f in range(route.num_filters):
        reached = route.cluster[:, f] >= 0
        sent = route.stage == f
        kk, yy = route.cluster[reached, f], y[reached]
        joint = torch.bincount(kk * c + yy, minlength=k * c).view(k, c).double()
        sizes = joint.sum(1)
        nonempty = sizes > 0
        purity = joint.max(1).values[nonempty] / sizes[nonempty]  # nonempty guards the division
        share = sizes / sizes.sum()  # the sum is the number of samples reaching the filter, >= 1
        entropy = float(-(share[nonempty] * share[nonempty].log()).sum())
        n_in, n_out = int(reached.sum()), int(sent.sum())
        out["filters"].append({
            "filter": f + 1,
            "samples_in": n_in,
            "samples_out": n_out,
            "tail_share_in": float(tail_sample[reached].double().mean()) if n_in else None,
            "separation_accuracy": float(tail_sample[sent].double().mean()) if n_out else None,
            "threshold": float(cascade.thresholds_[f]),
            "cluster_sizes": [int(s) for s in sizes.tolist()],
            "cluster_size_entropy": entropy,
            "cluster_size_entropy_ratio": entropy / math.log(k) if k > 1 else None,  # log K > 0 for K > 1
            "empty_clusters": int((~nonempty).sum()),
            "mean_purity": float(purity.mean()),
            "weighted_purity": float(joint.max(1).values.sum() / sizes.sum()),
        })
    out["samples_regular"] = int((route.stage == route.num_filters).sum())
    return out


def tail_auc(score_tail: np.ndarray, score_head: np.ndarray) -> float | None:
    """``P(s_tail > s_head) + P(s_tail = s_head) / 2`` for a random tail and head sample: the area
    under the ROC curve of ``score`` as a tail detector (Mann-Whitney U over the product of the
    sizes, ties counted half, average ranks); ``None`` when either side is empty. Independent of
    the tail share, so that a long-tailed train split and a balanced test split compare."""
    n_t, n_h = int(score_tail.size), int(score_head.size)
    if n_t == 0 or n_h == 0:
        return None
    values = np.concatenate([score_tail, score_head]).astype(np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    ranks = (first + (counts + 1) / 2.0)[inverse]  # average 1-based ranks
    u = ranks[:n_t].sum() - n_t * (n_t + 1) / 2.0
    return float(u / (n_t * n_h))  # n_t, n_h >= 1


def separation(cascade: FlowCascade, split: FeatureSet, class_counts: np.ndarray,
               tail_threshold: int = TAIL_THRESHOLD) -> dict[str, Any]:
    """Head-tail separation of a fitted cascade on any labelled split (train, val or test).

    Tail classes have at most ``tail_threshold`` samples in ``class_counts`` (the **train** counts,
    whatever the split). Per filter, over the split's samples that reach it: ``samples_in``,
    ``samples_out``, ``tail_share_in``, ``separation_accuracy`` (tail share among those sent out, as
    in :func:`diagnostics`, which depends on the split's own tail share), and the measures that do
    not: ``tail_out_rate`` / ``head_out_rate`` (share of the tail / head samples reaching the filter
    that it sends out) and ``auc`` (:func:`tail_auc` of the filter's log-likelihood). On train they
    measure how well the flows fit their own samples (the tail classes' few samples are fitted with
    the large weights of eq. 6); on val and test, how separable unseen samples are.
    """
    labels = split.require_labels()
    route = cascade.route(split.features)
    is_tail = np.asarray(class_counts)[labels] <= int(tail_threshold)
    stage = route.stage.cpu().numpy()
    ll = route.log_likelihood.double().cpu().numpy()
    share = (lambda a: float(a.mean()) if a.size else None)  # None where nothing is counted
    out: dict[str, Any] = {"samples": int(labels.size), "tail_share": share(is_tail), "filters": []}
    for f in range(route.num_filters):
        reached = stage >= f
        sent = stage == f
        t, h = reached & is_tail, reached & ~is_tail
        out["filters"].append({
            "filter": f + 1,
            "samples_in": int(reached.sum()),
            "samples_out": int(sent.sum()),
            "tail_share_in": share(is_tail[reached]),
            "separation_accuracy": share(is_tail[sent]),
            "tail_out_rate": share(sent[t]),
            "head_out_rate": share(sent[h]),
            "auc": tail_auc(ll[t, f], ll[h, f]),
        })
    return out


def flow_stopping(cascade: FlowCascade) -> list[dict[str, Any]]:
    """Per filter: ``epochs_run``, ``best_epoch`` (1-based; the weights kept) and the val objective
    there (``best_val_nll``, eq. 7 on val, ``None`` without a val split)."""
    out = []
    for f, history in enumerate(cascade.history_):
        best = int(cascade.best_epoch_[f])
        val = history[best].get("val_nll") if 0 <= best < len(history) else None
        out.append({"filter": f + 1, "epochs_run": len(history), "best_epoch": best + 1,
                    "best_val_nll": None if val is None or not math.isfinite(val) else float(val)})
    return out
