"""The course lists of README.md and docs/index.md name every stage folder, once each, in order."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = r"(\d\d_[A-Za-z0-9_]+)"


def stage_folders() -> list[str]:
    """Every stages/NN_topic/ folder, in its number's order."""
    return sorted(p.name for p in (ROOT / "stages").iterdir() if p.is_dir() and re.fullmatch(STAGE, p.name))


def readme_course_table() -> list[str]:
    """The stage column of README.md's "## The course" table, top to bottom."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## The course\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| [")]
    listed = []
    for row in rows:
        match = re.match(rf"\| \[{STAGE}\]\(stages/{STAGE}/README\.md\) \|", row)
        assert match and match[1] == match[2], \
            f"README.md: a course row must read | [NN_topic](stages/NN_topic/README.md) |: {row[:80]}"
        listed.append(match[1])
    return listed


def index_course_list() -> list[str]:
    """The stages docs/index.md's "The course, in order" list links, top to bottom."""
    listed = []
    page = (ROOT / "docs/index.md").read_text(encoding="utf-8")
    for label, folder in re.findall(rf"^ +- \[(\d\d) · [^\]]+\]\(stages/{STAGE}\.md\)", page, flags=re.M):
        assert label == folder[:2], f"docs/index.md: the entry numbered {label} links to stage {folder}"
        listed.append(folder)
    return listed


def differences(listed: list[str], folders: list[str]) -> list[str]:
    """What is wrong with a list of stages against the folders: missing, unknown, repeated, out of order."""
    problems = [f"stage folder {f} is not listed" for f in folders if f not in listed]
    problems += [f"{f} is listed but stages/{f}/ does not exist" for f in listed if f not in folders]
    problems += [f"{f} is listed {listed.count(f)} times" for f in sorted(set(listed)) if listed.count(f) > 1]
    if not problems and listed != folders:
        problems.append(f"out of order: listed {listed}, the folders' order is {folders}")
    return problems


def test_readme_course_table_lists_every_stage_in_order() -> None:
    assert differences(readme_course_table(), stage_folders()) == []


def test_docs_index_lists_every_stage_in_order() -> None:
    assert differences(index_course_list(), stage_folders()) == []


def test_differences_name_a_missing_an_unknown_and_a_misplaced_stage() -> None:
    folders = ["00_a", "01_b", "02_c"]
    assert differences(["00_a", "02_c"], folders) == ["stage folder 01_b is not listed"]
    assert differences(["00_a", "01_b", "02_c", "03_d"], folders) == ["03_d is listed but stages/03_d/ does not exist"]
    assert differences(["00_a", "02_c", "01_b"], folders) == [
        f"out of order: listed ['00_a', '02_c', '01_b'], the folders' order is {folders}"]
    assert differences(["00_a", "01_b", "01_b", "02_c"], folders) == ["01_b is listed 2 times"]
