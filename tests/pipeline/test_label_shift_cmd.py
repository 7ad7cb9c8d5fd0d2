"""Label-shift results in metrics.json and the `calibrate` command."""

import json

import numpy as np
import pytest

from tests.pipeline.conftest import assert_user_error, invoke


def test_metrics_hold_shifted_test_sets(imported_run):
    metrics = json.loads((imported_run["out"] / "metrics.json").read_text())
    shift = metrics["label_shift"]
    assert set(shift) == {"ce", "ce+pc"}
    names = list(shift["ce"])
    assert names[0] == "forward-50" and names[-1] == "backward-50" and "uniform" in names and len(names) == 11
    ce, pc = shift["ce"], shift["ce+pc"]
    # the uniform subset is the balanced test split itself
    assert ce["uniform"]["accuracy"] == pytest.approx(metrics["methods"]["ce"]["overall"])
    # ce post-compensated to the (uniform) true prior is exactly ce+pc
    assert ce["uniform"]["accuracy_true_prior"] == pytest.approx(pc["uniform"]["accuracy"])
    for row in ce.values():
        assert 0 <= row["em_error"] <= 1 and 0 <= row["bbse_error"] <= 1
    report = (imported_run["out"] / "report.md").read_text()
    assert "## Shifted test label distributions" in report and "## Calibration" in report
    assert "ce + PC (EM prior)" in report


def test_calibrate_writes_the_contract(imported_run, tmp_path):
    out = tmp_path / "cal"
    r = invoke("calibrate", "--config", imported_run["config"], "--target", imported_run["store"],
               "--method", "em", "--out", out)
    assert r.exit_code == 0, r.output
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["method"] == "em" and cal["split"] == "test"
    assert cal["true_prior"] == pytest.approx([0.25] * 4)
    assert len(cal["estimated_prior"]) == 4 and sum(cal["estimated_prior"]) == pytest.approx(1)
    assert set(cal["methods"]) == {"ce", "ce+pc"}
    for m in cal["methods"].values():
        assert set(m) >= {"accuracy_uncompensated", "accuracy_estimated_prior", "accuracy_true_prior"}
        assert all(0 <= v <= 1 for v in m.values())
    # the same compensated logits, whichever prior the base carried
    assert cal["methods"]["ce"]["accuracy_true_prior"] == cal["methods"]["ce+pc"]["accuracy_true_prior"]
    assert cal["estimated_prior"] == cal["estimated_priors"]["ce"]


def test_calibrate_bad_input(imported_run, tmp_path, feature_files):
    x = np.load(feature_files["test"])
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, features=x["features"][:, :5], labels=x["labels"])
    other = tmp_path / "other.zarr"
    assert invoke("import-features", "--train", narrow, "--test", narrow, "--out", other).exit_code == 0
    cfg = imported_run["config"]
    out = tmp_path / "cal"
    assert_user_error(invoke("calibrate", "--config", cfg, "--target", other, "--out", out), "dimension 5")
    assert_user_error(invoke("calibrate", "--config", cfg, "--target", imported_run["store"], "--split", "deploy",
                             "--out", out), "no split 'deploy'")
    assert_user_error(invoke("calibrate", "--config", cfg, "--target", imported_run["store"], "--method", "mle",
                             "--out", out), "'mle'")
    assert_user_error(invoke("calibrate", "--config", cfg, "--target", tmp_path / "nowhere.zarr", "--out", out),
                      "nowhere.zarr")
    assert not out.exists()
