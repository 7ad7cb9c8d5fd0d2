"""Labelled variants and val-selected sweeps (``label``, ``grid``) end to end through ``longtail run``."""

import json

import numpy as np
import pytest

from longtail.pipeline.config import parse_config
from longtail.pipeline.combine import balanced_accuracy
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


def test_seeds_average_the_fits_with_a_t_interval(tmp_path, store, write_config):
    # minibatch SGD: the converged default (L-BFGS) gives every seed the same fit on a fixed store
    methods = [{"name": "ce", "params": {**FAST, "solver": "sgd"}}, {"name": "ce+pc", "params": FAST},
               {"name": "logit-adjust", "grid": {"tau": [0.0, 1.0]}, "params": FAST}]
    cfg = write_config({**_cfg(tmp_path, store, methods), "seeds": [0, 1, 2]})
    r = invoke("run", cfg, "--no-prefect")
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["ce", "ce+pc", "logit-adjust"]
    ce = metrics["methods"]["ce"]
    assert ce["seeds"] == 3 and ce["ci95_over"] == "seeds"
    values = ce["per_seed"]["balanced_accuracy"]
    assert len(set(values)) > 1  # the seed reaches the fit
    # the t-interval by hand: t_{0.975, 2} = 4.302653, sample standard deviation (n - 1)
    mean = sum(values) / 3
    sd = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
    assert ce["balanced_accuracy"] == pytest.approx(mean)
    assert ce["ci95"]["balanced_accuracy"] == pytest.approx([mean - 4.302653 * sd / 3 ** 0.5,
                                                             mean + 4.302653 * sd / 3 ** 0.5], rel=1e-6)
    # each seed's fit is cached: the per-seed artifacts are in the lineage
    assert {f"ce@seed={s}" for s in range(3)} <= set(metrics["lineage"]["artifacts"])
    # the sweep chooses on the val score averaged over seeds
    sel = metrics["selection"]["logit-adjust"]
    assert set(sel["val_balanced_accuracy"]) == {"logit-adjust[tau=0.0]", "logit-adjust[tau=1.0]"}
    assert metrics["methods"]["logit-adjust"]["seeds"] == 3
    report = (tmp_path / "out" / "report.md").read_text()
    assert " ± " in report and "over 3 seeds (Student-t)" in report


def test_one_seed_gets_a_bootstrap_interval_over_test_samples(imported_run):
    metrics = json.loads((imported_run["out"] / "metrics.json").read_text())
    ce = metrics["methods"]["ce"]
    assert ce["seeds"] == 1 and ce["ci95_over"] == "test samples"
    lo, hi = ce["ci95"]["balanced_accuracy"]
    assert lo <= ce["balanced_accuracy"] <= hi and hi - lo > 0


@pytest.mark.parametrize("seeds, needle", [([], "non-empty list"), ([0, 0], "more than once"),
                                           ([-1], "[0, 2**63)"), ([2 ** 70], "[0, 2**63)")])
def test_bad_seeds(seeds, needle):
    with pytest.raises(LongtailError, match=needle.replace("[", r"\[").replace("*", r"\*").replace(")", r"\)")):
        parse_config({"store": "s", "output": "o", "methods": ["ce"], "seeds": seeds})
