"""Unit tests of pipeline callbacks: filters, registration order, errors propagate unchanged."""

import pytest

from goose_core.engine.callbacks import Callback, CallbackList, Event


def _fire_all(callbacks: CallbackList) -> None:
    for kind in ("forward", "recompute", "backward"):
        for i in range(3):
            for j in range(2):
                callbacks.fire(kind, "before", i, j)
                callbacks.fire(kind, "after", i, j)


@pytest.mark.parametrize("filters, expected", [
    ({}, 36),
    ({"microbatch_idx": 1}, 12),
    ({"partition_idx": 0}, 18),
    ({"microbatch_idx": 2, "partition_idx": 1}, 6),
    ({"kinds": ["recompute"]}, 12),
    ({"microbatch_idx": 0, "partition_idx": 0, "kinds": ["forward"]}, 2),
])
def test_filters(filters: dict, expected: int) -> None:
    seen: list[Event] = []
    _fire_all(CallbackList([Callback(seen.append, **filters)]))
    assert len(seen) == expected
    for event in seen:
        assert filters.get("microbatch_idx", event.microbatch_idx) == event.microbatch_idx
        assert filters.get("partition_idx", event.partition_idx) == event.partition_idx
        assert event.kind in filters.get("kinds", [event.kind])


def test_events_say_which_work_and_which_side() -> None:
    seen: list[Event] = []
    callbacks = CallbackList([Callback(seen.append)])
    callbacks.fire("backward", "before", 3, 1)
    assert seen == [Event("backward", "before", 3, 1)]


def test_registration_order_add_and_remove() -> None:
    calls: list[str] = []
    first = Callback(lambda e: calls.append("first"))
    callbacks = CallbackList([first])
    callbacks.add(Callback(lambda e: calls.append("second")))
    callbacks.fire("forward", "before", 0, 0)
    callbacks.remove(first)
    callbacks.fire("forward", "before", 0, 0)
    assert calls == ["first", "second", "second"]


def test_a_raising_callback_propagates_its_error() -> None:
    def fail(event: Event) -> None:
        raise KeyError(f"boom at {event.microbatch_idx}")

    callbacks = CallbackList([Callback(fail, microbatch_idx=2)])
    callbacks.fire("forward", "before", 1, 0)  # filtered out: not called
    with pytest.raises(KeyError, match="boom at 2"):
        callbacks.fire("forward", "before", 2, 0)
