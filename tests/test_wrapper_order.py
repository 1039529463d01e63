"""Every order of the three wrappers either equals the single-device run or is refused, on every
rank, before the first step (tp=2 x pp=2 x dp=2, plain AdamW and ZeRO-1 with clipping); with
ContextParallel the one order is TP, PP, CP, DP and the 23 others are refused on every rank
before any collective (tp=2 x pp=2 x cp=2)."""

from __future__ import annotations

import itertools

import pytest
import torch

from goose_core import (ContextParallel, DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel,
                        TensorParallel, clip_grad_norm_, full_state_dict, spawn)
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, train_loop)

ORDERS = list(itertools.permutations(("tp", "pp", "dp")))
#: Tensor parallelism cuts whole modules (embedding, head, every block), so it must see them all:
#: it comes before the pipeline split. Data parallelism may come anywhere.
SUPPORTED = {order for order in ORDERS if order.index("tp") < order.index("pp")}

# Two AdamW steps of the GQA Llama (as tests/test_composition.py); ZeRO-1 with clipping on GPT-2,
# whose tied embedding lives on the first and the last stage, under SGD; float64, so
# PARALLEL.
PLAIN = TrainSpec(family="llama", steps=2)
ZERO = TrainSpec(family="gpt2", steps=2, optimizer="sgd", max_grad_norm=0.5)


def _wrap(model: torch.nn.Module, ctx: ParallelContext, order: tuple[str, ...]) -> torch.nn.Module:
    for name in order:
        if name == "tp":
            model = TensorParallel(model, ctx).parallelize()
        elif name == "pp":
            model = PipelineParallel(model, ctx, num_microbatches=2).parallelize()
        else:
            model = DataParallel(model, ctx).parallelize()
    return model


def _train(ctx: ParallelContext, spec: TrainSpec, order: tuple[str, ...], zero: bool) -> RunResult | str:
    """The run, or the refusal's message when wrapping (or building the optimizer) refuses."""
    try:
        model = _wrap(spec.build_model(), ctx, order)
        optimizer = spec.build_optimizer(model.parameters())
        if zero:
            optimizer = DistributedOptimizer(optimizer, ctx)
    except ValueError as err:
        return str(err)
    clip = None
    if spec.max_grad_norm is not None:
        clip = lambda: clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)  # noqa: E731
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size), clip)
    return RunResult(losses, full_state_dict(model, ctx))


_RUNS: dict[tuple[str, tuple[str, ...], bool], list[RunResult | str]] = {}


def _runs(spec: TrainSpec, order: tuple[str, ...], zero: bool) -> list[RunResult | str]:
    """Every rank's result, once per (spec, order, optimizer) in this session."""
    key = (repr(spec), order, zero)
    if key not in _RUNS:
        _RUNS[key] = run_distributed(_train, 2, 2, 2, spec, order, zero, timeout=120)
    return _RUNS[key]


def _check_order(spec: TrainSpec, order: tuple[str, ...], zero: bool) -> None:
    results = _runs(spec, order, zero)
    if order not in SUPPORTED:
        assert all(isinstance(r, str) for r in results), f"{order}: not refused on every rank"
        assert len(set(results)) == 1, f"{order}: ranks refused differently: {set(results)}"
        assert "apply TensorParallel before PipelineParallel" in results[0], results[0]
        return
    reference = reference_run(spec)
    for rank, result in enumerate(results):
        assert isinstance(result, RunResult), f"{order}, rank {rank} refused: {result}"
        try:
            assert_matches_reference(result, reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"{order}, rank {rank}: {err}") from err
    for rank, result in enumerate(results[1:], 1):  # the dp replicas (and gathered shards) agree
        for name, value in results[0].params.items():
            assert torch.equal(result.params[name], value), f"{order}: {name} differs on rank {rank}"
    # Every supported order runs the same operations in the same order (the reducer is rebuilt
    # over the same parameters, in the same registration order), so it gives the same bits as
    # TP -> PP -> DP on any CPU.
    assert_matches_reference(results[0], _runs(spec, ("tp", "pp", "dp"), zero)[0], EXACT)


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_every_order_with_a_plain_optimizer(order: tuple[str, ...]) -> None:
    _check_order(PLAIN, order, zero=False)


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_every_order_with_zero1_and_clipping(order: tuple[str, ...]) -> None:
    _check_order(ZERO, order, zero=True)


def _misuse(ctx: ParallelContext) -> list[str]:
    """Wrapping after the optimizer, and pipelining twice: each refused before any step."""
    messages = []
    model = DataParallel(PLAIN.build_model(), ctx).parallelize()
    DistributedOptimizer(PLAIN.build_optimizer(model.parameters()), ctx)
    with pytest.raises(ValueError) as err:
        TensorParallel(model, ctx).parallelize()
    messages.append(str(err.value))
    model = PipelineParallel(PLAIN.build_model(), ctx).parallelize()
    with pytest.raises(ValueError) as err:
        PipelineParallel(model, ctx)
    messages.append(str(err.value))
    return messages


def test_wrapping_after_the_optimizer_and_pipelining_twice_are_refused_on_every_rank() -> None:
    for after_optimizer, twice in run_distributed(_misuse, 2, 1, 2, timeout=120):
        assert "apply every wrapper (TensorParallel, PipelineParallel, DataParallel) first" in after_optimizer
        assert "already split into pipeline stages" in twice


CP_ORDERS = list(itertools.permutations(("tp", "pp", "cp", "dp")))
#: The pipeline cuts ContextParallel's slice into micro-batches, so it is built first; TP before
#: the pipeline; DataParallel counts the targets of the slices, so it comes after.
CP_ORDER = ("tp", "pp", "cp", "dp")


def _cp_refusals(orders: list[tuple[str, ...]]) -> list[str]:
    """Each order wrapped and fed one batch: what it raises (by the first forward), or "trains"."""
    ctx = ParallelContext(2, 2, 1, context_parallel_size=2, backend="gloo", device="cpu")
    messages = []
    for order in orders:
        try:
            model = PLAIN.build_model()
            for name in order:
                model = ContextParallel(model, ctx).parallelize() if name == "cp" else _wrap(model, ctx, (name,))
            model(**PLAIN.batch(0))
        except ValueError as err:
            messages.append(str(err))
        else:
            messages.append("trains")
    return messages


def test_context_parallel_has_one_order_and_the_others_are_refused_on_every_rank() -> None:
    refused = [order for order in CP_ORDERS if order != CP_ORDER]
    out = spawn(_cp_refusals, 8, [*refused, CP_ORDER], timeout=120)
    for rank, messages in enumerate(out):
        assert messages[-1] == "trains", f"rank {rank}: {messages[-1]}"
        for order, message in zip(refused, messages):
            assert message == out[0][refused.index(order)], f"{order}: rank {rank} refused otherwise"
            assert any(fix in message for fix in (
                "apply TensorParallel before PipelineParallel", "ContextParallel must wrap the model before "
                "DataParallel", "apply the wrappers in the order TensorParallel, PipelineParallel, "
                "ContextParallel, DataParallel")), f"{order}: {message}"
