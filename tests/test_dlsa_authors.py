"""benchmarks/dlsa_authors.py refuses a bad ``--authors-repo`` cleanly: one line on stderr, status 2.

The authors' code is not needed (and not used): every case here fails before anything of theirs is
imported, and a fake checkout that has the right file names but not their functions is refused
after the import, naming what it lacks.
"""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "dlsa_authors.py"


def _script():
    if "dlsa_authors" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dlsa_authors", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["dlsa_authors"] = module
        spec.loader.exec_module(module)
    return sys.modules["dlsa_authors"]


def _fake_checkout(root: pathlib.Path, skip: str | None = None) -> pathlib.Path:
    """Every file the adapter requires, as harmless stubs (``skip`` left out)."""
    for rel in _script().REQUIRED_FILES:
        if rel == skip:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x: 1\n" if rel.endswith(".yaml") else "")
    return root


def test_missing_option_from_the_command_line_is_one_line_and_status_2():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--authors-repo is required" in lines[0] and "silicx/DLSA" in lines[0]


@pytest.mark.parametrize("case", ["no-such-dir", "empty-dir", "missing-one-file"])
def test_not_a_checkout_is_one_line_and_status_2(tmp_path, capsys, case):
    if case == "no-such-dir":
        repo, expect = tmp_path / "nope", "no such directory"
    elif case == "empty-dir":
        repo, expect = tmp_path, "missing train_dlsa.py"
    else:
        repo, expect = _fake_checkout(tmp_path, skip="solvers/regular_classifier.py"), \
            "missing solvers/regular_classifier.py"
    assert _script().main(["--authors-repo", str(repo)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlsa_authors: error: ") and expect in lines[0]


def test_right_files_without_their_functions_are_refused_after_import(tmp_path, capsys):
    repo = _fake_checkout(tmp_path)
    assert _script().main(["--authors-repo", str(repo)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "train_dlsa.py lacks divide_and_conquer" in lines[0]
    assert "train_dlsa" not in sys.modules  # the fake is forgotten again


def test_their_epochs_can_only_be_lowered_to_a_runnable_count(tmp_path, capsys):
    repo = _fake_checkout(tmp_path)
    assert _script().main(["--authors-repo", str(repo), "--classifier-epochs", "4"]) == 2
    assert "at least 5" in capsys.readouterr().err
