"""Stage 15: context parallelism composes with the pipeline, equal to the single-device run.

The pipeline cuts the cp slice of each batch into micro-batches with its global position ids,
its shifted labels, and the padding mask of the whole sequence for the ring, per micro-batch.
cp2 x pp2 (ring and Ulysses; Llama with GQA and GPT-2 with its tied embedding; left padding,
GPipe and 1F1B) and tp2 x cp2 x pp2 with ZeRO-1 and clipping train as one device at ``PARALLEL``
(float64) on every rank; position ids restarted per slice, or the ring's padding mask not cut
per micro-batch, land far outside it. Every case of one grid runs in one group of processes.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import pytest
import torch

from goose_core import (ContextParallel, DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel,
                        TensorParallel, clip_grad_norm_, full_state_dict, spawn)
from goose_core.context_parallel import slicing
from goose_core.context_parallel.attention import ulysses_available
from goose_core.pipeline import local_pipeline
from goose_core.pipeline.stage import CellScope
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run, train_loop

pytestmark = pytest.mark.usefixtures("one_thread")  # the reference runs in this process

METHOD = "ulysses" if ulysses_available() else "ring"
#: (family, method, schedule) at cp2 x pp2, left padding: the cp slices and the micro-batches
#: hold different numbers of targets.
CASES = [("llama", "ring", "gpipe"), ("gpt2", "ring", "1f1b"), ("llama", METHOD, "1f1b"), ("gpt2", METHOD, "gpipe")]


def _spec(family: str, clip: float | None = None) -> TrainSpec:
    return TrainSpec(family=family, steps=2, batch_size=4, seq_len=16, padding="left", max_grad_norm=clip)


def _no_global_positions(mp: pytest.MonkeyPatch) -> None:
    # the slice's own indices as its positions: rotary sees the wrong distances
    def local(kwargs: dict, positions: torch.Tensor, _slice=slicing.slice_batch) -> dict:
        out = _slice(kwargs, positions)
        out["position_ids"] = torch.arange(len(positions)).expand(out["input_ids"].shape[0], -1)
        return out
    mp.setattr(slicing, "slice_batch", local)
    mp.setattr("goose_core.context_parallel.wrapper.slice_batch", local)


def _mask_not_cut(mp: pytest.MonkeyPatch) -> None:
    # every micro-batch's ring masks its keys by the first micro-batch's padding
    init = CellScope.__init__
    mp.setattr(CellScope, "__init__", lambda self, enter, rows=None: init(
        self, lambda mine, _e=enter, _all=rows: _e(None if _all is None else _all[: len(mine)]), rows))


#: Bugs planted in the composition, each a monkeypatch applied inside the ranks.
BUGS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "position ids restarted per slice": _no_global_positions,
    "the padding mask not cut per micro-batch": _mask_not_cut,
}


def _run(ctx: ParallelContext, spec: TrainSpec, method: str, schedule: str, zero: bool) -> RunResult:
    model = spec.build_model()
    if ctx.tensor_parallel_size > 1:
        model = TensorParallel(model, ctx).parallelize()
    model = PipelineParallel(model, ctx, num_microbatches=2, schedule=schedule).parallelize()
    model = ContextParallel(model, ctx, method=method).parallelize()
    model = DataParallel(model, ctx).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    optimizer = DistributedOptimizer(optimizer, ctx) if zero else optimizer
    clip = None if spec.max_grad_norm is None else (
        lambda: clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx))  # noqa: E731
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size), clip)
    return RunResult(losses, full_state_dict(model, ctx))


def _cases(tp: int, cases: list[tuple[str, str, str]], bugs: list[str], clip: float | None) -> list[RunResult]:
    ctx = ParallelContext(tp, 2, 1, context_parallel_size=2, backend="gloo", device="cpu")
    zero = tp > 1
    results = [_run(ctx, _spec(f, clip), m, s, zero) for f, m, s in cases]
    for bug in bugs:
        with pytest.MonkeyPatch.context() as mp:
            BUGS[bug](mp)
            results.append(_run(ctx, _spec("llama", clip), "ring", "gpipe", zero))
    return results


def _check(out: list[list[RunResult]], cases: list[tuple[str, str, str]], bugs: list[str],
           clip: float | None) -> None:
    references = {f: reference_run(_spec(f, clip)) for f in {f for f, _, _ in cases} | {"llama"}}
    for rank, mine in enumerate(out):
        for (family, method, schedule), got in zip(cases, mine):
            try:
                assert_matches_reference(got, references[family], PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"rank {rank}, {family}, {method}, {schedule}: {err}") from err
        for bug, got in zip(bugs, mine[len(cases):]):
            with pytest.raises(AssertionError):
                assert_matches_reference(got, references["llama"], PARALLEL)


def test_cp2_pp2_equals_one_device_and_the_planted_bugs_fail() -> None:
    _check(spawn(_cases, 4, 1, CASES, list(BUGS), None, timeout=240), CASES, list(BUGS), None)


def test_what_the_cell_scope_or_the_shifted_labels_would_not_reach_is_refused() -> None:
    batch = _spec("llama").batch(0)
    scope = CellScope(lambda rows: contextlib.nullcontext())
    blocks = local_pipeline(_spec("llama").build_model(), 2, num_microbatches=2, recompute="blocks")
    with pytest.raises(ValueError, match="recompute='blocks' reruns each block inside the backward, outside"):
        blocks(**batch, cell_scope=scope)
    own_loss = local_pipeline(_spec("llama").build_model(), 2, loss_fn=lambda logits, labels: logits.sum())
    with pytest.raises(ValueError, match=r"loss_fn=...\) takes the labels unshifted"):
        own_loss(**batch, shift_labels=batch["labels"])


def test_tp2_cp2_pp2_with_zero1_and_clipping_equals_one_device() -> None:
    # A clip of 0.5 acts on the first steps; ZeRO-1 shards the optimizer over dp x cp (2 replicas).
    cases = [("llama", "ring", "1f1b")]
    _check(spawn(_cases, 8, 2, cases, [], 0.5, timeout=240), cases, [], 0.5)
