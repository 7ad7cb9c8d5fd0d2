"""The Prefect flow on digits-lt: it really runs, and a second run recomputes nothing."""

import json

import pytest

from longtail.pipeline.config import parse_config


def test_flow_runs_and_second_run_skips_everything(harness, tmp_path, monkeypatch):
    from longtail.flows.pipeline_flow import longtail_flow
    from longtail.stages import base, extract

    config = {
        "store": str(tmp_path / "features.zarr"),
        "dataset": "digits-lt",
        "backbone": {"kind": "builtin", "epochs": 3, "width": 8},
        "methods": [{"name": "ce", "params": {"epochs": 10}},
                    {"name": "balanced-softmax", "params": {"epochs": 10}},
                    {"name": "ce+pc", "params": {"epochs": 10}},
                    {"name": "dlsa+ce", "params": {"epochs": 10, "dlsa": {"flow_epochs": 2, "num_clusters": 5,
                                                                          "flow_hidden": 16}}}],
        "output": str(tmp_path / "out"),
    }
    parse_config(config)  # the same mapping the CLI passes
    metrics = longtail_flow(config)
    assert set(metrics["methods"]) == {"ce", "balanced-softmax", "ce+pc", "dlsa+ce"}
    assert len(metrics["dlsa"]["dlsa+ce"]["filters"]) == 3
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["dataset"] == "digits-lt"
    assert written["class_counts"] == [104, 75, 53, 38, 27, 20, 14, 10, 7, 5]
    # the ce fit is shared: ce+pc reuses it, so both report the same fit time
    assert written["methods"]["ce+pc"]["fit_seconds"] >= written["methods"]["ce"]["fit_seconds"]

    def boom(*args, **kwargs):
        raise AssertionError("recomputed on a run whose inputs did not change")

    monkeypatch.setattr(extract, "train_small_cnn", boom)
    monkeypatch.setattr(extract, "extract_chunks", boom)
    monkeypatch.setattr(base.Method, "fit", boom)
    from longtail.stages import dlsa

    monkeypatch.setattr(dlsa.FlowCascade, "fit", boom)
    again = longtail_flow(config)
    for name, m in metrics["methods"].items():
        assert again["methods"][name] == m
