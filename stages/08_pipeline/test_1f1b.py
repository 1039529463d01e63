"""Stage 08, 1F1B: the second schedule, in one process (local transport) and over ranks.

What 1F1B changes is *when* each backward runs: inside the forward call, one micro-batch at a
time, so a partition holds at most p micro-batches in flight where GPipe holds M. The training
loop does not change: ``loss.backward()`` hands the parked gradients to ``.grad``, times its seed
(:mod:`goose_core.engine.parked`). Parity over ranks, composed with tp and dp, is in
``test_gpipe.py`` (parametrized by schedule).
"""

import pytest
import torch
from torch import nn

from goose_core import ParallelContext, PipelineParallel
from goose_core.pipeline import Callback, local_pipeline
from goose_core.engine.activations import InFlight, LiveActivations
from goose_core.engine.schedule import OneFOneB
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, snapshot, train_loop)

SPEC = TrainSpec(family="llama", batch_size=8, seq_len=16)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_local_1f1b_trains_like_the_single_device_run() -> None:
    # Tied weights; SGD keeps a wrong scale visible; except_last mixes recomputed and plain cells
    # (every mode over ranks: test_gpipe.py).
    spec = TrainSpec(family="gpt2", steps=2, optimizer="sgd")
    model = local_pipeline(spec.build_model(), 2, 4, "except_last", schedule="1f1b")
    optimizer = spec.build_optimizer(model.parameters())
    result = RunResult(train_loop(model, optimizer, spec.batches()), snapshot(model))
    assert_matches_reference(result, reference_run(spec), PARALLEL)


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


def test_grad_changes_only_in_loss_backward_by_its_seed_once() -> None:
    model = local_pipeline(SPEC.build_model(), 2, 2, "except_last", schedule="1f1b")
    loss = model(**SPEC.batch(0)).loss
    assert all(p.grad is None for p in model.parameters())  # the backward ran, its result is parked
    loss.backward()
    first = _grads(model)
    loss = model(**SPEC.batch(0)).loss  # a loss that is not (yet) backward changes no .grad
    assert all(torch.equal(p.grad, first[name]) for name, p in model.named_parameters())
    (loss * 4).backward()  # the seed counts: (loss / k).backward(), GradScaler.scale(loss)...
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, first[name] + 4 * first[name])  # a power of two: bit for bit
    with pytest.raises(RuntimeError, match="call loss.backward\\(\\) once per forward"):
        loss.backward()


def test_a_scaled_float16_loss_is_refused_with_the_fix() -> None:
    model = local_pipeline(SPEC.build_model(), 2, 2, schedule="1f1b")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(**SPEC.batch(0)).loss
    with pytest.raises(ValueError, match="use schedule='gpipe' with the scaler, or bfloat16"):
        (loss * 1024).backward()


def test_without_grad_1f1b_only_runs_the_forward() -> None:
    model = local_pipeline(SPEC.build_model(), 2, 2, schedule="1f1b")
    flight = model.callbacks.add(InFlight())
    with torch.no_grad():
        loss = model(**SPEC.batch(0)).loss
    assert not loss.requires_grad and all(p.grad is None for p in model.parameters())
    assert not flight.peak
    torch.testing.assert_close(loss, SPEC.build_model()(**SPEC.batch(0)).loss.detach(),
                               rtol=PARALLEL.rtol, atol=PARALLEL.atol)


def test_a_failing_backward_leaves_grad_as_it_was() -> None:
    def boom(event) -> None:
        raise KeyError("callback says no")

    model = local_pipeline(SPEC.build_model(), 2, 2, schedule="1f1b")
    model(**SPEC.batch(0)).loss.backward()
    before = _grads(model)
    model.callbacks.add(Callback(boom, 1, 0, ["backward"]))
    with pytest.raises(KeyError, match="callback says no"):  # raised inside the forward call now
        model(**SPEC.batch(0))
    assert all(torch.equal(p.grad, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("make", [
    lambda model: local_pipeline(model, 2, 2, schedule="zero-bubble"),
    lambda model: PipelineParallel(model, None, 2, schedule="interleaved"),  # type: ignore[arg-type]
])
def test_an_unknown_schedule_is_refused_with_the_choices(make) -> None:
    with pytest.raises(ValueError, match=r"unknown pipeline schedule .*; choose one of \['gpipe', '1f1b'\]"):
        make(SPEC.build_model())


def _work_per_rank(ctx: ParallelContext, m: int) -> tuple[list[tuple[str, int]], dict[int, int]]:
    events: list[tuple[str, int]] = []
    record = lambda e: events.append(("F" if e.kind == "forward" else "B", e.microbatch_idx))  # noqa: E731

    flight = InFlight()
    model = PipelineParallel(SPEC.build_model(), ctx, num_microbatches=m, recompute="never",
                             callbacks=[Callback(record, kinds=["forward", "backward"]), flight],
                             schedule="1f1b").parallelize()
    model(**SPEC.batch(0)).loss.backward()
    return [e for k, e in enumerate(events) if k % 2 == 0], dict(flight.peak)


def test_over_ranks_each_stage_runs_warmup_steady_cooldown() -> None:
    p, m = 4, 8
    for j, (work, peak) in enumerate(run_distributed(_work_per_rank, 1, p, 1, m, timeout=90)):
        assert work == [(a.kind, a.microbatch) for a in OneFOneB(m, p).actions(j)]
        assert peak == {j: min(p - j, m)}  # the first stage: p in flight, not M
