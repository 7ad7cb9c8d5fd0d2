"""Issue 14, item 5: limits before allocation and one line for every mistake (no traceback): an id
column taken for labels, seeds out of the generators' range, a malformed ``--set``, an ``.npy`` named
``.npz``, a non-UTF-8 file name, a full disk, an over-long path, a malformed run directory, a python
backbone that raises, ``store: ""``, ``1e-3`` in method params, data checks before the first fit."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from longtail.pipeline.config import load_config, parse_config
from longtail.stages.errors import LongtailError
from tests.pipeline.conftest import FAST, assert_user_error, invoke


# ---------------------------------------------------------------------------------------- allocation
def test_an_id_column_for_labels_is_refused_before_anything_is_allocated(tmp_path, feature_files):
    """One label of 10**12 (an id column): refused in a process whose address space is capped at
    2 GiB, so a bincount of 10**12 counters (8 TB) would fail with MemoryError, not with this line."""
    x = np.load(feature_files["train"])["features"]
    y = np.load(feature_files["train"])["labels"].copy()
    y[5] = 10**12
    bad = tmp_path / "ids.npz"
    np.savez(bad, features=x, labels=y)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from longtail.stages.errors import LongtailError
        from longtail.storage.importers import import_features
        try:
            import_features(train={str(bad)!r}, test={str(feature_files["test"])!r}, out={str(tmp_path / "s.zarr")!r})
        except LongtailError as e:
            print("USER ERROR:", e)
            sys.exit(2)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "USER ERROR" in r.stdout and "ids.npz" in r.stdout and "1000000000000" in r.stdout
    assert "distinct" in r.stdout


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("seed", [-1, 2**70, True, 1.5])
def test_seeds_outside_the_generators_range_are_one_line(write_config, tmp_path, seed):
    base = {"store": str(tmp_path / "s.zarr"), "output": str(tmp_path / "o"), "methods": ["ce"]}
    assert_user_error(invoke("status", write_config({**base, "seed": seed})), "seed")
    assert_user_error(invoke("status", write_config({**base, "seeds": [0, seed]})), "seed")


@pytest.mark.parametrize("seed", [-1, 2**70])
def test_a_method_seed_outside_the_range_is_one_line(imported_run, write_config, tmp_path, seed):
    cfg = write_config({"store": str(imported_run["store"]), "output": str(tmp_path / "o2"),
                        "methods": [{"name": "ce+pc", "params": {**FAST, "seed": seed}}]}, "s.yaml")
    assert_user_error(invoke("run", cfg, "--no-prefect"), "seed", str(seed))


def test_an_empty_store_or_output_is_refused(tmp_path):
    for key in ("store", "output", "artifacts"):
        data = {"store": str(tmp_path / "s.zarr"), "output": str(tmp_path / "o"), "methods": ["ce"], key: ""}
        with pytest.raises(LongtailError, match=key):
            parse_config(data)


def test_exponent_numbers_are_numbers_everywhere(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("store: s.zarr\noutput: o\nmethods:\n  - {name: ce, params: {lr: 1e-3, weight_decay: 5E-4}}\n"
                    "backbone: {kind: builtin, lr: 1e-2}\n")
    cfg = load_config(str(path))
    assert cfg.methods[0].params == {"lr": 0.001, "weight_decay": 0.0005}
    assert cfg.backbone.lr == 0.01
    path.write_text("store: s.zarr\noutput: o\nmethods: [{name: ce, params: {lr: '1e-3'}}]\n")
    assert load_config(str(path)).methods[0].params["lr"] == "1e-3"  # quoted: a string, as written


def test_malformed_set_is_one_line(imported_run, tmp_path):
    for item in ("num_clusters=[1,", "=3", "lr"):
        r = invoke("dlsa-diagnostics", imported_run["store"], "--out", tmp_path / "d", "--set", item)
        assert_user_error(r, "--set")


# ---------------------------------------------------------------------------------------- files
def test_an_npy_named_npz_is_one_line(tmp_path, feature_files):
    x = np.load(feature_files["train"])["features"]
    bad = tmp_path / "train.npz"
    with open(bad, "wb") as f:
        np.save(f, x)
    r = invoke("import-features", "--train", bad, "--test", feature_files["test"], "--out", tmp_path / "s.zarr")
    assert_user_error(r, "train.npz", "npz")


def test_a_non_utf8_file_name_imports_and_later_runs_work(tmp_path, feature_files, write_config):
    name = os.fsdecode(b"tr\xffain.npz")
    odd = tmp_path / name
    odd.write_bytes(feature_files["train"].read_bytes())
    store = tmp_path / "s.zarr"
    r = invoke("import-features", "--train", odd, "--test", feature_files["test"], "--out", store)
    assert r.exit_code == 0, r.output
    cfg = write_config({"store": str(store), "output": str(tmp_path / "o"),
                        "methods": [{"name": "ce", "params": FAST}], "evaluation": {"shift_ratios": []}})
    r = invoke("run", cfg, "--no-prefect")
    assert r.exit_code == 0, r.output
    assert invoke("status", cfg).exit_code == 0


def test_a_full_disk_is_one_line(imported_run, monkeypatch):
    from longtail.pipeline import io as pio

    def full(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pio, "atomic_write", full)
    r = invoke("stage", "evaluate", "--config", imported_run["config"], "--force")
    assert_user_error(r, "No space left on device", "metrics.json")


def test_an_over_long_path_is_one_line(imported_run, write_config, tmp_path):
    out = tmp_path / ("x" * 300)
    cfg = write_config({"store": str(imported_run["store"]), "output": str(out),
                        "methods": [{"name": "ce", "params": FAST}], "evaluation": {"shift_ratios": []}}, "long.yaml")
    r = invoke("run", cfg, "--no-prefect")
    assert_user_error(r, "File name too long")


@pytest.mark.parametrize("damage", ["metrics-list", "npz-is-npy", "no-methods", "missing-logits", "bad-json"])
def test_report_on_a_malformed_run_directory_is_one_line(imported_run, damage):
    from longtail.pipeline.evaluate import EVALUATE_COMMIT, EVALUATE_FILES
    from longtail.pipeline.io import write_commit

    out = imported_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    if damage == "metrics-list":
        (out / "metrics.json").write_text("[]")
    elif damage == "npz-is-npy":
        with open(out / "evaluation.npz", "wb") as f:
            np.save(f, np.zeros(3))
    elif damage == "no-methods":
        del metrics["methods"]
        (out / "metrics.json").write_text(json.dumps(metrics))
    elif damage == "missing-logits":
        metrics["methods"]["added"] = metrics["methods"]["ce"]
        (out / "metrics.json").write_text(json.dumps(metrics))
    elif damage == "bad-json":
        (out / "metrics.json").write_bytes(b"\xff{")
    # a crafted directory may carry a matching commit record: the files themselves are checked
    key = metrics["lineage"]["evaluate"]["key"]
    write_commit(out, EVALUATE_COMMIT, key, EVALUATE_FILES)
    assert_user_error(invoke("report", out), str(out))


def test_a_python_backbone_that_raises_is_one_line(tmp_path, write_config, monkeypatch):
    (tmp_path / "badnet.py").write_text("def build():\n    raise RuntimeError('no weights here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = write_config({"store": str(tmp_path / "s.zarr"), "dataset": "digits-lt", "output": str(tmp_path / "o"),
                        "backbone": {"kind": "python", "target": "badnet:build", "allow_code": True},
                        "methods": [{"name": "ce", "params": FAST}]})
    r = invoke("run", cfg, "--no-prefect")
    assert_user_error(r, "badnet:build", "no weights here")


# ---------------------------------------------------------------------------------------- before any fit
@pytest.mark.parametrize("entry, needle", [
    ({"name": "ce+ts", "params": FAST}, "val split"),
    ({"name": "heuristic-cala", "params": {**FAST, "k": 500}}, "= 500"),
    ({"name": "dlsa+ce", "params": {"dlsa": {"gate": False, "classifier_input": "x", "num_clusters": 100000}}},
     "num_clusters = 100000"),
])
def test_data_checks_run_before_the_first_fit(tmp_path, feature_files, write_config, entry, needle):
    store = tmp_path / "noval.zarr"
    r = invoke("import-features", "--train", feature_files["train"], "--test", feature_files["test"], "--out", store)
    assert r.exit_code == 0, r.output
    out = tmp_path / "o"
    cfg = write_config({"store": str(store), "output": str(out),
                        "methods": [{"name": "balanced-softmax", "params": FAST}, entry]})
    r = invoke("run", cfg, "--no-prefect")
    assert_user_error(r, needle)
    assert not (out / "cache" / "method").exists() or not any(
        p for p in (out / "cache" / "method").iterdir() if not p.name.startswith("."))  # nothing was fitted
