"""The contiguous min-max partition: split a sequence of block costs into p stages, exactly."""

from __future__ import annotations

import math
import warnings
from itertools import accumulate
from typing import Sequence

__all__ = ["ImbalanceWarning", "solve", "stage_costs", "check_costs"]


class ImbalanceWarning(UserWarning):
    """One block is heavier than all the others together: no split can balance the stages."""


def check_costs(costs: Sequence[float], num_stages: int) -> None:
    """Raise ValueError for costs that cannot be split into ``num_stages`` non-empty stages.

    Raises:
        ValueError: ``num_stages < 1``, more stages than blocks, or a cost that is negative,
            NaN or infinite.
    """
    if num_stages < 1:
        raise ValueError(f"the number of pipeline stages must be >= 1, got {num_stages}")
    if len(costs) < num_stages:
        raise ValueError(f"{len(costs)} blocks cannot fill {num_stages} pipeline stages (each needs at "
                         f"least one): use pipeline_parallel_size <= {len(costs)} or a deeper model")
    bad = [(i, c) for i, c in enumerate(costs) if not math.isfinite(c) or c < 0]
    if bad:
        i, c = bad[0]
        raise ValueError(f"block costs must be finite and >= 0, but block {i} costs {c!r}")


def stage_costs(costs: Sequence[float], counts: Sequence[int]) -> list[float]:
    """The cost of each stage: the sum of its consecutive blocks' costs."""
    bounds = [0, *accumulate(counts)]
    return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]


def solve(costs: Sequence[float], num_stages: int) -> list[int]:
    """How many consecutive blocks each stage takes so that the costliest stage is as cheap as
    possible (exact). Among the optimal splits it returns the most even one (least sum of squared
    stage costs), and among those the one whose earlier stages hold more blocks (like "uniform":
    the last stage also carries the head and the loss).

    A dynamic program over prefixes, O(p·n²) for n blocks and p stages: the block lists of a
    pipeline are short (tens to hundreds), so exactness costs nothing worth a heuristic::

        best[s][j] = min over i < j of  max(best[s-1][i], cost(i..j))    (s stages, first j blocks)

    A second pass minimises the sum of squares over the splits whose every stage fits under that
    optimum (squares add up, so this pass is exact too).

    Warns:
        ImbalanceWarning: one block costs more than all the others together (with p >= 2): that
            block alone bounds the step time, whatever the split.

    Raises:
        ValueError: see :func:`check_costs`.
    """
    check_costs(costs, num_stages)
    prefix = [0.0, *accumulate(float(c) for c in costs)]
    bottleneck = _min_max(prefix, num_stages)
    counts = _most_even(prefix, num_stages, bottleneck)
    _warn_if_one_block_dominates(costs, num_stages)
    return counts


def _piece(prefix: list[float], i: int, j: int) -> float:
    # Always the same expression, so both passes see bit-identical piece costs.
    return prefix[j] - prefix[i]


def _min_max(prefix: list[float], num_stages: int) -> float:
    """The least achievable cost of the costliest stage."""
    n = len(prefix) - 1
    # best[j]: least max-cost of splitting the first j blocks into s stages (inf if impossible).
    best = [_piece(prefix, 0, j) if j >= 1 else math.inf for j in range(n + 1)]
    for s in range(2, num_stages + 1):
        best = [min((max(best[i], _piece(prefix, i, j)) for i in range(s - 1, j)), default=math.inf)
                for j in range(n + 1)]
    return best[n]


def _most_even(prefix: list[float], num_stages: int, bottleneck: float) -> list[int]:
    """Among splits whose every stage costs <= ``bottleneck``, the least sum of squared costs."""
    n = len(prefix) - 1
    # score[s][j] for the first j blocks in s stages; cut[s][j]: where the last stage starts.
    score = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    score[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, n + 1):
            # Descending i: on a tie the later cut wins, which gives earlier stages more blocks.
            for i in range(j - 1, s - 2, -1):
                piece = _piece(prefix, i, j)
                if piece > bottleneck or score[s - 1][i] == math.inf:
                    continue
                total = score[s - 1][i] + piece * piece
                if total < score[s][j]:
                    score[s][j], cut[s][j] = total, i
    counts, j = [], n
    for s in range(num_stages, 0, -1):
        counts.append(j - cut[s][j])
        j = cut[s][j]
    return counts[::-1]


def _warn_if_one_block_dominates(costs: Sequence[float], num_stages: int) -> None:
    total = sum(costs)
    heaviest = max(range(len(costs)), key=lambda i: costs[i])
    if num_stages >= 2 and costs[heaviest] > total - costs[heaviest]:
        share = costs[heaviest] / total
        warnings.warn(f"block {heaviest} costs {share:.0%} of all {len(costs)} blocks together: no split "
                      f"into {num_stages} stages can balance them (its stage bounds every step). Split "
                      f"that block, or use fewer pipeline stages.", ImbalanceWarning, stacklevel=3)
