"""A pipelined model trains under ``torch.compile`` (each block compiled) equal to the compiled one-device run.

The backend is ``aot_eager``: dynamo captures each block's graph and AOTAutograd traces its
forward and backward, as under inductor, but the graph runs ATen's eager kernels, so no C++
compiler is needed and a float64 run keeps float64's noise. The tolerance is ``PARALLEL``, every
float64 layout's: the compiled blocks are the same graphs on both sides, so the pipeline's only
changes are its own (micro-batch sums, the tied embedding's sum over two stages).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

from goose_core import ParallelContext, PipelineParallel, compile_blocks, full_state_dict
from goose_core.pipeline import local_pipeline
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, run_distributed, snapshot,
                                train_loop)

SPEC = TrainSpec(family="gpt2", steps=2, optimizer="sgd", overrides={"num_hidden_layers": 2})  # a block per stage
RUNS = [("except_last", "gpipe", 2), ("selective", "1f1b", 2)]  # a cell mode, a block mode
_STRICT = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)  # no silent fall back to eager


class _Counting:
    """``aot_eager``, counting the graphs it compiles."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return aot_eager(gm, example_inputs)


def _compiled(model: torch.nn.Module) -> tuple[torch.nn.Module, _Counting]:
    torch._dynamo.reset()
    counters.clear()
    backend = _Counting()
    return compile_blocks(model, backend=backend), backend


def _assert_compiled(backend: _Counting, blocks: int) -> None:
    """Every held block ran compiled, in one graph each (no graph break)."""
    breaks = dict(counters["graph_break"])
    assert backend.graphs >= blocks and not breaks, (backend.graphs, breaks)


def _train(ctx: ParallelContext, runs: list[tuple[str, str, int]]) -> list[RunResult | str]:
    """Each run trained compiled per block; last, what a whole-model compile raises on this rank."""
    out: list[RunResult | str] = []
    for mode, schedule, m in runs:
        model = PipelineParallel(SPEC.build_model(), ctx, num_microbatches=m, recompute=mode,
                                 schedule=schedule).parallelize()
        model, backend = _compiled(model)
        optimizer = SPEC.build_optimizer(model.parameters())
        with _STRICT:
            losses = train_loop(model, optimizer, SPEC.batches())
        _assert_compiled(backend, 1)
        out.append(RunResult(losses, full_state_dict(model, ctx)))
    whole = torch.compile(PipelineParallel(SPEC.build_model(), ctx, num_microbatches=2).parallelize(), backend="eager")
    try:
        whole(**SPEC.batch(0))
        out.append("trained")
    except TypeError as err:
        out.append(str(err))
    return out


def _compiled_reference() -> RunResult:
    model, backend = _compiled(SPEC.build_model())
    optimizer = SPEC.build_optimizer(model.parameters())
    with _STRICT:
        losses = train_loop(model, optimizer, SPEC.batches())
    _assert_compiled(backend, 1)
    return RunResult(losses, snapshot(model))


def test_pipelined_model_trains_compiled_equal_to_the_compiled_one_device_run() -> None:
    per_rank = run_distributed(_train, 1, 2, 1, RUNS, timeout=240)
    reference = _compiled_reference()
    for k, (mode, schedule, m) in enumerate(RUNS):
        for rank, results in enumerate(per_rank):
            try:
                assert_matches_reference(results[k], reference, PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"compiled pp=2 {mode} {schedule} M={m} rank {rank}: {err}") from err
    for rank, results in enumerate(per_rank):  # refused on every rank, none left waiting
        assert "goose_core.compile_blocks(model" in results[-1], (rank, results[-1])


def test_blocks_left_uncompiled_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    model = local_pipeline(SPEC.build_model(), 2)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # compile_blocks compiles nothing
    model, backend = _compiled(model)
    model(**SPEC.batch(0)).loss.backward()
    with pytest.raises(AssertionError):
        _assert_compiled(backend, 1)


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_whole_model_compile_is_refused_by_name(how: str) -> None:
    model = local_pipeline(SPEC.build_model(), 2)
    torch._dynamo.reset()
    if how == "torch.compile":
        model = torch.compile(model, backend="eager")
    else:
        model.compile(backend="eager")
    with pytest.raises(TypeError, match=r"compile_blocks\(model"):
        model(**SPEC.batch(0))
