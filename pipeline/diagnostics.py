"""``longtail dlsa-diagnostics``: head-tail separability of each store's features (paper 004's
"feature evaluation"), from the diagnostics a method declares once its shared artifacts are
attached: for DLSA, its flow cascade, fitted (or reused) once per store with the same parameters
(its flows stopped on the val split's likelihood when the store has one); no classifier is trained.
The separation is reported on train, val and test (``separation``): on train the flows score the
samples they were fitted on, so only val and test say how separable unseen features are."""

from __future__ import annotations

import os
from typing import Any

from longtail.pipeline.config import parse_config
from longtail.pipeline.extract import existing_store
from longtail.pipeline.io import write_json
from longtail.pipeline.keys import without_device
from longtail.pipeline.methods import build_method, validate_methods
from longtail.pipeline.report.plots import plot_dlsa
from longtail.pipeline.requirements import provide
from longtail.pipeline.stores import open_features
from longtail.stages.errors import LongtailError
from longtail.stages.registry import parse_name

#: the method whose diagnostics the command reports, and their ``metrics.json`` section
METHOD, SECTION = "dlsa+ce", "dlsa"


def run_dlsa_diagnostics(stores: list[str], out_dir: str, params: dict | None = None, seed: int = 0,
                         device: str = "auto") -> dict:
    """Write ``OUT/dlsa_diagnostics.json`` = ``{"params": {...}, "stores": {URL: diagnostics}}`` and
    one plot per store, so that backbones can be compared on equal terms. ``params`` are the DLSA
    wrapper's; ``fit_seconds`` of a store is the build time of the artifacts behind its diagnostics."""
    if not stores:
        raise LongtailError("dlsa-diagnostics: name at least one store")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LongtailError(f"--out {out_dir!r} exists and is not a directory")
    wrapper = parse_name(METHOD).outer
    cfgs = [parse_config({"store": url, "output": out_dir, "seed": seed, "device": device,
                          "artifacts": os.path.join(out_dir, "cache"),
                          "methods": [{"name": METHOD, "params": {wrapper: dict(params or {})}}]},
                         source="dlsa-diagnostics")
            for url in stores]
    infos = []
    for cfg in cfgs:  # every check before any fit
        info = existing_store(cfg)
        validate_methods(cfg, open_features(cfg, info).num_classes)
        infos.append(info)
    out: dict[str, Any] = {"params": None, "stores": {}}
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    for i, (cfg, info) in enumerate(zip(cfgs, infos)):
        method, resolved = build_method(cfg, cfg.methods[0])
        fs = open_features(cfg, info)
        train = fs.read("train")  # once: the artifacts and the diagnostics
        seconds = sum(provide(cfg, req, info, train=train) for req in method.requirements())
        others = {s: fs.read(s) for s in ("val", "test") if s in fs.splits}
        others = {s: split for s, split in others.items() if split.labels is not None}
        diag = dict((method.diagnostics(train, **others) or {})[SECTION])
        diag["fit_seconds"] = seconds
        out["params"] = without_device(resolved[wrapper])
        out["stores"][info.url] = diag
        plot_dlsa(diag, f"store {i + 1}: {os.path.basename(info.url.rstrip('/'))}",
                  os.path.join(out_dir, "plots", f"dlsa-store{i + 1}.png"))
    write_json(os.path.join(out_dir, "dlsa_diagnostics.json"), out)
    return out
