"""benchmarks/bench_dlsa.py: its flow-step reference trains the same filter as the product, and its
arguments fail cleanly. No time is asserted."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
import torch

from longtail.stages.data import FeatureSet

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    if "bench_dlsa" not in sys.modules:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        spec = importlib.util.spec_from_file_location("bench_dlsa", ROOT / "benchmarks" / "bench_dlsa.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_dlsa"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_dlsa"]


def test_the_nflows_reference_and_the_product_train_the_same_filter():
    """One epoch of the first filter, nflows' forward and plain Adam against maf_forward and fused
    Adam: the same batches and maths, so the same losses up to float rounding (on a set this small
    the trajectories do not drift apart: the epoch's median and mean agree too)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), (200, 100, 50, 30))
    x = (rng.normal(size=(y.size, 12)) + 2.0 * rng.normal(size=(4, 12))[y]).astype(np.float32)
    train = FeatureSet(x, y, np.bincount(y), tuple("abcd"), name="train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, ref = _bench().filter_epoch(train, len(y), "cpu", reference=True)
        _, fast = _bench().filter_epoch(train, len(y), "cpu", reference=False)
    finally:
        torch.set_num_threads(threads)
    assert set(ref) == set(fast) == {"first", "median", "mean"}
    assert all(np.isfinite(v) for v in ref.values())
    assert fast["first"] == pytest.approx(ref["first"], rel=1e-6, abs=1e-6)
    for key in ("median", "mean"):
        assert fast[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-4)
    assert ref["first"] != ref["mean"]  # the epoch trained: the first step is not the epoch


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--write-readme"], "does not write the README"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--ref-rows", "10"], "--ref-rows at least 256"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _bench().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_saved_quick_run_never_writes_the_readme(tmp_path):
    saved = tmp_path / "quick.json"
    saved.write_text(json.dumps({"quick": True}))
    with pytest.raises(SystemExit, match="holds a --quick run"):
        _bench().main(["--load", str(saved), "--write-readme"])


def test_the_loss_sentence_explains_a_drift_only_where_there_is_one():
    same = {"first": 1.0, "median": 0.5, "mean": 0.4}
    agree = _bench()._losses(same, dict(same))
    assert agree.endswith("mean 0.4000 and 0.4000.") and "drift" not in agree
    drift = _bench()._losses({"first": 1.0, "median": 0.5, "mean": -17.9}, {"first": 1.0, "median": 0.6, "mean": -12.9})
    assert "median 0.5000 and 0.6000" in drift and "drift apart" in drift and "eq. 10" in drift
    assert _bench()._losses(-17.9, -12.9) == "Mean losses -17.9000 and -12.9000."  # a --save file of before
