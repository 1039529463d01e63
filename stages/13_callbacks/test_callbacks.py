"""Stage 13: callbacks fire in the GPipe schedule's order, filters work, a raising callback stops
the run, and the timeline they record becomes a Gantt chart."""

import time
from pathlib import Path

import pytest

from goose_core import ParallelContext, RankError, spawn
from goose_core.pipeline import Callback, Event
from goose_core.instruments.gantt import draw_gantt
from goose_core.instruments.timeline import bubble_fraction, cell_order, trim_waits
from goose_core.testing import PARALLEL, TrainSpec, assert_matches_reference, reference_run, run_distributed

from course import load_train_script

train_script = load_train_script("13")
# SGD at M=4, as in stage 09: AdamW turns the ~1 ulp that micro-batching moves in near-zero
# gradients into a visible share of the update, even with no pipeline at all.
SPEC = TrainSpec(family="llama", steps=2, optimizer="sgd")
M = 4


def _train(ctx: ParallelContext, recompute: str) -> tuple:
    return train_script.train(ctx, SPEC, M, recompute)


@pytest.mark.parametrize("pp, recompute", [(2, "never"), (2, "always"), (2, "except_last"), (4, "except_last")])
def test_event_order_is_the_gpipe_schedule(pp: int, recompute: str) -> None:
    results = run_distributed(_train, 1, pp, 1, recompute, timeout=120)
    reference = reference_run(SPEC)
    for j, (result, spans, events) in enumerate(results):
        # Before/after pairs in the schedule's order; recompute just before its backward.
        assert events == train_script.schedule_events(M, pp, j, recompute)
        assert_matches_reference(result, reference, PARALLEL)  # callbacks change no number
        # The gathered timeline holds every stage's cells, in the same order, on every rank.
        assert spans == results[0][1]
        assert cell_order(spans, j) == [(k, i) for k, phase, i in events if phase == "before"]


def test_schedule_events_spelled_out() -> None:
    # M=3 with except_last on any stage: micro-batch 2 is not checkpointed.
    cells = [(k, i) for k, phase, i in train_script.schedule_events(3, 2, 1, "except_last") if phase == "before"]
    assert cells == [("forward", 0), ("forward", 1), ("forward", 2), ("backward", 2),
                     ("recompute", 1), ("backward", 1), ("recompute", 0), ("backward", 0)]


def _filtered(ctx: ParallelContext) -> dict[str, list[tuple]]:
    seen: dict[str, list[tuple]] = {"mb1": [], "stage1": [], "mb2_stage0_fwd": []}

    def into(key: str) -> object:
        return lambda e: seen[key].append((e.kind, e.phase, e.microbatch_idx, e.partition_idx))

    callbacks = (Callback(into("mb1"), microbatch_idx=1), Callback(into("stage1"), partition_idx=1),
                 Callback(into("mb2_stage0_fwd"), microbatch_idx=2, partition_idx=0, kinds=["forward"]))
    train_script.train(ctx, TrainSpec(family="gpt2", steps=1), M, "except_last", callbacks)
    return seen


def test_filters_by_microbatch_partition_and_kind() -> None:
    first, second = run_distributed(_filtered, 1, 2, 1, timeout=120)
    # Micro-batch 1 on each stage: forward, recompute and backward, before and after.
    for j, seen in enumerate((first, second)):
        assert sorted({(k, i, p) for k, _, i, p in seen["mb1"]}) == [
            ("backward", 1, j), ("forward", 1, j), ("recompute", 1, j)]
        assert len(seen["mb1"]) == 6
    assert first["stage1"] == [] and len(second["stage1"]) == 2 * (M + M + M - 1)
    assert {p for *_, p in second["stage1"]} == {1}
    assert first["mb2_stage0_fwd"] == [("forward", "before", 2, 0), ("forward", "after", 2, 0)]
    assert second["mb2_stage0_fwd"] == []


class CallbackFailed(Exception):
    pass


def _fail(event: Event) -> None:
    raise CallbackFailed(f"callback refused {event.kind} of micro-batch {event.microbatch_idx}")


def _raise_on(ctx: ParallelContext, partition: int | None) -> str:
    callback = Callback(_fail, microbatch_idx=1, partition_idx=partition, kinds=["forward"])
    try:
        train_script.train(ctx, SPEC, M, "except_last", (callback,))
    except CallbackFailed as err:
        if partition is not None:
            raise
        return str(err)
    return "no error"


def test_a_callback_raising_on_every_rank_stops_every_rank_with_its_error() -> None:
    # "forward before" fires ahead of the receive, so each stage raises in micro-batch 1's forward.
    assert run_distributed(_raise_on, 1, 2, 1, None, timeout=60) == [
        "callback refused forward of micro-batch 1"] * 2


def test_a_callback_raising_on_one_rank_ends_the_run_without_a_hang() -> None:
    # Stage 1 would wait forever for micro-batch 1; the launcher takes it down with stage 0's error.
    start = time.monotonic()
    with pytest.raises(RankError, match="callback refused forward of micro-batch 1"):
        run_distributed(_raise_on, 1, 2, 1, 0, timeout=60)
    assert time.monotonic() - start < 30


def _gantt(ctx: ParallelContext, path: Path) -> float:
    _, spans, _ = train_script.train(ctx, TrainSpec(family="gpt2", steps=2), M, "always")
    spans = trim_waits(spans)
    if ctx.rank == 0:
        draw_gantt(spans, path)
    return bubble_fraction(spans)


def test_a_real_run_draws_its_gantt_chart(tmp_path: Path) -> None:
    bubbles = run_distributed(_gantt, 1, 2, 1, tmp_path / "gantt.png", timeout=120)
    assert (tmp_path / "gantt.png").read_bytes()[:4] == b"\x89PNG"
    assert bubbles[0] == bubbles[1] and 0 < bubbles[0] < 1


def test_main_checks_the_schedule_and_prints_beside_the_reference(capfd: pytest.CaptureFixture) -> None:
    spawn(train_script.main, 2, ["--steps", "1", "--recompute", "always"], timeout=120)
    out = capfd.readouterr().out
    assert "stage 0 events = GPipe schedule: F0 F1 F2 F3 R3 B3 R2 B2 R1 B1 R0 B0" in out
    assert "bubble" in out and "reference" in out


def _emulated(ctx: ParallelContext, recompute: str) -> list:
    return train_script.emulated(ctx, M, recompute, t_forward=0.02, t_backward=0.04, steps=2)


def test_the_timeline_measures_gpipes_bubble_on_sleeping_cells() -> None:
    # Cells that sleep release the CPU, so even a busy 2-core box shows the schedule itself:
    # with equal cells the bubble is (p - 1) / (M + p - 1) = 1/5 at p=2, M=4.
    spans = run_distributed(_emulated, 1, 2, 1, "never", timeout=60)[0]
    for j in range(2):
        backwards = [("backward", i) for i in reversed(range(M))]
        assert cell_order(spans, j) == [("forward", i) for i in range(M)] + backwards
    assert bubble_fraction(trim_waits(spans)) == pytest.approx(1 / 5, abs=0.08)
