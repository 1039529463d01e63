"""Unit tests of partition planning: uniform, explicit, by time, by memory; reports; agreement."""

import logging

import pytest
import torch
from torch import nn

from goose_core import ParallelContext
from goose_core.partition import PartitionPlan, partition_blocks, plan_partition
from goose_core.testing import run_distributed

# Six narrow blocks, then two 32x wider ones: a uniform split puts both wide ones on the last stage.
WIDTHS = [64] * 6 + [2048] * 2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: profiling times on one thread


def _blocks() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, 64)) for w in WIDTHS]


def _sample() -> torch.Tensor:
    return torch.randn(8, 32, 64, generator=torch.Generator().manual_seed(0))


def test_uniform_and_explicit_keep_their_behaviour() -> None:
    assert partition_blocks(4, 2) == [2, 2]
    assert partition_blocks(5, 2) == [3, 2]
    assert partition_blocks(10, 4, "uniform") == [3, 3, 2, 2]
    assert partition_blocks(4, 2, [1, 3]) == [1, 3]
    assert plan_partition(5, 2).stage_costs == [3, 2]


@pytest.mark.parametrize("partitioner", ["time", "memory"])
def test_wide_blocks_get_stages_of_their_own(partitioner: str) -> None:
    plan = plan_partition(8, 4, partitioner, block_fns=_blocks(), sample=_sample())
    # Memory is exact; measured times are noisy on a shared machine, so the narrow blocks may
    # split [4, 2] instead of [3, 3], but each wide block always gets a stage of its own.
    assert plan.counts == [3, 3, 1, 1] if partitioner == "memory" else plan.counts[2:] == [1, 1]
    uniform = PartitionPlan([2, 2, 2, 2], "uniform", plan.block_costs, plan.unit)
    assert max(plan.stage_costs) < 0.75 * max(uniform.stage_costs)
    assert plan.partitioner == partitioner and plan.unit == {"time": "s", "memory": "bytes"}[partitioner]


def test_memory_weighs_activations_by_microbatches() -> None:
    # Activations grow with M, parameters do not: the costs are act * M + 4 * params.
    one = plan_partition(8, 4, "memory", block_fns=_blocks(), sample=_sample(), optimizer_factor=0.0)
    eight = plan_partition(8, 4, "memory", block_fns=_blocks(), sample=_sample(), optimizer_factor=0.0,
                           num_microbatches=8)
    assert eight.block_costs == [8 * c for c in one.block_costs]


def test_the_plan_is_logged_with_predicted_costs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="goose_core.partition"):
        plan = plan_partition(8, 4, "memory", block_fns=_blocks(), sample=_sample())
    assert "memory partition [3, 3, 1, 1]" in caplog.text and "MiB" in caplog.text
    assert plan.imbalance == pytest.approx(max(plan.stage_costs) / (sum(plan.block_costs) / 4))


def test_table_puts_measured_beside_predicted() -> None:
    plan = PartitionPlan([1, 2], "time", [0.001, 0.001, 0.002], "s")
    lines = plan.table(measured=[0.0011, 0.0029]).splitlines()
    assert lines[0].split() == ["stage", "blocks", "predicted", "share", "measured", "share"]
    assert lines[1].split() == ["0", "1", "1.00", "ms", "25%", "1.10", "ms", "28%"]
    assert lines[2].split() == ["1", "2", "3.00", "ms", "75%", "2.90", "ms", "72%"]


@pytest.mark.parametrize("args, kwargs, message", [
    ((2, 3, "uniform"), {}, "2 blocks cannot fill 3 pipeline stages"),
    ((4, 2, "fastest"), {}, "unknown partitioner 'fastest'"),
    ((4, 2, [2, 1]), {}, r"explicit partition \[2, 1\] must .* sum to 4"),
    ((4, 2, "time"), {}, "pass block_fns"),
    ((4, 2, "memory"), {"block_fns": [nn.Identity()] * 3, "sample": torch.zeros(1)}, "3 block_fns for 4 blocks"),
    ((4, 2, "memory"), {"block_fns": [nn.Identity()] * 4, "sample": torch.zeros(1), "num_microbatches": 0},
     "num_microbatches must be >= 1"),
])
def test_bad_input_is_a_clear_error(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_partition(*args, **kwargs)


def _plan_with_rank_dependent_costs(ctx: ParallelContext, default_group: bool) -> list[int]:
    # Each rank's blocks differ (rank 1 sees the wide block first): without agreement the ranks
    # would split differently and the pipeline would be garbage.
    widths = [1024, 64, 64, 64] if ctx.rank == 1 else [64, 64, 64, 1024]
    blocks = [nn.Sequential(nn.Linear(64, w), nn.Linear(w, 64)) for w in widths]
    group = None if default_group else ctx.pp_group
    return plan_partition(4, 2, "memory", block_fns=blocks, sample=_sample(), group=group).counts


@pytest.mark.parametrize("default_group", [False, True])
def test_every_rank_of_the_group_takes_the_same_split(default_group: bool) -> None:
    out = run_distributed(_plan_with_rank_dependent_costs, 1, 2, 1, default_group, timeout=60)
    assert out == [[3, 1], [3, 1]]
