"""Unit tests of the process-grid arithmetic (no processes)."""

import pytest

from goose_core.distributed import ProcessGrid, layouts


def test_layouts_are_every_factorisation() -> None:
    assert layouts(1) == [(1, 1, 1)]
    assert sorted(layouts(4)) == sorted([(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)])
    assert len(layouts(8)) == 10
    assert all(tp * pp * dp == 8 for tp, pp, dp in layouts(8))


def test_documented_2x2x2_table() -> None:
    # The table in grid.py's docstring, written out by hand.
    grid = ProcessGrid(tp=2, pp=2, dp=2)
    expected = {0: (0, 0, 0), 1: (1, 0, 0), 2: (0, 0, 1), 3: (1, 0, 1),
                4: (0, 1, 0), 5: (1, 1, 0), 6: (0, 1, 1), 7: (1, 1, 1)}
    for rank, (tp, pp, dp) in expected.items():
        assert grid.coords(rank) == {"tp": tp, "cp": 0, "pp": pp, "dp": dp}
        assert grid.rank(tp=tp, pp=pp, dp=dp) == rank
    assert grid.all_groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid.all_groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid.all_groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid.pipeline_neighbours(1) == (None, 5)
    assert grid.pipeline_neighbours(5) == (1, None)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_groups_partition_the_world(world: int) -> None:
    for tp, pp, dp in layouts(world):
        grid = ProcessGrid(tp, pp, dp)
        for axis in ("tp", "pp", "dp"):
            groups = grid.all_groups(axis)
            assert sorted(r for g in groups for r in g) == list(range(world))
            assert all(len(g) == getattr(grid, axis) for g in groups)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        ProcessGrid(tp=bad)  # type: ignore[arg-type]


def test_world_size_mismatch_names_the_sizes_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"2 \* 2 \* 1 = 4, but the world size is 8.*data_parallel_size=2"):
        ProcessGrid(2, 2, 1).check_world_size(8)


def test_context_parallel_sits_between_tp_and_dp() -> None:
    # The tp=2, cp=2, dp=2 table in grid.py's docstring; cp=1 leaves every rank where it was.
    grid = ProcessGrid(tp=2, dp=2, cp=2)
    assert grid.all_groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid.all_groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid.all_replica_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert grid.coords(6) == {"tp": 0, "cp": 1, "dp": 1, "pp": 0}
    assert all(ProcessGrid(2, 2, 2).coords(r) == {**ProcessGrid(2, 2, 2, 1).coords(r), "cp": 0} for r in range(8))
    assert ProcessGrid(2, 2, 2).all_replica_groups() == ProcessGrid(2, 2, 2).all_groups("dp")
    with pytest.raises(ValueError, match=r"context_parallel_size = 1 \* 1 \* 1 \* 2 = 2, but the world size is 4"):
        ProcessGrid(cp=2).check_world_size(4)
