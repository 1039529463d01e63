"""The course's own tooling: find a stage, run its train.py, read what it printed, check its chapter.

The library knows nothing of the course; the course stands on the library. Stage tests import
this module by name (``from course import load_train_script``): ``pyproject.toml`` puts
``stages/`` on pytest's ``pythonpath``. ``make test-stage N`` runs it as a script to find the
folder of stage N. :func:`chapter_problems` and :func:`notes_problems` say where a chapter
(README.md) or its measurements (NOTES.md) leave the template ``stages/test_course.py`` holds
every stage to.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["STAGES_DIR", "CHAPTER_HEADINGS", "CHAPTER_MAX_LINES", "CORE_MAX_LINES", "HISTORY", "MACHINES",
           "stage_dir", "stage_tests", "load_train_script", "run_train_script", "beside_reference_diffs",
           "headings", "section", "chapter_problems", "notes_problems"]

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
    the stage's lesson introduces (``lessons.LESSONS``)."""
    from lessons import lesson  # stages/ is on the path: this file's folder

    folder = stage_dir(number)
    root = STAGES_DIR.parent
    tests = [root / p for p in lesson(int(number), root).unit_tests if p.rsplit("/", 1)[1].startswith("test_")]
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


#: A chapter's level-2 headings, exactly these, in this order.
CHAPTER_HEADINGS = ["Why", "The picture", "The core code", "The change to the loop", "The proof", "Break it",
                    "Details"]
CHAPTER_MAX_LINES = 200
#: The core code is an excerpt: at most this many lines of code in its fenced blocks.
CORE_MAX_LINES = 40
#: Development history, which a chapter never tells (it speaks of the concept and the code as
#: they are), and machine numbers, which live in the stage's NOTES.md with their command.
#: "issue" is history only with an article or a number: "the order both sides issue" is NCCL's.
HISTORY = [r"\b(?:the|this|that|an|our|its)\s+issue\b", r"\bissue(?:'s|\s*#?\d)", r"pipegoose",
           r"\bother engineers?\b", r"\bwas not taken\b", r"\bused to be\b", r"\bwe found\b",
           r"\bsessions?\b", r"\bformerly\b", r"\bpull request\b"]
MACHINES = [r"\bH100\b", r"\bH200\b"]
#: A command that reproduces a table: a line of a fenced block, or an inline code span.
_COMMAND = re.compile(r"(?m)^\s*(?:\$ )?(?:[A-Z_]+=\S+ )*(?:make|python3?|torchrun|pytest)\b"
                      r"|`(?:[A-Z_]+=\S+ )*(?:make|python3?|torchrun|pytest) [^`]+`")


def headings(text: str) -> list[tuple[int, int, str]]:
    """``(line index, level, title)`` of every Markdown heading outside fenced code."""
    found, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) +(.+?)\s*$", line)):
            found.append((i, len(match.group(1)), match.group(2)))
    return found


def section(text: str, title: str, level: int) -> str | None:
    """The body of the heading ``title`` at ``level``, up to the next heading of that level or
    higher (a ``###`` section ends at the next ``##`` or ``###``); None if there is no such heading."""
    lines, found = text.splitlines(), headings(text)
    for k, (start, lvl, name) in enumerate(found):
        if (lvl, name) == (level, title):
            end = next((i for i, later, _ in found[k + 1:] if later <= level), len(lines))
            return "\n".join(lines[start + 1:end])
    return None


def chapter_problems(text: str, number: int) -> list[str]:
    """What keeps chapter ``number``'s README from the template (empty: it follows it)."""
    lines, found = text.splitlines(), headings(text)
    problems = []
    if not lines or not lines[0].startswith(f"# Stage {number:02d} · "):
        problems.append(f"the first line is not '# Stage {number:02d} · <title>'")
    after = [line for line in lines[1:] if line.strip()]
    if not after or not after[0].startswith("**Prerequisites:**"):
        problems.append("no '**Prerequisites:**' line right after the title")
    if [t for _, lvl, t in found if lvl == 1] != [lines[0][2:].strip() if lines else ""]:
        problems.append("a level-1 heading other than the title")
    if (level2 := [t for _, lvl, t in found if lvl == 2]) != CHAPTER_HEADINGS:
        problems.append(f"the level-2 headings are {level2}, not {CHAPTER_HEADINGS}")
    if len(lines) > CHAPTER_MAX_LINES:
        problems.append(f"{len(lines)} lines, more than {CHAPTER_MAX_LINES}")
    body = {title: section(text, title, 2) or "" for title in CHAPTER_HEADINGS}
    needs = {"The picture": (r"```|!\[", "an ASCII diagram or an image"),
             "The core code": (r"```[\s\S]*goose_core/|goose_core/[\s\S]*```", "a code excerpt and its path"),
             "The change to the loop": (r"```diff", "a ```diff block"),
             "The proof": (r"test_\w+", "the test that proves it"),
             "Break it": (r"```", "a fenced block to run")}
    for title, (pattern, what) in needs.items():
        if not re.search(pattern, body[title]):
            problems.append(f"'## {title}' lacks {what}")
    core = sum(len(block.splitlines()) for block in re.findall(r"```[^\n]*\n(.*?)```", body["The core code"], re.S))
    if core > CORE_MAX_LINES:
        problems.append(f"'## The core code' shows {core} lines of code, more than {CORE_MAX_LINES}")
    details = [t for _, lvl, t in headings(body["Details"]) if lvl == 3]
    problems += [f"'## Details' has no '### {t}'" for t in ("Public names used", "Run it") if t not in details]
    return problems + _history(text, HISTORY + MACHINES)


def _history(text: str, patterns: list[str]) -> list[str]:
    found = []
    for pattern in patterns:
        for match in re.finditer(pattern, text, re.IGNORECASE):
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"line {line}: {match.group(0)!r} tells development history or a machine's numbers")
    return found


def notes_problems(text: str) -> list[str]:
    """What keeps a stage's NOTES.md from its rules (empty: none): every table headed by the
    command that reproduces it (between the table and the heading or table before it), and no
    development history (machine names are welcome here: the numbers are theirs)."""
    lines, problems = text.splitlines(), []
    start, fenced, in_table = 0, False, False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        table_line = not fenced and line.startswith("|")
        if table_line and not in_table and not _COMMAND.search("\n".join(lines[start:i])):
            problems.append(f"line {i + 1}: a table with no command above it that reproduces it")
        if (in_table and not table_line) or (not fenced and re.match(r"#{1,6} ", line)):
            start = i
        in_table = table_line
    return problems + _history(text, HISTORY)


if __name__ == "__main__":
    try:
        print(" ".join(str(path) for path in stage_tests(sys.argv[1] if len(sys.argv) > 1 else "")))
    except ValueError as err:
        sys.exit(f"make test-stage: {err} (usage: make test-stage 3)")
