"""Checkpoints are by full parameter names: one saved under a schedule resumes under another,
whose ranks hold other blocks (interleaved 1F1B's chunks, ZBV's V), equal to the single-device run."""

from pathlib import Path

from goose_core import ParallelContext, PipelineParallel, full_state_dict, load_checkpoint, save_checkpoint
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, train_loop)

SPEC = TrainSpec(family="gpt2", steps=3, optimizer="adamw")  # tied: on ranks 0 and p-1, then both on rank 0
#: (schedule, virtual_stages) of each step: one chunk per rank, two round-robin, two in a V.
LEGS = [("1f1b", None), ("interleaved-1f1b", 2), ("zbv", None)]


def _resume_across_schedules(ctx: ParallelContext, folder: str) -> RunResult:
    """A step under each schedule, each resumed from the checkpoint the one before saved."""
    batches, losses = list(SPEC.batches()), []
    for step, (schedule, virtual_stages) in enumerate(LEGS):
        model = PipelineParallel(SPEC.build_model(), ctx, num_microbatches=4, schedule=schedule,
                                 virtual_stages=virtual_stages).parallelize()
        optimizer = SPEC.build_optimizer(model.parameters())
        if step:
            load_checkpoint(folder, model, optimizer, ctx)
        losses += train_loop(model, optimizer, batches[step:step + 1])
        save_checkpoint(folder, model, optimizer, ctx)
    return RunResult(losses, full_state_dict(model, ctx))


def test_a_checkpoint_saved_under_one_schedule_resumes_under_another(tmp_path: Path) -> None:
    reference = reference_run(SPEC)
    for rank, result in enumerate(run_distributed(_resume_across_schedules, 1, 2, 1, str(tmp_path / "ckpt"),
                                                  timeout=180)):
        try:
            assert_matches_reference(result, reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"1f1b -> interleaved -> zbv, rank {rank}: {err}") from err
