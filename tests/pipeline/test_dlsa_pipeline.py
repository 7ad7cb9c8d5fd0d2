"""DLSA in the pipeline: one cascade for every wrapped head, diagnostics, the diagnostics command."""

import json

import pytest

from longtail.pipeline import graph
from longtail.pipeline.config import parse_config
from longtail.pipeline.extract import existing_store
from longtail.pipeline.stores import open_features
from tests.pipeline.conftest import assert_user_error, invoke

DLSA = {"num_filters": 2, "num_clusters": 4, "flow_epochs": 2, "flow_hidden": 16, "tail_threshold": 10}


def test_one_cascade_serves_every_head(imported_run, tmp_path, monkeypatch):
    from longtail.stages import dlsa

    fits = []
    real_fit = dlsa.FlowCascade.fit

    def counting_fit(self, train, val=None):
        fits.append(val is not None)  # the pipeline hands the val split over: the flows stop on it
        return real_fit(self, train, val)

    monkeypatch.setattr(dlsa.FlowCascade, "fit", counting_fit)
    cfg = parse_config({"store": str(imported_run["store"]), "output": str(tmp_path / "o"),
                        "methods": [{"name": f"dlsa+{h}", "params": {"epochs": 5, "dlsa": DLSA}}
                                    for h in ("ce", "balanced-softmax")]})
    metrics = graph.run_all(cfg)
    assert fits == [True]
    diag = metrics["dlsa"]["dlsa+ce"]
    other = metrics["dlsa"]["dlsa+balanced-softmax"]
    for key in ("filters", "separation", "flow"):  # one cascade: the same routes and separation
        assert diag[key] == other[key]
    assert [f["samples_in"] for f in diag["filters"]][0] == 99
    # separation on train, val and test, each split counted in full
    fs = open_features(cfg, existing_store(cfg))
    for split in ("train", "val", "test"):
        sep = diag["separation"][split]
        assert sep["samples"] == len(fs.read(split))
        assert sep["filters"][0]["samples_in"] == sep["samples"]
        assert set(sep["filters"][0]) >= {"auc", "tail_out_rate", "head_out_rate", "separation_accuracy"}
    assert len(diag["flow"]) == 2 and all(1 <= s["best_epoch"] <= s["epochs_run"] <= 2 for s in diag["flow"])
    assert diag["classifier_input"]["chosen"] in ("x", "xz") and diag["classifier_input"]["setting"] == "auto"
    assert [g["uses"] in ("classifier", "head") for g in diag["groups"]] == [True, True]
    assert (tmp_path / "o" / "plots" / "dlsa-dlsa_ce.png").is_file()
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## DLSA flow filters" in report
    assert "## DLSA head-tail separation on train, val and test" in report and "AUC test" in report
    assert "## DLSA choices made on val" in report
    # the wrapped head is the cached plain head: a run of `ce` alone fits nothing new
    spy = []
    monkeypatch.setattr(dlsa.FlowCascade, "fit", lambda *a: spy.append(1))
    graph.run_all(parse_config({"store": str(imported_run["store"]), "output": str(tmp_path / "o"),
                                 "methods": [{"name": "dlsa+ce", "params": {"epochs": 5, "dlsa": DLSA}}]}))
    assert spy == []


def test_dlsa_diagnostics_command(imported_run, tmp_path):
    out = tmp_path / "diag"
    args = [f"--set={k}={v}" for k, v in DLSA.items()]
    r = invoke("dlsa-diagnostics", imported_run["store"], "--out", out, *args)
    assert r.exit_code == 0, r.output
    assert "AUC val" in r.output and "AUC test" in r.output
    res = json.loads((out / "dlsa_diagnostics.json").read_text())
    (diag,) = res["stores"].values()
    assert len(diag["filters"]) == 2 and res["params"]["num_clusters"] == 4
    assert set(diag["separation"]) == {"train", "val", "test"}
    assert (out / "plots" / "dlsa-store1.png").is_file()
    assert_user_error(invoke("dlsa-diagnostics", imported_run["store"], "--out", out, "--set", "filter_fraction=1.5"),
                      "filter_fraction")
    assert_user_error(invoke("dlsa-diagnostics", imported_run["store"], "--out", out, "--set", "nokey"), "KEY=VALUE")
