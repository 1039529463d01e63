"""goose_core's modules import each other without a cycle, and the low seams stay low.

The graph is read from the source (every ``import`` statement, those inside functions too), one
node per file; importing a package counts as importing its ``__init__.py``, and the parent
packages Python runs first are left out (they would tie every module to ``goose_core/__init__``).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "goose_core"


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_of(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
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
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


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
