"""mkdocs hook: publish stage chapters and benchmark results from where they live (one source).

Every stages/NN_topic/README.md becomes the page stages/NN_topic.md; benchmarks/results.md and
its plots/*.png (written by ``make bench``) become benchmarks/index.md and its pictures, and
benchmarks/gpu.md (written by ``make bench-gpu``) becomes benchmarks/gpu.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

__all__ = ["on_files", "on_config"]

ROOT = Path(__file__).resolve().parents[2]


def _chapters() -> list[Path]:
    return sorted((ROOT / "stages").glob("[0-9][0-9]_*/README.md"))


def on_config(config: Any) -> Any:
    # Expand the "Course: stages/" placeholder in the nav into one entry per chapter.
    for i, entry in enumerate(config["nav"] or []):
        if isinstance(entry, dict) and entry.get("Course") == "stages/":
            config["nav"][i] = {"Course": [f"stages/{p.parent.name}.md" for p in _chapters()]}
    return config


def on_files(files: Files, config: Any) -> Files:
    for readme in _chapters():
        files.append(File.generated(config, f"stages/{readme.parent.name}.md",
                                    content=readme.read_text(encoding="utf-8")))
    results = ROOT / "benchmarks"
    files.append(File.generated(config, "benchmarks/index.md",
                                content=(results / "results.md").read_text(encoding="utf-8")))
    files.append(File.generated(config, "benchmarks/gpu.md", content=(results / "gpu.md").read_text(encoding="utf-8")))
    for plot in sorted((results / "plots").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/plots/{plot.name}", content=plot.read_bytes()))
    return files
