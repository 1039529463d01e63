"""mkdocs hook: publish chapters, their notes, the API reference and benchmark results from where they live.

Every stages/NN_topic/README.md becomes the page stages/NN_topic.md, and its notes, NOTES.md and
any NOTES_<topic>.md, the pages stages/NN_topic-notes.md and stages/NN_topic-notes_<topic>.md
listed after it (links between them, written as on GitHub, are pointed at those pages). Every
public package and top-level module of goose_core, found by walking the source at build time, gets
a page api/NAME.md that mkdocstrings fills from its docstrings (goose_core itself: api/index.md).
benchmarks/results.md and its plots/*.png (written by ``make bench``) become benchmarks/index.md
and its pictures, and benchmarks/gpu.md (written by ``make bench-gpu``) becomes benchmarks/gpu.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

__all__ = ["on_files", "on_config", "on_page_content", "api_modules", "api_page", "hidden_by_submodules",
           "top_level_names"]

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "goose_core"
# A Sphinx role in a docstring, as the Markdown renders it: :class:<code>~a.B</code>.
SPHINX_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):<code>(~?)([^<]*)</code>")


def _chapters() -> list[Path]:
    return sorted((ROOT / "stages").glob("[0-9][0-9]_*/README.md"))


def _notes(readme: Path) -> list[Path]:
    """The chapter's notes: NOTES.md, and any NOTES_<topic>.md beside it."""
    return sorted(readme.parent.glob("NOTES*.md"))


def _site_name(chapter: str, name: str) -> str:
    """A chapter folder's page on the site: README.md -> NN_topic.md, NOTES_x.md -> NN_topic-notes_x.md."""
    return f"{chapter}.md" if name == "README.md" else f"{chapter}-{name.lower()}"


def _relinked(chapter: str, text: str) -> str:
    # Links between a chapter and its notes are written as on GitHub (NOTES.md, README.md): point
    # them at the pages they become (a missing target stays missing, and the strict build says so).
    return re.sub(r"\]\((README\.md|NOTES[\w-]*\.md)(?=[)#])", lambda m: f"]({_site_name(chapter, m[1])}", text)


def api_modules() -> list[str]:
    """goose_core, its public packages at any depth and its public top-level modules, dotted, sorted."""
    base = ROOT / PACKAGE
    names = [PACKAGE]
    for init in sorted(base.rglob("__init__.py")):
        parts = init.parent.relative_to(ROOT).parts
        if len(parts) > 1 and not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    names += [f"{PACKAGE}.{module.stem}" for module in base.glob("*.py") if not module.name.startswith("_")]
    return sorted(names)


def api_page(module: str) -> str:
    """The page documenting ``module``: goose_core.distributed -> api/distributed.md."""
    rest = module.split(".")[1:]
    return "api/" + ("/".join(rest) if rest else "index") + ".md"


def _literal_all(tree: ast.Module) -> set[str] | None:
    """A module's __all__ when it is written as a literal (None when it is computed)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def hidden_by_submodules(module: str) -> list[str]:
    """Where each name of ``module``'s __all__ that a same-named submodule hides from mkdocstrings
    comes from (``from goose_core.partition.solve import solve``: goose_core.partition.solve.solve)."""
    folder = ROOT.joinpath(*module.split("."))
    if not (folder / "__init__.py").exists():
        return []
    tree = ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))
    exported = _literal_all(tree) or set()
    return [f"{node.module}.{alias.name}" for node in tree.body if isinstance(node, ast.ImportFrom)
            for alias in node.names if alias.asname is None and alias.name in exported
            and ((folder / f"{alias.name}.py").exists() or (folder / alias.name / "__init__.py").exists())]


def top_level_names() -> dict[str, str]:
    """Each name goose_core exports -> the module it comes from, read from the imports of its
    __init__.py (those under ``if TYPE_CHECKING:`` too, for a facade that imports lazily)."""
    tree = ast.parse((ROOT / PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    exported = _literal_all(tree)
    return {alias.asname or alias.name: node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{PACKAGE}.")
            for alias in node.names if exported is None or (alias.asname or alias.name) in exported}


def _api_content(module: str) -> str:
    if module != PACKAGE:
        hidden = "".join(f"\n::: {origin}\n" for origin in hidden_by_submodules(module))
        return f"# `{module}`\n\n::: {module}\n{hidden}"
    # goose_core's own names are its packages' names again: link each to where it is documented.
    longest_first = sorted(api_modules(), key=len, reverse=True)
    home = {name: next(m for m in longest_first if origin == m or origin.startswith(f"{m}."))
            for name, origin in top_level_names().items()}
    pages = "\n".join(f"- [`{name}`]({api_page(name)[len('api/'):]})" for name in api_modules() if name != PACKAGE)
    names = "\n".join(f"- [`{name}`]({api_page(home[name])[len('api/'):]}#{home[name]}.{name}) from `{home[name]}`"
                      for name in sorted(home))
    return (f"# API reference\n\nEach public package and module of `{PACKAGE}`, from its docstrings: the names its "
            f"`__all__` exports.\n\n{pages}\n\n## `{PACKAGE}`\n\n::: {PACKAGE}\n    options:\n      members: false\n\n"
            f"Its names, each documented with its package:\n\n{names}\n")


def on_config(config: Any) -> Any:
    # Expand the "Course: stages/" and "API reference: api/" placeholders in the nav.
    course = []
    for readme in _chapters():
        course += [f"stages/{_site_name(readme.parent.name, page.name)}" for page in [readme, *_notes(readme)]]
    expand = {("Course", "stages/"): course, ("API reference", "api/"): [api_page(m) for m in api_modules()]}
    for i, entry in enumerate(config["nav"] or []):
        for (title, placeholder), pages in expand.items():
            if isinstance(entry, dict) and entry.get(title) == placeholder:
                config["nav"][i] = {title: pages}
    return config


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    # Docstrings cite names the Sphinx way; on the API pages show the name alone (~ keeps its last part).
    if not page.file.src_uri.startswith("api/"):
        return html
    return SPHINX_ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)


def on_files(files: Files, config: Any) -> Files:
    for readme in _chapters():
        chapter = readme.parent.name
        for page in [readme, *_notes(readme)]:
            files.append(File.generated(config, f"stages/{_site_name(chapter, page.name)}",
                                        content=_relinked(chapter, page.read_text(encoding="utf-8"))))
    for module in api_modules():
        files.append(File.generated(config, api_page(module), content=_api_content(module)))
    results = ROOT / "benchmarks"
    files.append(File.generated(config, "benchmarks/index.md",
                                content=(results / "results.md").read_text(encoding="utf-8")))
    files.append(File.generated(config, "benchmarks/gpu.md", content=(results / "gpu.md").read_text(encoding="utf-8")))
    for plot in sorted((results / "plots").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/plots/{plot.name}", content=plot.read_bytes()))
    return files
