"""Labelled variants and val-selected sweeps (``label``, ``grid``) end to end through ``longtail run``."""

import json

import numpy as np
import pytest

from longtail.pipeline.config import parse_config
from longtail.pipeline.select import balanced_accuracy
from longtail.stages.errors import LongtailError
from tests.pipeline.conftest import FAST, assert_user_error, invoke


@pytest.fixture
def store(tmp_path, feature_files):
    path = tmp_path / "s.zarr"
    r = invoke("import-features", "--train", feature_files["train"], "--val", feature_files["val"],
               "--test", feature_files["test"], "--out", path)
    assert r.exit_code == 0, r.output
    return path


def _cfg(tmp_path, store, methods):
    return {"store": str(store), "output": str(tmp_path / "out"), "methods": methods}


def test_a_sweep_is_chosen_on_val_and_labels_list_one_method_twice(tmp_path, store, write_config):
    methods = [{"name": "logit-adjust", "grid": {"tau": [0.0, 1.0, 2.0]}, "params": FAST},
               {"name": "ce", "label": "ce-short", "params": {"epochs": 2, "batch_size": 64}},
               {"name": "ce", "label": "ce-long", "params": {"epochs": 8, "batch_size": 64}}]
    r = invoke("run", write_config(_cfg(tmp_path, store, methods)), "--no-prefect")
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["logit-adjust", "ce-short", "ce-long"]
    assert metrics["methods"]["ce-short"] != metrics["methods"]["ce-long"]
    sel = metrics["selection"]["logit-adjust"]
    members = ["logit-adjust[tau=0.0]", "logit-adjust[tau=1.0]", "logit-adjust[tau=2.0]"]
    assert list(sel["val_balanced_accuracy"]) == members
    # the choice, recomputed by hand from each member's cached val logits
    from longtail.pipeline.config import load_config
    from longtail.pipeline.methods import method_logits

    cfg = load_config(str(tmp_path / "config.yaml"))
    val_labels = np.load(tmp_path / "val.npz")["labels"]
    val = {m: balanced_accuracy(method_logits(cfg, metrics["lineage"]["artifacts"][m], "val"), val_labels)
           for m in members}
    assert sel["val_balanced_accuracy"] == pytest.approx(val)
    assert sel["chosen"] == max(members, key=lambda m: val[m])
    assert sel["params"]["tau"] == float(sel["chosen"].split("=")[1].rstrip("]"))
    # the label's scores are the chosen member's test scores; the others' only in the oracle
    assert metrics["methods"]["logit-adjust"]["balanced_accuracy"] == sel["test_oracle"][sel["chosen"]]
    assert set(metrics["label_shift"]) == {"logit-adjust", "ce-short", "ce-long"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Sweeps chosen on val" in report and "Test-set oracle of the sweeps (not used to choose)" in report
    with np.load(tmp_path / "out" / "evaluation.npz") as ev:
        assert "logits/logit-adjust" in ev.files and not [f for f in ev.files if "[" in f]
    # a member is a stage of its own
    r = invoke("stage", "method:ce-long", "--config", tmp_path / "config.yaml")
    assert r.exit_code == 0, r.output
    r = invoke("status", tmp_path / "config.yaml")
    assert "method:logit-adjust[tau=2.0]" in r.output and "method:ce-short" in r.output


@pytest.mark.parametrize("methods, needle", [
    ([{"name": "ce", "grid": {"lr": []}}], "grid.lr must be a non-empty list"),
    ([{"name": "ce", "grid": {}}], "grid must be a non-empty mapping"),
    (["ce", {"name": "ce", "params": {"epochs": 2}}], "ce listed more than once"),
    ([{"name": "ce", "label": "x"}, {"name": "focal", "label": "x"}], "x listed more than once"),
    ([{"name": "ce", "params": {"lr": 0.1}, "grid": {"lr": [0.1, 0.2]}}], "'lr' is both in params and in grid"),
])
def test_bad_sweeps_and_labels_are_config_errors(methods, needle):
    with pytest.raises(LongtailError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        parse_config({"store": "s", "output": "o", "methods": methods})


def test_a_grid_over_an_unknown_parameter_fails_before_any_fit(tmp_path, store, write_config):
    cfg = write_config(_cfg(tmp_path, store, [{"name": "ce", "grid": {"tua": [1, 2]}}]))
    assert_user_error(invoke("run", cfg, "--no-prefect"), "tua")
    assert not (tmp_path / "out").exists()


def test_a_grid_on_a_store_without_val_fails_before_any_fit(tmp_path, feature_files, write_config):
    path = tmp_path / "noval.zarr"
    assert invoke("import-features", "--train", feature_files["train"], "--test", feature_files["test"],
                  "--out", path).exit_code == 0
    cfg = write_config(_cfg(tmp_path, path, ["ce", {"name": "logit-adjust", "grid": {"tau": [0.5, 1.0]}}]))
    assert_user_error(invoke("run", cfg, "--no-prefect"), "logit-adjust", "val split")
    assert not (tmp_path / "out" / "cache").exists()
