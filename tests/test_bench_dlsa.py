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
    Adam: the same batches and maths, so the same mean loss up to float rounding."""
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
    assert np.isfinite(ref) and fast == pytest.approx(ref, rel=1e-4, abs=1e-4)


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
