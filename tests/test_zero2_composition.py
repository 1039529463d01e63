"""ZeRO-2 (and ZeRO-3) with the rest of the assembled run: tensor and pipeline parallelism equal the
single-device run (tp2 x dp2, pp2 x dp2 GPipe, 2 x 2 x 2 1F1B; GPT-2 with its embedding tied
across the first and the last stage, two micro-batches, clipping), and a ZeRO-2 checkpoint
resumes bit-exactly, loads under ZeRO-1 and at another dp size (stage 07 proves data parallelism
alone)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from goose_core import (DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel, TensorParallel,
                        clip_grad_norm_, full_state_dict)
from goose_core.checkpoint import load_checkpoint, save_checkpoint
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, snapshot)

# ZeRO-3 lives in goose_core.data_parallel.zero3; its cases run where that module exists.
ZERO3 = importlib.util.find_spec("goose_core.data_parallel.zero3") is not None
STAGES = [2, pytest.param(3, marks=pytest.mark.skipif(not ZERO3, reason="zero_stage=3 not in this tree"))]
SPEC = TrainSpec(family="gpt2", steps=3, max_grad_norm=1.0)  # float64: PARALLEL

pytestmark = pytest.mark.usefixtures("one_thread")  # the reference runs in this process


def _train(ctx: ParallelContext, zero_stage: int, schedule: str) -> RunResult:
    model = SPEC.build_model()
    if ctx.tp_size > 1:
        model = TensorParallel(model, ctx).parallelize()
    if ctx.pp_size > 1:
        model = PipelineParallel(model, ctx, num_microbatches=2, schedule=schedule).parallelize()
    model = DataParallel(model, ctx, bucket_size_mb=0.05, zero_stage=zero_stage).parallelize()
    optimizer = DistributedOptimizer(SPEC.build_optimizer(model.parameters()), ctx)
    losses = []
    for batch in SPEC.batches(ctx.dp_rank, ctx.dp_size):
        loss = model(**batch).loss  # a pipeline splits its micro-batches itself
        loss.backward()  # the pipeline's flush reduce-scatters every bucket and frees it
        clip_grad_norm_(model.parameters(), SPEC.max_grad_norm, ctx)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, full_state_dict(model, ctx))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("tp, pp, schedule", [(2, 1, "1f1b"), (1, 2, "gpipe"), (2, 2, "1f1b")],
                         ids=["tp2-dp2", "pp2-dp2-gpipe", "2x2x2-1f1b"])
def test_equals_the_single_device_run_with_tp_and_pp(stage: int, tp: int, pp: int, schedule: str) -> None:
    reference = reference_run(SPEC)
    for rank, result in enumerate(run_distributed(_train, tp, pp, 2, stage, schedule, timeout=180)):
        try:
            assert_matches_reference(result, reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err

def _checkpointed(ctx: ParallelContext, path: str, zero_stage: int, resume: bool) -> dict:
    """Three steps at ZeRO-``zero_stage``, a checkpoint after the second; or (``resume``) the
    checkpoint loaded at this layout and stage, and the third step."""
    spec = SPEC
    model = DataParallel(spec.build_model(), ctx, bucket_size_mb=0.05, zero_stage=zero_stage).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    batches = list(spec.batches(ctx.dp_rank, ctx.dp_size))
    first = 0
    if resume:
        first = load_checkpoint(path, model, optimizer, ctx)["step"]
    losses = []
    for step in range(first, spec.steps):
        loss = model(**batches[step]).loss
        loss.backward()
        clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 1 and not resume:
            save_checkpoint(path, model, optimizer, ctx, step=2)
    layout = optimizer.state_dict()
    return {"run": RunResult(losses[-1:], snapshot(model)), "layout": (layout["layout"], layout["dp_size"])}


def _resumes(ctx: ParallelContext, path: str) -> dict:
    return {"through": _checkpointed(ctx, path, 2, resume=False), "zero2": _checkpointed(ctx, path, 2, resume=True),
            "zero1": _checkpointed(ctx, path, 1, resume=True)}


def test_a_zero2_checkpoint_resumes_bit_exactly_and_loads_at_zero1_and_at_another_dp(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    for out in run_distributed(_resumes, 1, 1, 2, path, timeout=120):
        through = out["through"]["run"]
        assert_matches_reference(out["zero2"]["run"], through, EXACT)  # the same layout: bit for bit
        assert_matches_reference(out["zero1"]["run"], through, EXACT)  # ZeRO-1 steps the same shards
        assert out["zero1"]["layout"] == out["zero2"]["layout"]  # one optimizer-state layout
    for out in run_distributed(_checkpointed, 1, 1, 4, path, 2, True, timeout=120):
        assert_matches_reference(out["run"], through, PARALLEL)  # resharded from dp 2 to dp 4
