"""The meta-learned heads in the pipeline: one meta set (drawn from val) for both, the ``meta``
section of metrics.json and the report, and a store without val split."""

import pytest

from longtail.pipeline import graph
from longtail.pipeline.config import parse_config
from longtail.pipeline.report.meta import meta_sections
from tests.pipeline.conftest import assert_user_error, invoke

FAST = {"epochs": 4, "min_steps": 0, "batch_size": 32, "meta_start": 0.5, "meta_batch": 20}


def test_meta_heads_share_one_meta_set_and_report_what_moved(imported_run, tmp_path, monkeypatch):
    from longtail.stages.meta import metaset

    built = []
    real = metaset.build_meta_set

    def counting(split, **kw):
        built.append(split.name)
        return real(split, **kw)

    monkeypatch.setattr(metaset, "build_meta_set", counting)
    cfg = parse_config({"store": str(imported_run["store"]), "output": str(tmp_path / "o"),
                        "methods": [{"name": "meta-cb", "params": {**FAST, "tau": 0.0}},
                                    {"name": "metalad", "params": {**FAST, "eta2": 1e3}}]})
    metrics = graph.run_all(cfg)
    assert built == ["val"]  # one artifact, built on the val split, attached to both
    meta = metrics["meta"]
    assert meta["meta-cb"]["meta_rows"] == 40 and meta["meta-cb"]["meta_source"] == "val"  # 10 of 15 per class
    assert meta["meta-cb"]["eps_scale"][3] == 0.0 and meta["metalad"]["lambda_moved"][3] > 0
    table = meta_sections(metrics)[0]
    verdicts = {row[0]: row[-1] for row in table["rows"]}
    assert verdicts == {"meta-cb": "barely moved", "metalad": "moved"}
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## Meta-learned re-weighting" in report and "## Conditional weights per class (meta-cb)" in report


def test_store_without_val_split(tmp_path, feature_files, write_config):
    store = tmp_path / "noval.zarr"
    r = invoke("import-features", "--train", feature_files["train"], "--test", feature_files["test"], "--out", store)
    assert r.exit_code == 0, r.output
    bad = write_config({"store": str(store), "output": str(tmp_path / "a"),
                        "methods": [{"name": "meta-cb", "params": FAST}]}, name="a.yaml")
    assert_user_error(invoke("run", bad, "--no-prefect"), "'val'", "meta-set", "source: val", "method 'meta-cb'")
    good = write_config({"store": str(store), "output": str(tmp_path / "b"),
                         "methods": [{"name": "metalad", "params": {**FAST, "meta_source": "train",
                                                                     "meta_per_class": 3}}]}, name="b.yaml")
    r = invoke("run", good, "--no-prefect")
    assert r.exit_code == 0, r.output
