"""``longtail calibrate``: the deployment label prior of another store's features, estimated from
the configured methods' logits, and every method post-compensated to it (``calibration.json``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from longtail.pipeline.config import RunConfig
from longtail.pipeline.extract import existing_store
from longtail.pipeline.graph import run_methods
from longtail.pipeline.io import write_json
from longtail.pipeline.methods import load_method, method_logits, split_logits, validate_methods
from longtail.stages.calibrate import post_compensate
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import accuracy
from longtail.stages.label_shift import BCTSCalibration, estimate_prior, positive_prior, total_variation
from longtail.stages.priors import ESTIMATORS
from longtail.storage.featurestore import open_store


def _same_backbone(source, target) -> bool:
    """Stores made by longtail's extraction carry a weights hash; imported stores do not know their
    backbone, so for them only the feature dimension can be checked."""
    kinds = {(source.backbone or {}).get("kind"), (target.backbone or {}).get("kind")}
    if "imported" in kinds:
        return True
    return source.backbone_hash == target.backbone_hash


#: the calibrations EM can run on (``--calibration``)
CALIBRATIONS = ("bcts", "none")


def run_calibrate(cfg: RunConfig, target_url: str, how: str = "em", split: str = "test",
                  out_dir: str | None = None, calibration: str = "bcts") -> dict:
    """Estimate the deployment label prior of ``target_url``'s ``split`` from its features and
    post-compensate every configured method to it; write ``OUT/calibration.json``.

    EM runs by default on posteriors calibrated by BCTS on the source store's val split
    (:mod:`stages.bcts`; ``calibration="none"``: on the method's posteriors as they are), and each
    method is then post-compensated from the prior its (calibrated) logits carry to the estimate.

    ``estimated_prior`` is the estimate of the first configured method (``estimated_priors`` has
    each method's own); each method's ``accuracy_estimated_prior`` uses its own estimate. Accuracies
    are null when the target split has no labels.
    """
    if how not in ESTIMATORS:
        raise LongtailError(f"--method {how!r}: use one of {', '.join(ESTIMATORS)}")
    if calibration not in CALIBRATIONS:
        raise LongtailError(f"--calibration {calibration!r}: use one of {', '.join(CALIBRATIONS)}")
    calibrated = how == "em" and calibration == "bcts"
    out_dir = out_dir or cfg.output
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LongtailError(f"--out {out_dir!r} exists and is not a directory")
    validate_methods(cfg)
    source = existing_store(cfg)
    src = open_store(source.url, storage_options=cfg.storage_options)
    tgt = open_store(target_url, storage_options=cfg.storage_options)
    tgt.verify()  # as a run does with the model's store: an edited target is one line, before any estimate
    if split not in tgt.splits:
        raise LongtailError(f"target store {target_url!r} has no split {split!r} (it has {', '.join(tgt.splits)})")
    if tgt.feature_dim != src.feature_dim:
        raise LongtailError(f"target store {target_url!r} has features of dimension {tgt.feature_dim}, "
                            f"the model's store {cfg.store!r} {src.feature_dim}")
    if not _same_backbone(src, tgt):
        raise LongtailError(f"target store {target_url!r} was extracted with another backbone (weights "
                            f"{tgt.backbone_hash}) than the model's store {cfg.store!r} ({src.backbone_hash})")
    if tgt.num_classes != src.num_classes:
        raise LongtailError(f"target store {target_url!r} has {tgt.num_classes} classes, the model's store {src.num_classes}")
    # the target's features are only ever read chunk by chunk (split_logits); its labels whole
    labels = [y for _, y, _ in tgt.iter_chunks(split)] if tgt.has_labels(split) else None
    target_labels = None if labels is None else np.concatenate(labels)
    if how == "bbse" and "val" not in src.splits:
        raise LongtailError(f"--method bbse needs a labelled val split in {cfg.store!r}")
    if calibrated and "val" not in src.splits:
        raise LongtailError(f"--calibration bcts (the default for EM) is fitted on a labelled val split, and "
                            f"{cfg.store!r} has none: give it one, or pass --calibration none")
    val = src.read("val") if "val" in src.splits else None
    results = run_methods(cfg, source)
    true_prior = None
    if target_labels is not None:
        true_prior = np.bincount(target_labels, minlength=src.num_classes).astype(np.float64)
        true_prior /= true_prior.sum()  # labels is non-empty (FeatureSet refuses empty splits)

    def acc(z):
        return None if target_labels is None else accuracy(z, target_labels)

    out: dict[str, Any] = {"method": how, "calibration": calibration if how == "em" else "none", "split": split, "estimated_prior": None, "methods": {},
                           "estimated_priors": {}, "target": target_url}
    if true_prior is not None:
        out["true_prior"] = true_prior.tolist()
        out["estimation_error"] = {}
    for r in results:
        method = load_method(cfg, r.key)
        logits = split_logits(method, tgt, split)
        lp = method.logit_prior()
        val_logits = method_logits(cfg, r.key, "val") if val is not None else None
        bcts = BCTSCalibration(val_logits, val.labels) if calibrated else None
        est = estimate_prior(how, logits, lp, val_logits, None if val is None else val.labels, calibration=bcts)
        compensated = (post_compensate(logits, lp, positive_prior(est)) if bcts is None
                       else post_compensate(bcts(logits), bcts.prior, positive_prior(est)))
        entry = {"accuracy_uncompensated": acc(logits),
                 "accuracy_estimated_prior": acc(compensated),
                 "accuracy_true_prior": None if true_prior is None else acc(post_compensate(logits, lp, positive_prior(true_prior)))}
        out["methods"][r.name] = entry
        out["estimated_priors"][r.name] = est.tolist()
        if true_prior is not None:
            out["estimation_error"][r.name] = total_variation(est, true_prior)
        if out["estimated_prior"] is None:
            out["estimated_prior"] = est.tolist()
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "calibration.json"), out)
    return out
