"""A checkpoint saved under context parallelism loads at another cp: cp is a replica axis for the
weights, and the checkpoint holds full tensors (ZeRO-1's shards over dp x cp consolidated)."""

from __future__ import annotations

from typing import Any, Callable

from goose_core import (ContextParallel, DataParallel, DistributedOptimizer, ParallelContext, full_state_dict,
                        load_checkpoint, save_checkpoint, spawn)
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run, train_loop


def _save_or_resume(ctx: ParallelContext, spec: TrainSpec, path: str, save: bool) -> RunResult:
    """cp ranks: step 0, then a checkpoint; otherwise load it and train the remaining steps."""
    model = DataParallel(ContextParallel(spec.build_model(), ctx).parallelize(), ctx).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    batches = list(spec.batches(ctx.dp_rank, ctx.dp_size))
    first = 0 if save else load_checkpoint(path, model, optimizer, ctx)["step"]
    losses = train_loop(model, optimizer, batches[first:1] if save else batches[first:])
    if save:
        save_checkpoint(path, model, optimizer, ctx, step=1)
    return RunResult(losses, full_state_dict(model, ctx))


def _on_dp_cp(fn: Callable[..., Any], dp: int, cp: int, *args: Any) -> Any:
    return fn(ParallelContext(data_parallel_size=dp, context_parallel_size=cp, backend="gloo", device="cpu"), *args)


def test_a_checkpoint_saved_at_cp2_resumes_at_cp1(tmp_path: Any) -> None:
    # cp is a replica axis for the weights: the checkpoint holds full tensors (ZeRO-1's shards over
    # dp x cp consolidated), and dp 2 x cp 1 loads it and trains on as one device would.
    spec = TrainSpec(family="llama", steps=2, batch_size=2, seq_len=16, padding="right")
    reference = reference_run(spec)
    path = str(tmp_path / "ckpt")
    saved = spawn(_on_dp_cp, 2, _save_or_resume, 1, 2, spec, path, True, timeout=180)
    resumed = spawn(_on_dp_cp, 2, _save_or_resume, 2, 1, spec, path, False, timeout=180)
    for rank, (first, rest) in enumerate(zip(saved, resumed)):
        try:
            assert_matches_reference(RunResult(first.losses + rest.losses, rest.params), reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err
