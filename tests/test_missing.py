"""A rank that stops taking part is named on every rank that waited for it, within the timeout and
a few seconds: alive but stuck (sleeping), or gone early with exit code 0
(goose_core.distributed.missing, goose_core.distributed.progress)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch

from goose_core import DataParallel, ParallelContext, PipelineParallel, TensorParallel
from goose_core.data import shard_batch
from goose_core.distributed import MissingRankError, spawn
from goose_core.distributed.missing import is_peer_failure
from goose_core.distributed.progress import Progress
from goose_core.testing import TrainSpec

SPEC = TrainSpec(family="llama", batch_size=4, seq_len=8, dtype=torch.float32)
TIMEOUT = 3.0  # seconds: ParallelContext(timeout=...)
SLACK = 4.0  # what naming may add: two reads of the records (1 s) and a busy 2-core machine


def test_peer_failures_are_told_from_other_errors() -> None:
    assert is_peer_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:7353"))
    assert is_peer_failure(RuntimeError("Timed out waiting 3000ms for recv operation to complete"))
    assert not is_peer_failure(RuntimeError("stack expects each tensor to be equal size"))
    assert not is_peer_failure(ValueError("timed out"))  # not torch's: a user's own error


def _plant(bug: str) -> None:
    """Break what the message relies on, in this rank, before its context publishes anything."""
    if bug == "no counts":  # the records carry no operation counts: a live rank cannot be judged
        Progress.seqs = lambda self: {}  # type: ignore[method-assign]
    elif bug == "no exit record":  # a rank that leaves says nothing
        Progress.close = lambda self, how: None  # type: ignore[method-assign]


def _train(tp: int, pp: int, dp: int, quitter: int, how: str, bug: str) -> str:
    """Train steps until one fails; ``quitter`` stops after step 2 (sleeps, or returns early).
    Returns the failure's message and how long the failing operation waited."""
    _plant(bug)
    ctx = ParallelContext(tp, pp, dp, backend="gloo", device="cpu", timeout=timedelta(seconds=TIMEOUT))
    model = SPEC.build_model()
    if tp > 1:
        model = TensorParallel(model, ctx).parallelize()
    if pp > 1:
        model = PipelineParallel(model, ctx, num_microbatches=2).parallelize()
    if dp > 1:
        model = DataParallel(model, ctx).parallelize()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        if ctx.rank == quitter and step == 2:
            if how == "sleep":
                time.sleep(TIMEOUT + SLACK + 3)  # alive, not taking part, until every peer gave up
            return "quit"
        started = time.monotonic()
        try:
            model(**shard_batch(SPEC.batch(step), ctx.dp_rank, ctx.dp_size)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        except MissingRankError as err:
            waited = time.monotonic() - started
            time.sleep(SLACK)  # under spawn the store lives in rank 0: keep it while peers read
            return f"{waited:.1f}|{err}"
    return "finished"


def _failures(results: list[str], quitter: int) -> dict[int, tuple[float, str]]:
    assert results[quitter] == "quit"
    out = {}
    for rank, result in enumerate(results):
        if rank != quitter:
            assert result != "finished", f"rank {rank} trained on without rank {quitter}"
            waited, message = result.split("|", 1)
            out[rank] = (float(waited), message)
    return out


@pytest.mark.parametrize("layout", [(1, 1, 2), (1, 2, 1)], ids=["dp2", "pp2"])
def test_a_stuck_rank_is_named_alive_with_its_step_and_last_activity(layout: tuple[int, int, int]) -> None:
    results = spawn(_train, 2, *layout, 1, "sleep", "", timeout=60)
    for rank, (waited, message) in _failures(results, 1).items():
        assert waited < TIMEOUT + SLACK, message
        assert f"rank {rank} (" in message and "gave up waiting" in message
        assert "ParallelContext(timeout=...)" in message and "3.0 s" in message
        assert "did not arrive: rank 1 (" in message and "is alive but did not arrive" in message
        assert "is alive but did not arrive: step 2, last: '" in message, message  # its last note


def test_a_stuck_rank_is_named_at_tp2xpp2() -> None:
    """Rank 3 (tp 1, pp 1) sleeps: its tensor-parallel peer times out in a collective, its
    pipeline neighbour in a receive, and rank 0 waits on rank 2, which waits on rank 3: all
    three name rank 3."""
    results = spawn(_train, 4, 2, 2, 1, 3, "sleep", "", timeout=90)
    failures = _failures(results, 3)
    for rank in (0, 1, 2):  # rank 2's neighbour (waits on a waiting rank), rank 3's, its tp peer
        waited, message = failures[rank]
        assert waited < TIMEOUT + SLACK, message
        assert "rank 3 (tp 1, pp 1, dp 0) is alive but did not arrive: step 2" in message, message


def test_without_operation_counts_a_stuck_rank_cannot_be_named() -> None:
    """The planted bug: records without torch's operation counts. The peer still fails in time,
    but cannot tell which rank is missing: the counts are what name it."""
    results = spawn(_train, 2, 1, 1, 2, 1, "sleep", "no counts", timeout=60)
    waited, message = _failures(results, 1)[0]
    assert waited < TIMEOUT + SLACK
    assert "could not tell which rank did not arrive" in message
    assert "rank 1 (tp 0, pp 0, dp 1) is alive" not in message


@pytest.mark.parametrize("layout", [(1, 1, 2), (1, 2, 1)], ids=["dp2", "pp2"])
def test_a_rank_that_returns_early_with_exit_code_0_is_named_as_gone(layout: tuple[int, int, int]) -> None:
    results = spawn(_train, 2, *layout, 1, "return", "", timeout=60)
    waited, message = _failures(results, 1)[0]
    assert waited < TIMEOUT + SLACK, message
    assert "did not arrive: rank 1 (" in message
    assert "exited after destroying the process group after step 2" in message, message


def test_without_the_exit_record_a_gone_rank_is_only_seen_to_stop() -> None:
    """The planted bug: no record at exit. The rank is still caught by its stopped heartbeat,
    but nothing says it left: the exit record is what says so."""
    results = spawn(_train, 2, 1, 1, 2, 1, "return", "no exit record", timeout=60)
    waited, message = _failures(results, 1)[0]
    assert "exited" not in message
    assert "rank 1 (tp 0, pp 0, dp 1) stopped publishing its progress" in message, message


def _store_host_leaves(bug: str) -> str:
    return _train(1, 1, 2, 0, "return", bug)


def test_when_rank_0_leaves_the_store_goes_with_it_and_the_message_says_so() -> None:
    results = spawn(_store_host_leaves, 2, "", timeout=60)
    waited, message = _failures(results, 0)[1]
    assert waited < TIMEOUT + SLACK, message
    assert "the progress records could not be read" in message
    assert "rank 0's process under goose_core.spawn" in message
