"""docs/architecture.md's package tree names every module of goose_core, and only modules that exist.

The tree is the first code block under "## Package layout". Under its ``goose_core/`` line, a line
indented two spaces opens a package (``  pkg/   file.py   text``) or names a top-level module
(``  file.py   text``); a deeper line either names more modules of the open package
(``           file.py   text``) or continues the text above it. A line may name several modules
(``a.py, b.py  text``), and its text may name one more after a semicolon (``text; c.py  text``).
A line back at column 0 ends goose_core's part of the tree.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = r"[A-Za-z_]\w*\.py(?:,\s*[A-Za-z_]\w*\.py)*"
ENTRY = re.compile(rf"({MODULES})(?:\s+(.*))?$")
AFTER_SEMICOLON = re.compile(rf";\s+({MODULES})\s{{2,}}")


def tree_block(page: str) -> list[str]:
    """The lines of the code block that opens the "## Package layout" section."""
    section = page.split("\n## Package layout\n", 1)[1]
    return section.split("```", 2)[1].splitlines()[1:]


def names_in(text: str) -> list[str]:
    """Module names at the start of an entry's text and after each ``; `` inside it."""
    entry = ENTRY.match(text)
    if entry is None:
        return []
    found = re.split(r",\s*", entry[1])
    for match in AFTER_SEMICOLON.finditer(entry[2] or ""):
        found += re.split(r",\s*", match[1])
    return found


def tree_paths(lines: list[str]) -> tuple[set[str], set[str]]:
    """(modules, packages) the tree names under goose_core/, as paths relative to goose_core/."""
    modules: set[str] = set()
    packages: set[str] = set()
    inside, package = False, ""
    for line in lines:
        if not line.strip():
            continue
        if not line.startswith(" "):  # column 0: goose_core/ opens the tree, anything else ends it
            if inside:
                break
            inside = line.strip() == "goose_core/"
            continue
        if not inside:
            continue
        body = line.strip()
        if re.match(r"  \S", line):  # a package or a top-level module
            first = body.split()[0]
            if first.endswith("/"):
                package = first
                packages.add(first.rstrip("/"))
                body = body[len(first):].strip()
            else:
                package = ""
        modules |= {package + name for name in names_in(body)}
    return modules, packages


def code_paths() -> tuple[set[str], set[str]]:
    """(modules, packages) under goose_core/: every .py but __init__.py, every folder with an __init__.py."""
    base = ROOT / "goose_core"
    modules = {p.relative_to(base).as_posix() for p in base.rglob("*.py") if p.name != "__init__.py"}
    packages = {p.parent.relative_to(base).as_posix() for p in base.rglob("*/__init__.py")}
    return modules, packages


def test_the_tree_names_every_module_and_package_and_no_other() -> None:
    named_modules, named_packages = tree_paths(tree_block((ROOT / "docs/architecture.md").read_text(encoding="utf-8")))
    modules, packages = code_paths()
    assert named_modules, "no module found in docs/architecture.md's package tree: has its format changed?"
    problems = [f"goose_core/{m}: named in the tree, no such module" for m in sorted(named_modules - modules)]
    problems += [f"goose_core/{m}: a module the tree does not name" for m in sorted(modules - named_modules)]
    problems += [f"goose_core/{p}/: named in the tree, no such package" for p in sorted(named_packages - packages)]
    problems += [f"goose_core/{p}/: a package the tree does not name" for p in sorted(packages - named_packages)]
    assert not problems, "docs/architecture.md's package tree against goose_core/:\n" + "\n".join(problems)


def test_the_parser_reads_packages_modules_lists_and_continuations() -> None:
    tree = """\
goose_core/
  grid_pkg/      grid.py         the rank arithmetic
                 context.py      a description that runs on
                                 to a second line naming nothing.py in passing
  models/        a.py, b.py  both halves; c.py  a layout only
  loss.py        the loss
tests/           unit tests, one file per module, e.g. other.py
""".splitlines()
    assert tree_paths(tree) == ({"grid_pkg/grid.py", "grid_pkg/context.py", "models/a.py", "models/b.py",
                                 "models/c.py", "loss.py"}, {"grid_pkg", "models"})
