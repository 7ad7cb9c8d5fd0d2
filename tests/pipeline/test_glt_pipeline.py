"""Group metrics in metrics.json and the `longtail glt` protocol runs."""

import json
import os

import numpy as np
import pytest

from longtail.pipeline import glt
from longtail.pipeline.config import parse_config
from longtail.stages import evaluate as ev
from longtail.stages.errors import LongtailError
from longtail.storage.featurestore import open_store
from tests.pipeline.conftest import FAST, assert_user_error, gaussian_split, invoke

GLT_FAST = {"name": "digits-glt"}
BACKBONE_FAST = {"kind": "builtin", "epochs": 3, "width": 8}


def glt_config(tmp_path, **extra):
    return {"store": str(tmp_path / "features.zarr"), "dataset": dict(GLT_FAST), "backbone": BACKBONE_FAST,
            "methods": [{"name": "ce", "params": FAST}, {"name": "balanced-softmax", "params": FAST}],
            "output": str(tmp_path / "out"), "evaluation": {"shift_ratios": []}} | extra


def test_glt_command_runs_one_protocol_end_to_end(tmp_path, write_config):
    cfg = write_config(glt_config(tmp_path))
    r = invoke("glt", "--config", cfg, "--protocols", "glt", "--no-prefect")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    summary = json.loads((out / "glt.json").read_text())
    assert summary["protocols"] == ["glt"] and set(summary["methods"]) == {"ce", "balanced-softmax"}
    assert "GLT worst-group" in (out / "glt.md").read_text() and (out / "glt.html").is_file()
    # the protocol's run: its own store and output, the config's artifact cache
    metrics = json.loads((out / "glt" / "metrics.json").read_text())
    store = open_store(str(tmp_path / "features-glt.zarr"))
    assert all(store.has_attributes(s) for s in ("train", "val", "test"))
    assert store.attrs["attribute_names"] == ["original", "inverted", "thick"]
    assert os.listdir(out / "cache") and not (out / "glt" / "cache").exists()
    test = store.read("test")
    logits = np.load(out / "glt" / "evaluation.npz")["logits/ce"]
    m = metrics["methods"]["ce"]
    # recomputed by hand from the stored logits and the stored attributes
    pred = logits.argmax(1)
    groups = [(pred[(test.labels == c) & (test.attributes == a)] == c).mean() for c in range(10) for a in range(3)]
    assert m["average_group"] == pytest.approx(np.mean(groups))
    assert m["worst_group"] == pytest.approx(np.min(groups))
    assert np.array(m["group_accuracy"]).ravel() == pytest.approx(groups)
    assert m["macro_precision"] == pytest.approx(ev.macro_precision(pred, test.labels, 10))
    # Test-GBL is balanced, so the mean over groups is the overall accuracy
    assert m["average_group"] == pytest.approx(m["overall"])
    assert metrics["groups"]["test_counts"] == [[15] * 3] * 10
    assert summary["methods"]["ce"]["glt"] == {"accuracy": m["overall"], "macro_precision": m["macro_precision"],
                                                "average_group": m["average_group"], "worst_group": m["worst_group"],
                                                "balanced_accuracy": m["balanced_accuracy"]}
    report = (out / "glt" / "report.md").read_text()
    assert "Generalized long tail" in report and "plots/groups-ce.png" in report
    assert (out / "glt" / "plots" / "groups-balanced-softmax.png").is_file()


def test_protocol_configs_override_dataset_store_and_output(tmp_path):
    cfg = parse_config(glt_config(tmp_path, artifacts=str(tmp_path / "shared")))
    plan = glt.protocol_configs(cfg, ["clt", "alt", "glt"])
    assert [p for p, _ in plan] == ["clt", "alt", "glt"]
    for p, c in plan:
        assert c.dataset.protocol == p and c.dataset.name == "digits-glt"
        assert c.store == str(tmp_path / f"features-{p}.zarr")
        assert c.output == os.path.join(str(tmp_path / "out"), p)
        assert c.artifacts_url == str(tmp_path / "shared")
        assert c.methods == cfg.methods
    assert glt.protocol_store("s3://bucket/run", "alt") == "s3://bucket/run-alt"
    assert glt.parse_protocols(None) == ["clt", "alt", "glt"]
    assert glt.parse_protocols(" GLT, clt") == ["glt", "clt"]


@pytest.mark.parametrize("text, needle", [
    ("glt,blt", "unknown protocol 'blt'"),
    ("glt,glt", "named twice"),
    (",", "at least one"),
])
def test_bad_protocols(text, needle):
    with pytest.raises(LongtailError, match=needle):
        glt.parse_protocols(text)


def test_glt_command_errors_write_nothing(tmp_path, write_config):
    out = tmp_path / "out"
    cfg = write_config(glt_config(tmp_path))
    assert_user_error(invoke("glt", "--config", cfg, "--protocols", "glt,blt"), "unknown protocol 'blt'")
    lt = write_config(glt_config(tmp_path, dataset="digits-lt"), "lt.yaml")
    assert_user_error(invoke("glt", "--config", lt, "--no-prefect"), "'digits-lt' has no attributes")
    imported = write_config({k: v for k, v in glt_config(tmp_path).items() if k != "dataset"}, "imp.yaml")
    assert_user_error(invoke("glt", "--config", imported, "--no-prefect"), "names no dataset")
    off = write_config(glt_config(tmp_path, evaluation={"groups": False}), "off.yaml")
    assert_user_error(invoke("glt", "--config", off, "--no-prefect"), "evaluation.groups is false")
    assert not out.exists() and not list(tmp_path.glob("*.zarr"))
    # a protocol on a dataset that has none is an unknown parameter of that dataset
    bad = write_config(glt_config(tmp_path, dataset={"name": "digits-lt", "protocol": "alt"}), "bad.yaml")
    assert_user_error(invoke("run", bad, "--no-prefect"), "digits-lt", "protocol")
    assert not out.exists()


def write_npz(path, counts, seed, attributes=True):
    x, y = gaussian_split(counts, seed=seed)
    arrays = {"features": x, "labels": y}
    if attributes:
        arrays["attributes"] = (np.arange(len(y)) % 2).astype(np.int64)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("with_attributes", [True, False])
def test_imported_store_with_and_without_attributes(tmp_path, write_config, with_attributes):
    files = {s: write_npz(tmp_path / f"{s}.npz", n, i, attributes=with_attributes)
             for i, (s, n) in enumerate((("train", [40, 12, 5]), ("val", [6] * 3), ("test", [10] * 3)))}
    store = tmp_path / "store.zarr"
    r = invoke("import-features", "--train", files["train"], "--val", files["val"], "--test", files["test"],
               "--out", store)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    cfg = write_config({"store": str(store), "output": str(out), "methods": [{"name": "ce", "params": FAST}],
                        "evaluation": {"groups": True, "shift_ratios": []}})
    r = invoke("run", cfg, "--no-prefect")
    if not with_attributes:
        assert_user_error(r, "evaluation.groups is true", "no attributes")
        assert not out.exists()
        return
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["methods"]["ce"]
    assert metrics["groups"] == {"attribute_names": ["0", "1"], "test_counts": [[5, 5]] * 3}
    assert len(m["group_accuracy"]) == 3 and m["worst_group"] <= m["average_group"]
    # the imported attributes are the ones evaluated: attribute = position mod 2 in the test file
    test = open_store(str(store)).read("test")
    np.testing.assert_array_equal(test.attributes, np.arange(30) % 2)


def test_groups_default_follows_the_store(imported_run):
    """digits-lt style stores (no attributes) keep metrics.json as it was: no group keys."""
    metrics = json.loads((imported_run["out"] / "metrics.json").read_text())
    assert "groups" not in metrics
    assert all("worst_group" not in m for m in metrics["methods"].values())
