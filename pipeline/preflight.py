"""Every check that can fail on user input, run before anything is written."""

from __future__ import annotations

import os

from longtail.pipeline.config import RunConfig
from longtail.pipeline.evaluate import use_groups
from longtail.pipeline.extract import complete_store, planned_extract
from longtail.pipeline.methods import validate_methods
from longtail.stages.errors import LongtailError
from longtail.storage.featurestore import open_store, store_status


def preflight(cfg: RunConfig, run_code: bool = True) -> None:
    """Methods (names, targets, parameters), the output directory, the store and the dataset, and
    the group metrics the evaluation would compute. ``run_code=False`` (``deploy --dry-run``): a
    ``python`` backbone is located and hashed, not built (see :func:`planned_extract`)."""
    validate_methods(cfg)
    if os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        raise LongtailError(f"output {cfg.output!r} exists and is not a directory")
    status = store_status(cfg.store, storage_options=cfg.storage_options)
    if cfg.dataset is None:
        if status != "complete":
            raise LongtailError(f"store {cfg.store!r} is {status} and the config names no dataset to extract it from")
        fs = open_store(cfg.store, storage_options=cfg.storage_options)
        validate_methods(cfg, fs.num_classes, fs.splits)
        use_groups(cfg, fs.has_attributes("test"), f"store {cfg.store!r}")
        return
    ds, _, key = planned_extract(cfg, run_code=run_code)
    validate_methods(cfg, ds.num_classes, tuple(ds.splits))
    use_groups(cfg, ds.splits["test"].attributes is not None, f"dataset {ds.name!r}")
    if status == "complete" and key is not None:
        complete_store(cfg, key, ds.fingerprint, verify=False)  # the run verifies it
