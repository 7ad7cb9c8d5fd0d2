"""Stage 3, evaluation: every configured method on the test split (metrics, calibration, shot
groups, (class, attribute) groups, shifted label distributions, the diagnostics methods declare),
written to ``metrics.json`` and ``evaluation.npz``, keyed by its inputs."""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

from longtail.pipeline.combine import aggregate_seeds, balanced_accuracy, select_sweeps
from longtail.pipeline.config import RunConfig
from longtail.pipeline.io import drop_commit, read_commit, write_bytes, write_commit, write_json
from longtail.pipeline.keys import code_version, stable_hash
from longtail.pipeline.methods import MethodResult, load_method, method_logits
from longtail.pipeline.stores import StoreInfo, open_features
from longtail.stages import evaluate as ev
from longtail.stages.base import Method
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate.intervals import bootstrap_intervals
from longtail.stages.label_shift import shifted_evaluation


def evaluate_code_version() -> str:
    """Source hash of the evaluation: this module's import closure (metrics, label shift, prior
    estimators, group metrics; not extraction code)."""
    return code_version([__name__])


# ---------------------------------------------------------------------------- group metrics
def use_groups(cfg: RunConfig, test_has_attributes: bool, where: str) -> bool:
    """Whether the evaluation computes group metrics; an error when they are required
    (``evaluation.groups: true``) and ``where`` (a store or dataset) has no test attributes."""
    wanted = cfg.evaluation.groups
    if wanted and not test_has_attributes:
        raise LongtailError(
            f"evaluation.groups is true but the test split of {where} has no attributes: group metrics "
            "need an attribute per test sample (import-features takes an 'attributes' array per file)"
        )
    return test_has_attributes if wanted is None else bool(wanted)


def group_info(test, attribute_names: list[str] | None) -> dict:
    """``metrics.json``'s ``groups``: the test samples per (class, attribute) group and the names."""
    counts = ev.group_counts(test.labels, test.attributes, test.num_classes, len(attribute_names or []) or None)
    names = list(attribute_names or [])
    names += [str(a) for a in range(len(names), counts.shape[1])]
    return {"attribute_names": names, "test_counts": counts.tolist()}


# ---------------------------------------------------------------------------- keys and lineage
def evaluate_inputs(cfg: RunConfig, store: StoreInfo, results: list[MethodResult]) -> dict:
    """What ``metrics.json`` depends on: the features, every method's artifact, the evaluation
    settings, the seed (shifted subsets) and the evaluation code."""
    return {"store_fingerprint": store.fingerprint, "artifacts": {r.name: r.key for r in results},
            "evaluation": cfg.evaluation.model_dump(mode="json"), "seed": cfg.seed,
            "code_version": evaluate_code_version()}


def evaluate_key(inputs: dict) -> str:
    """The key of ``metrics.json`` written from ``inputs`` (:func:`evaluate_inputs`)."""
    return stable_hash("evaluate", inputs)


def recorded_evaluate(metrics: dict | None) -> dict:
    """``lineage.evaluate`` (``{"key", "inputs"}``) of a ``metrics.json`` read back; {} when absent."""
    return ((metrics or {}).get("lineage") or {}).get("evaluate") or {}


#: the commit record of ``metrics.json`` and ``evaluation.npz`` (written last, see :func:`run_evaluate`)
EVALUATE_COMMIT = ".evaluate-commit.json"
EVALUATE_FILES = ["metrics.json", "evaluation.npz"]


def evaluation_problem(out_dir: str) -> str | None:
    """None when ``metrics.json`` and ``evaluation.npz`` of ``out_dir`` are one committed
    evaluation (both as written, by one run); otherwise why not."""
    key, problem = read_commit(out_dir, EVALUATE_COMMIT)
    if problem is None and recorded_evaluate(read_metrics(out_dir)).get("key") != key:
        return f"metrics.json was not written with {EVALUATE_COMMIT}"
    return problem


def read_metrics(out_dir: str) -> dict | None:
    """``OUT/metrics.json`` of an earlier run, or None when absent or unreadable."""
    try:
        with open(os.path.join(out_dir, "metrics.json"), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return None
    return doc if isinstance(doc, dict) else None


def declares_diagnostics(method: Method) -> bool:
    """Whether a method of the chain overrides :meth:`Method.diagnostics` (only then is the train
    split read for it)."""
    return any(type(m).diagnostics is not Method.diagnostics for m in method.chain())


def method_diagnostics(method: Method, train) -> dict[str, Any]:
    """``{metrics.json section: payload}`` of every method of the chain (the outermost wins a section)."""
    out: dict[str, Any] = {}
    for m in method.chain():
        for section, payload in (m.diagnostics(train) or {}).items():
            out.setdefault(section, payload)
    return out


# ---------------------------------------------------------------------------- the stage
def run_evaluate(cfg: RunConfig, store: StoreInfo, results: list[MethodResult], force: bool = False) -> dict:
    """Evaluate every configured method on the test split; write ``metrics.json`` and the
    per-class details the report plots from (``evaluation.npz``), committed as one by the record
    :data:`EVALUATE_COMMIT` (hashes of both, written last).

    Keyed like every stage: when ``metrics.json`` was written from the same inputs (see
    :func:`evaluate_inputs`) and both files still match their commit record, it is returned as it
    is (NaN metrics read back as None)."""
    inputs = evaluate_inputs(cfg, store, results)
    key = evaluate_key(inputs)
    previous = None if force else read_metrics(cfg.output)
    if (previous is not None and recorded_evaluate(previous).get("key") == key
            and evaluation_problem(cfg.output) is None):
        return previous
    fs = open_features(cfg, store)
    test = fs.read("test")
    labels = test.require_labels()
    e = cfg.evaluation
    metrics: dict[str, Any] = {
        "dataset": fs.attrs.get("dataset") or (cfg.dataset.name if cfg.dataset else "imported"),
        "class_counts": [int(c) for c in test.class_counts],
        "methods": {},
    }
    many, medium, few, rule = ev.shot_groups(test.class_counts, many_threshold=e.many_threshold,
                                             few_threshold=e.few_threshold, split_rule=e.split_rule)
    details: dict[str, np.ndarray] = {"labels": labels}
    val = fs.read("val") if "val" in fs.splits else None
    val_labels = val.labels if val is not None else None
    label_shift: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}  # diagnostics the methods declare, by metrics.json section
    train = None
    groups = use_groups(cfg, test.attributes is not None, f"store {store.url!r}")
    choosing = {s.label for s in cfg.methods if s.select_for}  # fits whose val score a sweep compares
    val_scores: dict[str, float] = {}
    for r in results:
        logits = method_logits(cfg, r.key, "test")
        m = ev.evaluate(logits, labels, test.class_counts, many_threshold=e.many_threshold,
                        few_threshold=e.few_threshold, split_rule=e.split_rule, ece_bins=e.ece_bins)
        m["fit_seconds"] = float(r.fit_seconds)
        m["classwise_ece"] = ev.classwise_ece(ev.softmax(logits), labels, e.ece_bins)
        m["seeds"] = 1  # a seed group's fits are averaged below, with a t-interval over seeds
        m["ci95"] = {k: list(v) for k, v in bootstrap_intervals(
            logits, labels, {"many": many, "medium": medium, "few": few}, seed=cfg.seed).items()}
        m["ci95_over"] = "test samples"
        if r.name in choosing and val_labels is not None:
            val_scores[r.name] = balanced_accuracy(method_logits(cfg, r.key, "val"), val_labels)
        if groups:
            m |= ev.group_metrics(logits, labels, test.attributes)
        metrics["methods"][r.name] = m
        details[f"logits/{r.name}"] = logits
        method = load_method(cfg, r.key)  # once per method, for its logit prior and diagnostics
        if e.shift_ratios:
            val_logits = method_logits(cfg, r.key, "val") if val_labels is not None else None
            label_shift[r.name] = shifted_evaluation(
                logits, labels, test.class_counts, method.logit_prior(),
                val_logits=val_logits, val_labels=val_labels, ratios=e.shift_ratios, seed=cfg.seed)
        if declares_diagnostics(method):
            train = train if train is not None else fs.read("train")  # read once for every method
            for section, payload in method_diagnostics(method, train).items():
                sections.setdefault(section, {})[r.name] = payload
    if label_shift:
        metrics["label_shift"] = label_shift
    for section, per_method in sections.items():
        if section in metrics:
            raise RuntimeError(f"a method's diagnostics section {section!r} clashes with a metrics.json key")
        metrics[section] = per_method
    aggregate_seeds(cfg, metrics, details, val_scores)
    select_sweeps(cfg, metrics, details, val_scores)
    if groups:
        metrics["groups"] = group_info(test, fs.attrs.get("attribute_names"))
    metrics["shot_rule"] = {"split_rule": e.split_rule, "many_threshold": e.many_threshold,
                            "few_threshold": e.few_threshold}
    metrics["shot_groups"] = {"rule": rule, "many": [int(i) for i in many],
                              "medium": [int(i) for i in medium], "few": [int(i) for i in few],
                              "many_threshold": e.many_threshold, "few_threshold": e.few_threshold}
    metrics["class_names"] = list(test.class_names)
    metrics["lineage"] = {"store": store.url, "store_fingerprint": store.fingerprint,
                          "backbone": fs.attrs.get("backbone"), "seed": cfg.seed,
                          "artifacts": {r.name: r.key for r in results},
                          "evaluate": {"key": key, "inputs": inputs}}
    os.makedirs(cfg.output, exist_ok=True)
    # one commit: the record goes first and comes back last, so that a crash between the two
    # writes leaves files nobody trusts (they are evaluated again), never a mixed pair
    drop_commit(cfg.output, EVALUATE_COMMIT)
    write_json(os.path.join(cfg.output, "metrics.json"), metrics)
    buf = io.BytesIO()
    np.savez_compressed(buf, **details)
    write_bytes(os.path.join(cfg.output, "evaluation.npz"), buf.getvalue())
    write_commit(cfg.output, EVALUATE_COMMIT, key, EVALUATE_FILES)
    return metrics

