"""The report's tables of the meta-learned methods, from ``metrics.json``'s ``meta`` section.

Every payload there (one per method label) has ``method``, ``meta_source``, ``meta_rows``,
``meta_start_epoch`` and ``meta_loss`` (per epoch, ``None`` before the meta stage); what moved is
method-specific: ``eps_scale`` (``meta-cb``: mean ``|ε|`` over mean class weight of the rows, per epoch) or
``lambda_moved`` and ``delta_mean_abs`` (``metalad``: the largest ``|Λ − Λ_0|``, the mean size of the
adjustment). A payload without either is reported with its meta loss only. The table says when a meta
step barely moved anything (below :data:`BARELY`), so that "no gain" is told apart from "the meta step
did nothing".
"""

from __future__ import annotations

from typing import Any

#: below this relative size, the meta step "barely moved" the meta variables: |ε| under 1% of the
#: class weights, or coefficients that moved by less than 0.01 from their start (1)
BARELY = 0.01


def _last(values: list | None) -> float | None:
    finite = [v for v in (values or []) if v is not None]
    return finite[-1] if finite else None


def _first(values: list | None) -> float | None:
    finite = [v for v in (values or []) if v is not None]
    return finite[0] if finite else None


def _mean(values: list | None) -> float | None:
    finite = [v for v in (values or []) if v is not None]
    return sum(finite) / len(finite) if finite else None


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def movement(diag: dict[str, Any]) -> tuple[str, float | None, str]:
    """``(what moved, its size, verdict)`` of one payload; the size is the largest over the meta stage."""
    if diag.get("eps_scale") is not None:
        size = max((v for v in diag["eps_scale"] if v is not None), default=None)
        what = "mean |eps| / mean w"
    elif diag.get("lambda_moved") is not None:
        size = max((v for v in diag["lambda_moved"] if v is not None), default=None)
        what = "max |lambda - lambda_0|"
    elif diag.get("delta_mean_abs") is not None:  # meta-cala: the adjustment itself, from 0, in logits
        size = max((v for v in diag["delta_mean_abs"] if v is not None), default=None)
        what = "max mean |delta| (logits)"
    else:
        return "n/a", None, "n/a"
    if size is None:
        return what, None, "no meta step"
    return what, size, "barely moved" if size < BARELY else "moved"


def meta_sections(metrics: dict) -> list[dict]:
    """The summary table of every meta-learned method, and for ``meta-cb`` the per-class mean
    conditional weight over the meta stage (paper 003, fig. 3); ``[]`` without a ``meta`` section."""
    meta = metrics.get("meta") or {}
    if not meta:
        return []
    rows = []
    for name, diag in meta.items():
        what, size, verdict = movement(diag)
        coeffs = diag.get("lambda_mean") or {}
        learned = ", ".join(f"{t} {_g(_last(v))}" for t, v in coeffs.items()) or "n/a"
        start = diag.get("meta_start_epoch")
        rows.append([name, f"{diag.get('meta_rows', 'n/a')} ({diag.get('meta_source', 'n/a')})",
                     "n/a" if start is None else str(int(start) + 1), _g(_first(diag.get("meta_loss"))),
                     _g(_last(diag.get("meta_loss"))), f"{what}: {_g(size)}", _g(_last(diag.get("delta_mean_abs"))),
                     learned, verdict])
    out = [{
        "title": "Meta-learned re-weighting",
        "text": "Per meta-learned method: the meta set (rows, split), the first meta-stage epoch (from 1), the "
                "plain CE (or the method's loss) of the meta batches at the look-ahead, first and last meta epoch; what the "
                "meta step moved (meta-cb: mean conditional weight |eps| over mean class weight; metalad: "
                "largest change of a coefficient), the mean size of the logit adjustment (metalad: mean over "
                "non-target classes of |delta|) and the learned mean coefficient per term at the end. "
                f"\"barely moved\" (size below {BARELY}): the method trained as its non-meta base "
                "(cb-ce after a CE warm-up; the fixed-coefficient loss), so no gain is no evidence against "
                "meta-learning; raise tau or eta2.",
        "columns": ["Method", "Meta rows", "Meta from epoch", "Meta loss first", "Meta loss last", "Moved",
                    "Mean |delta|", "Mean coefficients (last)", "Verdict"],
        "rows": rows,
    }]
    eps = {n: d for n, d in meta.items() if d.get("eps_class_mean")}
    if eps:
        names = metrics.get("class_names") or []
        c = len(next(iter(eps.values()))["eps_class_mean"][0])
        labels = [names[i] if i < len(names) else str(i) for i in range(c)]
        shown = list(range(c)) if c <= 12 else list(range(6)) + list(range(c - 6, c))
        table = []
        for n, d in eps.items():
            per_class = [_mean([row[i] for row in d["eps_class_mean"]]) for i in range(c)]
            table.append([n] + [_g(per_class[i]) for i in shown])
        out.append({
            "title": "Conditional weights per class (meta-cb)",
            "text": "Mean conditional weight eps of each class over the batches of the meta stage (paper 003, "
                    "fig. 3: larger for tail classes, head classes sometimes below 0); classes in index order"
                    + ("" if c <= 12 else ", the first and last six") + ". Per epoch in metrics.json "
                    "(meta.<method>.eps_class_mean).",
            "columns": ["Method"] + [labels[i] for i in shown],
            "rows": table,
        })
    return out
