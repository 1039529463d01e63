"""Checkpoints are by full parameter names: one saved under a schedule resumes under another,
whose ranks hold other blocks (interleaved 1F1B's chunks), equal to the single-device run."""

from pathlib import Path

from goose_core import ParallelContext, PipelineParallel, full_state_dict, load_checkpoint, save_checkpoint
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, train_loop)

SPEC = TrainSpec(family="gpt2", steps=2, optimizer="adamw")  # tied: the head is on rank p-1 in both


def _resume_across_schedules(ctx: ParallelContext, folder: str) -> RunResult:
    """One step under 1F1B, saved; loaded into interleaved 1F1B (other blocks per rank), one more."""
    spec = SPEC
    first = TrainSpec(**{**spec.__dict__, "steps": 1})  # the same first batch
    model = PipelineParallel(spec.build_model(), ctx, num_microbatches=4, schedule="1f1b").parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    losses = train_loop(model, optimizer, first.batches())
    save_checkpoint(folder, model, optimizer, ctx)
    model = PipelineParallel(spec.build_model(), ctx, num_microbatches=4, schedule="interleaved-1f1b",
                             virtual_stages=2).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    load_checkpoint(folder, model, optimizer, ctx)
    losses += train_loop(model, optimizer, list(spec.batches())[1:])
    return RunResult(losses, full_state_dict(model, ctx))


def test_a_checkpoint_saved_under_1f1b_resumes_under_interleaved(tmp_path: Path) -> None:
    reference = reference_run(SPEC)
    for rank, result in enumerate(run_distributed(_resume_across_schedules, 1, 2, 1, str(tmp_path / "ckpt"),
                                                  timeout=180)):
        try:
            assert_matches_reference(result, reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"1f1b -> interleaved rank {rank}: {err}") from err
