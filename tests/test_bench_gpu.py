"""benchmarks/bench_gpu.py on the CPU at its tiny size: the same stage functions a GPU run calls.

No time is asserted: a run on the CPU compared with a run on the CPU must agree exactly (the same
seed on the same device gives the same bytes), the table has one row per stage, a spent budget
skips stages without losing their rows, and the README gets the table between its markers only.
"""

import importlib.util
import json
import pathlib
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ["extract", "neighbours", "ce", "evaluate", "dlsa-cascade", "heuristic-cala"]


def _bench():
    """The script as a module (once; its dataclasses need it in ``sys.modules``)."""
    if "bench_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_gpu"]


def _table_rows(markdown: str) -> list[str]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| stage |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


README = "# x\n\n## Performance\n\nCPU table.\n\n### Heads at their defaults\n\nMore.\n\n## Development\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    bench = _bench()
    tmp = tmp_path_factory.mktemp("gpu-bench")
    out = tmp / "gpu.md"
    readme = tmp / "README.md"
    readme.write_text(README)
    rc = bench.main(["--device", "cpu", "--tiny", "--threads", "1", "--stages", ",".join(STAGES),
                     "--out", str(out), "--write-readme", "--readme", str(readme)])
    return bench, rc, out, readme


def test_tiny_cpu_run_has_a_row_per_stage_and_cpu_agrees_with_cpu_exactly(tiny_run):
    bench, rc, out, _ = tiny_run
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {r["key"]: r for r in doc["stages"]}
    assert list(rows) == STAGES  # the priority order
    assert len(_table_rows(out.read_text())) == len(STAGES)
    for key, r in rows.items():
        assert "seconds" in r["device_full"] and "seconds" in r["cpu"], key
        assert r["check"]["ok"], (key, r["check"])
    # the same code on the same device and seed: no difference at all
    assert rows["extract"]["check"]["relative_max_abs_diff"] == 0.0
    assert rows["neighbours"]["check"]["overlap"] == 1.0
    assert rows["neighbours"]["device_full"]["faiss"].endswith("on the CPU")
    for key in ("ce", "heuristic-cala"):
        assert rows[key]["check"]["logits_max_abs_diff"] == 0.0
        assert rows[key]["check"]["same_predictions"] == 1.0
        assert rows[key]["check"]["balanced_accuracy_diff_points"] == 0.0
    assert rows["dlsa-cascade"]["check"]["loglik_max_abs_diff"] == 0.0
    assert rows["dlsa-cascade"]["check"]["same_group"] == 1.0
    assert rows["evaluate"]["check"]["metrics_max_abs_diff"] == 0.0
    # the comparison subset is smaller than the full set, the evaluation runs on the full test split
    assert rows["ce"]["cmp_rows"] < rows["ce"]["full_rows"] == bench.TINY.train
    assert rows["evaluate"]["cmp_rows"] == rows["evaluate"]["full_rows"]


def test_readme_gets_the_table_between_markers_before_heads_at_their_defaults(tiny_run):
    bench, _, out, readme = tiny_run
    text = readme.read_text()
    start, end = text.index(bench.START_MARKER), text.index(bench.END_MARKER)
    assert text.index("CPU table.") < start < end < text.index("### Heads at their defaults")
    assert text.count(bench.START_MARKER) == 1
    block = text[start + len(bench.START_MARKER):end]
    assert len(_table_rows(block)) == len(STAGES)
    # rendering the saved run again replaces the block, and nothing else moves
    assert bench.main(["--from-json", str(out.with_suffix(".json")), "--write-readme", "--readme",
                       str(readme)]) == 0
    again = readme.read_text()
    assert again.count(bench.START_MARKER) == 1
    assert again[:start] == text[:start] and again[again.index(bench.END_MARKER):] == text[end:]


def test_a_tiny_cpu_run_never_goes_into_the_project_readme(tiny_run, capsys):
    bench, _, out, _ = tiny_run
    before = (ROOT / "README.md").read_text()
    assert bench.main(["--from-json", str(out.with_suffix(".json")), "--write-readme"]) == 2
    assert "CUDA device" in capsys.readouterr().err
    assert (ROOT / "README.md").read_text() == before


def test_a_spent_budget_skips_every_stage_but_keeps_its_row(tmp_path):
    bench = _bench()
    out = tmp_path / "gpu.md"
    rc = bench.main(["--device", "cpu", "--tiny", "--threads", "1", "--stages", "ce,evaluate",
                     "--budget-s", "0.001", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [r["key"] for r in doc["stages"]] == ["ce", "evaluate"]
    for r in doc["stages"]:
        assert r["device_full"]["stopped"] and "seconds" not in r["device_full"]
        assert "seconds" not in r["cpu"] and "check" not in r
    assert len(_table_rows(out.read_text())) == 2


def test_a_run_past_its_deadline_is_stopped_and_reported():
    bench = _bench()
    t0 = time.perf_counter()
    result = bench._try(lambda: time.sleep(30) or {"seconds": 30.0}, 0.2)
    assert result["stopped"] and "seconds" not in result
    assert time.perf_counter() - t0 < 30  # it did not sleep to the end (not a timing assertion)


def test_the_comparison_subset_keeps_every_class(tmp_path):
    bench = _bench()
    from longtail.storage.featurestore import open_store

    spec = bench.TINY
    bench.write_store(spec, str(tmp_path / "s.zarr"))
    store = open_store(str(tmp_path / "s.zarr"))
    full = bench.Data("full", store.read("train"), store.read("val"), store.read("test"))
    cmp = bench.comparison_data(full, spec.cmp_train, spec.cmp_val_per_class, spec.cmp_test_per_class)
    counts = full.train.class_counts
    assert (cmp.train.class_counts >= 1).all() and (cmp.train.class_counts <= counts).all()
    np.testing.assert_array_equal(cmp.train.class_counts, np.bincount(cmp.train.labels, minlength=spec.classes))
    assert abs(len(cmp.train) - spec.cmp_train) <= spec.classes  # round(n_c R / N), at least 1 per class
    for split, per in (("val", spec.cmp_val_per_class), ("test", spec.cmp_test_per_class)):
        sub = getattr(cmp, split)
        assert (np.bincount(sub.labels, minlength=spec.classes) == per).all()
        np.testing.assert_array_equal(sub.class_counts, cmp.train.class_counts)
    # the rows are the full set's own rows, features included
    rows = np.flatnonzero(np.isin(full.train.index, cmp.train.index))
    np.testing.assert_array_equal(full.train.features[rows], cmp.train.features)


def test_runs_merge_stage_by_stage_keeping_what_was_measured(tiny_run, tmp_path):
    bench, _, out, _ = tiny_run
    measured = json.loads(out.with_suffix(".json").read_text())
    skipped_out = tmp_path / "skipped.md"
    assert bench.main(["--device", "cpu", "--tiny", "--threads", "1", "--stages", "ce,lws", "--budget-s", "0.001",
                       "--out", str(skipped_out)]) == 0
    skipped = json.loads(skipped_out.with_suffix(".json").read_text())
    merged = bench.merge([skipped, measured])
    rows = {r["key"]: r for r in merged["stages"]}
    assert list(rows) == ["ce", "lws"] + [k for k in STAGES if k != "ce"]
    assert rows["ce"] == next(r for r in measured["stages"] if r["key"] == "ce")  # the measured row wins
    assert "seconds" not in rows["lws"]["device_full"]  # only the skipped run has it
    assert merged["facts"]["runs"] == 2
    assert "over 2 runs" in bench.render(merged)
    other = {**measured, "facts": {**measured["facts"], "device": "cuda", "gpu": "another"}}
    with pytest.raises(ValueError):
        bench.merge([measured, other])


def test_longtail_imports_from_the_checkout_when_not_installed(tmp_path):
    """Where ``pip install -e .`` is refused (another Python), the script links the package folders;
    checked in a Python without site-packages (``-S``), where nothing of longtail is installed."""
    import subprocess

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_gpu; folder = bench_gpu.importable_longtail(); "
            "import longtail.stages.errors as e; print(folder is not None, e.__file__.startswith(folder))")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT / "benchmarks")], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.split() == ["True", "True"]
    assert _bench().importable_longtail() is None  # installed here: nothing to do


def test_write_readme_on_the_cpu_is_refused_before_any_work(tmp_path, capsys):
    bench = _bench()
    before = (ROOT / "README.md").read_text()
    assert bench.main(["--device", "cpu", "--tiny", "--write-readme", "--out", str(tmp_path / "g.md")]) == 2
    assert "CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()  # nothing ran
    assert (ROOT / "README.md").read_text() == before
