"""Unit tests of the RNG tracker: split streams per tp rank, the replicated stream untouched."""

import torch

from goose_core.tensor_parallel import RNGTracker


def test_split_streams_differ_by_tp_rank_and_repeat_by_seed() -> None:
    draws = []
    for rank in (0, 1, 0):
        tracker = RNGTracker(seed=0, tp_rank=rank)
        with tracker.fork():
            draws.append(torch.rand(8))
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], draws[2])


def test_the_replicated_stream_continues_as_if_the_region_never_ran() -> None:
    torch.manual_seed(5)
    want = torch.rand(4), torch.rand(4)
    torch.manual_seed(5)
    tracker = RNGTracker(seed=0, tp_rank=1)
    first = torch.rand(4)
    tracker.enter()
    tracker.enter()  # idempotent: q, k and v all enter the same region
    inside = torch.rand(4)
    tracker.leave()
    tracker.leave()
    assert torch.equal(first, want[0]) and torch.equal(torch.rand(4), want[1])
    assert not torch.equal(inside, want[1])


def test_the_split_stream_resumes_where_it_left_off() -> None:
    tracker, again = RNGTracker(seed=3, tp_rank=0), RNGTracker(seed=3, tp_rank=0)
    with tracker.fork():
        a = torch.rand(4)
    torch.rand(4)  # replicated work between two regions
    with tracker.fork():
        b = torch.rand(4)
    with again.fork():
        both = torch.rand(8)
    assert torch.equal(torch.cat([a, b]), both)


def test_nested_fork_keeps_the_outer_region() -> None:
    tracker = RNGTracker(seed=0, tp_rank=0)
    tracker.enter()
    with tracker.fork():
        pass
    assert tracker.in_split_region
    tracker.leave()
    assert not tracker.in_split_region
