"""Many fits under one label: several seeds, and val-selected sweeps.

**Seeds.** With ``seeds: [0, 1, 2]`` every method entry is fitted once per seed
(:func:`pipeline.config.expand_seeds`, ``LABEL@seed=S``, each cached); :func:`aggregate_seeds`
replaces the fits by one entry under ``LABEL``: each number the mean over seeds, ``seeds`` their
count, ``per_seed`` each metric's values, ``ci95`` the Student-t interval over seeds of every
metric (:func:`stages.evaluate.intervals.t_interval`). A method fitted once, or whose fits are the
same for every seed (a deterministic method), keeps the bootstrap interval over test samples the
evaluation computed for it (``ci95_over`` says which). The label-shift tables, per-method diagnostics
and the logits the plots use are those of the first seed.

**Sweeps.** A method entry with a ``grid`` (``{name: logit-adjust, grid: {tau: [0.5, 1, 1.5, 2]}}``)
is fitted once per combination, each member a cached method of its own
(:func:`pipeline.config.expand_grids`); :func:`select_sweeps` keeps, under the entry's label, the
member with the best balanced accuracy on the **val** split (averaged over seeds), records the
chosen parameters and every member's val score under ``metrics.json``'s ``selection``, and keeps
the members' test scores only as a test-set oracle (``selection.LABEL.test_oracle``), never used
to choose.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from longtail.pipeline.config import RunConfig
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import METRIC_KEYS, per_class_accuracy
from longtail.stages.evaluate.validate import nanmean
from longtail.stages.evaluate.intervals import t_interval


def check_selections(cfg: RunConfig, splits) -> None:
    """A sweep chooses on the val split: refuse a store without one before any fit."""
    if cfg.selections and "val" not in splits:
        raise LongtailError(f"methods {', '.join(cfg.selections)}: a grid is chosen on the val split, and store "
                            f"{cfg.store!r} has none (give it a val split, or list each combination with its own label)")


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class accuracy over the classes present in ``labels``."""
    return nanmean(per_class_accuracy(logits.argmax(axis=1), labels, logits.shape[1]))  # NaN: absent classes


def _collapse(metrics: dict[str, Any], details: dict[str, np.ndarray], members: list[str], label: str,
              kept: str) -> None:
    """Every per-method section of ``metrics`` (a mapping holding all ``members``) and the logits in
    ``details``: the members' entries replaced, at the first member's place, by ``kept``'s under
    ``label``."""
    for key, section in list(metrics.items()):
        if not (isinstance(section, dict) and all(m in section for m in members)):
            continue
        out: dict = {}
        for name, value in section.items():
            if name in members:
                if name == members[0]:
                    out[label] = section[kept]
                continue
            out[name] = value
        metrics[key] = out
    for m in members:
        value = details.pop(f"logits/{m}", None)
        if m == kept and value is not None:
            details[f"logits/{label}"] = value


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _mean(values: list[Any]) -> float | None:
    v = [math.nan if x is None else float(x) for x in values]
    m = float(np.mean(v))
    return None if math.isnan(m) else m


def aggregate_seeds(cfg: RunConfig, metrics: dict[str, Any], details: dict[str, np.ndarray],
                    val_scores: dict[str, float]) -> None:
    """Each seed group's fits (``LABEL@seed=S``) in ``metrics`` and ``details`` replaced by one
    entry under ``LABEL`` (see the module); ``val_scores`` gets the mean of its fits' scores."""
    for label, specs in cfg.seed_groups.items():
        fits = [s.label for s in specs]
        rows = [metrics["methods"][f] for f in fits]
        merged: dict[str, Any] = {}
        for key, first in rows[0].items():
            values = [r.get(key) for r in rows]
            merged[key] = _mean(values) if all(_is_number(v) for v in values) else first
        merged["seeds"] = len(fits)
        per_seed = {k: [r[k] for r in rows] for k in METRIC_KEYS if k in rows[0]}
        merged["per_seed"] = per_seed
        if all(len(set(v)) == 1 for v in per_seed.values()):
            # every seed gave the same fit (a deterministic method, e.g. a converged convex head): a
            # zero-width interval would claim a certainty the finite test split does not give
            merged["ci95"], merged["ci95_over"] = rows[0]["ci95"], "test samples"
        else:
            merged["ci95"] = {k: list(t_interval([math.nan if x is None else x for x in v]))
                              for k, v in per_seed.items()}
            merged["ci95_over"] = "seeds"
        _collapse(metrics, details, fits, label, fits[0])
        metrics["methods"][label] = merged
        if all(f in val_scores for f in fits):
            val_scores[label] = float(np.mean([val_scores.pop(f) for f in fits]))


def select_sweeps(cfg: RunConfig, metrics: dict[str, Any], details: dict[str, np.ndarray],
                  val_scores: dict[str, float]) -> None:
    """Every sweep's members in ``metrics`` and ``details`` replaced by the member chosen on val,
    under the sweep's label; ``metrics["selection"]`` added (see the module).

    ``val_scores``: each member's val balanced accuracy, by label. Ties go to the first member in
    grid order."""
    if not cfg.selections:
        return
    selection: dict[str, Any] = {}
    specs = {s.seed_of or s.label: s for s in cfg.methods}
    for label, members in cfg.selections.items():
        missing = [m for m in members if m not in val_scores]
        if missing:
            raise LongtailError(f"methods {label}: a grid is chosen on the val split, and there is none")
        val = {m: val_scores[m] for m in members}
        chosen = max(members, key=lambda m: val[m])  # max keeps the first of equal scores
        selection[label] = {
            "chosen": chosen, "name": specs[chosen].name, "params": specs[chosen].params,
            "criterion": "val balanced accuracy", "val_balanced_accuracy": val,
            "test_oracle": {m: metrics["methods"][m]["balanced_accuracy"] for m in members},
        }
        _collapse(metrics, details, members, label, chosen)
    metrics["selection"] = selection
