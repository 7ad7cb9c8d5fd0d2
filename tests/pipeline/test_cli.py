"""The command line: every bad input is one line on stderr, exit status 2, and nothing written."""

import json
import os

import numpy as np
import pytest
from tests.pipeline.conftest import FAST, assert_user_error, invoke


def snapshot(path):
    return {os.path.join(d, p): open(os.path.join(d, p), "rb").read()
            for d, _, files in os.walk(path) for p in files}


def test_run_on_imported_store_writes_the_metrics_contract(imported_run):
    metrics = json.loads((imported_run["out"] / "metrics.json").read_text())
    assert metrics["class_counts"] == [60, 25, 10, 4]
    assert set(metrics["methods"]) == {"ce", "ce+pc"}
    keys = {"overall", "balanced_accuracy", "many", "medium", "few", "mcc", "nmi", "ece", "brier",
            "nll", "fit_seconds"}
    for m in metrics["methods"].values():
        assert keys <= set(m)
        for k in ("overall", "balanced_accuracy", "ece"):
            assert 0.0 <= m[k] <= 1.0
    assert (imported_run["out"] / "report.md").is_file()
    assert (imported_run["out"] / "report.html").is_file()


def test_stage_rerun_refits_only_that_method(imported_run):
    from longtail.storage.artifacts import ArtifactStore

    art = ArtifactStore(str(imported_run["out"] / "cache"))
    before = set(art.keys("method"))
    r = invoke("stage", "ce", "--config", imported_run["config"])
    assert r.exit_code == 0, r.output
    assert set(art.keys("method")) == before  # cached: nothing new
    r = invoke("stage", "method:ce", "--config", imported_run["config"], "--force")
    assert r.exit_code == 0, r.output
    assert set(art.keys("method")) == before  # same key, same bytes: recomputed in place of nothing
    assert_user_error(invoke("stage", "lws", "--config", imported_run["config"]), "unknown stage 'lws'")


def test_report_command_rerenders(imported_run):
    (imported_run["out"] / "report.md").unlink()
    r = invoke("report", imported_run["out"])
    assert r.exit_code == 0, r.output
    assert "ce+pc" in (imported_run["out"] / "report.md").read_text()
    assert_user_error(invoke("report", imported_run["out"] / "nope"), "metrics.json", "does not exist")


@pytest.mark.parametrize(
    "patch, needles",
    [
        ({"methods": ["no-such-method"]}, ["unknown method 'no-such-method'"]),
        ({"methods": [{"name": "ce", "params": {"epochz": 3}}]}, ["unknown parameter", "epochz"]),
        ({"colour": "red"}, ["unknown config key 'colour'"]),
        ({"store": "MISSING"}, ["MISSING", "missing"]),
        ({"dataset": "digits-lt"}, ["never overwritten", "another dataset"]),
        ({"dataset": "digits-lt", "store": "NEW", "backbone": {"kind": "torchscript", "path": "JUNK"}},
         ["JUNK", "not a readable TorchScript"]),
    ],
)
def test_bad_run_input_changes_nothing(imported_run, write_config, tmp_path, patch, needles):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    data = {"store": str(imported_run["store"]), "output": str(imported_run["out"]),
            "methods": [{"name": "ce", "params": FAST}]}
    for k, v in patch.items():
        if v == "MISSING":
            v = str(tmp_path / "missing.zarr")
        if v == "NEW":
            v = str(tmp_path / "new.zarr")
        if isinstance(v, dict) and v.get("path") == "JUNK":
            v = dict(v, path=str(junk))
        data[k] = v
    needles = [str(junk) if n == "JUNK" else str(tmp_path / "missing.zarr") if n == "MISSING" else n
               for n in needles]
    before_out, before_store = snapshot(imported_run["out"]), snapshot(imported_run["store"])
    assert_user_error(invoke("run", write_config(data, "bad.yaml"), "--no-prefect"), *needles)
    assert snapshot(imported_run["out"]) == before_out
    assert snapshot(imported_run["store"]) == before_store
    assert not (tmp_path / "new.zarr").exists()


def test_corrupt_store_is_a_user_error(tmp_path, write_config):
    store = tmp_path / "bad.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{not json")
    cfg = write_config({"store": str(store), "output": str(tmp_path / "o"), "methods": ["ce"]})
    assert_user_error(invoke("run", cfg, "--no-prefect"), "bad.zarr")


def _npz(path, x, y):
    np.savez(path, features=x, labels=y)
    return path


@pytest.mark.parametrize(
    "case, needles",
    [
        ("lengths", ["labels"]),
        ("nan", ["NaN"]),
        ("label-range", ["outside"]),
        ("no-train-sample", ["no train sample"]),
        ("empty", ["empty"]),
        ("missing-key", ["labels"]),
    ],
)
def test_bad_feature_files(tmp_path, feature_files, case, needles):
    x, y = np.load(feature_files["train"])["features"], np.load(feature_files["train"])["labels"]
    bad = tmp_path / "bad.npz"
    extra = []
    if case == "lengths":
        _npz(bad, x, y[:-3])
    elif case == "nan":
        x = x.copy()
        x[3, 2] = np.nan
        _npz(bad, x, y)
    elif case == "label-range":
        _npz(bad, x, y)
        extra = ["--class-names", "a,b,c"]
    elif case == "no-train-sample":
        keep = y != 2
        _npz(bad, x[keep], y[keep])
    elif case == "empty":
        _npz(bad, x[:0], y[:0])
    elif case == "missing-key":
        np.savez(bad, features=x, targets=y)
    out = tmp_path / "s.zarr"
    r = invoke("import-features", "--train", bad, "--test", feature_files["test"], "--out", out, *extra)
    assert_user_error(r, *needles)
    assert not out.exists() or not any(out.iterdir())


def test_import_never_overwrites_a_complete_store(imported_run, feature_files):
    before = snapshot(imported_run["store"])
    r = invoke("import-features", "--train", feature_files["test"], "--test", feature_files["test"],
               "--out", imported_run["store"])
    assert_user_error(r, "never overwritten")
    assert snapshot(imported_run["store"]) == before


def test_usage_errors_exit_2(tmp_path):
    assert invoke("run").exit_code == 2
    assert invoke("frobnicate").exit_code == 2
    assert_user_error(invoke("run", tmp_path / "nope.yaml"), "nope.yaml", "does not exist")


def test_parameter_errors_fail_before_any_fit(imported_run, write_config, tmp_path):
    out = tmp_path / "fresh-out"
    for params, needle in (({"pc": {"target_prior": [0.5, 0.5, -0.2, 0.2]}}, "negative"),
                           ({"pc": {"target_prior": [0.5, 0.5]}}, "target_prior"),
                           ({"lr": -1}, "lr")):
        cfg = write_config({"store": str(imported_run["store"]), "output": str(out),
                            "methods": [{"name": "ce+pc", "params": params}]}, "p.yaml")
        assert_user_error(invoke("run", cfg), needle)
        assert not out.exists()  # no cache, no fit, no Prefect run
