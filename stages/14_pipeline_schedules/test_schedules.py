"""Stage 14: train.py's interleaved run equals one device, and interleaved 1F1B and ZB-H1 hold
exactly the cells in flight their timetables say, per rank, beside 1F1B's (counted by
callbacks: counts, not timings).

Parity over the whole matrix (pp=2 and 4, Llama and GPT-2, tp, dp, ZeRO-1, the recompute modes)
and the planted bugs are in ``tests/test_schedule_interleaved.py``.
"""

import torch

from goose_core import ParallelContext, PipelineParallel
from goose_core.engine.callbacks import Callback, Event
from goose_core.engine.schedule import Schedule, schedule_named
from goose_core.testing import PARALLEL, TrainSpec, assert_matches_reference, reference_run, run_distributed

from course import beside_reference_diffs, load_train_script, run_train_script

train_script = load_train_script("14")
SPEC = TrainSpec(family="llama", steps=2, overrides={"num_hidden_layers": 4})


def in_flight(schedule: Schedule, rank: int) -> int:
    """The most cells of ``rank`` whose forward has run and whose backward has not (with a split
    backward: whose W has not), in its program: the activations it holds."""
    last = "W" if schedule.split_backward else "B"
    now = peak = 0
    for action in schedule.rank_actions(rank):
        now += 1 if action.kind == "F" else -1 if action.kind == last else 0
        peak = max(peak, now)
    return peak


class _RankInFlight(Callback):
    """Cells of this rank (every chunk) with the forward done and the backward not."""

    def __init__(self, last: str = "backward") -> None:
        super().__init__(self._count, kinds=["forward", last])
        self.now = self.peak = 0

    def _count(self, event: Event) -> None:
        if event.phase == "after" and event.kind == "forward" and torch.is_grad_enabled():
            self.now += 1
            self.peak = max(self.peak, self.now)
        elif event.phase == "after" and event.kind != "forward":
            self.now -= 1


def _counted(ctx: ParallelContext) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, v in (("1f1b", None), ("interleaved-1f1b", 2), ("zb-h1", None)):
        counter = _RankInFlight("weight" if name == "zb-h1" else "backward")
        model = PipelineParallel(SPEC.build_model(), ctx, num_microbatches=4, recompute="never",
                                 callbacks=[counter], schedule=name, virtual_stages=v).parallelize()
        model(**SPEC.batch(0)).loss.backward()
        out[name] = counter.peak
    out["run"] = train_script.train(ctx, SPEC, 4)[0]
    return out


def test_each_rank_holds_the_chunks_in_flight_its_timetable_says() -> None:
    per_rank = run_distributed(_counted, 1, 2, 1, timeout=120)
    reference = reference_run(SPEC)
    for rank, out in enumerate(per_rank):
        assert out["1f1b"] == in_flight(schedule_named("1f1b")(4, 2), rank) == 2 - rank
        # (V-1)p + 2(p-1-r) + 1 chunks, each half a stage: 2.5 stages' worth on rank 0 against 2.
        assert out["interleaved-1f1b"] == in_flight(schedule_named("interleaved-1f1b", 2)(4, 4), rank) == 5 - 2 * rank
        # ZB-H1 holds each micro-batch until its W: min(p, M) on every rank, 1F1B's rank-0 peak.
        assert out["zb-h1"] == in_flight(schedule_named("zb-h1")(4, 2), rank) == 2
        assert_matches_reference(out["run"], reference, PARALLEL)


def test_torchrun_prints_the_timetable_and_the_losses_beside_the_reference() -> None:
    out = run_train_script("14", 2, "--steps", "2", timeout=240)
    assert "interleaved-1f1b p=2 M=4 V=2" in out and "r1   |      F0.0" in out
    diffs = beside_reference_diffs(out)
    assert len(diffs) == 2 and max(diffs) < 1e-12, diffs


def _folded_rows(ctx: ParallelContext) -> dict[str, list]:
    out = {}
    for name, v in (("interleaved-1f1b", 2), ("zbv", None)):
        spans = train_script.by_rank(train_script.emulated(ctx, 4, name, v, 0.002, 0.004, steps=1),
                                     ctx.group_ranks("pp"))
        out[name] = [sorted((s.start, s.end) for s in spans if s.partition_idx == r) for r in range(2)]
    return out


def test_the_chart_folds_each_chunk_onto_the_rank_that_ran_it() -> None:
    # A rank runs one cell at a time, so its row never overlaps itself. ZBV's V puts chunk 2 on
    # rank 1 (not 2 mod 2 = 0): folding by chunk number drew it over rank 0's own cells.
    rows = run_distributed(_folded_rows, 1, 2, 1, timeout=120)[0]
    for name, per_rank in rows.items():
        for rank, row in enumerate(per_rank):
            assert row and all(a[1] <= b[0] for a, b in zip(row, row[1:])), (name, rank)
