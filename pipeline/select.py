"""Val-selected sweeps: a method entry with a ``grid`` (``{name: logit-adjust, grid: {tau: [0.5, 1,
1.5, 2]}}``) is fitted once per combination, each member a cached method of its own
(:func:`pipeline.config.expand_grids`); evaluation keeps, under the entry's label, the member with
the best balanced accuracy on the **val** split, records the chosen parameters and every member's
val score under ``metrics.json``'s ``selection``, and shows the members' test scores only as a
test-set oracle (``selection.LABEL.test_oracle``), never used to choose.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from longtail.pipeline.config import RunConfig
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import per_class_accuracy


def check_selections(cfg: RunConfig, splits) -> None:
    """A sweep chooses on the val split: refuse a store without one before any fit."""
    if cfg.selections and "val" not in splits:
        raise LongtailError(f"methods {', '.join(cfg.selections)}: a grid is chosen on the val split, and store "
                            f"{cfg.store!r} has none (give it a val split, or list each combination with its own label)")


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class accuracy over the classes present in ``labels``."""
    c = logits.shape[1]
    per = per_class_accuracy(logits.argmax(axis=1), labels, c)
    present = np.bincount(labels, minlength=c) > 0
    return float(np.mean(per[present]))


def _rename(section: dict, members: list[str], label: str, chosen: str) -> dict:
    """``section`` with the members' entries replaced, at the first member's place, by the chosen
    member's under ``label``."""
    out: dict = {}
    for name, value in section.items():
        if name in members:
            if name == members[0] and chosen in section:
                out[label] = section[chosen]
            continue
        out[name] = value
    return out


def select_sweeps(cfg: RunConfig, metrics: dict[str, Any], details: dict[str, np.ndarray],
                  val_logits: dict[str, np.ndarray], val_labels: np.ndarray | None) -> None:
    """Replace every sweep's members in ``metrics`` (its method table and per-method sections) and
    ``details`` by the member chosen on val, under the sweep's label; add ``metrics["selection"]``.

    ``val_logits``: each member's val logits, by label. Ties go to the first member in grid order."""
    if not cfg.selections:
        return
    if val_labels is None:
        raise LongtailError(f"methods {', '.join(cfg.selections)}: a grid is chosen on the val split, and the "
                            "store has none")
    selection: dict[str, Any] = {}
    for label, specs in cfg.selections.items():
        members = [s.label for s in specs]
        val = {m: balanced_accuracy(val_logits[m], val_labels) for m in members}
        chosen = max(members, key=lambda m: val[m])  # max keeps the first of equal scores
        spec = specs[members.index(chosen)]
        selection[label] = {
            "chosen": chosen, "name": spec.name, "params": spec.params, "criterion": "val balanced accuracy",
            "val_balanced_accuracy": val,
            "test_oracle": {m: metrics["methods"][m]["balanced_accuracy"] for m in members},
        }
        for key, section in list(metrics.items()):
            if isinstance(section, dict) and chosen in section and all(m in section for m in members):
                metrics[key] = _rename(section, members, label, chosen)
        for m in members:
            value = details.pop(f"logits/{m}")
            if m == chosen:
                details[f"logits/{label}"] = value
    metrics["selection"] = selection
