"""Name the rank that did not arrive: a timed-out or broken operation becomes a MissingRankError.

torch's own message (gloo's ``Timed out waiting 120000ms for recv operation``, ``Connection
closed by peer``) says only that this rank waited. goose's choke points (its collectives, the
pipeline's receives and sends, the data-parallel buckets, ZeRO-1's gather, the gradient norm, the
pipeline's loss broadcast) pass such an error to :func:`raise_named`, which reads every rank's
progress record (:mod:`goose_core.distributed.progress`) and raises, on every rank that waited:

    rank 0 (tp 0, pp 0, dp 0) gave up waiting on ranks [0, 1] ...
    did not arrive: rank 1 (tp 0, pp 0, dp 1) is alive but behind: step 2, last 'forward'
    4.1 s ago; it issued 5 operations on ranks [0, 1], this rank 6

A rank is named when its record ended (it left: exited, or destroyed its context), when its
heartbeat stopped between two reads ``2 x INTERVAL`` apart (killed or frozen), or when it is
alive but its operation count on the failed group is behind this rank's (or it is the pipeline
neighbour this rank waited for). Ranks that gave up waiting themselves publish what they waited
on, and the same rule runs on their wait too: a rank waiting on a waiting rank still finds the
one that never came. torch's
``monitored_barrier`` names missing ranks too, but only on gloo, only at a barrier every rank
calls, and it costs a round of messages; these records cost nothing until a failure.
"""

from __future__ import annotations

import functools
import json
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn, TypeVar

import torch.distributed as dist

from goose_core.distributed.progress import Progress, current, record_key

__all__ = ["MissingRankError", "is_peer_failure", "raise_named", "names_missing", "naming_missing", "explain"]

#: Phrases of torch's errors for a peer that did not come (gloo, NCCL's watchdog, the store).
_PEER_FAILURES = ("timed out", "connection closed", "connection reset", "broken pipe",
                  "failed to recv", "communicator was aborted", "watchdog caught")


class MissingRankError(RuntimeError):
    """A collective or point-to-point operation failed because peers did not arrive; the message
    names them and what they did last."""


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is torch saying a peer did not answer (timeout, closed connection)."""
    return isinstance(err, RuntimeError) and any(p in str(err).lower() for p in _PEER_FAILURES)


def raise_named(err: BaseException, *, group: dist.ProcessGroup | None = None,
                peer: int | None = None) -> NoReturn:
    """Re-raise ``err``, as a MissingRankError naming the missing ranks when it is a peer
    failure. ``group``: the failed operation's group; ``peer``: the rank it exchanged with."""
    progress = current()
    if isinstance(err, MissingRankError) or progress is None or not is_peer_failure(err):
        raise err
    group = group if group is not None else dist.group.WORLD
    ranks = [peer] if peer is not None else dist.get_process_group_ranks(group)
    message = explain(progress, str(err), ranks, group.group_name, pipeline=peer is not None)
    raise MissingRankError(message) from err


F = TypeVar("F", bound=Callable[..., Any])


def names_missing(fn: F) -> F:
    """Decorate ``fn(tensor, group, ...)``: its peer failures name the missing ranks."""

    @functools.wraps(fn)
    def run(x: Any, group: dist.ProcessGroup, *args: Any, **kwargs: Any) -> Any:
        with naming_missing(group):
            return fn(x, group, *args, **kwargs)

    return run  # type: ignore[return-value]


@contextmanager
def naming_missing(group: dist.ProcessGroup | None = None, peer: int | None = None) -> Iterator[None]:
    """Within the block, a peer failure of an operation on ``group`` (default: the world), or
    with the rank ``peer`` (point-to-point), names the missing ranks."""
    try:
        yield
    except RuntimeError as err:
        raise_named(err, group=group, peer=peer)


def _read(store: dist.Store, world: int) -> dict[int, dict[str, Any]]:
    records = {}
    for rank in range(world):
        key = record_key(rank)
        if store.check([key]):  # get() would wait for a record that never comes
            records[rank] = json.loads(store.get(key))
    return records


def explain(progress: Progress, error: str, ranks: list[int], group: str,
            pipeline: bool = False) -> str:
    """The message: who gave up on what, and which ranks did not arrive with what they did last.

    Args:
        progress: this rank's record.
        error: torch's message.
        ranks: the ranks of the failed operation (the peer alone for a pipeline message).
        group: the name of its process group (whose operation counts are compared).
        pipeline: the failed operation was a point-to-point exchange with ``ranks[0]``.
    """
    on = f"rank {ranks[0]}" if pipeline else f"ranks {ranks}"
    head = (f"rank {progress.rank} ({progress.where}) gave up waiting on {on} at step "
            f"{progress.step} ({_seconds(progress.timeout.total_seconds())} is the timeout: "
            f"ParallelContext(timeout=...)). torch: {error.splitlines()[0][:300] if error else '?'}")
    progress.fail(f"gave up waiting on {on}", {"ranks": ranks, "group": group, "pipeline": pipeline})
    world = dist.get_world_size()
    try:
        first = _read(progress.store, world)
        time.sleep(2 * progress.interval)  # a live rank beats in between; a gone one does not
        last = _read(progress.store, world)
    except Exception as err:  # noqa: BLE001 - the store itself is gone
        return (f"{head}\nthe progress records could not be read ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}): the store lives in torchrun's agent, or in "
                f"rank 0's process under goose_core.spawn, so that process has likely exited")
    return "\n".join([head, *_verdicts(progress, first, last, ranks, group, pipeline)])


def _verdicts(progress: Progress, first: dict[int, dict], last: dict[int, dict], ranks: list[int],
              group: str, pipeline: bool) -> list[str]:
    # Who waited on whom: this rank, and every rank that gave up too (its record says on what),
    # so a rank waiting on a waiting rank still finds the one that never came.
    waits = [(progress.rank, {"ranks": ranks, "group": group, "pipeline": pipeline}, progress.seqs())]
    waits += [(r, rec["waited"], rec["seq"]) for r, rec in sorted(last.items())
              if r != progress.rank and rec["state"] == "failed" and rec.get("waited")]
    gone, behind, waiting = [], [], []
    for rank in range(dist.get_world_size()):
        record = last.get(rank)
        if rank == progress.rank:
            continue
        if record is None:
            gone.append(f"rank {rank} published no progress record (it never built its "
                        f"ParallelContext, or died before)")
        elif record["state"] == "failed":
            waiting.append(f"rank {rank} ({record['where']}) {record['activity']} too")
        elif record["end"] is not None:
            gone.append(f"rank {rank} ({record['where']}) {record['end']} after step "
                        f"{record['step']} (last: {_last(record)}) while this rank waited")
        elif rank in first and first[rank]["beat"] == record["beat"]:
            gone.append(f"rank {rank} ({record['where']}) stopped publishing its progress "
                        f"(killed, or its process is frozen) at step {record['step']}, last: "
                        f"{_last(record)}")
        elif (why := _why_behind(rank, record, waits)) is not None:
            behind.append(why)
    if gone or behind:
        return ["did not arrive: " + "; ".join(gone + behind)] + (
            ["gave up as well: " + "; ".join(waiting)] if waiting else [])
    listed = [f"rank {r}: step {last[r]['step']}, last: {_last(last[r])}" for r in ranks if r in last]
    return ["could not tell which rank did not arrive: every rank of the operation is alive and "
            "has issued as many operations as this one; their records: " + "; ".join(listed)] + (
        ["gave up as well: " + "; ".join(waiting)] if waiting else [])


def _why_behind(rank: int, record: dict[str, Any],
                waits: list[tuple[int, dict[str, Any], dict[str, int]]]) -> str | None:
    """Why a live rank did not arrive: it is the pipeline neighbour a rank waited for, or its
    operation count on a group a rank waited on is behind that rank's; None if neither."""
    for waiter, waited, seqs in waits:
        if rank not in waited["ranks"]:
            continue
        group, theirs = waited["group"], record["seq"].get(waited["group"], 0)
        if waited["pipeline"]:
            count = f"the pipeline neighbour rank {waiter} waited for"
        elif theirs < seqs.get(group, 0):
            count = (f"it issued {theirs} operations on ranks {waited['ranks']}, rank {waiter} "
                     f"{seqs.get(group, 0)}")
        else:
            continue
        return _behind(record, count)
    return None


def _behind(record: dict[str, Any], count: str) -> str:
    return (f"rank {record['rank']} ({record['where']}) is alive but did not arrive: step "
            f"{record['step']}, last: {_last(record)}; {count}")


def _last(record: dict[str, Any]) -> str:
    return f"'{record['activity']}' {_seconds(time.time() - record['since'])} ago"


def _seconds(s: float) -> str:
    return f"{s:.1f} s"
