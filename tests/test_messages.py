"""Point-to-point in NCCL's order: both sides of every boundary issue the same messages in the
same order, for every schedule; tags play no part."""

import pytest
import torch
import torch.distributed as dist

from goose_core import ParallelContext
from goose_core.engine.messages import Message, messages
from goose_core.engine.schedule import GPipe, OneFOneB, Schedule
from goose_core.testing import run_distributed

SCHEDULES: list[type[Schedule]] = [GPipe, OneFOneB]


@pytest.mark.parametrize("schedule_cls", SCHEDULES)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_each_pair_issues_the_same_messages_in_the_same_order(
        schedule_cls: type[Schedule], p: int, m: int, requires_grad: bool) -> None:
    schedule = schedule_cls(m, p)
    plans = [messages(schedule, j, requires_grad) for j in range(p)]
    for j in range(p - 1):
        left, right = plans[j][j + 1], plans[j + 1][j]
        assert left == right  # direction (src, dst), micro-batch and kind, message by message
        assert all({msg.src, msg.dst} == {j, j + 1} for msg in left)
        # Every message once: a header, then each micro-batch's activation (and gradient).
        kinds = ["activation"] + (["gradient"] if requires_grad else [])
        assert sorted(msg.key for msg in left) == sorted(
            [("header", -1)] + [(k, i) for k in kinds for i in range(m)])
        # A gradient crosses the boundary after its activation, the other way.
        for i in range(m if requires_grad else 0):
            act = left.index(Message("activation", i, j, j + 1))
            assert act < left.index(Message("gradient", i, j + 1, j))
        assert left[0] == Message("header", -1, j, j + 1)


def test_gpipe_sends_activations_then_receives_gradients_last_first() -> None:
    plan = messages(GPipe(3, 2), 0)[1]
    assert [(m.kind, m.microbatch) for m in plan] == [
        ("header", -1), ("activation", 0), ("activation", 1), ("activation", 2),
        ("gradient", 2), ("gradient", 1), ("gradient", 0)]


def test_1f1b_interleaves_activations_and_gradients_in_one_agreed_order() -> None:
    plan = messages(OneFOneB(3, 2), 0)[1]
    assert [(m.kind, m.microbatch) for m in plan] == [
        ("header", -1), ("activation", 0), ("activation", 1), ("gradient", 0), ("activation", 2),
        ("gradient", 1), ("gradient", 2)]


@pytest.mark.parametrize("schedule_cls", SCHEDULES)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_each_side_can_issue_its_plan_in_program_order(schedule_cls: type[Schedule], p: int, m: int) -> None:
    """Walk each partition's program: a message is sent when its cell has run and received when
    its cell needs it; issuing in plan order, no receive may wait behind a send not yet produced
    (on NCCL, messages of a pair complete in issue order: that would deadlock)."""
    schedule = schedule_cls(m, p)
    for j in range(p):
        plans = messages(schedule, j)
        produced: set[tuple[str, int]] = {("header", -1)}
        for action in schedule.actions(j):
            needs = [("activation", j - 1)] if action.kind == "F" else [("gradient", j + 1)]
            for kind, peer in needs:
                if peer not in plans:
                    continue
                plan = plans[peer]
                k = plan.index(Message(kind, action.microbatch, peer, j))
                blocked = [m.key for m in plan[:k] if m.src == j and m.key not in produced]
                assert not blocked, f"partition {j} needs {kind} {action.microbatch} behind unsent {blocked}"
            produced.add(("activation" if action.kind == "F" else "gradient", action.microbatch))


def test_a_partition_outside_the_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="partition 2 is not in"):
        messages(GPipe(2, 2), 2)


def _old_order(ctx: ParallelContext) -> list[float]:
    """The old transport's order: gradient receives posted during the forward (micro-batch 0
    first) while the next stage sends them in backward order (last first), matched by tags."""
    if ctx.is_first_stage:
        bufs = [torch.zeros(1) for _ in range(2)]
        works = [dist.irecv(b, 1, tag=10 + i) for i, b in enumerate(bufs)]
        for w in works:
            w.wait()
        return [float(b) for b in bufs]
    for i in reversed(range(2)):
        dist.send(torch.full((1,), float(i)), 0, tag=10 + i)
    return []


def test_the_old_tagged_order_swaps_gradients_when_tags_are_ignored() -> None:
    """Under the ``nccl_matching`` fixture (every test), tags do not match: micro-batch 0's
    receive gets micro-batch 1's gradient. This is what the derived order avoids."""
    received, _ = run_distributed(_old_order, 1, 2, 1, timeout=60)
    assert received == [1.0, 0.0]
