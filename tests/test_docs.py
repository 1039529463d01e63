"""The documentation site builds in strict mode (broken links, missing pages and docstring errors
fail), with a chapter page per stage, its notes beside it, and an API page per public package."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from mkdocs.structure.files import Files

ROOT = Path(__file__).resolve().parents[1]


def load_hook(root: Path | None = None) -> ModuleType:
    """docs/hooks/stages.py as a module (docs/ is no package), reading the tree at ``root``."""
    spec = importlib.util.spec_from_file_location("goose_docs_hook", ROOT / "docs/hooks/stages.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    if root is not None:
        hook.ROOT = root
    return hook


def exported(module: str) -> list[str]:
    """The names in ``module``'s ``__all__``, as Python computes it."""
    return list(importlib.import_module(module).__all__)


def site_page(src_uri: str) -> str:
    """Where a page lands with directory URLs: api/index.md -> api/index.html, api/loss.md -> api/loss/index.html."""
    stem = src_uri.removesuffix(".md")
    return f"{stem}.html" if stem.endswith("index") else f"{stem}/index.html"


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    out = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr
    for stage in sorted((ROOT / "stages").glob("[0-9][0-9]_*/README.md")):
        assert (tmp_path / "stages" / stage.parent.name / "index.html").exists()
        for notes in stage.parent.glob("NOTES*.md"):  # published beside the chapter
            assert (tmp_path / "stages" / f"{stage.parent.name}-{notes.stem.lower()}" / "index.html").exists()
    for page in ("benchmarks/index.html", "benchmarks/gpu/index.html"):  # make bench / make bench-gpu
        assert (tmp_path / page).exists()
    hook = load_hook()
    for module in hook.api_modules():
        html = (tmp_path / site_page(hook.api_page(module))).read_text(encoding="utf-8")
        assert ":class:<code>" not in html and ":func:<code>" not in html, f"{module}: a Sphinx role left as text"
        if module == "goose_core":  # its names link to their packages' pages
            found = re.findall(r'href="([\w/]+)/#(goose_core\.[\w.]+)"', html)
            links = {anchor.rsplit(".", 1)[1]: (page, anchor) for page, anchor in found}
            assert [name for name in exported(module) if name not in links] == [], "goose_core: names the index does not link"
            for page, anchor in links.values():
                assert f'id="{anchor}"' in (tmp_path / "api" / page / "index.html").read_text(encoding="utf-8"), anchor
            continue
        hidden = {origin.rsplit(".", 1)[1]: origin for origin in hook.hidden_by_submodules(module)}
        undocumented = [name for name in exported(module)
                        if f'id="{hidden.get(name, f"{module}.{name}")}"' not in html]
        assert undocumented == [], f"{module}: names of __all__ its API page does not document"


def test_api_modules_are_every_public_package_and_top_level_module() -> None:
    hook = load_hook()
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "goose_core").rglob("__init__.py")}
    top = {f"goose_core.{p.stem}" for p in (ROOT / "goose_core").glob("*.py") if not p.name.startswith("_")}
    assert set(hook.api_modules()) == packages | top
    assert hook.api_page("goose_core") == "api/index.md"
    assert hook.api_page("goose_core.distributed") == "api/distributed.md"


def fake_tree(root: Path) -> None:
    """Two chapters, one with notes; goose_core with a new package, a private one, a name a submodule hides."""
    files = {
        "stages/00_a/README.md": "# Stage 00\n\nMeasured: [NOTES.md](NOTES.md), [its table](NOTES.md#table).\n",
        "stages/00_a/NOTES.md": "# Stage 00 notes\n\nBack to [the chapter](README.md).\n",
        "stages/00_a/NOTES_memory.md": "# Stage 00 memory\n\nSee [NOTES.md](NOTES.md#top).\n",
        "stages/01_b/README.md": "# Stage 01\n",
        "goose_core/__init__.py": '__all__ = ["x"]\n',
        "goose_core/loss.py": '__all__ = ["y"]\n',
        "goose_core/_private.py": "",
        "goose_core/newpkg/__init__.py": 'from goose_core.newpkg.solve import solve\n__all__ = ["solve"]\n',
        "goose_core/newpkg/solve.py": '__all__ = ["solve"]\n',
        "goose_core/_hidden/__init__.py": "",
        "benchmarks/results.md": "# results\n",
        "benchmarks/gpu.md": "# gpu\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_the_hook_publishes_notes_beside_their_chapter_and_walks_new_packages(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    hook = load_hook(tmp_path)
    nav = hook.on_config({"nav": [{"Course": "stages/"}, {"API reference": "api/"}]})["nav"]
    assert nav == [{"Course": ["stages/00_a.md", "stages/00_a-notes.md", "stages/00_a-notes_memory.md",
                               "stages/01_b.md"]},
                   {"API reference": ["api/index.md", "api/loss.md", "api/newpkg.md"]}]
    config = SimpleNamespace(site_dir=str(tmp_path / "site"), use_directory_urls=True,
                             plugins=SimpleNamespace(_current_plugin=None))
    pages = {f.src_uri: f.content_string for f in hook.on_files(Files([]), config) if f.src_uri.endswith(".md")}
    assert "[NOTES.md](00_a-notes.md), [its table](00_a-notes.md#table)" in pages["stages/00_a.md"]
    assert "[the chapter](00_a.md)" in pages["stages/00_a-notes.md"]
    assert "[NOTES.md](00_a-notes.md#top)" in pages["stages/00_a-notes_memory.md"]
    assert pages["api/newpkg.md"] == ("# `goose_core.newpkg`\n\n::: goose_core.newpkg\n"
                                      "\n::: goose_core.newpkg.solve.solve\n")
    assert "::: goose_core\n" in pages["api/index.md"] and "[`goose_core.newpkg`](newpkg.md)" in pages["api/index.md"]


@pytest.mark.parametrize("html, shown", [
    (":class:<code>~goose_core.distributed.ParallelContext</code>", "<code>ParallelContext</code>"),
    (":mod:<code>goose_core.finite</code>", "<code>goose_core.finite</code>"),
    ("plain <code>x</code>", "plain <code>x</code>"),
])
def test_api_pages_show_sphinx_roles_as_names(html: str, shown: str) -> None:
    hook = load_hook()
    api, chapter = (SimpleNamespace(file=SimpleNamespace(src_uri=uri)) for uri in ("api/loss.md", "stages/00_a.md"))
    assert hook.on_page_content(html, api) == shown
    assert hook.on_page_content(html, chapter) == html
