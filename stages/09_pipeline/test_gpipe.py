"""Stage 09: GPipe and 1F1B over processes equal the single-device run, for three families.

The matrix pp in {2, 4} x M in {1, 2, 4, 8} x 3 families is covered by two spawned groups per
schedule that each train several configurations, so that every value of every axis appears (and
every family meets both depths). Every run uses the default recompute mode (stage 11 varies it).

SGD where M >= 4 keeps a wrong gradient scale visible (AdamW's normalisation would hide it).
The runs are float64, so every configuration is held to PARALLEL. What the pipeline itself adds
is measured separately: against the same micro-batched accumulation on one device, with AdamW,
the pipelined run is bit-identical (``EXACT``) for untied weights.
"""

import pytest
import torch

from goose_core import DataParallel, ParallelContext, PipelineParallel, TensorParallel, full_state_dict
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference,
                                reference_run, run_distributed, snapshot, train_loop)

from course import beside_reference_diffs, load_train_script, run_train_script

train_script = load_train_script("09")

# (family, M, optimizer): every M and family at each depth.
MATRIX = {
    2: [("gpt2", 1, "adamw"), ("llama", 2, "adamw"), ("bloom", 4, "sgd"), ("gpt2", 8, "sgd")],
    4: [("bloom", 1, "adamw"), ("gpt2", 2, "adamw"), ("llama", 4, "sgd"), ("llama", 8, "sgd"), ("bloom", 8, "sgd")],
}
# 1F1B: every family at each depth, M below, at and above the depth. The Llama at pp=2 is also
# held to EXACT against one-device accumulation (test_pipeline_is_exactly_...).
MATRIX_1F1B = {
    2: [("gpt2", 8, "sgd"), ("llama", 8, "adamw"), ("bloom", 2, "sgd")],
    4: [("llama", 8, "sgd"), ("bloom", 1, "adamw"), ("gpt2", 4, "sgd")],
}
MATRICES = {"gpipe": MATRIX, "1f1b": MATRIX_1F1B}


def _spec(family: str, optimizer: str) -> TrainSpec:
    return TrainSpec(family=family, steps=2, optimizer=optimizer)


def _train_many(ctx: ParallelContext, configs: list[tuple[str, int, str]],
                schedule: str = "gpipe") -> list[RunResult]:
    return [train_script.train(ctx, _spec(f, o), m, schedule) for f, m, o in configs]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp", [2, 4])
def test_every_rank_matches_the_single_device_run(pp: int, schedule: str) -> None:
    configs = MATRICES[schedule][pp]
    per_rank = run_distributed(_train_many, 1, pp, 1, configs, schedule, timeout=150)
    for k, (family, m, optimizer) in enumerate(configs):
        reference = reference_run(_spec(family, optimizer))
        for rank, results in enumerate(per_rank):
            try:
                assert_matches_reference(results[k], reference, PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"{schedule} pp={pp} {family} M={m} rank {rank}: {err}") from err
    if (schedule, pp) == ("1f1b", 2):  # 1F1B's backward runs the micro-batches first to last
        _assert_exactly_micro_batch_accumulation(per_rank[-1][1], reverse=False)


def _microbatched_reference(spec: TrainSpec, m: int, reverse: bool) -> RunResult:
    """One device, the same micro-batches, gradients accumulated in the pipeline's backward order."""
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    losses = train_loop(model, optimizer, spec.batches(), micro_batches=m, reverse=reverse)
    return RunResult(losses, snapshot(model))


def _assert_exactly_micro_batch_accumulation(last_rank: RunResult, reverse: bool) -> None:
    """Llama, M=8, AdamW on the last stage equals one-device accumulation bit for bit."""
    expected = _microbatched_reference(_spec("llama", "adamw"), 8, reverse)
    expected.losses = last_rank.losses  # the loss is summed in another order; params are not
    assert_matches_reference(last_rank, expected, EXACT)


def test_pipeline_is_exactly_micro_batch_accumulation() -> None:
    # GPipe's backward runs the micro-batches last first (1F1B's: in the pp=2 matrix above).
    results = run_distributed(_train_many, 1, 2, 1, [("llama", 8, "adamw")], timeout=120)
    _assert_exactly_micro_batch_accumulation(results[-1][0], reverse=True)


def _bad(ctx: ParallelContext, kwargs: dict) -> None:
    spec = TrainSpec(family="gpt2", **kwargs.pop("spec", {}))
    model = PipelineParallel(spec.build_model(), ctx, **kwargs).parallelize()
    model(**spec.batch(0))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_microbatches": 0}, "num_microbatches must be >= 1, got 0"),
    ({"num_microbatches": 3}, "a batch of 8 does not split into 3 equal micro-batches"),
    ({"spec": {"overrides": {"n_layer": 1}}}, "1 blocks cannot fill 2 pipeline stages"),
])
def test_bad_input_fails_every_rank_with_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(Exception, match=message) as info:
        run_distributed(_bad, 1, 2, 1, kwargs, timeout=60)
    assert "ValueError" in str(info.value)


def _eval_logits(ctx: ParallelContext) -> torch.Tensor | None:
    spec = TrainSpec(family="bloom")
    model = PipelineParallel(spec.build_model().eval(), ctx, num_microbatches=4).parallelize()
    with torch.no_grad():
        return model(input_ids=spec.batch(0)["input_ids"]).logits


def test_eval_returns_logits_on_the_last_stage() -> None:
    first, last = run_distributed(_eval_logits, 1, 2, 1, timeout=60)
    spec = TrainSpec(family="bloom")
    with torch.no_grad():
        want = spec.build_model().eval()(input_ids=spec.batch(0)["input_ids"]).logits
    assert first is None
    torch.testing.assert_close(last, want, rtol=PARALLEL.rtol, atol=PARALLEL.atol)


def test_torchrun_prints_losses_beside_the_reference() -> None:
    out = run_train_script("09", 2, "--steps", "2", "--family", "gpt2")
    assert "GPipe over 2 stages" in out
    diffs = beside_reference_diffs(out)
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs


def _composed(ctx: ParallelContext, spec: TrainSpec, m: int, schedule: str) -> RunResult:
    """Pipeline with data parallelism (each dp rank feeds its shard) or tensor parallelism inside."""
    model = spec.build_model()
    if ctx.tensor_parallel_size > 1:
        model = TensorParallel(model, ctx).parallelize()
    model = PipelineParallel(model, ctx, num_microbatches=m, schedule=schedule).parallelize()
    if ctx.data_parallel_size > 1:
        model = DataParallel(model, ctx).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    batches = spec.batches(ctx.dp_rank, ctx.dp_size)
    return RunResult(train_loop(model, optimizer, batches), full_state_dict(model, ctx))


@pytest.mark.parametrize("tp, dp, family, m, schedule", [
    # The default mode mixes recomputed cells (a nested backward each, so a gradient hook fires
    # once per micro-batch) with plain ones: data parallelism must reduce once, at the end.
    (1, 2, "llama", 4, "gpipe"),
    (2, 1, "bloom", 2, "gpipe"),  # vocab-parallel loss on the last stage
    # 1F1B, tied embeddings: the tied sum runs inside the forward call, the dp flush in loss.backward().
    (1, 2, "gpt2", 4, "1f1b"),
])
def test_composes_with_data_and_tensor_parallelism(tp: int, dp: int, family: str, m: int, schedule: str) -> None:
    spec = _spec(family, "sgd")
    results = run_distributed(_composed, tp, 2, dp, spec, m, schedule, timeout=120)
    reference = reference_run(spec)
    for result in results:
        assert_matches_reference(result, reference, PARALLEL)
