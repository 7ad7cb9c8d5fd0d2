"""The layout the arrows show: ``cli -> flows -> pipeline -> {stages, storage}``, no import cycle
between the project's modules (function-local imports count), one ``longtail.`` namespace, and
modules small enough to read."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "storage", "pipeline", "flows")
#: what each package may not import (the house's arrows, DESIGN.md)
FORBIDDEN = {"stages": {"storage", "pipeline", "flows", "prefect"},
             "storage": {"pipeline", "flows", "prefect"},
             "pipeline": {"flows"}}
#: lines a module may have ("no module over about 500 lines")
MAX_LINES = 560


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, mod: str):
    """Every imported name (top level and inside functions), relative imports resolved."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def _graph():
    files = _modules()
    graph, bare, bad = {m: set() for m in files}, [], []
    for mod, path in files.items():
        for target in _imports(path, mod):
            top = target.split(".")[0]
            if top in PACKAGES:
                bare.append(f"{mod} imports {target}")
            if not target.startswith("longtail."):
                if top in FORBIDDEN.get(mod.split(".")[0], ()):
                    bad.append(f"{mod} -> {target}")
                continue
            target = target[len("longtail."):]
            if target.split(".")[0] in FORBIDDEN.get(mod.split(".")[0], ()):
                bad.append(f"{mod} -> {target}")
            parts = target.split(".")
            for i in range(len(parts), 0, -1):  # the longest known module name
                cand = ".".join(parts[:i])
                if cand in files and cand != mod:
                    graph[mod].add(cand)
                    break
    return files, graph, bare, bad


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        sccs.append(sorted(comp))
    return sccs


def test_no_import_cycle_between_modules():
    files, graph, _, _ = _graph()
    # a package's __init__ re-exporting its own submodules is not a design cycle
    cycles = [c for c in _cycles(graph)
              if not (len(c) == 2 and files[c[0]].name == "__init__.py" and c[1].startswith(c[0] + "."))]
    assert cycles == []


def test_arrows_point_one_way():
    assert _graph()[3] == []


def test_one_longtail_namespace():
    """``import pipeline`` would pick up any other distribution's top-level ``pipeline``."""
    assert _graph()[2] == []


def test_the_cycle_check_sees_function_local_imports():
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph) == [["a", "b"]]


@pytest.mark.parametrize("mod", sorted(_modules()))
def test_modules_stay_readable(mod):
    assert len(_modules()[mod].read_text().splitlines()) <= MAX_LINES
