"""Unit tests of the contiguous min-max partition solver, against brute force."""

import random
import warnings
from itertools import combinations

import pytest

from goose_core.partition.solve import ImbalanceWarning, solve, stage_costs


def _all_splits(n: int, p: int) -> list[list[int]]:
    splits = []
    for cuts in combinations(range(1, n), p - 1):
        bounds = [0, *cuts, n]
        splits.append([b - a for a, b in zip(bounds, bounds[1:])])
    return splits


def _brute_force(costs: list[float], p: int) -> tuple[float, float]:
    """The optimal bottleneck, and the least sum of squares among the splits that reach it."""
    loads = [stage_costs(costs, split) for split in _all_splits(len(costs), p)]
    best = min(max(load) for load in loads)
    return best, min(sum(c * c for c in load) for load in loads if max(load) == best)


@pytest.mark.parametrize("seed", range(200))
def test_optimal_on_random_costs(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    p = rng.randint(1, n)
    # Integers keep sums exact, so ties are real ties; floats are checked below.
    costs = [float(rng.randint(0, 20)) for _ in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImbalanceWarning)
        counts = solve(costs, p)
    assert len(counts) == p and sum(counts) == n and min(counts) >= 1
    load = stage_costs(costs, counts)
    best, squares = _brute_force(costs, p)
    assert max(load) == best
    assert sum(c * c for c in load) == squares


@pytest.mark.parametrize("seed", range(50))
def test_optimal_on_random_float_costs(seed: int) -> None:
    rng = random.Random(1000 + seed)
    n = rng.randint(2, 10)
    p = rng.randint(2, min(n, 5))
    costs = [rng.lognormvariate(0, 1) for _ in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImbalanceWarning)
        counts = solve(costs, p)
    best, _ = _brute_force(costs, p)
    assert max(stage_costs(costs, counts)) == pytest.approx(best, rel=1e-12)


def test_equal_costs_split_like_uniform() -> None:
    assert solve([1.0] * 5, 2) == [3, 2]
    assert solve([1.0] * 8, 4) == [2, 2, 2, 2]
    assert solve([1.0] * 10, 4) == [3, 3, 2, 2]


def test_wide_blocks_get_stages_of_their_own() -> None:
    # Two wide blocks (4x) among narrow ones: each wide one shares its stage with few others.
    costs = [1, 1, 4, 1, 1, 1, 4, 1]
    counts = solve(costs, 4)
    assert max(stage_costs(costs, counts)) == 5  # a wide block alone would leave 5 stages
    assert counts == [2, 1, 3, 2]  # loads 2, 4, 3, 5: the most even way to reach 5


def test_the_most_even_of_the_optimal_splits() -> None:
    # [5,1,1] and [3,3,1] both have bottleneck 10; the second is the even one.
    with pytest.warns(ImbalanceWarning):
        assert solve([1, 1, 1, 1, 1, 1, 10], 3) == [3, 3, 1]


def test_one_stage_takes_everything() -> None:
    assert solve([3.0, 1.0, 2.0], 1) == [3]


def test_dominant_block_warns_with_its_index() -> None:
    with pytest.warns(ImbalanceWarning, match="block 2 costs 91% of all 4 blocks"):
        counts = solve([1, 1, 30, 1], 2)
    assert counts == [2, 2]  # still the optimal split (2 | 31): the warning says it is poor


def test_no_warning_when_balanced() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImbalanceWarning)
        solve([1, 2, 3, 4], 2)


@pytest.mark.parametrize("costs, p, message", [
    ([1, 2], 3, "2 blocks cannot fill 3 pipeline stages"),
    ([1, 2], 0, "must be >= 1, got 0"),
    ([1, -1], 2, "block 1 costs -1"),
    ([1, float("nan")], 1, "block 1 costs nan"),
])
def test_bad_input_is_a_clear_error(costs: list[float], p: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        solve(costs, p)
