"""Interleaved 1F1B: its timetable (every cell once, dependencies kept, the bubble of the formula),
its point-to-point plan per pair of ranks under NCCL's matching, and parity with one device."""

import itertools

import pytest
import torch

from goose_core import (DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel, TensorParallel,
                        full_state_dict)
from goose_core.engine.messages import Message, blocked_receives, messages
from goose_core.engine.schedule import (Interleaved1F1B, OneFOneB, Schedule, schedule_named, timetable,
                                        timetable_bubble)
from goose_core.pipeline import local_pipeline
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, train_loop)

SHAPES = [(p, v, m) for p in (2, 3, 4) for v in (2, 3) for m in (p, 2 * p, 4 * p)]


def _interleaved(p: int, v: int, m: int) -> Schedule:
    return schedule_named("interleaved-1f1b", v)(m, p * v)


@pytest.mark.parametrize("p, v, m", SHAPES)
def test_every_cell_runs_once_after_its_inputs_on_its_rank(p: int, v: int, m: int) -> None:
    schedule = _interleaved(p, v, m)
    ran: dict[tuple[str, int, int], int] = {}
    for tick, work in enumerate(timetable(schedule)):
        for rank, a in work.items():
            assert a.partition % p == rank  # chunk c on rank c mod p
            assert (a.kind, a.microbatch, a.partition) not in ran
            ran[(a.kind, a.microbatch, a.partition)] = tick
    n = p * v
    assert set(ran) == {(k, i, j) for k in "FB" for i in range(m) for j in range(n)}
    for i, j in itertools.product(range(m), range(n)):
        assert j == 0 or ran[("F", i, j - 1)] < ran[("F", i, j)]
        assert ran[("F", i, j)] < ran[("B", i, j)]
        assert j == n - 1 or ran[("B", i, j + 1)] < ran[("B", i, j)]


@pytest.mark.parametrize("p, v, m", SHAPES)
def test_the_bubble_is_the_formula_v_times_smaller_than_1f1b(p: int, v: int, m: int) -> None:
    assert timetable_bubble(_interleaved(p, v, m)) == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)
    assert timetable_bubble(OneFOneB(m, p)) == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


def test_the_rank_order_is_megatrons() -> None:
    """p=2, V=2, m=4: rank 0 warms up with (V-1)p + 2(p-1) = 4 forwards, rounds of p micro-batches."""
    order = [f"{a.kind}{a.microbatch}.{a.partition // 2}" for a in _interleaved(2, 2, 4).rank_actions(0)]
    assert order == ["F0.0", "F1.0", "F0.1", "F1.1", "F2.0", "B0.1", "F3.0", "B1.1", "F2.1", "B0.0",
                     "F3.1", "B1.0", "B2.1", "B3.1", "B2.0", "B3.0"]


@pytest.mark.parametrize("p, v, m", SHAPES)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_each_pair_of_ranks_issues_the_same_messages_in_the_same_order(
        p: int, v: int, m: int, requires_grad: bool) -> None:
    schedule = _interleaved(p, v, m)
    plans = [messages(schedule, r, requires_grad) for r in range(p)]
    for r in range(p):
        assert set(plans[r]) == {(r - 1) % p, (r + 1) % p}  # a ring: p-1 sends to 0
        for peer, plan in plans[r].items():
            assert plan == plans[peer][r]
            kinds = ["activation"] + (["gradient"] if requires_grad else [])
            boundaries = [b for b in range(p * v - 1) if {b % p, (b + 1) % p} == {r, peer}]
            assert sorted(msg.slot for msg in plan) == sorted(
                [("header", -1, b) for b in boundaries]
                + [(k, i, b) for k in kinds for i in range(m) for b in boundaries])
            for b in boundaries:  # the header first, each gradient after its activation
                mine = [msg for msg in plan if msg.boundary == b]
                assert mine[0].kind == "header"
                for i in range(m if requires_grad else 0):
                    assert mine.index(Message("activation", i, b, b + 1)) < mine.index(Message("gradient", i, b + 1, b))


@pytest.mark.parametrize("p, v, m", SHAPES)
def test_each_rank_can_issue_its_plan_in_program_order(p: int, v: int, m: int) -> None:
    assert blocked_receives(_interleaved(p, v, m)) == []


def _per_boundary(schedule: Schedule, rank: int) -> dict[int, list[Message]]:
    """A planted bug: each pair's messages boundary after boundary (a channel per boundary, as
    with one partition per rank), not merged in tick order."""
    return {peer: sorted(plan, key=lambda msg: msg.boundary) for peer, plan in messages(schedule, rank).items()}


def test_planted_a_channel_per_boundary_deadlocks_under_nccl_order() -> None:
    assert blocked_receives(_interleaved(2, 2, 4), _per_boundary)


class _BackwardChunksInForwardOrder(Interleaved1F1B):
    """A planted bug: backwards run the rank's chunks first to last, so rank 0 would run the
    backward of chunk 0 before the gradient from chunk 1 exists."""

    virtual_stages = 2

    def _action(self, kind, k, rank):  # type: ignore[no-untyped-def]
        a = super()._action(kind, k, rank)
        if kind == "B":
            flipped = self.virtual_stages - 1 - a.partition // self.num_ranks
            return a._replace(partition=flipped * self.num_ranks + rank)
        return a


def test_planted_backward_before_its_gradient_deadlocks_the_timetable() -> None:
    with pytest.raises(ValueError, match="deadlocks"):
        timetable(_BackwardChunksInForwardOrder(4, 4))


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "interleaved-1f1b", "virtual_stages": 2, "num_microbatches": 3},
     r"num_microbatches must be a multiple of 2, got 3 \(use 4\)"),
    ({"schedule": "interleaved-1f1b", "virtual_stages": 1}, "needs virtual_stages >= 2"),
    ({"schedule": "1f1b", "virtual_stages": 2}, "virtual_stages=2 needs schedule='interleaved-1f1b'"),
    ({"schedule": "interleaved-1f1b", "virtual_stages": 4, "num_microbatches": 4},
     "4 blocks cannot fill 8 pipeline stages"),
])
def test_bad_configurations_are_refused_on_every_rank_with_the_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(Exception, match=match) as info:
        run_distributed(_refused, 1, 2, 1, kwargs, timeout=60)
    assert "ValueError" in str(info.value)


@pytest.mark.parametrize("schedule, virtual_stages", [("interleaved-1f1b", 2), ("zbv", None)])
def test_generate_is_refused_by_the_schedules_name(schedule: str, virtual_stages: int | None) -> None:
    """generate runs one micro-batch, which these schedules cannot order at p > 1."""
    spec = TrainSpec(family="llama")
    model = local_pipeline(spec.build_model(), 2, 4, schedule=schedule, virtual_stages=virtual_stages)
    with torch.no_grad(), pytest.raises(ValueError, match=rf"one micro-batch, which schedule='{schedule}' cannot "
                                                          r"run at pipeline depth 2: generate with the model "
                                                          r"pipelined under schedule='1f1b'"):
        model.generate(spec.batch(0)["input_ids"][:1, :4], max_new_tokens=1, do_sample=False)


def _refused(ctx: ParallelContext, kwargs: dict) -> None:
    spec = TrainSpec(family="llama")
    model = PipelineParallel(spec.build_model(), ctx, **kwargs).parallelize()
    model(**spec.batch(0))


# -- parity ----------------------------------------------------------------------------------------

def _spec(family: str, layers: int, optimizer: str = "sgd") -> TrainSpec:
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return TrainSpec(family=family, steps=2, optimizer=optimizer, overrides={key: layers})


# (family, blocks, M, recompute): GPT-2 ties its embeddings across ranks 0 and p-1.
CASES = {
    2: [("gpt2", 4, 4, "except_last"), ("llama", 4, 8, "always"), ("gpt2", 8, 8, "never")],
    4: [("llama", 8, 8, "except_last"), ("gpt2", 8, 4, "always")],
}


def _train(ctx: ParallelContext, spec: TrainSpec, m: int, recompute: str = "except_last",
           schedule: str = "interleaved-1f1b", virtual_stages: int | None = 2, zero: bool = False) -> RunResult:
    model = spec.build_model()
    if ctx.tensor_parallel_size > 1:
        model = TensorParallel(model, ctx).parallelize()
    model = PipelineParallel(model, ctx, num_microbatches=m, recompute=recompute, schedule=schedule,
                             virtual_stages=virtual_stages).parallelize()
    if ctx.data_parallel_size > 1:
        model = DataParallel(model, ctx).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    if zero:
        optimizer = DistributedOptimizer(optimizer, ctx)
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size))
    return RunResult(losses, full_state_dict(model, ctx))


def _train_many(ctx: ParallelContext, cases: list[tuple[str, int, int, str]]) -> list[RunResult]:
    return [_train(ctx, _spec(f, layers), m, recompute) for f, layers, m, recompute in cases]


def _assert_every_rank(per_rank: list, k: int, spec: TrainSpec, what: str) -> None:
    reference = reference_run(spec)
    for rank, results in enumerate(per_rank):
        try:
            assert_matches_reference(results[k] if isinstance(results, list) else results, reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"{what} rank {rank}: {err}") from err


@pytest.mark.parametrize("pp", [2, 4])
def test_every_rank_matches_the_single_device_run(pp: int) -> None:
    per_rank = run_distributed(_train_many, 1, pp, 1, CASES[pp], timeout=240)
    for k, (family, layers, m, recompute) in enumerate(CASES[pp]):
        _assert_every_rank(per_rank, k, _spec(family, layers), f"pp={pp} {family} M={m} {recompute}")


def _composed(ctx: ParallelContext) -> list[RunResult]:
    spec = _spec("llama", 4, "adamw")
    return [_train(ctx, spec, 4),  # tp=2 or dp=2 inside
            _train(ctx, spec, 4, zero=True)]


@pytest.mark.parametrize("tp, dp", [(2, 1), (1, 2)])
def test_composes_with_tensor_data_parallelism_and_zero1(tp: int, dp: int) -> None:
    per_rank = run_distributed(_composed, tp, 2, dp, timeout=240)
    for k, what in enumerate(["plain", "ZeRO-1"]):
        _assert_every_rank(per_rank, k, _spec("llama", 4, "adamw"), f"tp={tp} dp={dp} {what}")


def _wrong_chunks(ctx: ParallelContext) -> RunResult:
    """A planted bug: rank r holds the adjacent chunks rV, ..., rV + V - 1, run as the cells of
    r, r + p, ...: the blocks run out of order."""
    right = PipelineParallel._chunks

    def adjacent(self: PipelineParallel, rank: int) -> dict[int, list[int]]:
        labels, v = sorted(right(self, rank)), self.schedule.virtual_stages
        return {label: right(self, (rank * v + k) % ctx.pipeline_parallel_size)[rank * v + k]
                for k, label in enumerate(labels)}

    PipelineParallel._chunks = adjacent  # type: ignore[method-assign]
    return _train(ctx, _spec("llama", 4), 4, "never")


def test_planted_chunks_on_the_wrong_ranks_fail_parity() -> None:
    per_rank = run_distributed(_wrong_chunks, 1, 2, 1, timeout=120)
    with pytest.raises(AssertionError):
        _assert_every_rank(per_rank, 0, _spec("llama", 4), "wrong chunks")
