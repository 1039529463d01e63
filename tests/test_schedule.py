"""The GPipe schedule is a pure function of (micro-batches, partitions)."""

import pytest

from goose_core.engine.schedule import GPipe, clock_cycles


def test_clock_cycles_match_the_docstring_table() -> None:
    assert clock_cycles(4, 3) == [
        [(0, 0)],
        [(1, 0), (0, 1)],
        [(2, 0), (1, 1), (0, 2)],
        [(3, 0), (2, 1), (1, 2)],
        [(3, 1), (2, 2)],
        [(3, 2)],
    ]


@pytest.mark.parametrize("m, n", [(1, 1), (1, 4), (8, 2), (3, 5), (8, 4)])
def test_every_cell_runs_once_at_clock_i_plus_j(m: int, n: int) -> None:
    clocks = clock_cycles(m, n)
    assert len(clocks) == m + n - 1
    cells = [cell for clock in clocks for cell in clock]
    assert sorted(cells) == [(i, j) for i in range(m) for j in range(n)]
    for k, clock in enumerate(clocks):
        assert all(i + j == k for i, j in clock)
        assert len({j for _, j in clock}) == len(clock)  # one cell per partition per clock


def test_gpipe_forward_respects_data_dependencies_and_backward_reverses() -> None:
    schedule = GPipe(4, 3)
    order = schedule.forward_cells()
    for i, j in order:
        if j > 0:
            assert order.index((i, j - 1)) < order.index((i, j))
        if i > 0:
            assert order.index((i - 1, j)) < order.index((i, j))
    assert all(schedule.backward_order(j) == [3, 2, 1, 0] for j in range(3))


@pytest.mark.parametrize("m, n", [(0, 2), (2, 0), (-1, 1)])
def test_bad_sizes_are_refused(m: int, n: int) -> None:
    with pytest.raises(ValueError, match="micro-batch"):
        GPipe(m, n)
