"""Issue 14 on a real (tiny) run: what a run reads is checked (items 1-3): an edited store, edited
train labels, a same-size rewrite of a cached logits file, a crash between the evaluate writes,
``--force`` on a corrupt artifact, ``status`` and ``verify``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
import zarr

from tests.pipeline.conftest import FAST, assert_user_error, invoke


def _status(config):
    r = invoke("status", config, "--json")
    assert r.exit_code == 0, r.output
    return {k: v for k, v in json.loads(r.stdout)["stages"].items()}


def _add_method(config, name="balanced-softmax"):
    with open(config) as f:
        data = yaml.safe_load(f)
    data["methods"].append({"name": name, "params": FAST})
    with open(config, "w") as f:
        yaml.safe_dump(data, f)


def _method_dirs(out):
    base = out / "cache" / "method"
    return sorted(p.name for p in base.iterdir() if not p.name.startswith("."))


def _ce_dir(run):
    for d in (run["out"] / "cache" / "method").iterdir():
        meta = d / "meta.json"
        if meta.exists() and json.loads(meta.read_text())["name"] == "ce":
            return d
    raise AssertionError("no ce artifact")


def _rewrite_same_size(path):
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # a value of the last row: same size, still a valid .npy
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------- the store
def test_an_edited_store_chunk_is_refused_and_nothing_is_cached(imported_run):
    g = zarr.open_group(str(imported_run["store"]), mode="r+")
    g["train"]["features"][5, 1] += 0.5  # decodes fine, changes one value
    _add_method(imported_run["config"])
    before = _method_dirs(imported_run["out"])
    r = invoke("run", imported_run["config"], "--no-prefect")
    assert_user_error(r, str(imported_run["store"]), "'train'", "fingerprint")
    assert _method_dirs(imported_run["out"]) == before  # nothing fitted on it was cached
    st = _status(imported_run["config"])
    assert st["import"]["state"] == "corrupt" and "fingerprint" in st["import"]["reason"]
    r = invoke("verify", imported_run["store"])
    assert_user_error(r, "'train'")
    assert "corrupt" in r.stdout


def test_edited_train_labels_are_refused(imported_run):
    g = zarr.open_group(str(imported_run["store"]), mode="r+")
    labels = g["train"]["labels"][:]
    labels[labels == 3] = 2
    labels[-1] = 3
    g["train"]["labels"][:] = labels
    r = invoke("stage", "ce", "--config", imported_run["config"], "--force")
    assert_user_error(r, "class counts")


def test_a_truncated_chunk_is_one_line(imported_run):
    chunk = imported_run["store"] / "test" / "features" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    r = invoke("run", imported_run["config"], "--no-prefect")
    assert_user_error(r, "test/features/c/0/0")


# ---------------------------------------------------------------------------------------- artifacts
def test_a_same_size_rewrite_of_cached_logits_is_refused_then_force_repairs_it(imported_run):
    metrics_before = (imported_run["out"] / "metrics.json").read_bytes()
    d = _ce_dir(imported_run)
    _rewrite_same_size(d / "logits_test.npy")
    r = invoke("run", imported_run["config"], "--no-prefect")
    assert_user_error(r, "logits_test.npy", "hash")
    assert (imported_run["out"] / "metrics.json").read_bytes() == metrics_before
    st = _status(imported_run["config"])
    assert st["method:ce"]["state"] == "corrupt" and "logits_test.npy" in st["method:ce"]["reason"]
    assert st["evaluate"]["state"] != "cached"
    r = invoke("verify", imported_run["out"])
    assert r.exit_code == 2 and "logits_test.npy" in r.stderr

    r = invoke("stage", "ce", "--config", imported_run["config"], "--force")  # replaces the artifact
    assert r.exit_code == 0, r.output
    assert invoke("verify", imported_run["out"]).exit_code == 0
    r = invoke("run", imported_run["config"], "--no-prefect")
    assert r.exit_code == 0, r.output
    assert {v["state"] for v in _status(imported_run["config"]).values()} == {"cached"}


def test_verify_passes_on_a_clean_run_and_names_what_it_checked(imported_run):
    r = invoke("verify", imported_run["out"])
    assert r.exit_code == 0, r.output
    assert "store" in r.stdout and "method" in r.stdout and "metrics.json" in r.stdout
    r = invoke("verify", imported_run["config"])
    assert r.exit_code == 0, r.output
    assert_user_error(invoke("verify", imported_run["out"] / "nothing-here"), "nothing-here")


# ---------------------------------------------------------------------------------------- one commit
def test_a_crash_between_the_two_evaluate_writes_is_not_trusted(imported_run, monkeypatch):
    from longtail.pipeline import evaluate as ev_mod

    _add_method(imported_run["config"])
    real = ev_mod.write_bytes

    def crash(path, data):
        if str(path).endswith("evaluation.npz"):
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ev_mod, "write_bytes", crash)
    r = invoke("run", imported_run["config"], "--no-prefect")
    assert r.exit_code != 0
    monkeypatch.setattr(ev_mod, "write_bytes", real)
    # metrics.json names the new method, evaluation.npz is the old one: neither report nor status trusts them
    st = _status(imported_run["config"])
    assert st["evaluate"]["state"] != "cached"
    assert_user_error(invoke("report", imported_run["out"]), "evaluate")
    r = invoke("run", imported_run["config"], "--no-prefect")  # evaluates again, then renders
    assert r.exit_code == 0, r.output
    with np.load(imported_run["out"] / "evaluation.npz") as d:
        assert "logits/balanced-softmax" in d.files
    assert {v["state"] for v in _status(imported_run["config"]).values()} == {"cached"}


def test_a_hand_edited_report_file_marks_the_report_stale(imported_run):
    (imported_run["out"] / "report.md").write_text("edited")
    assert _status(imported_run["config"])["report"]["state"] == "stale"
    r = invoke("run", imported_run["config"], "--no-prefect")
    assert r.exit_code == 0, r.output
    assert (imported_run["out"] / "report.md").read_text() != "edited"
