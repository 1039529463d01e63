"""mkdocs hook: the page train/config.md, goose train's configuration reference, written at build
time from goose_core/train/config.py (the fields ``--help`` is built from), so it cannot drift."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

__all__ = ["on_files"]

ROOT = Path(__file__).resolve().parents[2]


def on_files(files: Files, config: Any) -> Files:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the checkout's goose_core: standard library only, no torch
    from goose_core.train.reference import config_reference

    files.append(File.generated(config, "train/config.md", content=config_reference()))
    return files
