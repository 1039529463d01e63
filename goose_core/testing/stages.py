"""Find a course stage's folder from its number (``make test-stage N``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["STAGES_DIR", "stage_dir", "load_train_script"]

STAGES_DIR = Path(__file__).resolve().parents[2] / "stages"


def stage_dir(number: str) -> Path:
    """The folder of stage ``number`` (``"3"`` or ``"03"``).

    Raises:
        ValueError: not a number, or no stage has it.
    """
    stages = sorted(p for p in STAGES_DIR.iterdir() if p.is_dir() and p.name[:2].isdigit())
    if not number.strip().isdigit():
        raise ValueError(f"stage must be a number such as 3 or 03, got {number!r}")
    for path in stages:
        if int(path.name[:2]) == int(number):
            return path
    known = ", ".join(p.name for p in stages)
    raise ValueError(f"no stage {number}; the stages are: {known}")


def load_train_script(number: str) -> ModuleType:
    """Import stage ``number``'s ``train.py`` as a module (stage folders are not packages)."""
    path = stage_dir(number) / "train.py"
    spec = importlib.util.spec_from_file_location(f"goose_stage_{int(number):02d}_train", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    try:
        print(stage_dir(sys.argv[1] if len(sys.argv) > 1 else ""))
    except ValueError as err:
        sys.exit(f"make test-stage: {err} (usage: make test-stage 3)")
