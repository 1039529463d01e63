"""Stage 11: every recompute mode, under both schedules, equals the single-device run.

Stage 09 proves the pipeline at its default mode (``except_last``); these are the other two,
``always`` and ``never``, over the same families, depths and micro-batch counts, and composed
with data and tensor parallelism. SGD where M >= 4 keeps a wrong gradient scale visible; the
Llama at pp=2, M=8, ``always``, AdamW is held bit for bit (``EXACT``) to one device accumulating
the same micro-batches in the schedule's backward order.
"""

import pytest

from goose_core import ParallelContext, full_state_dict
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, at_layout,
                                reference_run, run_distributed, snapshot, train_loop)

from course import load_train_script

train_script = load_train_script("11")

# (family, M, mode, optimizer, schedule): both modes, every family and M at each depth.
MATRIX = {
    2: [("gpt2", 1, "never", "adamw", "gpipe"), ("llama", 2, "always", "adamw", "gpipe"),
        ("gpt2", 8, "always", "sgd", "gpipe"), ("llama", 8, "always", "adamw", "gpipe"),
        ("llama", 8, "always", "adamw", "1f1b"), ("bloom", 2, "never", "sgd", "1f1b")],
    4: [("bloom", 1, "always", "adamw", "gpipe"), ("llama", 4, "never", "sgd", "gpipe"),
        ("bloom", 8, "never", "sgd", "gpipe"), ("llama", 8, "never", "sgd", "1f1b"),
        ("bloom", 1, "always", "adamw", "1f1b")],
}
EXACTLY = {"gpipe": True, "1f1b": False}  # the Llama M=8 always AdamW runs: backward last first?


def _spec(family: str, optimizer: str) -> TrainSpec:
    return TrainSpec(family=family, steps=2, optimizer=optimizer)


def _train_many(ctx: ParallelContext, configs: list[tuple[str, int, str, str, str]]) -> list[RunResult]:
    return [train_script.train(ctx, _spec(f, o), m, c, s) for f, m, c, o, s in configs]


@pytest.mark.parametrize("pp", [2, 4])
def test_every_mode_matches_the_single_device_run(pp: int) -> None:
    configs = MATRIX[pp]
    per_rank = run_distributed(_train_many, 1, pp, 1, configs, timeout=150)
    for k, (family, m, mode, optimizer, schedule) in enumerate(configs):
        reference = reference_run(_spec(family, optimizer))
        for rank, results in enumerate(per_rank):
            try:
                assert_matches_reference(results[k], reference, PARALLEL)
            except AssertionError as err:
                where = f"{schedule} pp={pp} {family} M={m} {mode} rank {rank}"
                raise AssertionError(f"{where}: {err}") from err
        if (family, m, mode, optimizer) == ("llama", 8, "always", "adamw"):
            _assert_exactly_micro_batch_accumulation(per_rank[-1][k], reverse=EXACTLY[schedule])


def _assert_exactly_micro_batch_accumulation(last_rank: RunResult, reverse: bool) -> None:
    """One device, the same 8 micro-batches, gradients accumulated in the pipeline's backward order."""
    spec = _spec("llama", "adamw")
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    train_loop(model, optimizer, spec.batches(), micro_batches=8, reverse=reverse)
    expected = RunResult(last_rank.losses, snapshot(model))  # the loss is summed in another order
    assert_matches_reference(last_rank, expected, EXACT)


def _composed(ctx: ParallelContext, spec: TrainSpec, m: int, mode: str, schedule: str) -> RunResult:
    """Pipeline with data parallelism (each dp rank feeds its shard) or tensor parallelism inside."""
    model = at_layout(spec.build_model(), ctx, num_microbatches=m, recompute=mode, schedule=schedule)
    optimizer = spec.build_optimizer(model.parameters())
    batches = spec.batches(ctx.dp_rank, ctx.dp_size)
    return RunResult(train_loop(model, optimizer, batches), full_state_dict(model, ctx))


@pytest.mark.parametrize("tp, dp, family, m, mode, schedule", [
    (1, 2, "gpt2", 4, "always", "gpipe"),  # tied embeddings: summed over stages, averaged over dp
    (2, 1, "llama", 4, "always", "1f1b"),
])
def test_every_mode_composes_with_data_and_tensor_parallelism(tp: int, dp: int, family: str, m: int,
                                                              mode: str, schedule: str) -> None:
    spec = _spec(family, "sgd")
    results = run_distributed(_composed, tp, 2, dp, spec, m, mode, schedule, timeout=120)
    reference = reference_run(spec)
    for result in results:
        assert_matches_reference(result, reference, PARALLEL)
