"""The package's two floors: inference modules never import the training floor, and no module imports
itself back through others (an import cycle), found by reading every module's imports."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import msr_utmos_cli

ROOT = Path(msr_utmos_cli.__file__).resolve().parent
PACKAGE = "msr_utmos_cli"
TRAINING = f"{PACKAGE}.training"
KNOWN_CYCLES: list[set[str]] = []  # none left: report_render imports report, never the other way


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(name: str) -> list[tuple[str, bool]]:
    """(package module imported, at module level) for every import in `name`'s source, lazy ones too;
    imports only for type checkers (`if TYPE_CHECKING:`) do not run and are left out."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names if a.name.startswith(PACKAGE))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                if base.startswith(PACKAGE):
                    for a in child.names:  # `from . import audio` names a module; `from . import __version__` not
                        sub = f"{base}.{a.name}"
                        found.append((sub if sub in MODULES else base, top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return [(m, top) for m, top in found if m in MODULES]


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"a"}, "b": set()}) == [{"a"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = {name: {m for m, _ in imports(name)} for name in MODULES}
    assert len(graph) > 20 and sum(map(len, graph.values())) > 30  # the walk did read the package
    assert [c for c in cycles(graph) if c not in KNOWN_CYCLES] == []


def test_inference_floor_never_imports_the_training_floor():
    """Only the CLI may reach training code, and only inside its distill and finetune commands."""
    commands = {f"{PACKAGE}.cli", f"{PACKAGE}.cli_train"}
    inference = [n for n in MODULES if not n.startswith(TRAINING)]
    assert {f"{PACKAGE}.model", f"{PACKAGE}.scoring", f"{PACKAGE}.cli"} <= set(inference)
    for name in inference:
        for m, top in imports(name):
            if m.startswith(TRAINING):
                assert name in commands and not top, f"{name} imports {m}"


@pytest.mark.parametrize("floor", ["inference", "training"])
def test_every_module_imports_and_the_inference_floor_loads_no_training_code(floor):
    names = [n for n in MODULES if n.startswith(TRAINING) == (floor == "training") and not n.endswith("__main__")]
    code = (f"import importlib, json, sys\nfor n in {names!r}:\n    importlib.import_module(n)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({TRAINING!r}))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    loaded = json.loads(p.stdout.strip().splitlines()[-1])
    assert loaded == [] if floor == "inference" else set(loaded) >= set(names)
