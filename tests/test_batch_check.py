"""Tensor-parallel peers and pipeline stages fed different batches: refused on every rank, on the
first forward; a bad batch (ids past the vocabulary, labels that do not fit, shapes that differ
between peers at any step) refused on every rank of every layout, even when only one data-parallel
shard holds it; the same, good batch passes (goose_core.distributed.batch_check)."""

from __future__ import annotations

import pytest
import torch

from goose_core import ParallelContext, PipelineParallel, RankError, TensorParallel
from goose_core.data import shard_batch
from goose_core.distributed import batch_check
from goose_core.distributed.batch_check import BatchCheck, batch_checksum, check_policy
from goose_core.testing import TrainSpec, at_layout, run_distributed

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


def _corrupt(batch: dict[str, torch.Tensor], case: str, ctx: ParallelContext, step: int) -> dict[str, torch.Tensor]:
    """``batch`` as a faulty loop would feed it to this rank at ``step``."""
    batch = {k: v.clone() for k, v in batch.items()}
    if case == "id" or (case == "id on one shard" and ctx.dp_rank == ctx.dp_size - 1):
        batch["input_ids"][0, 3] = 300
    if case == "label":
        batch["labels"][1, 2] = 300
    if case == "short labels":
        batch["labels"] = batch["labels"][:, :-1]
    if case == "short peer" and step == 1 and (ctx.tp_rank, ctx.pp_rank) == (ctx.tp_size - 1, ctx.pp_size - 1):
        batch = {k: v[:, :-1] for k, v in batch.items()}
    return batch


def _train(ctx: ParallelContext, case: str) -> list[str | float]:
    """Two training steps on ``ctx``'s layout fed ``case``'s batches: each loss, or the
    ValueError's message (any other error fails the run)."""
    model = at_layout(SPEC.build_model(), ctx, num_microbatches=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out: list[str | float] = []
    for step in range(2):
        batch = _corrupt(shard_batch(SPEC.batch(step), ctx.dp_rank, ctx.dp_size), case, ctx, step)
        try:
            loss = model(**batch).loss
        except ValueError as err:
            return [*out, str(err)]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out


BAD = [  # case, tp, pp, dp, the step refused, the message's start
    ("id", 2, 1, 1, 0, "input_ids hold 300, outside [0, 256)"),  # trained silently on a split vocabulary
    ("label", 2, 1, 1, 0, "labels hold 300 (other than -100, which is ignored), outside [0, 256)"),
    ("id on one shard", 1, 2, 2, 0, "input_ids on data-parallel rank 1 hold 300"),  # was IndexError + gloo
    ("id on one shard", 1, 1, 2, 0, "input_ids on data-parallel rank 1 hold 300"),
    ("id on one shard", 2, 2, 2, 0, "input_ids on data-parallel rank 1 hold 300"),
    ("short labels", 2, 2, 1, 0, "labels have shape (8, 15) but input_ids (8, 16)"),  # was a stack error
    ("short peer", 2, 1, 1, 1, "the tensor-parallel peers of data-parallel rank 0 were fed batches of "
                               "different shapes: input_ids's shape ranges from (8, 15) to (8, 16)"),  # was SIGABRT
    ("short peer", 1, 2, 1, 1, "the pipeline stages of data-parallel rank 0 were fed batches of different shapes"),
]


@pytest.mark.parametrize("case, tp, pp, dp, step, message", BAD, ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}" for c in BAD])
def test_a_bad_batch_is_refused_on_every_rank_with_its_value(case: str, tp: int, pp: int, dp: int, step: int,
                                                            message: str) -> None:
    for rank, out in enumerate(run_distributed(_train, tp, pp, dp, case, timeout=120)):
        assert len(out) == step + 1 and all(isinstance(loss, float) for loss in out[:step]), f"rank {rank}: {out}"
        assert isinstance(out[step], str) and out[step].startswith(message), f"rank {rank}: {out[step]}"


def test_planted_without_the_check_ids_past_the_vocabulary_train_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the check guards: at tp=2 the vocabulary-parallel embedding masks id 300 on both shards.
    monkeypatch.setattr(batch_check, "first_fault", lambda *args: None)  # the ranks are forked: inherited
    for rank, out in enumerate(run_distributed(_train, 2, 1, 1, "id", timeout=120)):
        assert len(out) == 2 and all(isinstance(loss, float) for loss in out), f"rank {rank}: {out}"


def test_planted_without_the_dp_ranks_a_bad_shard_leaves_the_others_failing_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What the dp ranks' joining guards: the shard with the bad id refuses it alone, the other
    # shard's ranks wait for it in DataParallel's collectives and fail there, on a lost peer.
    monkeypatch.setattr(BatchCheck, "_dp_joins", lambda *args: False)
    with pytest.raises(RankError):
        run_distributed(_train, 1, 2, 2, "id on one shard", timeout=60)


def _evaluate_one_replica(ctx: ParallelContext) -> list[float]:
    """dp rank 0 alone evaluates (no grad, no labels), then every rank trains one step."""
    model = at_layout(SPEC.build_model(), ctx)
    batch = shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size)
    out = []
    if ctx.dp_rank == 0:
        with torch.no_grad():
            out.append(model(input_ids=batch["input_ids"]).logits.float().mean().item())
    loss = model(**batch).loss
    loss.backward()
    return [*out, loss.item()]


def test_a_forward_that_does_not_train_leaves_the_other_replicas_out() -> None:
    for rank, out in enumerate(run_distributed(_evaluate_one_replica, 2, 1, 2, timeout=120)):
        assert len(out) == (2 if rank < 2 else 1), f"rank {rank}: {out}"  # ranks 0, 1: dp rank 0
