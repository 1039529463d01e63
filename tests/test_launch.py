"""Unit tests of the launcher: results come back, failures and hangs fail fast and clean up."""

import multiprocessing as mp
import os
import time

import pytest
import torch

from goose_core import RankError, spawn


def _rank_and_tensor() -> tuple[int, torch.Tensor]:
    rank = int(os.environ["RANK"])
    return rank, torch.full((2,), float(rank))


def _fail_on_rank_1() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one is broken")
    time.sleep(60)  # the others would wait forever for the broken rank


def _die_on_rank_0() -> None:
    if os.environ["RANK"] == "0":
        os._exit(3)
    time.sleep(60)


def _leave_quietly_on_rank_1() -> None:
    if os.environ["RANK"] == "1":
        os._exit(0)  # no result, no error
    time.sleep(60)


def _hang() -> None:
    time.sleep(60)


def test_results_in_rank_order_with_tensors() -> None:
    out = spawn(_rank_and_tensor, 4)
    assert [r for r, _ in out] == [0, 1, 2, 3]
    assert all(torch.equal(t, torch.full((2,), float(r))) for r, t in out)
    assert mp.active_children() == []


def test_children_run_one_thread() -> None:
    torch.ones(256, 256) @ torch.ones(256, 256)  # the parent's pool is warm: the fork trap
    assert spawn(torch.get_num_threads, 2) == [1, 1]


def test_failing_rank_fails_fast_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match=r"(?s)rank 1 of 3 failed.*ValueError: rank one is broken"):
        spawn(_fail_on_rank_1, 3, timeout=30)
    assert time.monotonic() - start < 10
    assert mp.active_children() == []


def test_dead_rank_is_reported() -> None:
    with pytest.raises(RankError, match="rank 0 of 2 died with exit code 3"):
        spawn(_die_on_rank_0, 2, timeout=30)
    assert mp.active_children() == []


def test_rank_that_exits_0_without_a_result_is_named_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1 of 2 exited with code 0 before reporting a result"):
        spawn(_leave_quietly_on_rank_1, 2, timeout=30)
    assert time.monotonic() - start < 10  # not the deadline
    assert mp.active_children() == []


def test_hang_hits_the_deadline() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 1 s"):
        spawn(_hang, 2, timeout=1.0)
    assert time.monotonic() - start < 10
    assert mp.active_children() == []
