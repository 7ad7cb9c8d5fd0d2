"""Cache keys from the code a stage really runs: the import closure of its modules."""

import shutil
import textwrap

import pytest

from longtail.pipeline import keys
from longtail.pipeline.evaluate import evaluate_code_version
from longtail.pipeline.report.build import report_code_version
from longtail.stages.registry import make_method


@pytest.fixture
def tree(tmp_path):
    """A temporary copy of the project's packages, and the roots that point the closures at it."""
    roots = {}
    for name, path in keys.PROJECT_ROOTS.items():
        shutil.copytree(path, tmp_path / path.name, ignore=shutil.ignore_patterns("__pycache__"))
        roots[name] = tmp_path / path.name
    return tmp_path, roots


def _edit(path):
    path.write_text(path.read_text() + "\n# edited\n")


def test_the_copy_hashes_like_the_tree(tree):
    _, roots = tree
    m = make_method("tau-norm")
    assert keys.method_code_version(m, roots) == keys.method_code_version(m)
    assert keys.code_version(["longtail.pipeline.evaluate"], roots) == evaluate_code_version()


@pytest.mark.parametrize("name, module", [("tau-norm", "evaluate/classification.py"),     # tau is chosen with per_class_accuracy
                                          ("logit-adjust", "calibrate.py"),  # prior_from_log
                                          ("ce+pc", "calibrate.py"),
                                          ("ce", "losses/classic.py")])
def test_editing_a_module_a_method_imports_makes_it_stale(tree, name, module):
    root, roots = tree
    m = make_method(name)
    before = keys.method_code_version(m, roots)
    _edit(root / "stages" / module)
    assert keys.method_code_version(m, roots) != before


def test_editing_unrelated_code_changes_neither_method_nor_evaluation_keys(tree):
    root, roots = tree
    ce = make_method("ce")
    before = (keys.method_code_version(ce, roots), keys.code_version(["longtail.pipeline.evaluate"], roots))
    for path in ("stages/extract.py", "stages/datasets.py", "pipeline/extract.py", "stages/registry.py",
                 "flows/cli.py"):
        _edit(root / path)
    assert (keys.method_code_version(ce, roots), keys.code_version(["longtail.pipeline.evaluate"], roots)) == before
    closure = keys.import_closure(["longtail.pipeline.evaluate"])
    assert "longtail.stages.extract" not in closure and "longtail.pipeline.extract" not in closure
    assert "longtail.stages.label_shift" in closure and "longtail.stages.registry" not in closure
    # the evaluation key follows the evaluation code, the report key the report code
    ev_before = keys.code_version(["longtail.pipeline.evaluate"], roots)
    rep_before = keys.code_version(["longtail.pipeline.report.build"], roots)
    _edit(root / "stages" / "label_shift.py")
    assert keys.code_version(["longtail.pipeline.evaluate"], roots) != ev_before
    _edit(root / "pipeline" / "report" / "plots.py")
    assert keys.code_version(["longtail.pipeline.report.build"], roots) != rep_before
    assert report_code_version() == keys.code_version(["longtail.pipeline.report.build"])


def test_closure_follows_function_local_and_relative_imports_inside_a_users_package(tmp_path, monkeypatch):
    pkg = tmp_path / "closurepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "helper.py").write_text("X = 1\n")
    (pkg / "unused.py").write_text("Y = 2\n")
    (pkg / "main.py").write_text(textwrap.dedent("""
        import numpy as np
        from longtail.stages.errors import LongtailError

        def f():
            from .sub import helper
            return helper.X
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    closure = keys.import_closure(["closurepkg.main"])
    assert {"closurepkg.main", "closurepkg.sub", "closurepkg.sub.helper", "longtail.stages.errors"} <= set(closure)
    assert "closurepkg.unused" not in closure and "numpy" not in closure
    before = keys.code_version(["closurepkg.main"])
    (pkg / "sub" / "helper.py").write_text("X = 2\n")
    assert keys.code_version(["closurepkg.main"]) != before


def test_code_versions_computed_from_many_threads_at_once_agree():
    """The threads task runner computes method keys concurrently; CPython 3.11's parser is not
    thread-safe, so keys parses one source at a time (and each once)."""
    from concurrent.futures import ThreadPoolExecutor

    from longtail.pipeline.keys import code_version

    mods = ["longtail.stages.cala", "longtail.stages.dlsa.wrapper", "longtail.stages.lade",
            "longtail.pipeline.evaluate"] * 8
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda m: code_version([m]), mods))
    assert got == [code_version([m]) for m in mods]
