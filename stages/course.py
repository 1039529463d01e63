"""The course's own tooling: find a stage, load or launch its train.py, read what it printed.

The library knows nothing of the course; the course stands on the library. Stage tests import
this module by name (``from course import load_train_script``): ``pyproject.toml`` puts
``stages/`` on pytest's ``pythonpath``. ``make test-stage N`` runs it as a script to find the
folder of stage N.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["STAGES_DIR", "stage_dir", "stage_tests", "load_train_script", "run_train_script", "beside_reference_diffs"]

STAGES_DIR = Path(__file__).resolve().parent


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


def stage_tests(number: str) -> list[Path]:
    """What ``make test-stage N`` runs: the stage's folder, and the unit tests of ``tests/`` that
    ``lessons.LESSONS`` says the stage introduces (a path there may be a file-name prefix)."""
    from lessons import LESSONS  # stages/ is on the path: this file's folder

    folder = stage_dir(number)
    root = STAGES_DIR.parent
    tests = sorted({path for entry in LESSONS.get(int(number), ()) if entry.startswith("tests/")
                    for path in root.glob(entry + ("*" if not entry.endswith(".py") else ""))
                    if path.is_file() and path.suffix == ".py"})
    return [folder, *tests]


def load_train_script(number: str) -> ModuleType:
    """Import stage ``number``'s ``train.py`` as a module (stage folders are not packages)."""
    path = stage_dir(number) / "train.py"
    spec = importlib.util.spec_from_file_location(f"goose_stage_{int(number):02d}_train", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_train_script(number: str, nproc: int, *args: str, timeout: float = 180.0) -> str:
    """Launch stage ``number``'s ``train.py`` under ``torchrun --standalone`` with ``nproc``
    ranks, as its docstring tells a reader to, and return what it printed.

    Raises:
        AssertionError: the run failed; the message ends with its stderr.
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    script = stage_dir(number) / "train.py"
    out = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}", str(script), *args],
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, f"{script} failed:\n{out.stderr[-3000:]}"
    return out.stdout


def beside_reference_diffs(stdout: str) -> list[float]:
    """The ``|diff|`` column of every table row that ``format_beside_reference`` printed."""
    rows = [line.split() for line in stdout.splitlines()]
    return [float(row[3]) for row in rows if len(row) == 4 and row[0].isdigit()]


if __name__ == "__main__":
    try:
        print(" ".join(str(path) for path in stage_tests(sys.argv[1] if len(sys.argv) > 1 else "")))
    except ValueError as err:
        sys.exit(f"make test-stage: {err} (usage: make test-stage 3)")
