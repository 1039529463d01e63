"""Stage 13, the pipeline seen through callbacks: what stages 09 and 11 claim about *when* work
runs, recorded by the executor's callbacks.

1F1B keeps at most ``min(p - j, M)`` micro-batches in flight where GPipe keeps M, each rank runs
exactly its warm-up / steady / cool-down actions, a recompute runs right before its own cell's
backward, and a raising callback stops the step (and the group) without touching ``.grad``.
"""

import time

import pytest
import torch
from torch import nn

from goose_core import ParallelContext, PipelineParallel
from goose_core.pipeline import MODES, Callback, GPipe, InFlight, LiveActivations, OneFOneB, local_pipeline
from goose_core.testing import PARALLEL, TrainSpec, run_distributed

SPEC = TrainSpec(family="llama", batch_size=8, seq_len=16)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _failing_callback(ctx: ParallelContext) -> None:
    def boom(event) -> None:
        raise RuntimeError("callback failed on purpose")

    spec = TrainSpec(family="llama")
    model = PipelineParallel(spec.build_model(), ctx, num_microbatches=2).parallelize()
    model.callbacks.add(Callback(boom, microbatch_idx=1, partition_idx=1, kinds=["backward"]))
    model(**spec.batch(0)).loss.backward()


def test_a_failing_stage_fails_every_rank_fast() -> None:
    start = time.monotonic()
    with pytest.raises(Exception, match="callback failed on purpose"):
        run_distributed(_failing_callback, 1, 2, 1, timeout=60)
    assert time.monotonic() - start < 30  # the launcher takes the waiting rank down


def test_1f1b_keeps_at_most_p_microbatches_in_flight_where_gpipe_keeps_m() -> None:
    p, m = 4, 8
    spec = TrainSpec(family="llama", batch_size=8, seq_len=8)
    peak, saved = {}, {}
    for schedule in ("gpipe", "1f1b"):
        flight = InFlight()
        model = local_pipeline(spec.build_model(), p, m, "never", callbacks=[flight], schedule=schedule)
        with LiveActivations(model.parameters()) as live:
            model(**spec.batch(0)).loss.backward()
        assert live.bytes == 0 and all(n == 0 for n in flight.now.values())  # all freed, all done
        peak[schedule], saved[schedule] = dict(flight.peak), live.peak
    assert peak["gpipe"] == {j: m for j in range(p)}
    # One process runs a micro-batch's backward through every partition at once (its graph is
    # connected), so partition j holds min(p - j, M): the first partition p, as over ranks.
    assert peak["1f1b"] == {j: min(p - j, m) for j in range(p)}
    # Partition-micro-batches alive: p(p+1)/2 against p*M (10 vs 32).
    assert saved["1f1b"] < saved["gpipe"] * (p + 1) / (2 * m) * 1.25


def test_without_grad_1f1b_only_runs_the_forward() -> None:
    model = local_pipeline(SPEC.build_model(), 2, 2, schedule="1f1b")
    flight = model.callbacks.add(InFlight())
    with torch.no_grad():
        loss = model(**SPEC.batch(0)).loss
    assert not loss.requires_grad and all(p.grad is None for p in model.parameters())
    assert not flight.peak
    torch.testing.assert_close(loss, SPEC.build_model()(**SPEC.batch(0)).loss.detach(),
                               rtol=PARALLEL.rtol, atol=PARALLEL.atol)


def test_a_failing_1f1b_backward_leaves_grad_as_it_was() -> None:
    def boom(event) -> None:
        raise KeyError("callback says no")

    model = local_pipeline(SPEC.build_model(), 2, 2, schedule="1f1b")
    model(**SPEC.batch(0)).loss.backward()
    before = _grads(model)
    model.callbacks.add(Callback(boom, 1, 0, ["backward"]))
    with pytest.raises(KeyError, match="callback says no"):  # raised inside the forward call now
        model(**SPEC.batch(0))
    assert all(torch.equal(p.grad, before[name]) for name, p in model.named_parameters())


def _work_per_rank(ctx: ParallelContext, m: int) -> tuple[list[tuple[str, int]], dict[int, int]]:
    events: list[tuple[str, int]] = []
    record = lambda e: events.append(("F" if e.kind == "forward" else "B", e.microbatch_idx))  # noqa: E731

    flight = InFlight()
    model = PipelineParallel(SPEC.build_model(), ctx, num_microbatches=m, recompute="never",
                             callbacks=[Callback(record, kinds=["forward", "backward"]), flight],
                             schedule="1f1b").parallelize()
    model(**SPEC.batch(0)).loss.backward()
    return [e for k, e in enumerate(events) if k % 2 == 0], dict(flight.peak)


def test_over_ranks_each_1f1b_stage_runs_warmup_steady_cooldown() -> None:
    p, m = 4, 8
    for j, (work, peak) in enumerate(run_distributed(_work_per_rank, 1, p, 1, m, timeout=90)):
        assert work == [(a.kind, a.microbatch) for a in OneFOneB(m, p).actions(j)]
        assert peak == {j: min(p - j, m)}  # the first stage: p in flight, not M


M = 4


def _events(ctx: ParallelContext, spec: TrainSpec) -> dict[str, list[tuple[str, str, int]]]:
    """Per recompute mode: this stage's (kind, phase, micro-batch) events of one step with dropout."""
    out = {}
    for mode in MODES:
        events: list[tuple[str, str, int]] = []
        model = PipelineParallel(spec.build_model(), ctx, num_microbatches=M, recompute=mode,
                                 callbacks=[Callback(lambda e: events.append(
                                     (e.kind, e.phase, e.microbatch_idx)))]).parallelize()
        torch.manual_seed(100 + ctx.rank)  # the dropout masks of this step
        model(**spec.batch(0)).loss.backward()
        out[mode] = events
    return out


def test_gpipe_backward_order_is_the_schedule_and_recompute_runs_just_before_its_cell() -> None:
    spec = TrainSpec(family="gpt2", dropout=0.1)  # tied embeddings on two stages, dropout everywhere
    schedule = GPipe(M, 2)
    for rank, modes in enumerate(run_distributed(_events, 1, 2, 1, spec, timeout=120)):
        for mode, events in modes.items():
            order = [i for kind, phase, i in events if kind == "backward" and phase == "before"]
            assert order == schedule.backward_order(rank), (rank, mode, events)
            recomputed = [i for kind, phase, i in events if kind == "recompute" and phase == "before"]
            stop = {"always": M, "except_last": M - 1, "never": 0}[mode]
            assert recomputed == [i for i in order if i < stop]
            for i in recomputed:  # just before its own backward, after the previous cell's
                at = events.index(("recompute", "after", i))
                assert events[at + 1] == ("backward", "before", i)
                if i + 1 < M:
                    assert events.index(("backward", "after", i + 1)) < at
