"""Stage 12: time and memory partitioners balance uneven blocks, and a partitioned model still
equals the single-device run."""

import functools

import pytest
import torch

from goose_core import ParallelContext, PipelineParallel, TensorParallel, full_state_dict, spawn
from goose_core.partition import ImbalanceWarning, PartitionPlan, plan_partition, stage_costs
from goose_core.testing import (
    PARALLEL,
    RunResult,
    TrainSpec,
    assert_matches_reference,
    reference_run,
    run_distributed,
    train_loop,
)

from course import load_train_script

train_script = load_train_script("12")

# SGD keeps the comparison about the partition: a wrong gradient scale stays visible, which
# AdamW's normalisation would hide. (The default AdamW spec is checked on GPT-2 below.)
SPEC = TrainSpec(family="llama", steps=2, optimizer="sgd", overrides={"num_hidden_layers": 8})


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: profiling times on one thread


@functools.cache
def _single_device_run() -> RunResult:
    return train_script.single_device_run(SPEC, train_script.uneven_model(SPEC))


@pytest.mark.parametrize("stages, counts, gain", [(2, [7, 1], 0.8), (4, [3, 3, 1, 1], 0.5)])
def test_memory_gives_the_wide_layers_stages_of_their_own(stages: int, counts: list[int], gain: float) -> None:
    # Memory is deterministic: a wide layer (16x the MLP) weighs ~8 narrow ones, so at pp=2 the
    # six narrow layers and one wide one (6 + 8) beat two wide ones together (16).
    partition = train_script.plan(train_script.uneven_model(SPEC), SPEC, stages, "memory", num_microbatches=4)
    assert partition.counts == counts
    uniform = [8 // stages] * stages  # both wide layers on the last stage
    assert max(partition.stage_costs) <= gain * max(stage_costs(partition.block_costs, uniform))


def test_time_unloads_the_stage_of_the_wide_layers() -> None:
    # Measured times are noisy, so the exact split may move by one block; never to uniform.
    partition = train_script.plan(train_script.uneven_model(SPEC), SPEC, 2, "time", num_microbatches=4)
    assert partition.counts[1] < 4 and partition.unit == "s"
    assert max(partition.stage_costs) < max(stage_costs(partition.block_costs, [4, 4]))


def _pipeline_counts(ctx: ParallelContext, partitioner: str) -> list[int]:
    model = train_script.uneven_model(SPEC)
    return PipelineParallel(model, ctx, num_microbatches=4, partitioner=partitioner).counts


@pytest.mark.parametrize("partitioner", ["time", "memory"])
def test_pipeline_parallel_takes_the_partitioner_by_name(partitioner: str) -> None:
    # Each rank profiles; the first rank's costs are broadcast, so both ranks hold one split.
    first, second = run_distributed(_pipeline_counts, 1, 2, 1, partitioner, timeout=120)
    assert first == second and first[1] < 4
    if partitioner == "memory":
        assert first == [7, 1]


def _train(ctx: ParallelContext, partitioner: str) -> tuple[RunResult, list[int], float, float]:
    result, partition, predicted, measured = train_script.train(ctx, SPEC, partitioner, num_microbatches=4)
    return result, partition.counts, predicted, measured


@pytest.mark.parametrize("partitioner", ["time", "memory"])
def test_partitioned_uneven_model_equals_the_single_device_run(partitioner: str) -> None:
    results = run_distributed(_train, 1, 2, 1, partitioner, timeout=180)
    expected = _single_device_run()
    assert results[0][1] == results[1][1] != [4, 4]
    for result, _, predicted, measured in results:
        assert_matches_reference(result, expected, PARALLEL)
        assert predicted > 0 and measured > 0


def test_the_predicted_step_is_gpipes_clock_cycles_times_the_slowest_stage() -> None:
    times = PartitionPlan([4, 4], "time", [1.0] * 6 + [4.0, 4.0], "s")
    assert train_script.predicted_step(times, [4, 4], 4) == (4 + 2 - 1) * 10.0
    assert train_script.predicted_step(times, [6, 2], 4) == (4 + 2 - 1) * 8.0


def _train_by_time(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    model = PipelineParallel(spec.build_model(), ctx, num_microbatches=2, partitioner="time").parallelize()
    batches = spec.batches()
    losses = train_loop(model, spec.build_optimizer(model.parameters()), batches)
    return RunResult(losses, full_state_dict(model, ctx))


def test_time_partitioned_gpt2_equals_reference_run() -> None:
    spec = TrainSpec(family="gpt2", steps=2)
    for result in run_distributed(_train_by_time, 1, 2, 1, spec, timeout=120):
        assert_matches_reference(result, reference_run(spec), PARALLEL)


def test_a_dominant_block_is_reported_and_too_many_stages_refused() -> None:
    model = train_script.uneven_model(SPEC, wide=(7,), factor=64)
    with pytest.warns(ImbalanceWarning, match="block 7 costs .* of all 8 blocks together"):
        train_script.plan(model, SPEC, 2, "memory", num_microbatches=4)
    with pytest.raises(ValueError, match="8 blocks cannot fill 9 pipeline stages"):
        plan_partition(8, 9, "memory", block_fns=[torch.nn.Identity()] * 8, sample=torch.zeros(1, 1, 64))


def test_main_prints_predicted_beside_measured_and_losses(capfd: pytest.CaptureFixture) -> None:
    # spawn gives each rank torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), so this
    # is the torchrun launch without paying a fresh interpreter per rank.
    spawn(train_script.main, 2, ["--steps", "2", "--partitioner", "memory"], timeout=120)
    out = capfd.readouterr().out
    assert "memory partition [7, 1]" in out
    assert "step: predicted" in out and "measured" in out and "reference" in out


def _tensor_and_pipeline(ctx: ParallelContext, spec: TrainSpec) -> tuple[list[int], RunResult]:
    model = TensorParallel(spec.build_model(), ctx).parallelize()
    pipeline = PipelineParallel(model, ctx, num_microbatches=2, partitioner="time")
    model = pipeline.parallelize()
    batches = spec.batches()
    losses = train_loop(model, spec.build_optimizer(model.parameters()), batches)
    return pipeline.counts, RunResult(losses, full_state_dict(model, ctx))


def test_time_partitioner_composes_with_tensor_parallelism() -> None:
    # Sharded blocks all-reduce inside the profile: every rank must profile, in step.
    spec = TrainSpec(family="llama", steps=2, optimizer="sgd")
    results = run_distributed(_tensor_and_pipeline, 2, 2, 1, spec, timeout=120)
    assert all(counts == results[0][0] for counts, _ in results)
    for _, result in results:
        assert_matches_reference(result, reference_run(spec), PARALLEL)
