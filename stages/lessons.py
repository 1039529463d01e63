"""Lesson views for git: a commit per stage, so that ``git diff stage-07 stage-08`` is stage 08's lesson.

The stages did not land one commit each (02 and 03 came together, 05 to 07 together, 04 before
02, and every file has been edited since), so no past commit holds "the course up to stage N".
This builds that view from one commit REV (the course's current state), as a chain of commits
beside the main history::

    stage-00 ── stage-04 ── ... ── stage-11          views: REV's files of stages 00..NN
                                         ╲
    main ... ── REV = stage-12                       the last stage is REV itself

stage-NN's tree is REV's tree without the files that later stages introduce (``LESSONS`` says
which stage introduces which path; a stage folder is its own stage's; anything else is stage
00's). So ``git diff stage-07 stage-08`` adds exactly stage 08's chapter, code and tests, and
``git diff --stat`` lists them. A view holds each file as it is at REV, not as it was when the
stage landed, and an intermediate view does not run on its own (``goose_core/__init__.py``
imports every stage's package). Stages from 10 on land as their own commits and are tagged
where they land, so the chain continues in the real history.

    python stages/lessons.py REV          # build the views, print the `git tag` commands
    python stages/lessons.py REV --tag    # and run them
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

__all__ = ["LESSONS", "stage_of", "lesson_commits"]

#: The paths each stage introduces (a path ending in "/" is a folder, else a file or a file-name
#: prefix); the longest match wins, so a file of goose_core/engine/ that stage 09 names is 09's.
LESSONS: dict[int, tuple[str, ...]] = {
    0: ("goose_core/__init__.py", "goose_core/data/", "goose_core/loss.py", "goose_core/testing/"),
    4: ("goose_core/distributed/", "goose_core/testing/distributed.py", "tests/test_grid.py", "tests/test_context.py",
        "tests/test_launch.py", "benchmarks/bench_launch.py"),
    5: ("goose_core/data_parallel/", "goose_core/grad_sync.py", "goose_core/metadata.py",
        "tests/test_grad_sync.py", "tests/test_metadata.py", "tests/test_data_parallel.py", "tests/test_token_weighted.py",
        "benchmarks/bench_data_parallel.py"),
    6: ("goose_core/optim/", "tests/test_zero.py", "tests/test_clip.py", "benchmarks/bench_zero.py"),
    7: ("goose_core/tensor_parallel/", "goose_core/models/", "goose_core/state.py", "tests/test_tensor_parallel_",
        "tests/test_models_registry.py", "tests/test_state.py", "benchmarks/bench_tensor_parallel.py"),
    8: ("goose_core/pipeline/", "goose_core/engine/", "tests/test_pipeline.py", "tests/test_pipeline_families.py",
        "tests/test_router_loss.py", "tests/test_schedule.py", "tests/test_former_names.py",
        "tests/test_microbatch.py",
        "tests/test_dependency.py", "tests/test_transport.py", "tests/test_messages.py", "tests/test_composition.py",
        "tests/test_wrapper_order.py", "tests/test_batch_check.py", "tests/test_batch_faults.py",
        "benchmarks/bench_pipeline.py", "benchmarks/bench_batch_check.py",
        # the family sweep runs tensor and pipeline parallelism: it needs both stages
        "tools/sweep/", "goose_core/testing/layout.py", "tests/test_coverage.py",
        "docs/coverage."),
    9: ("goose_core/engine/stream.py", "goose_core/engine/stream_check.py", "goose_core/engine/emulation.py",
        "tests/test_stream.py", "tests/test_stream_check.py"),
    10: ("goose_core/engine/recompute.py", "tests/test_recompute.py"),
    11: ("goose_core/partition/", "tests/test_partition.py", "tests/test_profile.py", "tests/test_solve.py"),
    12: ("goose_core/engine/callbacks.py", "goose_core/instruments/",
        "tests/test_callbacks.py", "tests/test_timeline.py", "tests/test_gantt.py", "docs/img/gantt"),
    1: ("goose_core/amp/", "tests/test_amp", "goose_core/optim/master.py", "benchmarks/bench_mixed_precision.py",
         "docs/img/mixed_precision"),
    13: ("goose_core/checkpoint/", "tests/test_checkpoint_io.py", "tests/test_export.py",
         "goose_core/finite.py", "tests/test_finite.py", "docs/img/demo"),
}

_STAGE_FOLDER = re.compile(r"stages/(\d\d)_[^/]+/")


def stage_of(path: str) -> int:
    """The stage that introduces ``path`` (repository-relative, with "/")."""
    if match := _STAGE_FOLDER.match(path):
        return int(match.group(1))
    claims = [(len(p), n) for n, paths in LESSONS.items() for p in paths if path.startswith(p)]
    return max(claims)[1] if claims else 0


def unclaimed(paths: list[str]) -> list[str]:
    """The library files no lesson names (they fall to stage 00: add them to ``LESSONS``)."""
    return [p for p in paths if p.startswith("goose_core/")
            and not any(p.startswith(c) for claims in LESSONS.values() for c in claims)]


def _git(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(["git", *args], input=stdin, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def _tree(entries: list[str]) -> str:
    """Write the tree of ``ls-tree`` entries (``mode type sha<TAB>path``) through a scratch index."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {"GIT_INDEX_FILE": os.path.join(scratch, "index")}
        _git("update-index", "-z", "--index-info", stdin="".join(e + "\0" for e in entries), env=env)
        return _git("write-tree", env=env).strip()


def lesson_commits(rev: str) -> list[tuple[int, str]]:
    """``(stage, commit)`` for every stage of ``rev``: a view commit each, ``rev`` for the last."""
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    entries = _git("ls-tree", "-r", "-z", "--full-tree", sha).split("\0")[:-1]
    paths = [e.split("\t", 1)[1] for e in entries]
    stages = sorted({int(m.group(1)) for p in paths if (m := _STAGE_FOLDER.match(p))})
    # Deterministic: the same REV and author give the same commits.
    date = _git("show", "-s", "--format=%cI", sha).strip()
    env = {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
    commits, parent = [], []
    for n in stages[:-1]:
        tree = _tree([e for e, p in zip(entries, paths) if stage_of(p) <= n])
        message = (f"stage-{n:02d}: lesson view of stages 00-{n:02d} at {sha[:10]}\n\n"
                   f"Built by stages/lessons.py from {sha}: its files of stages 00 to {n:02d}, as they are "
                   f"there.\nA view for `git diff stage-{n:02d} stage-{n + 1:02d}`, not a past state; "
                   f"it does not run on its own.\n")
        commit = _git("commit-tree", tree, *parent, "-m", message, env=env).strip()
        commits.append((n, commit))
        parent = ["-p", commit]
    return commits + [(stages[-1], sha)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit whose course to cut into lessons (the merge on main)")
    parser.add_argument("--tag", action="store_true", help="create the stage-NN tags, not only print them")
    args = parser.parse_args(argv)
    paths = _git("ls-tree", "-r", "--name-only", "--full-tree", args.rev).splitlines()
    if missing := unclaimed(paths):
        print(f"stage 00 gets library files no lesson claims (add them to LESSONS): {missing}", file=sys.stderr)
    for n, commit in lesson_commits(args.rev):
        print(f"git tag stage-{n:02d} {commit}")
        if args.tag:
            _git("tag", f"stage-{n:02d}", commit)


if __name__ == "__main__":
    main()
