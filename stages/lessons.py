"""A stage's lesson: one unified diff of what the stage adds, built from the working tree alone.

::

    python stages/lessons.py 8        # stage 08's lesson (make lesson N=08)
    python stages/lessons.py          # every lesson's size (make lessons)

A lesson has three parts, in this order:

    (a) the loop     train.py against the train.py of the chapter whose loop it extends
                     (``EXTENDS``, else the stage before), as a rename diff
                     a/stages/07_tensor_parallel/train.py -> b/stages/08_pipeline/train.py
    (b) the library  the goose_core modules, unit tests (tests/) and benchmarks the stage
                     introduces (``LESSONS``), each as a new file (from /dev/null)
    (c) the proofs   the stage folder's tests (test_*.py, conftest.py), as new files

The chapter (README.md, NOTES.md and the scripts that measure NOTES.md's tables) is not in the
diff: it is what the reader reads beside it. Nor is a binary file: a diff cannot show one.
Every file appears as it is now, so a lesson needs no tag, no branch and no history: a fresh
clone (or a tarball of one) prints the same lessons. The diff is git's format, so
``python stages/lessons.py 8 | git apply --stat`` summarises it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LESSONS", "EXTENDS", "TOOLING", "SCOPE", "ROOT", "Lesson", "claims_of", "stage_of", "scope_files",
           "lesson", "lesson_diff", "lesson_table", "main"]

ROOT = Path(__file__).resolve().parents[1]

#: The paths each stage introduces. A path ending in "/" is a folder, any other a file or a
#: file-name prefix ("tests/test_tensor_parallel_"). Claims never overlap: every file of SCOPE
#: matches exactly one claim here or in TOOLING (stages/test_course.py checks it), so nothing
#: falls to a stage by default. A library module belongs to the stage whose concept it is; a unit
#: test to the latest stage whose concept it needs (a test that wraps with TP, PP and DP at once
#: is 13's), so ``make test-stage N`` runs nothing a later chapter explains.
LESSONS: dict[int, tuple[str, ...]] = {
    # One device: the loop, tiny models, data, the float64 harness and its tolerance.
    0: ("goose_core/__init__.py", "goose_core/data/", "goose_core/loss.py", "goose_core/testing/__init__.py",
        "goose_core/testing/models.py", "goose_core/testing/reference.py", "goose_core/testing/tolerances.py",
        "goose_core/testing/widen.py",
        "tests/test_data.py", "tests/test_loss.py", "tests/test_models.py", "tests/test_reference.py"),
    # bf16 weights, fp32 masters: MasterWeights and the optimizer-wrapping surface it stands on.
    1: ("goose_core/optim/__init__.py", "goose_core/optim/master.py", "goose_core/optim/wrapper.py"),
    # fp16 and dynamic loss scaling.
    2: ("goose_core/amp/", "tests/test_amp.py"),
    # Autocast has no module of its own: torch.autocast is the feature, and the engine keeps the
    # forward's autocast state where it replays work (engine/recompute.py, 11; engine/parked.py,
    # 09). Stage 03's lesson is its loop and its proofs.
    3: (),
    4: ("goose_core/distributed/__init__.py", "goose_core/distributed/collectives.py",
        "goose_core/distributed/compat.py", "goose_core/distributed/context.py", "goose_core/distributed/grid.py",
        "goose_core/distributed/launch.py", "goose_core/distributed/missing.py",
        "goose_core/distributed/progress.py", "goose_core/testing/distributed.py",
        "tests/test_grid.py", "tests/test_context.py", "tests/test_launch.py", "benchmarks/bench_launch.py"),
    5: ("goose_core/data_parallel/__init__.py", "goose_core/data_parallel/bucket.py",
        "goose_core/data_parallel/loss.py", "goose_core/data_parallel/reducer.py",
        "goose_core/data_parallel/replicas.py", "goose_core/data_parallel/wrapper.py",
        "goose_core/grad_sync.py", "goose_core/metadata.py",
        "tests/test_data_parallel.py", "tests/test_metadata.py", "benchmarks/bench_data_parallel.py"),
    6: ("goose_core/optim/zero.py", "goose_core/optim/zero_state.py", "goose_core/optim/clip.py",
        "tests/test_zero.py", "tests/test_clip.py", "benchmarks/bench_zero.py"),
    # ZeRO-2 and ZeRO-3: gradients, then parameters, sharded over dp too; what each stage costs
    # (the formulas, the traffic counter that checks them) and the benchmark beside FSDP2.
    7: ("goose_core/data_parallel/zero3.py", "goose_core/optim/zero_cost.py", "goose_core/distributed/traffic.py",
        "tests/test_zero2.py", "tests/test_zero3.py", "tests/test_zero_memory.py", "benchmarks/bench_zero3.py"),
    # Tensor parallelism, and the family knowledge it reads (each family module holds its TP half
    # and, where the family needs one, the few lines of its pipeline half).
    8: ("goose_core/tensor_parallel/", "goose_core/state.py", "goose_core/models/__init__.py",
        "goose_core/models/apertus.py", "goose_core/models/bloom.py", "goose_core/models/declared.py",
        "goose_core/models/doge.py", "goose_core/models/family.py", "goose_core/models/gpt2.py",
        "goose_core/models/inkling.py", "goose_core/models/opt.py", "goose_core/models/registry.py",
        "goose_core/models/sarvam_moe.py", "goose_core/models/stablelm.py",
        "tests/test_tensor_parallel_", "tests/test_state.py",
        "benchmarks/bench_tensor_parallel.py"),
    # The pipeline: the schedule as data (GPipe, 1F1B), its messages, micro-batches, phony
    # dependencies, transports, the executor, 1F1B's parked gradients and activation memory; and
    # the 🤗 binding: the split, a rank's stage, tied embeddings, PipelineParallel. The harness's
    # planted bugs, the named missing ranks and the family registry are tested here, where the
    # course has every wrapper their tests plant a bug in or stop a rank of (TP, PP, DP).
    9: ("goose_core/engine/__init__.py", "goose_core/engine/schedule.py", "goose_core/engine/messages.py",
        "goose_core/engine/microbatch.py", "goose_core/engine/dependency.py", "goose_core/engine/transport.py",
        "goose_core/engine/p2p.py", "goose_core/engine/pipeline.py", "goose_core/engine/parked.py",
        "goose_core/engine/activations.py", "goose_core/testing/layout.py",
        "goose_core/pipeline/__init__.py", "goose_core/pipeline/parallel.py", "goose_core/pipeline/split.py",
        "goose_core/pipeline/stage.py", "goose_core/pipeline/tied.py", "goose_core/pipeline/generate.py",
        "goose_core/models/pipeline_parts.py", "goose_core/models/falcon.py", "goose_core/models/gemma4_text.py",
        "tests/test_schedule.py", "tests/test_messages.py", "tests/test_microbatch.py", "tests/test_dependency.py",
        "tests/test_transport.py", "tests/test_pipeline_families.py", "tests/test_grad_sync.py",
        "tests/test_harness_catches_bugs.py", "tests/test_missing.py", "tests/test_models_registry.py",
        "benchmarks/bench_pipeline.py"),
    10: ("goose_core/engine/stream.py", "goose_core/engine/stream_check.py", "goose_core/engine/emulation.py",
        "tests/test_stream.py", "tests/test_stream_check.py", "tests/gpu/test_copy_wait.py",
        "tests/gpu/test_sanitizer.py"),
    # Recompute: whole cells, or inside the blocks only (whole or op by op); and compiling each
    # block, the other per-block transformation (torchtitan applies both per block, checkpoint
    # inside compile), whose test runs a block recompute mode compiled.
    11: ("goose_core/engine/recompute.py", "goose_core/engine/block_recompute.py", "goose_core/engine/selective.py",
         "goose_core/compile.py", "tests/test_selective_recompute.py", "tests/test_compile_pipeline.py",
         "benchmarks/bench_recompute.py"),
    12: ("goose_core/partition/", "tests/test_partition.py", "tests/test_profile.py", "tests/test_solve.py",
         "tests/gpu/test_profile_cuda.py"),
    # The executor's and recompute's unit tests watch the order of work through callbacks, so
    # they come with them (stages 09 and 11 prove their claims in their own folders).
    13: ("goose_core/engine/callbacks.py", "goose_core/instruments/__init__.py", "goose_core/instruments/timeline.py",
         "goose_core/instruments/gantt.py", "tests/test_callbacks.py",
         "tests/test_timeline.py", "tests/test_gantt.py", "tests/test_pipeline.py", "tests/test_recompute.py",
         "tests/gpu/test_local_pipeline.py"),
    # Schedules that shrink the bubble: interleaved 1F1B's chunks, placed by the schedule, the
    # p2p plan per pair of ranks, and ZB-H1 and ZBV: the backward split into B and W by autograd (the
    # schedule module itself is 09's).
    14: ("goose_core/engine/split_backward.py", "tests/test_schedule_interleaved.py",
         "tests/test_schedule_zero_bubble.py", "benchmarks/bench_schedules.py"),
    # Long sequences: context parallelism (the sequence split over the cp ranks: ring attention,
    # load-balanced, under 🤗's attention interface, or Ulysses' all-to-all head split; gradients
    # over dp x cp); sequence parallelism's unit tests (its module, tensor_parallel/sequence.py, is
    # in 08's folder: the tensor-parallel layers use it).
    15: ("goose_core/context_parallel/", "goose_core/distributed/all_to_all.py", "tests/test_context_parallel.py", "tests/test_ulysses.py",
         "tests/test_sequence_parallel.py"),
    # Expert parallelism: the EP and expert-data-parallel groups carved from dp, the dispatch
    # (all-to-all with uneven splits) to 🤗's own experts, and the router loss over the dp batch.
    16: ("goose_core/expert_parallel/", "goose_core/distributed/expert_groups.py",
         "benchmarks/bench_expert_parallel.py"),
    # The assembled run: every wrapper at once (the supported order, the orders refused), what
    # guards a grid (the same batch on tp peers and stages, a non-finite step stopped on every
    # rank), mixed precision across the grid, DCP checkpoints and the export. The MoE router loss
    # and a loss of the reader's own under the pipeline are here too: 17 assembles every family,
    # and they exist for families and losses past the three tiny models that 09 splits (the
    # router loss only for MoE families; custom_loss for a loop that computes its loss from the
    # logits, not from labels).
    17: ("goose_core/checkpoint/", "goose_core/finite.py", "goose_core/distributed/batch_check.py",
         "goose_core/distributed/batch_faults.py",
         "goose_core/testing/split_reductions.py", "goose_core/pipeline/router_loss.py",
         "goose_core/pipeline/custom_loss.py", "goose_core/instruments/accounting.py",
         "tests/test_composition.py", "tests/test_zero3_composition.py", "tests/test_wrapper_order.py",
         "tests/test_token_weighted.py", "tests/test_context_parallel_checkpoint.py",
         "tests/test_batch_check.py", "tests/test_batch_faults.py", "tests/test_finite.py",
         "tests/test_router_loss.py", "tests/test_custom_loss.py", "tests/test_checkpoint_io.py",
         "tests/test_export.py", "tests/test_single_process.py", "tests/test_pipeline_generate.py",
         "tests/test_zero2_composition.py", "tests/test_schedule_resume.py", "tests/gpu/composed_nccl.py",
         "tests/gpu/test_composed_nccl.py", "benchmarks/bench_batch_check.py",
         "benchmarks/bench_mixed_precision.py", "tests/test_expert_checkpoint.py"),
}

#: The chapter whose train.py a stage's loop extends, where that is not the stage before. Each
#: chapter's "The change to the loop" names the same stage (stages/test_course.py checks it):
#: the first multi-process loop is the one-device loop's (00), not autocast's; tensor parallelism
#: swaps DataParallel out of 05's loop (ZeRO's optimizers are no part of it); recompute is one
#: keyword in 09's loop (10's sleeping stages are for timing); callbacks go into 11's loop (12's
#: profiles and splits an uneven model first); the assembled run builds on 13's loop (14's
#: schedules are one argument of the pipeline it wraps); context parallelism is one wrapper
#: before DataParallel in 05's loop; expert parallelism is carved from the data-parallel ranks, so
#: its loop is 05's too.
EXTENDS: dict[int, int] = {4: 0, 8: 5, 11: 9, 13: 11, 15: 5, 16: 5, 17: 13}

#: Paths of SCOPE that belong to no lesson: the tooling around the course, not a concept of it.
#: The family sweep runs 08's and 09's concepts over every 🤗 family; it teaches none of its own.
#: The former names (aliases kept for old code) are no concept either.
TOOLING: tuple[str, ...] = (
    "tools/",
    "benchmarks/__init__.py", "benchmarks/__main__.py", "benchmarks/bench_against.py", "benchmarks/environment.py",
    "benchmarks/flops.py", "benchmarks/gpu", "benchmarks/measure.py", "benchmarks/page.py",
    "benchmarks/paired.py", "benchmarks/plots/", "benchmarks/results.",
    "tests/gpu/conftest.py", "tests/test_bench_gpu.py", "tests/test_bench_paired.py", "tests/test_coverage.py",
    "tests/test_docs", "tests/test_former_names.py", "tests/test_gpu_machine.py", "tests/test_import_graph.py",
    "tests/test_kernel_families.py", "tests/test_make_targets.py", "tests/test_pictures.py", "tests/test_versions.py",
    # A user's own tokenizer and files as a resumable batch stream: the data of `goose train`,
    # tooling around the course (its modules sit in stage 0's goose_core/data/).
    "tests/test_data_files.py", "tests/test_data_stream.py",
    # `goose train`: the command, its job loop, checkpoint rotation, what a person watches and
    # --verify: tooling around the course that uses what every chapter built.
    "goose_core/train/", "tests/test_train_",
    # `goose plan` and the test that holds it against accounting (stage 17's --account): tooling
    # around the course that reads what every chapter built (TP's cut, the pipeline's split,
    # ZeRO's buckets) and teaches none of its own.
    "goose_core/plan/", "tests/test_plan.py",
)

#: The folders whose every file is a lesson's or tooling's.
SCOPE: tuple[str, ...] = ("goose_core/", "tests/", "benchmarks/")

_STAGE_FOLDER = re.compile(r"stages/(\d\d)_[^/]+/")
_SKIPPED = {"__pycache__", "benchmarks/out"}  # build outputs, git-ignored


def _matches(path: str, claim: str) -> bool:
    """A claim ending in ".py" names one file; any other is a folder or a file-name prefix."""
    return path == claim if claim.endswith(".py") else path.startswith(claim)


def claims_of(path: str) -> list[tuple[int | None, str]]:
    """Every claim ``(stage, claim)`` that matches ``path``; stage None for TOOLING."""
    found: list[tuple[int | None, str]] = [(n, c) for n, claims in LESSONS.items() for c in claims
                                           if _matches(path, c)]
    return found + [(None, c) for c in TOOLING if _matches(path, c)]


def stage_of(path: str) -> int | None:
    """The stage that introduces ``path`` (repository-relative, "/"), None for tooling or unclaimed."""
    if match := _STAGE_FOLDER.match(path):
        return int(match.group(1))
    stages = {n for n, _ in claims_of(path)}
    return stages.pop() if len(stages) == 1 else None


def _walk(folder: Path, root: Path) -> list[str]:
    """Every file under ``folder``, repository-relative, sorted; build outputs skipped."""
    found = []
    for here, dirs, names in os.walk(folder):
        rel = Path(here).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not ({d, (rel / d).as_posix()} & _SKIPPED or d.startswith(".")))
        found += [Path(here, n).relative_to(root).as_posix() for n in names if not n.endswith(".pyc")]
    return sorted(found)


def scope_files(root: Path = ROOT) -> list[str]:
    """Every file of SCOPE in the working tree."""
    return [path for top in SCOPE for path in _walk(root / top, root)]


def _stage_folders(root: Path) -> dict[int, Path]:
    return {int(p.name[:2]): p for p in sorted((root / "stages").iterdir())
            if p.is_dir() and re.fullmatch(r"\d\d_\w+", p.name)}


@dataclass
class Lesson:
    """Stage ``stage``'s lesson: the loop it extends and the files it adds (repository-relative)."""

    stage: int
    train: str
    base: str | None  # the train.py it extends; None for the first stage
    library: list[str] = field(default_factory=list)  # goose_core/
    unit_tests: list[str] = field(default_factory=list)  # tests/
    benchmarks: list[str] = field(default_factory=list)  # benchmarks/
    proofs: list[str] = field(default_factory=list)  # the stage folder's tests and conftest.py

    @property
    def new_files(self) -> list[str]:
        return self.library + self.unit_tests + self.benchmarks + self.proofs


def lesson(stage: int, root: Path = ROOT) -> Lesson:
    """The parts of stage ``stage``'s lesson in the working tree at ``root``.

    Raises:
        ValueError: no stage ``stage``, or the stage it extends is not there.
    """
    folders = _stage_folders(root)
    if stage not in folders:
        known = ", ".join(p.name for p in folders.values())
        raise ValueError(f"no stage {stage}; the stages are: {known}")
    earlier = [n for n in folders if n < stage]
    extends = EXTENDS.get(stage, earlier[-1] if earlier else None)
    if extends is not None and extends not in folders:
        raise ValueError(f"stage {stage:02d} extends stage {extends:02d}, which is not there")
    for n in (stage, extends):
        if n is not None and not (folders[n] / "train.py").is_file():
            raise ValueError(f"{folders[n].name} has no train.py: every chapter writes its loop out")
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    text = lambda p: _read(root / p) is not None  # noqa: E731  (a diff cannot show a binary file)
    mine = [p for p in scope_files(root) if stage_of(p) == stage and text(p)]
    folder = [p for p in _walk(folders[stage], root) if text(p)]
    return Lesson(
        stage=stage,
        train=rel(folders[stage] / "train.py"),
        base=None if extends is None else rel(folders[extends] / "train.py"),
        library=[p for p in mine if p.startswith("goose_core/")],
        unit_tests=[p for p in mine if p.startswith("tests/")],
        benchmarks=[p for p in mine if p.startswith("benchmarks/")],
        proofs=[p for p in folder if re.fullmatch(r"test_\w*\.py|conftest\.py", p.rsplit("/", 1)[1])],
    )


def _read(path: Path) -> list[str] | None:
    """The file's lines, ends kept; None for a binary file."""
    try:
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _hunks(old: list[str], new: list[str], a: str, b: str) -> list[str]:
    """difflib's unified diff, with git's marker after a last line that has no newline."""
    out = []
    for line in difflib.unified_diff(old, new, a, b):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return out


def _file_diff(root: Path, old: str | None, new: str) -> str:
    """git's diff of ``old`` (None: a new file) becoming ``new``."""
    after = _read(root / new)
    head = [f"diff --git a/{old or new} b/{new}\n"]
    if old is None:
        head.append("new file mode 100644\n")
    elif old != new:
        head += [f"rename from {old}\n", f"rename to {new}\n"]
    before = [] if old is None else _read(root / old)
    if after is None or before is None:
        raise ValueError(f"{old} or {new} is not a text file: a lesson's loop is a train.py")
    return "".join(head + _hunks(before, after, "/dev/null" if old is None else f"a/{old}", f"b/{new}"))


def lesson_diff(stage: int, root: Path = ROOT) -> str:
    """Stage ``stage``'s lesson as one unified diff: the loop, then the library, then the proofs."""
    parts = lesson(stage, root)
    return _file_diff(root, parts.base, parts.train) + "".join(_file_diff(root, None, p) for p in parts.new_files)


def _added(root: Path, paths: list[str]) -> int:
    return sum(len(_read(root / p) or []) for p in paths)


def _loop_change(root: Path, parts: Lesson) -> tuple[int, int]:
    """Lines the loop adds and removes against the train.py it extends."""
    before = [] if parts.base is None else _read(root / parts.base) or []
    lines = _hunks(before, _read(root / parts.train) or [], "a", "b")[2:]  # past the ---/+++ header
    return sum(line[0] == "+" for line in lines), sum(line[0] == "-" for line in lines)


def lesson_table(root: Path = ROOT) -> str:
    """Every stage's lesson size: files, and the lines of each part (the loop's added/removed)."""
    header = ("stage", "extends", "files", "loop +/-", "library", "unit tests", "benchmarks", "stage tests")
    rows = [header]
    for n, folder in _stage_folders(root).items():
        parts = lesson(n, root)
        plus, minus = _loop_change(root, parts)
        rows.append((folder.name, "-" if parts.base is None else parts.base.split("/")[1][:2],
                     str(1 + len(parts.new_files)), f"+{plus}/-{minus}",
                     *(str(_added(root, p)) for p in (parts.library, parts.unit_tests, parts.benchmarks,
                                                      parts.proofs))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", default="", help="a stage number (8 or 08); none: the table")
    args = parser.parse_args(argv)
    if not args.stage:
        sys.stdout.write(lesson_table())
        return
    if not args.stage.isdigit():
        sys.exit(f"make lesson: stage must be a number such as 8 or 08, got {args.stage!r} (usage: make lesson N=08)")
    try:
        text = lesson_diff(int(args.stage))
    except ValueError as err:
        sys.exit(f"make lesson: {err} (usage: make lesson N=08)")
    try:
        sys.stdout.write(text)
    except BrokenPipeError:  # `make lesson N=08 | head`: the reader stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
