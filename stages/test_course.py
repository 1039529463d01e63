"""The course's tooling and rules: the stage lookup behind ``make test-stage N``, every chapter's
README on the template and ``train.py`` writing its loop out with only the public names its
README lists, from no later chapter, and each stage's lesson: a diff built from the working tree."""

import ast
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lessons
from course import STAGES_DIR, chapter_problems, headings, notes_problems, section, stage_dir, stage_tests
from lessons import LESSONS, TOOLING, claims_of, lesson, lesson_diff, lesson_table, scope_files, stage_of

ROOT = STAGES_DIR.parent
STAGE_DIRS = sorted(p for p in STAGES_DIR.glob("[0-9][0-9]_*") if p.is_dir())
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
    names = [path.name for path in stage_tests("17")]
    assert names[0].startswith("17_") and "test_checkpoint_io.py" in names and "test_export.py" in names
    assert {p.name for p in stage_tests("8")} >= {"08_tensor_parallel", "test_tensor_parallel_plan.py"}
    assert "test_checkpoint_io.py" not in {p.name for p in stage_tests("8")}
    assert all(p.name.startswith("test_") for p in stage_tests("17")[1:])  # not gpu/composed_nccl.py


def test_make_test_stage_lists_the_stages_for_an_unknown_number() -> None:
    # What `make test-stage 99` runs: the paths on stdout, or the stages and the usage.
    found = subprocess.run([sys.executable, str(STAGES_DIR / "course.py"), "6"], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.split()[0].endswith("06_zero1")
    unknown = subprocess.run([sys.executable, str(STAGES_DIR / "course.py"), "99"], capture_output=True, text=True)
    assert unknown.returncode == 1 and "the stages are: 00_reference" in unknown.stderr
    assert "usage: make test-stage 3" in unknown.stderr


# -- the chapter template -----------------------------------------------------------------------

GOOD_CHAPTER = """# Stage 08 · Pipelines
**Prerequisites:** 07 tensor parallelism

## Why
Layers do not fit.

## The picture
![GPipe and 1F1B](../img/1f1b.svg)

## The core code
From `goose_core/engine/schedule.py`:
```python
def cycles(m, n): ...
```

## The change to the loop
```diff
-model = TensorParallel(model, ctx).parallelize()
+model = PipelineParallel(model, ctx).parallelize()
```

## The proof
`test_gpipe.py::test_every_rank_matches_the_single_device_run` proves it; both sides issue the
messages in one order.

## Break it
```bash
sed -i 's/a/b/' goose_core/engine/schedule.py
```

## Details
### Public names used
- `goose_core`: `PipelineParallel`

### Run it
```bash
torchrun --standalone --nproc_per_node=2 stages/08_pipeline/train.py
```
"""


def test_the_chapter_checker_passes_a_chapter_on_the_template() -> None:
    assert chapter_problems(GOOD_CHAPTER, 8) == []


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("# Stage 08 · ", "# Stage 8: "), "the first line"),
    (lambda t: t.replace("# Stage 08 · Pipelines", "# Stage 07 · Pipelines"), "the first line"),
    (lambda t: t.replace("**Prerequisites:** 07 tensor parallelism\n", ""), "Prerequisites"),
    (lambda t: t.replace("## Why", "## Motivation"), "level-2 headings"),
    (lambda t: t.replace("## The proof", "## Details2").replace("## Details\n", "## The proof\n"), "level-2"),
    (lambda t: t + "\n## Notes\n", "level-2 headings"),
    (lambda t: t + "\n# Appendix\n", "level-1 heading"),
    (lambda t: t + "\n" * 200, "more than 200"),
    (lambda t: t.replace("![GPipe and 1F1B](../img/1f1b.svg)", "A picture."), "'## The picture' lacks"),
    (lambda t: t.replace("def cycles(m, n): ...\n", "pass\n" * 41), "41 lines of code, more than 40"),
    (lambda t: t.replace("```diff", "```python"), "'## The change to the loop' lacks"),
    (lambda t: t.replace("`test_gpipe.py::test_every_rank_matches_the_single_device_run`", "A test"),
     "'## The proof' lacks"),
    (lambda t: t.replace("```bash\nsed -i 's/a/b/' goose_core/engine/schedule.py\n```", "Edit it."),
     "'## Break it' lacks"),
    (lambda t: t.replace("### Run it", "### Running"), "no '### Run it'"),
    (lambda t: t.replace("### Public names used", "## Public names used"), "level-2 headings"),
    (lambda t: t.replace("Layers do not fit.", "The issue's target was not taken here."), "development history"),
    (lambda t: t.replace("Layers do not fit.", "pipegoose's version had wrong gradients."), "'pipegoose'"),
    (lambda t: t.replace("Layers do not fit.", "Shared with other engineers' runs."), "other engineers"),
    (lambda t: t.replace("Layers do not fit.", "This used to be slower; we found why."), "'used to be'"),
    (lambda t: t.replace("Layers do not fit.", "An H200 steps it in 47 ms."), "'H200'"),
    (lambda t: t.replace("Layers do not fit.", "In this session it ran."), "'session'"),
])
def test_the_chapter_checker_names_what_breaks_the_template(edit, problem: str) -> None:
    found = chapter_problems(edit(GOOD_CHAPTER), 8)
    assert any(problem in p for p in found), found


GOOD_NOTES = """# Stage 08 · notes

## Parity

```bash
python stages/08_pipeline/measure.py
```

| pp | error |
|---|---|
| 2 | 1e-15 |

On an H100, `make bench-gpu`:

| tokens/s |
|---|
| 1000 |
"""


def test_the_notes_checker_passes_tables_under_their_commands() -> None:
    assert notes_problems(GOOD_NOTES) == []


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("python stages/08_pipeline/measure.py", "see below"), "line 9: a table with no command"),
    (lambda t: t.replace("On an H100, `make bench-gpu`:", "On an H100:"), "line 15: a table with no command"),
    (lambda t: t.replace("| 2 | 1e-15 |\n", "| 2 | 1e-15 |\n\n| 4 | 2e-15 |\n"), "a table with no command"),
    (lambda t: t.replace("## Parity", "## Parity, as we found it"), "'we found'"),
])
def test_the_notes_checker_names_a_table_without_its_command(edit, problem: str) -> None:
    found = notes_problems(edit(GOOD_NOTES))
    assert any(problem in p for p in found), found


def test_headings_in_code_blocks_are_not_headings() -> None:
    text = "# Title\n```bash\n# a comment\n## not a heading\n```\n## Real\nbody\n### Sub\nx\n## Next\n"
    assert [(lvl, t) for _, lvl, t in headings(text)] == [(1, "Title"), (2, "Real"), (3, "Sub"), (2, "Next")]
    assert section(text, "Real", 2) == "body\n### Sub\nx" and section(text, "Sub", 3) == "x"


@pytest.mark.parametrize("folder", STAGE_DIRS, ids=lambda p: p.name)
def test_the_chapter_follows_the_template(folder: Path) -> None:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert chapter_problems(text, int(folder.name[:2])) == []
    images = re.findall(r"!\[[^\]]*\]\(\.\./img/([^)\s]+)\)", text)
    assert all((ROOT / "docs/img" / name).is_file() for name in images), f"missing pictures: {images}"
    notes = folder / "NOTES.md"
    assert ("NOTES.md" in text) == notes.exists(), "a NOTES.md the chapter does not link, or a link to none"
    if (folder / "NOTES.md").exists():
        assert notes_problems((folder / "NOTES.md").read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("folder", STAGE_DIRS, ids=lambda p: p.name)
def test_the_loop_change_is_against_the_chapter_the_lesson_extends(folder: Path) -> None:
    # The chapter's diff block and `make lesson`'s must compare the same two loops.
    base = lesson(int(folder.name[:2])).base
    change = section((folder / "README.md").read_text(encoding="utf-8"), "The change to the loop", 2) or ""
    if base is not None:
        number = base.split("/")[1][:2]
        assert re.search(rf"\bstage {number}\b|\b{number}_[a-z]", change), \
            f"'## The change to the loop' does not name stage {number}, whose loop the lesson extends"


def _public_names(text: str) -> dict[str, set[str]]:
    """The list under ``## Details`` / ``### Public names used``: ``- `module`: `name`, `name` ...``."""
    listed_section = section(section(text, "Details", 2) or "", "Public names used", 3)
    assert listed_section is not None, "no '### Public names used' under '## Details'"
    listed = {}
    for line in listed_section.splitlines():
        if match := re.match(r"- `([\w.]+)`: (.+)", line):
            listed[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    return listed


def test_the_public_names_parser_reads_only_its_section() -> None:
    after = "\n### Other\n- `goose_core.x`: `Y`\n## Later\n- `goose_core.z`: `Z`\n"
    assert _public_names(GOOD_CHAPTER + after) == {"goose_core": {"PipelineParallel"}}
    with pytest.raises(AssertionError, match="no '### Public names used'"):
        _public_names(GOOD_CHAPTER.replace("### Public names used", "### Names"))


def _goose_imports(script: Path, packages_only: bool = True) -> dict[str, set[str]]:
    """``{module: names}`` of every ``from goose_core... import ...`` in ``script``."""
    imports: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if packages_only and isinstance(node, ast.Import):
            assert not any(a.name.startswith("goose_core") for a in node.names), \
                f"{script}: import names from a goose_core package, not the module itself"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "goose_core":
            imports.setdefault(node.module, set()).update(a.name for a in node.names)
    return imports


@pytest.mark.parametrize("script", TRAIN_SCRIPTS, ids=lambda p: p.parent.name)
def test_train_py_imports_only_the_public_names_its_readme_lists(script: Path) -> None:
    imports = _goose_imports(script)
    assert imports == _public_names(script.with_name("README.md").read_text(encoding="utf-8"))
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
    # Under loss scaling the step is the scaler's: ``scaler.step(optimizer)`` calls optimizer.step().
    for calls in ((".backward()",), ("optimizer.step()", ".step(optimizer)"), ("optimizer.zero_grad()",)):
        assert any(call in text for call in calls), f"{script}: the loop's {calls[0]} is not written out"
    private = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
               and n.attr.startswith("_") and not n.attr.startswith("__")}
    assert not private, f"{script} reaches private attributes: {sorted(private)}"


# -- no chapter uses what a later chapter introduces ---------------------------------------------

def defining_file(module: str, name: str) -> str:
    """The goose_core file that defines ``name`` as ``from module import name`` finds it: re-exports
    followed through each package's ``from ... import`` (lazy ones under ``TYPE_CHECKING`` too),
    read from the source, nothing imported. A module that is not there is its own answer."""
    base = ROOT / module.replace(".", "/")
    if (base / f"{name}.py").is_file():  # a submodule
        return f"{module.replace('.', '/')}/{name}.py"
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if not path.is_file():
        return path.relative_to(ROOT).as_posix()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("goose_core"):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return defining_file(node.module, alias.name)
    return path.relative_to(ROOT).as_posix()


def test_defining_file_follows_re_exports() -> None:
    assert defining_file("goose_core", "ParallelContext") == "goose_core/distributed/context.py"
    assert defining_file("goose_core", "metadata") == "goose_core/metadata.py"
    assert defining_file("goose_core.data", "shard_batch") == "goose_core/data/loader.py"


def _later_names(script: Path, stage: int) -> list[str]:
    """The goose_core names ``script`` imports that no stage up to ``stage`` introduces."""
    found = []
    for module, names in _goose_imports(script, packages_only=False).items():
        for name in sorted(names):
            source = defining_file(module, name)
            if (owner := stage_of(source)) is None or owner > stage:
                found.append(f"{module}.{name} ({source}: stage {owner})")
    return found


@pytest.mark.parametrize("script", TRAIN_SCRIPTS, ids=lambda p: p.parent.name)
def test_train_py_uses_no_later_chapter(script: Path) -> None:
    assert _later_names(script, int(script.parent.name[:2])) == []


LESSON_TESTS = sorted(p for p in [*(ROOT / "tests").rglob("*.py"), *STAGES_DIR.glob("[0-9][0-9]_*/test_*.py")]
                      if stage_of(p.relative_to(ROOT).as_posix()) is not None)


@pytest.mark.parametrize("test_file", LESSON_TESTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_lesson_s_test_needs_no_stage_after_its_own(test_file: Path) -> None:
    # `make test-stage N` runs the stage's tests and its lesson's unit tests: none may stand on a
    # later chapter.
    assert _later_names(test_file, stage_of(test_file.relative_to(ROOT).as_posix())) == []


# -- the lessons --------------------------------------------------------------------------------

def test_every_path_a_lesson_or_the_tooling_claims_exists() -> None:
    files = scope_files() + [p.relative_to(ROOT).as_posix() for p in (ROOT / "tools").rglob("*") if p.is_file()]
    claims = [(n, c) for n, paths in LESSONS.items() for c in paths] + [(None, c) for c in TOOLING]
    gone = [(n, c) for n, c in claims if not any(lessons._matches(f, c) for f in files)]
    assert gone == [], f"claims that match no file (stage None: TOOLING): {gone}"


def test_every_library_test_and_benchmark_file_has_exactly_one_claim() -> None:
    # No file falls to a stage by default: a new module must be given to the stage it belongs to.
    wrong = {path: claims_of(path) for path in scope_files() if len(claims_of(path)) != 1}
    assert wrong == {}, f"files with no claim, or more than one: {wrong}"


def test_a_file_belongs_to_the_stage_that_introduces_it() -> None:
    assert stage_of("stages/09_pipeline/train.py") == 9
    assert stage_of("goose_core/pipeline/parallel.py") == stage_of("goose_core/engine/schedule.py") == 9
    assert stage_of("goose_core/engine/stream.py") == 10 and stage_of("goose_core/engine/recompute.py") == 11
    assert stage_of("goose_core/instruments/gantt.py") == 13 and stage_of("goose_core/amp/grad_scaler.py") == 2
    assert stage_of("tests/test_tensor_parallel_layers.py") == 8 and stage_of("tests/test_pipeline.py") == 13
    assert stage_of("Makefile") is stage_of("stages/course.py") is stage_of("tools/sweep/coverage.py") is None
    assert stage_of("goose_core/not_claimed_yet.py") is None  # no fall-through to stage 00


def _tree(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            (root / name).write_text(content, encoding="utf-8")


COURSE = {
    "Makefile": "all:\n",
    "goose_core/loss.py": "LOSS = 1\n",
    "goose_core/distributed/context.py": "class Context:\n    pass\n",
    "goose_core/logo.png": b"\x89PNG\r\n\x1a\n\x00\xff",
    "goose_core/data_parallel/wrapper.py": "WRAP = 2",  # no newline at the end
    "tests/test_context.py": "def test_context():\n    pass\n",
    "stages/00_a/train.py": "loss = 1\nloss.backward()\nstep()\n",
    "stages/00_a/README.md": "# Stage 00\n",
    "stages/01_p/train.py": "loss = 1\nloss = loss.half()\nloss.backward()\nstep()\n",
    "stages/04_b/train.py": "import dist\n--dp 2\nloss = 1\nloss.backward()\nall_reduce()\nstep()\n",
    "stages/04_b/README.md": "# Stage 04\n",
    "stages/04_b/NOTES.md": "| n |\n",
    "stages/04_b/measure.py": "print('a NOTES.md table')\n",
    "stages/04_b/test_b.py": "def test_b():\n    pass\n",
    "stages/05_c/train.py": "import dist\nloss = 1\nloss.backward()\nstep()\n",
}


@pytest.fixture
def course(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small course in a folder that is no git repository: lessons need no history."""
    _tree(tmp_path, COURSE)
    monkeypatch.setattr(lessons, "LESSONS", {
        0: ("goose_core/loss.py",), 1: (),
        4: ("goose_core/distributed/", "goose_core/logo.png", "tests/test_context.py"),
        5: ("goose_core/data_parallel/",)})
    monkeypatch.setattr(lessons, "EXTENDS", {4: 0})
    monkeypatch.setattr(lessons, "TOOLING", ())
    return tmp_path


def test_a_lesson_is_its_loop_then_its_library_then_its_proofs(course: Path) -> None:
    parts = lesson(4, course)
    assert (parts.base, parts.train) == ("stages/00_a/train.py", "stages/04_b/train.py")
    assert parts.new_files == ["goose_core/distributed/context.py", "tests/test_context.py",
                               "stages/04_b/test_b.py"]  # no README.md, NOTES.md, measure.py, nor the png
    diff = lesson_diff(4, course)
    assert [line for line in diff.splitlines() if line.startswith("diff --git")] == [
        "diff --git a/stages/00_a/train.py b/stages/04_b/train.py",
        "diff --git a/goose_core/distributed/context.py b/goose_core/distributed/context.py",
        "diff --git a/tests/test_context.py b/tests/test_context.py",
        "diff --git a/stages/04_b/test_b.py b/stages/04_b/test_b.py"]
    assert "rename from stages/00_a/train.py\nrename to stages/04_b/train.py\n" in diff
    assert "--- /dev/null\n+++ b/goose_core/distributed/context.py\n@@ -0,0 +1,2 @@\n+class Context:\n" in diff
    assert "logo.png" not in diff
    assert lesson(5, course).base == "stages/04_b/train.py"  # by default, the stage before
    (course / "stages/01_p/train.py").unlink()
    with pytest.raises(ValueError, match="01_p has no train.py"):
        lesson(1, course)
    (course / "stages/01_p/train.py").write_text(COURSE["stages/01_p/train.py"])
    assert lesson(0, course).base is None and lesson_diff(0, course).startswith(
        "diff --git a/stages/00_a/train.py b/stages/00_a/train.py\nnew file mode 100644\n--- /dev/null\n")


@pytest.mark.skipif(shutil.which("git") is None, reason="git apply checks the patch; git is not installed")
@pytest.mark.parametrize("stage", [0, 1, 4, 5])
def test_a_lesson_applied_to_the_loop_it_extends_gives_the_stage_s_files(course: Path, tmp_path: Path,
                                                                           stage: int) -> None:
    _check_applies(course, stage, tmp_path / "applied")


def _check_applies(root: Path, stage: int, target: Path) -> None:
    """``git apply`` the lesson where only the extended train.py is: every text file comes out as in ``root``."""
    parts = lesson(stage, root)
    target.mkdir()
    if parts.base:
        _tree(target, {parts.base: (root / parts.base).read_bytes()})
    out = subprocess.run(["git", "apply", "-"], cwd=target, input=lesson_diff(stage, root), text=True,
                         capture_output=True)
    assert out.returncode == 0, out.stderr
    files = [parts.train, *parts.new_files]
    assert {p: (target / p).read_bytes() for p in files} == {p: (root / p).read_bytes() for p in files}
    assert parts.base is None or parts.base == parts.train or not (target / parts.base).exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="git apply checks the patch; git is not installed")
@pytest.mark.parametrize("folder", STAGE_DIRS, ids=lambda p: p.name)
def test_every_stage_s_lesson_applies_to_the_loop_it_extends(folder: Path, tmp_path: Path) -> None:
    _check_applies(ROOT, int(folder.name[:2]), tmp_path / "applied")


def test_the_table_gives_every_stage_its_sizes(course: Path) -> None:
    rows = [line.split() for line in lesson_table(course).splitlines()]
    assert rows[0][:3] == ["stage", "extends", "files"] and [r[0] for r in rows[1:]] == [
        "00_a", "01_p", "04_b", "05_c"]
    assert rows[3] == ["04_b", "00", "4", "+3/-0", "2", "2", "0", "2"]
    assert rows[4][1:5] == ["04", "2", "+0/-2", "1"]  # "--dp 2" removed: "---dp 2" is no header


def test_make_lesson_prints_the_diff_or_the_stages() -> None:
    lesson_cli = [sys.executable, str(STAGES_DIR / "lessons.py")]
    found = subprocess.run(lesson_cli + ["09"], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.startswith("diff --git a/stages/08_tensor_parallel/train.py "
                                                             "b/stages/09_pipeline/train.py\n")
    unknown = subprocess.run(lesson_cli + ["99"], capture_output=True, text=True)
    assert unknown.returncode == 1 and "no stage 99; the stages are: 00_reference" in unknown.stderr
    table = subprocess.run(lesson_cli, capture_output=True, text=True)
    assert [line.split()[0] for line in table.stdout.splitlines()[1:]] == [p.name for p in STAGE_DIRS]
