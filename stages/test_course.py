"""The course's tooling and rules: the stage lookup behind ``make test-stage N``, every chapter's
``train.py`` writing its loop out with only the public names its README lists, and the lesson
views that give each stage a git diff of its own."""

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from course import STAGES_DIR, stage_dir, stage_tests
from lessons import LESSONS, lesson_commits, stage_of

TRAIN_SCRIPTS = sorted(STAGES_DIR.glob("[0-9][0-9]_*/train.py"))


@pytest.mark.parametrize("number", ["0", "00", "1", "01"])
def test_numbers_with_and_without_padding(number: str) -> None:
    assert stage_dir(number).name.startswith(number.zfill(2))


@pytest.mark.parametrize("number, message", [("99", "no stage 99; the stages are: 00_reference"),
                                             ("x", "must be a number"), ("", "must be a number")])
def test_unknown_stage_is_a_clear_error(number: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stage_dir(number)


def test_a_stage_s_tests_include_the_unit_tests_it_introduces() -> None:
    names = [path.name for path in stage_tests("13")]
    assert names[0].startswith("13_") and "test_checkpoint_io.py" in names and "test_export.py" in names
    assert {p.name for p in stage_tests("7")} >= {"07_tensor_parallel", "test_tensor_parallel_plan.py"}


def test_make_test_stage_lists_the_stages_for_an_unknown_number() -> None:
    # What `make test-stage 99` runs: the paths on stdout, or the stages and the usage.
    found = subprocess.run([sys.executable, str(STAGES_DIR / "course.py"), "6"], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.split()[0].endswith("06_zero1")
    unknown = subprocess.run([sys.executable, str(STAGES_DIR / "course.py"), "99"], capture_output=True, text=True)
    assert unknown.returncode == 1 and "the stages are: 00_reference" in unknown.stderr
    assert "usage: make test-stage 3" in unknown.stderr


def _goose_imports(script: Path) -> dict[str, set[str]]:
    """``{module: names}`` of every ``from goose_core... import ...`` in ``script``."""
    imports: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("goose_core") for a in node.names), \
                f"{script}: import names from a goose_core package, not the module itself"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "goose_core":
            imports.setdefault(node.module, set()).update(a.name for a in node.names)
    return imports


def _listed(readme: Path) -> dict[str, set[str]]:
    """The README's "Public names used" list: lines ``- `module`: `name`, `name` ...``
    (a ``### `` subsection of ``## Details`` in the chapter template, or a ``## `` section)."""
    text = readme.read_text(encoding="utf-8")
    parts = re.split(r"\n#{2,3} Public names used\n", text, maxsplit=1)
    assert len(parts) == 2, f"{readme} has no '### Public names used' section"
    section = re.split(r"\n#{1,3} ", parts[1], maxsplit=1)[0]
    listed = {}
    for line in section.splitlines():
        if match := re.match(r"- `([\w.]+)`: (.+)", line):
            listed[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    return listed


@pytest.mark.parametrize("script", TRAIN_SCRIPTS, ids=lambda p: p.parent.name)
def test_train_py_imports_only_the_public_names_its_readme_lists(script: Path) -> None:
    imports = _goose_imports(script)
    assert imports == _listed(script.with_name("README.md"))
    for module, names in imports.items():
        # Package level: goose_core or one package (or top-level module) under it, by __all__.
        assert module.count(".") <= 1, f"{script}: {module} is inside a package; import from the package"
        public = set(importlib.import_module(module).__all__)
        assert names <= public, f"{script}: {sorted(names - public)} not in {module}.__all__"


@pytest.mark.parametrize("script", TRAIN_SCRIPTS, ids=lambda p: p.parent.name)
def test_train_py_writes_its_loop_out_and_imports_no_other_stage(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    tree = ast.parse(text)
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "course" not in modules and "load_train_script" not in text, f"{script} loads another stage"
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"train_loop", "accumulate"}, f"{script}: write the loop out"
    for call in (".backward()", "optimizer.step()", "optimizer.zero_grad()"):
        assert call in text, f"{script}: the loop's {call} is not written out"
    private = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
               and n.attr.startswith("_") and not n.attr.startswith("__")}
    assert not private, f"{script} reaches private attributes: {sorted(private)}"


def test_every_path_a_lesson_claims_exists() -> None:
    for stage, claims in LESSONS.items():
        for claim in claims:
            assert list(STAGES_DIR.parent.glob(claim + "*")), f"LESSONS[{stage}] names {claim}, which is gone"


def test_a_file_belongs_to_the_stage_that_introduces_it() -> None:
    assert stage_of("stages/08_pipeline/train.py") == 8
    assert stage_of("goose_core/pipeline/parallel.py") == 8
    assert stage_of("goose_core/pipeline/stream.py") == 9  # the longest claim wins
    assert stage_of("tests/test_tensor_parallel_layers.py") == 7
    assert stage_of("Makefile") == stage_of("stages/course.py") == 0


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def test_lesson_views_diff_to_each_stage_s_own_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = ["Makefile", "goose_core/loss.py", "goose_core/distributed/context.py", "stages/00_a/train.py",
             "stages/04_b/train.py", "goose_core/data_parallel/wrapper.py", "stages/05_c/train.py"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "course")
    monkeypatch.chdir(tmp_path)
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "t@t")
    (s0, v0), (s1, v1), (s2, head) = lesson_commits("HEAD")
    assert (s0, s1, s2) == (0, 4, 5) and head == _git(tmp_path, "rev-parse", "HEAD").strip()
    assert _git(tmp_path, "ls-tree", "-r", "--name-only", v0).split() == [
        "Makefile", "goose_core/loss.py", "stages/00_a/train.py"]
    assert _git(tmp_path, "diff", "--name-only", v0, v1).split() == [
        "goose_core/distributed/context.py", "stages/04_b/train.py"]
    assert _git(tmp_path, "diff", "--name-only", v1, head).split() == [
        "goose_core/data_parallel/wrapper.py", "stages/05_c/train.py"]
    assert lesson_commits("HEAD")[0][1] == v0  # the same commit again: tags can be re-derived
