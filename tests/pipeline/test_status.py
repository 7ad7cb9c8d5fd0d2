"""`longtail status`: cached / stale (with the input that changed) / missing, and single-stage reruns
that recompute exactly the stages that depend on a change."""

import json
import os

import yaml

from tests.pipeline.conftest import FAST, assert_user_error, invoke


def _status(config):
    r = invoke("status", config, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["stages"]


def _states(stages):
    return {k: v["state"] for k, v in stages.items()}


def _edit(config, fn):
    with open(config) as f:
        data = yaml.safe_load(f)
    fn(data)
    with open(config, "w") as f:
        yaml.safe_dump(data, f)


def test_everything_cached_after_a_run(imported_run):
    stages = _status(imported_run["config"])
    assert list(stages) == ["import", "method:ce", "method:ce+pc", "evaluate", "report"]
    assert set(_states(stages).values()) == {"cached"}
    assert all(set(v) == {"state", "reason"} and isinstance(v["reason"], str) for v in stages.values())
    text = invoke("status", imported_run["config"])
    assert text.exit_code == 0 and "method:ce+pc" in text.stdout and "cached" in text.stdout


def test_param_change_marks_exactly_the_dependents_and_stage_recomputes_them(imported_run, monkeypatch):
    cfg = imported_run["config"]
    _edit(cfg, lambda d: d["methods"].append({"name": "balanced-softmax", "params": FAST}))
    assert invoke("stage", "balanced-softmax", "--config", cfg).exit_code == 0
    _edit(cfg, lambda d: d["methods"][0]["params"].update(epochs=6))  # ce only
    stages = _status(cfg)
    assert _states(stages) == {"import": "cached", "method:ce": "stale", "method:ce+pc": "stale",
                               "method:balanced-softmax": "cached", "evaluate": "stale", "report": "stale"}
    assert "params changed: epochs 5 -> 6" in stages["method:ce"]["reason"]
    assert "method:ce" in stages["evaluate"]["reason"]

    from longtail.stages import base

    fitted = []
    real_fit = base.Method.fit

    def counting_fit(self, *a, **k):
        fitted.append(type(self).name)
        return real_fit(self, *a, **k)

    monkeypatch.setattr(base.Method, "fit", counting_fit)
    r = invoke("stage", "ce", "--config", cfg)
    assert r.exit_code == 0, r.output
    assert "balanced-softmax" not in fitted and "ce" in fitted  # ce refitted, ce+pc on top, nothing else
    assert set(_states(_status(cfg)).values()) == {"cached"}
    fitted.clear()
    r = invoke("run", cfg, "--no-prefect")  # a second run with unchanged inputs computes nothing
    assert r.exit_code == 0 and fitted == []


def test_missing_and_report_states(imported_run):
    cfg = imported_run["config"]
    _edit(cfg, lambda d: d["methods"].append({"name": "focal", "params": FAST}))
    stages = _status(cfg)
    assert stages["method:focal"] == {"state": "missing", "reason": "never fitted"}
    assert stages["evaluate"]["state"] == "stale"
    os.remove(imported_run["out"] / "report.md")
    assert _status(cfg)["report"]["state"] == "missing"


def test_evaluation_setting_change_is_named(imported_run):
    cfg = imported_run["config"]
    _edit(cfg, lambda d: d.update(evaluation={"ece_bins": 10}))
    stages = _status(cfg)
    assert stages["evaluate"]["state"] == "stale"
    assert "evaluation.ece_bins 20 -> 10" in stages["evaluate"]["reason"]
    assert stages["report"]["state"] == "stale"


def test_backbone_change_invalidates_everything(tmp_path, write_config):
    cfg = write_config({"store": str(tmp_path / "f.zarr"), "dataset": "digits-lt", "output": str(tmp_path / "out"),
                        "backbone": {"kind": "builtin", "epochs": 1, "width": 4},
                        "evaluation": {"shift_ratios": []},
                        "methods": [{"name": "ce", "params": FAST}]})
    assert _states(_status(cfg)) == {"extract": "missing", "method:ce": "missing", "evaluate": "missing",
                                     "report": "missing"}
    assert invoke("run", cfg, "--no-prefect").exit_code == 0
    assert set(_states(_status(cfg)).values()) == {"cached"}
    _edit(cfg, lambda d: d["backbone"].update(epochs=2))
    stages = _status(cfg)
    assert set(_states(stages).values()) == {"stale"}
    assert "backbone changed (backbone.epochs 1 -> 2)" in stages["extract"]["reason"]
    assert stages["method:ce"]["reason"] == "upstream extract is stale"


def test_status_bad_input(tmp_path, write_config):
    assert_user_error(invoke("status", tmp_path / "nope.yaml"), "does not exist")
    cfg = write_config({"store": str(tmp_path / "s.zarr"), "output": str(tmp_path / "o"), "methods": ["nope"]})
    assert_user_error(invoke("status", cfg), "nope")
