"""Sequence parallelism: tokens split over tp between the regions, and training equal to one device."""

import pytest
import torch

from goose_core import (DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel, TensorParallel,
                        clip_grad_norm_, full_state_dict)
from goose_core.data import shard_batch
from goose_core.metadata import shard_spec
from goose_core.tensor_parallel import sequence
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, train_loop)

pytestmark = pytest.mark.usefixtures("one_thread")  # the reference runs in this process

# Dropout between the regions (GPT-2's embedding and residual dropout, Bloom's hidden dropout)
# draws the one-device mask. Attention dropout acts inside the region on this rank's heads,
# drawn per rank as chapter 08's tensor parallelism draws it: no layout reproduces that mask,
# so it is off (Llama has no other dropout).
NO_ATTENTION_DROPOUT = {"gpt2": {"attn_pdrop": 0.0}, "llama": {"attention_dropout": 0.0},
                        "bloom": {"attention_dropout": 0.0}}
FAMILY_SPECS = [TrainSpec(family=family, steps=2, dropout=0.1, padding=padding, overrides=overrides)
                for (family, overrides), padding in zip(NO_ATTENTION_DROPOUT.items(), ("right", "left", "right"))]


def _train_families(ctx: ParallelContext, specs: list[TrainSpec]) -> list[RunResult]:
    results = []
    for spec in specs:
        model = TensorParallel(spec.build_model(), ctx, sequence_parallel=True).parallelize()
        optimizer = spec.build_optimizer(model.parameters())
        results.append(RunResult(train_loop(model, optimizer, spec.batches()), full_state_dict(model, ctx)))
    return results


def _assert_all_match(per_rank: list[list[RunResult]], references: list[RunResult], names: list[str]) -> None:
    for rank, results in enumerate(per_rank):
        for result, reference, name in zip(results, references, names):
            try:
                assert_matches_reference(result, reference, PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"rank {rank}, {name}: {err}") from err


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_equals_the_single_device_run(tp: int) -> None:
    # Llama at tp=4 replicates each of its 2 kv-heads on two ranks; padding right and left.
    references = [reference_run(spec) for spec in FAMILY_SPECS]
    per_rank = run_distributed(_train_families, tp, 1, 1, FAMILY_SPECS, timeout=180)
    _assert_all_match(per_rank, references, [spec.family for spec in FAMILY_SPECS])


COMPOSED = TrainSpec(family="bloom", steps=2, max_grad_norm=0.5, padding="right")


def _same_pieces(ctx: ParallelContext, spec: TrainSpec) -> bool:
    """SP cuts the parameters as TP does: the same names, pieces and shard specs on this rank, so
    whatever saves or loads TP's pieces (checkpoints, full_state_dict) takes SP's unchanged."""
    sp = TensorParallel(spec.build_model(), ctx, sequence_parallel=True).parallelize()
    tp = TensorParallel(spec.build_model(), ctx).parallelize()
    pieces = dict(tp.named_parameters())
    return list(pieces) == [n for n, _ in sp.named_parameters()] and all(
        torch.equal(p, pieces[n]) and shard_spec(p) == shard_spec(pieces[n]) for n, p in sp.named_parameters())


def _composed(ctx: ParallelContext, spec: TrainSpec) -> tuple[RunResult, bool]:
    """SP x pp x dp with ZeRO-1 and clipping."""
    same = _same_pieces(ctx, spec)
    model = TensorParallel(spec.build_model(), ctx, sequence_parallel=True).parallelize()
    model = PipelineParallel(model, ctx, num_microbatches=2).parallelize()
    model = DataParallel(model, ctx).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    losses = []
    for step in range(spec.steps):
        loss = model(**shard_batch(spec.batch(step), ctx.dp_rank, ctx.dp_size)).loss
        loss.backward()
        clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, full_state_dict(model, ctx)), same


def test_sequence_parallel_composes_with_pipeline_data_parallel_zero1_and_clipping() -> None:
    # tp2 x pp2 x dp2: the pipeline's boundaries carry (micro-batch, S/tp, hidden), each rank's
    # own tokens; the dp ranks train on their halves of the batch.
    reference = reference_run(COMPOSED)
    for rank, (result, same) in enumerate(run_distributed(_composed, 2, 2, 2, COMPOSED, timeout=180)):
        assert_matches_reference(result, reference, PARALLEL)
        assert same, f"rank {rank}: SP's parameter pieces differ from TP's"


def test_a_norm_gradient_not_summed_over_tp_fails_parity(monkeypatch: pytest.MonkeyPatch) -> None:
    # The planted bug: every norm (and row bias) keeps its own tokens' share of the gradient.
    monkeypatch.setattr(sequence, "sum_grads_over", lambda params, group: None)
    spec = FAMILY_SPECS[1]
    reference = reference_run(spec)
    per_rank = run_distributed(_unchecked, 2, 1, 1, spec, timeout=120)
    with pytest.raises(AssertionError, match="differ beyond"):
        _assert_all_match(per_rank, [reference], ["llama"])


def _unchecked(ctx: ParallelContext, spec: TrainSpec) -> list[RunResult]:
    # check_grads=False: the first backward's replica check would otherwise name the norms first.
    model = TensorParallel(spec.build_model(), ctx, sequence_parallel=True, check_grads=False).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    return [RunResult(train_loop(model, optimizer, spec.batches()), full_state_dict(model, ctx))]
