"""goose_core's modules import each other without a cycle, and the low seams stay low.

The graph is read from the source (every ``import`` statement, those inside functions too), one
node per file; importing a package counts as importing its ``__init__.py``, and the parent
packages Python runs first are left out (they would tie every module to ``goose_core/__init__``);
what a package reaches (:func:`_reached`) counts them, and one test imports the engine for real.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "goose_core"


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, tuple[set[str], set[str]]]:
    """Module -> (the goose_core modules it imports, the top-level names of everything else it imports)."""
    modules = {_module_of(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, tuple[set[str], set[str]]] = {name: (set(), set()) for name in modules}
    for name, path in modules.items():
        inside, outside = found[name]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [s for s in subs if s in modules]  # from package import submodule
                if len(targets) < len(subs):
                    targets.append(node.module)  # names defined by the module itself
            else:
                continue
            inside.update(t for t in targets if t in modules and t != name)
            outside.update(t.split(".")[0] for t in targets if t.split(".")[0] != "goose_core")
    return found


def _graph() -> dict[str, set[str]]:
    return {name: inside for name, (inside, _) in _imports().items()}


def _reached(graph: dict[str, set[str]], starts: set[str]) -> set[str]:
    """Every module importing ``starts`` runs: what they import, transitively, and the packages
    above each (Python runs a package's ``__init__`` before its modules), except goose_core's own
    ``__init__``, the public facade, which loads its names lazily."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = [".".join(module.split(".")[:k]) for k in range(2, module.count(".") + 1)]
        todo += [m for m in (*graph[module], *parents) if m in graph]
    return seen


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("module, allowed", [
    ("goose_core.grad_sync", set()),                                   # the interface: imports nothing of goose
    ("goose_core.metadata", {"goose_core.grad_sync"}),
    ("goose_core.pipeline.stage", None),                               # checked below: no data_parallel, no optim
    ("goose_core.pipeline.tied", None),
])
def test_the_seams_stay_low(module: str, allowed: set[str] | None) -> None:
    imports = _graph()[module]
    if allowed is not None:
        assert imports == allowed
    else:
        assert not {m for m in imports if m.startswith(("goose_core.data_parallel", "goose_core.optim"))}


def test_family_knowledge_imports_no_parallelism() -> None:
    # goose_core.models is read by tensor_parallel and pipeline; it must not read them back (the
    # old tp adapters imported tensor_parallel.plan and registered themselves on import).
    graph = _graph()
    for module in (m for m in graph if m.startswith("goose_core.models")):
        assert {m for m in graph[module] if not m.startswith("goose_core.models")} == set(), module


def _package(name: str) -> set[str]:
    return {m for m in _graph() if m == name or m.startswith(name + ".")}


@pytest.mark.parametrize("package", ["goose_core.engine", "goose_core.instruments"])
def test_the_engine_and_the_instruments_know_no_model(package: str) -> None:
    # The engine runs cells, functions of one tensor; the 🤗 binding is goose_core.pipeline's.
    imports = _imports()
    reached = _reached(_graph(), _package(package))
    binding = sorted(m for m in reached if m.startswith(("goose_core.pipeline", "goose_core.models",
                                                          "goose_core.tensor_parallel")))
    assert not binding, f"{package} reaches {binding}"
    via = sorted(m for m in reached if "transformers" in imports[m][1])
    assert not via, f"{package} imports transformers through {via}"


def test_the_reach_follows_imports_and_parent_packages() -> None:
    graph = {"goose_core.a.x": {"goose_core.b.y"}, "goose_core.b.y": set(), "goose_core.b": {"goose_core.c"},
             "goose_core.c": set(), "goose_core.a": set(), "goose_core.d": set()}
    assert _reached(graph, {"goose_core.a.x"}) == {"goose_core.a.x", "goose_core.a", "goose_core.b.y",
                                                  "goose_core.b", "goose_core.c"}


def test_the_library_imports_nothing_of_the_course_or_the_tools() -> None:
    # stages/ and tools/ sit on the test path beside goose_core: an import of theirs would pass
    # here and fail for every user of the installed library.
    theirs = {p.stem for folder in ("stages", "tools") for p in (ROOT / folder).iterdir()
              if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert {"course", "sweep"} <= theirs
    wrong = {m: sorted(outside & theirs) for m, (_, outside) in _imports().items() if outside & theirs}
    assert not wrong, wrong


def test_importing_the_engine_and_the_instruments_loads_no_transformers() -> None:
    code = ("import importlib, pkgutil, sys, goose_core.engine, goose_core.instruments\n"
            "for package in (goose_core.engine, goose_core.instruments):\n"
            "    for module in pkgutil.iter_modules(package.__path__):\n"
            "        importlib.import_module(f'{package.__name__}.{module.name}')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'"
            " or m.startswith(('goose_core.pipeline', 'goose_core.models', 'goose_core.tensor_parallel'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
