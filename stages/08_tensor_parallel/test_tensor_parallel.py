"""Stage 08: tensor-parallel GPT-2, Llama (GQA) and Bloom train exactly like the single-device model."""


import pytest

from goose_core import DataParallel, ParallelContext, full_state_dict
from goose_core.testing import (
    PARALLEL,
    RunResult,
    TrainSpec,
    assert_matches_reference,
    reference_run,
    run_distributed,
    train_loop,
)

from course import beside_reference_diffs, load_train_script, run_train_script

train_script = load_train_script("08")


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bloom"])
def test_tp_equals_the_single_device_run(family: str, tp: int) -> None:
    # Llama has 2 kv-heads: tp=2 splits them, tp=4 replicates each on two ranks.
    spec = TrainSpec(family=family, steps=3)
    reference = reference_run(spec)
    for result in run_distributed(train_script.train, tp, 1, 1, spec, timeout=120):
        assert_matches_reference(result, reference, PARALLEL)


def _tied(ctx: ParallelContext, family: str) -> tuple[bool, int, int]:
    model = train_script.build(ctx, TrainSpec(family=family))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    distinct = {id(p) for p in model.parameters()}
    return head.weight is embedding.weight, len(distinct), embedding.weight.shape[0]


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_tied_embeddings_stay_one_parameter(family: str) -> None:
    count = len(list(TrainSpec(family=family).build_model().parameters()))
    for tied, params, rows in run_distributed(_tied, 2, 1, 1, family, timeout=60):
        assert tied and params == count and rows == 256 // 2


def test_torchrun_prints_losses_beside_the_reference() -> None:
    out = run_train_script("08", 2, "--steps", "2", "--family", "bloom")
    assert "tensor parallel over 2 ranks" in out
    diffs = beside_reference_diffs(out)
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs


def _bad_vocab(ctx: ParallelContext) -> None:
    train_script.build(ctx, TrainSpec(family="llama", overrides={"vocab_size": 250}))


def test_unsplittable_vocab_fails_on_every_rank_with_the_fix() -> None:
    with pytest.raises(Exception, match="vocab_size=250 does not divide by tp=4: pad the vocabulary"):
        run_distributed(_bad_vocab, 4, 1, 1, timeout=60)


def _tp_dp(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    model = DataParallel(train_script.build(ctx, spec), ctx).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    shards = spec.batches(ctx.dp_rank, ctx.dp_size)
    return RunResult(train_loop(model, optimizer, shards), full_state_dict(model, ctx))


def test_tp_composes_with_data_parallel() -> None:
    spec = TrainSpec(family="llama", steps=3)
    reference = reference_run(spec)
    for result in run_distributed(_tp_dp, 2, 1, 2, spec, timeout=120):
        assert_matches_reference(result, reference, PARALLEL)
