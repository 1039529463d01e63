"""Paired, interleaved timing: goose and its peer alternate, and the median paired ratio gets an interval.

Timing goose and then its peer lets background load land on one side: on a shared 2-core
machine a single goose / peer ratio moved by ±20% between identical runs. Here the two alternate
in the same processes, and each *round* times both back to back, in turns so that neither always
goes first::

    round:   0        1        2        3      ...
    order:   A  B  |  B  A  |  A  B  |  B  A   ...     A = goose, B = peer
    ratio:   A0/B0    A1/B1    A2/B2    A3/B3          (neighbours share the load of their moment)

The result is the median of the per-round ratios with a distribution-free 95% interval for that
median (order statistics of the ratios, see :func:`median_interval`). An interval that contains
1.0 is reported as "no difference measured": the run cannot tell the two apart.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

__all__ = ["CONFIDENCE", "Pairs", "alternate", "median_interval", "verdict"]

#: The interval's target coverage of the true median ratio.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Pairs:
    """The samples of one paired measurement: ``goose[i]`` and ``peer[i]`` were taken side by side."""

    goose: tuple[float, ...]
    peer: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.goose) != len(self.peer) or not self.goose:
            raise ValueError(f"pairs need as many goose as peer samples, at least one: got "
                             f"{len(self.goose)} and {len(self.peer)}")

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.goose, self.peer)]

    @property
    def ratio(self) -> float:
        """The median of the paired ratios goose / peer."""
        return statistics.median(self.ratios)

    @property
    def interval(self) -> tuple[float, float, float]:
        """(low, high, coverage): see :func:`median_interval`."""
        return median_interval(self.ratios)


def alternate(goose: Callable[[], float], peer: Callable[[], float], rounds: int, warmup: int = 1) -> Pairs:
    """Take ``rounds`` paired samples of two measurements, alternating which goes first.

    Each callable takes one sample and returns it (seconds, usually). Under several ranks every
    rank calls this with the same arguments: the order is fixed, so collectives inside the
    callables line up; rank 0's samples are the ones to report (taken between barriers).

    Args:
        warmup: untimed rounds first (allocations, first-call caches, shape exchanges).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for _ in range(warmup):
        goose(), peer()
    a: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            a.append(goose())
            b.append(peer())
        else:
            b.append(peer())
            a.append(goose())
    return Pairs(tuple(a), tuple(b))


def _binomial_tail(n: int, k: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2): the chance that k or fewer samples fall below the median."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values``' distribution.

    With the n values sorted, [x_(k), x_(n+1-k)] contains the true median unless k or more values
    fall on one side of it; each value does so with probability 1/2 whatever the distribution,
    so the coverage is 1 - 2 P(Binomial(n, 1/2) <= k - 1). The widest k reaching ``confidence``
    is taken; with fewer than 6 values even min..max falls short and its true coverage is
    returned as the third element (n=5: 94%, n=3: 75%).

    Returns:
        (low, high, coverage).
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    k = 1
    while k < n // 2 and 1 - 2 * _binomial_tail(n, k) >= confidence:
        k += 1
    coverage = 1 - 2 * _binomial_tail(n, k - 1) if n > 1 else 0.0
    return xs[k - 1], xs[n - k], coverage


def verdict(low: float, high: float, unit: str = "s") -> str:
    """What the interval says about goose / peer: "no difference measured" when it holds 1.0."""
    if low <= 1.0 <= high:
        return "no difference measured"
    lower = high < 1.0
    if unit == "s":
        return "goose faster" if lower else "goose slower"
    return "goose lower" if lower else "goose higher"
