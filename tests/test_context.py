"""ParallelContext creates every process group, the first/last-stage pair of each pipeline too."""

import pytest
import torch
import torch.distributed as dist

from goose_core import ParallelContext
from goose_core.testing import run_distributed


def _ends(ctx: ParallelContext) -> list[int] | None:
    group = ctx.pipeline_ends_group
    if group is None:
        return None
    members = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(members, torch.tensor([ctx.rank]), group=group)  # the group really works
    return [int(m) for m in members]


@pytest.mark.parametrize("tp, pp, dp, expected", [
    (2, 1, 1, [None, None]),                      # one stage: no pair
    (1, 2, 2, [[0, 2], [1, 3], [0, 2], [1, 3]]),  # two stages: the pipeline group itself
    (1, 4, 1, [[0, 3], None, None, [0, 3]]),      # more: first and last only, group rank 0 first
    (2, 3, 1, [[0, 4], [1, 5], None, None, [0, 4], [1, 5]]),  # one pair per pipeline
])
def test_pipeline_ends_group(tp: int, pp: int, dp: int, expected: list[list[int] | None]) -> None:
    assert run_distributed(_ends, tp, pp, dp, timeout=60) == expected
