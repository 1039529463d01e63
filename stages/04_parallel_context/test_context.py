"""Stage 04: every layout of 1, 2, 4 and 8 ranks gets the right groups and pipeline neighbours.

The expectations are written from the layout rule (tp fastest, then dp, then pp), not from
``ProcessGrid``, and checked by real communication: each group all-gathers its members' global
ranks, and each stage sends its rank to the next stage.
"""

import os
import re

import pytest
import torch
import torch.distributed as dist

from goose_core import ParallelContext, RankError, spawn
from goose_core.distributed import layouts


def _expected(rank: int, tp: int, pp: int, dp: int) -> dict[str, list[int]]:
    block = tp * dp  # ranks per pipeline stage
    stage_start = rank - rank % block
    tp_start = rank - rank % tp
    return {
        "tp": list(range(tp_start, tp_start + tp)),
        "dp": list(range(stage_start + rank % tp, stage_start + block, tp)),
        "pp": list(range(rank % block, tp * pp * dp, block)),
    }


def _members(ctx: ParallelContext, axis: str) -> list[int]:
    out = [torch.zeros(1, dtype=torch.long) for _ in range(ctx.size(axis))]
    dist.all_gather(out, torch.tensor([ctx.rank]), group=ctx.group(axis))
    return [int(t) for t in out]


def _neighbour_received(ctx: ParallelContext) -> int | None:
    got = torch.tensor([-1])
    ops = []
    if ctx.next_pipeline_rank is not None:
        ops.append(dist.P2POp(dist.isend, torch.tensor([ctx.rank]), ctx.next_pipeline_rank))
    if ctx.prev_pipeline_rank is not None:
        ops.append(dist.P2POp(dist.irecv, got, ctx.prev_pipeline_rank))
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    return None if ctx.prev_pipeline_rank is None else int(got)


def _check_every_layout(world: int) -> None:
    rank = int(os.environ["RANK"])
    for tp, pp, dp in layouts(world):
        ctx = ParallelContext(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp)
        expected = _expected(rank, tp, pp, dp)
        for axis in ("tp", "pp", "dp"):
            assert _members(ctx, axis) == expected[axis], (tp, pp, dp, axis)
            assert ctx.group_ranks(axis) == expected[axis]
            assert expected[axis][ctx.local_rank(axis)] == rank
        assert (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank) == (
            ctx.tensor_parallel_rank, ctx.pipeline_parallel_rank, ctx.data_parallel_rank)
        assert (ctx.tp_size, ctx.pp_size, ctx.dp_size) == (tp, pp, dp)
        assert ctx.is_first_stage == (rank < tp * dp) and ctx.is_last_stage == (rank >= (pp - 1) * tp * dp)
        prev = rank - tp * dp if not ctx.is_first_stage else None
        assert ctx.prev_pipeline_rank == prev
        assert _neighbour_received(ctx) == prev


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_layout_gets_its_groups_and_neighbours(world: int) -> None:
    spawn(_check_every_layout, world, world, timeout=120)


def _bad_layout(tp: int, pp: int, dp: int) -> str:
    try:
        ParallelContext(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp)
    except ValueError as err:
        assert not dist.is_initialized(), "the error must come before any collective"
        return str(err)
    raise AssertionError("no error")


@pytest.mark.parametrize("sizes, message", [
    ((3, 1, 1), "3 \\* 1 \\* 1 = 3, but the world size is 2"),
    ((2, 2, 2), "= 8, but the world size is 2"),
    ((0, 1, 2), "tp size must be an integer >= 1, got 0"),
])
def test_bad_layout_fails_on_every_rank_before_any_collective(sizes, message) -> None:
    for text in spawn(_bad_layout, 2, *sizes, timeout=60):
        assert re.search(message, text), text


def _half_launched(sizes: tuple[int, int, int]) -> None:
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # a launcher's environment with pieces missing
        os.environ.pop(key)
    ParallelContext(*sizes)


def _no_launcher(sizes: tuple[int, int, int]) -> int:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # a plain `python`, a notebook
        os.environ.pop(key)
    return ParallelContext(*sizes).world_size


def test_missing_launcher_environment_says_how_to_launch() -> None:
    with pytest.raises(RankError, match="launch with `torchrun"):
        spawn(_half_launched, 1, (1, 1, 1), timeout=60)
    assert spawn(_no_launcher, 1, (1, 1, 1), timeout=60) == [1]  # no launcher at all: a world of one
    with pytest.raises(RankError, match="torchrun --nproc_per_node=2"):
        spawn(_no_launcher, 1, (2, 1, 1), timeout=60)
