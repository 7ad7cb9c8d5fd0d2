"""benchmarks/bench_rows.py at a tiny size: both sides read every row of an epoch, the table says
what was measured, bad arguments fail cleanly. No time is asserted."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    if "bench_rows" not in sys.modules:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        spec = importlib.util.spec_from_file_location("bench_rows", ROOT / "benchmarks" / "bench_rows.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_rows"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_rows"]


def test_an_epoch_is_a_permutation_in_batches():
    batches = _bench().epoch_batches(1000, 256)
    assert [len(b) for b in batches] == [256, 256, 256, 232]
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(1000))


def test_a_tiny_run_measures_both_sides_and_renders_the_ratio(tmp_path):
    r = _bench().measure(str(tmp_path), 2000, 8, 64, 1)  # measure checks both read all 2,000 rows
    assert r["batches"] == 32 and min(r["first"], r["store"], r["npy"]) > 0
    text = _bench().render([r], 64, 1.0)
    assert "| 2,000 x 8 float32 | 32 |" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 3 and len({line.count("|") for line in table}) == 1  # header, rule, row: same cells
    assert f"**{r['store'] / r['npy']:.2f}x**" in text


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch and --repeats must be at least 1"),
    (["--small", "--write-readme"], "does not write the README"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _bench().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
