"""Tensor-parallel peers and pipeline stages fed different batches: refused on every rank, on the
first forward; the same batch passes (goose_core.distributed.batch_check)."""

from __future__ import annotations

import pytest
import torch

from goose_core import ParallelContext, PipelineParallel, TensorParallel
from goose_core.data import shard_batch
from goose_core.distributed.batch_check import batch_checksum, check_policy
from goose_core.testing import TrainSpec, run_distributed

SPEC = TrainSpec(family="llama", batch_size=8, seq_len=16)
ADVICE = "Shard the data by data-parallel rank, not by global rank"


def test_the_checksum_sees_order_fields_and_exact_values() -> None:
    ids = torch.arange(24).view(4, 6)
    base = batch_checksum({"input_ids": ids, "labels": ids})
    assert torch.equal(base, batch_checksum({"input_ids": ids.clone(), "labels": ids.clone()}))
    assert not torch.equal(base, batch_checksum({"input_ids": ids.flip(0), "labels": ids}))  # rows swapped
    assert not torch.equal(base, batch_checksum({"input_ids": ids, "labels": ids.roll(1, 1)}))
    assert not torch.equal(base, batch_checksum({"input_ids": ids}))  # labels missing
    assert not torch.equal(base, batch_checksum({"input_ids": ids.view(6, 4), "labels": ids}))  # rows
    mask = torch.ones(4, 6)
    nudged = mask.clone()
    nudged[0, 0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # one ulp: still seen
    assert not torch.equal(batch_checksum({"attention_mask": mask}), batch_checksum({"attention_mask": nudged}))
    assert batch_checksum({"input_ids": ids}).min() >= 0  # non-negative: -c cannot overflow


def test_an_unknown_policy_is_refused_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="check_batch must be one of 'first', 'always', 'never', got 'once'"):
        check_policy("once")
    model = SPEC.build_model()
    with pytest.raises(ValueError, match="got 'once'"):
        TensorParallel(model, ctx=None, check_batch="once")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 'once'"):
        PipelineParallel(model, ctx=None, check_batch="once")  # type: ignore[arg-type]


def _forward(ctx: ParallelContext, wrap: str, shard_by: str, policy: str = "first") -> list[str | float]:
    """Two forwards; each one's loss, or the message it raised. ``shard_by``: "dp" feeds every
    tp peer and pipeline stage the same batch, "world" gives every rank its own, "dp,world"
    does the first and then the second."""
    model = SPEC.build_model()
    if "tp" in wrap:
        model = TensorParallel(model, ctx, check_batch=policy).parallelize()
    if "pp" in wrap:
        model = PipelineParallel(model, ctx, num_microbatches=2, check_batch=policy).parallelize()
    out: list[str | float] = []
    hows = shard_by.split(",") if "," in shard_by else [shard_by, shard_by]
    for step, how in enumerate(hows):
        rank, size = (ctx.dp_rank, ctx.dp_size) if how == "dp" else (ctx.rank, ctx.world_size)
        batch = shard_batch(SPEC.batch(step), rank, size)
        try:
            out.append(model(**batch).loss.item())
        except ValueError as err:
            out.append(str(err))
            break
    return out


@pytest.mark.parametrize("wrap, tp, pp, dp", [("tp", 2, 1, 1), ("pp", 1, 2, 1), ("tp+pp", 2, 2, 2)])
def test_different_batches_are_refused_on_every_rank_the_same_batch_passes(wrap: str, tp: int, pp: int,
                                                                             dp: int) -> None:
    for rank, (first, *_) in enumerate(run_distributed(_forward, tp, pp, dp, wrap, "world", timeout=120)):
        assert isinstance(first, str) and ADVICE in first, f"rank {rank}: {first}"
        assert "input_ids, labels differ" in first, first
    for rank, losses in enumerate(run_distributed(_forward, tp, pp, dp, wrap, "dp", timeout=120)):
        assert all(isinstance(loss, float) for loss in losses), f"rank {rank}: {losses}"


def test_the_policy_decides_which_forwards_are_compared() -> None:
    # The first forward gets the same batch on both tp peers, the second different ones.
    first = run_distributed(_forward, 2, 1, 1, "tp", "dp,world", "first", timeout=120)
    assert all(isinstance(loss, float) for losses in first for loss in losses), first
    always = run_distributed(_forward, 2, 1, 1, "tp", "dp,world", "always", timeout=120)
    assert all(isinstance(losses[0], float) and ADVICE in losses[1] for losses in always), always
    # "never": different batches run on unchecked, as they would without the check.
    never = run_distributed(_forward, 2, 1, 1, "tp", "world", "never", timeout=120)
    assert all(isinstance(loss, float) for losses in never for loss in losses), never
