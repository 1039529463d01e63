"""The block recompute modes: gradients of ``never``, the policy's minimum of recompute FLOPs, less memory.

``"blocks"`` and ``"selective"`` run the same kernels on the same values as ``"never"`` (the
replay restores the RNG state; a kept matmul output is the tensor the replay would compute),
and the backward graph accumulates in the same order, so gradients are bit-identical to
``"never"`` under the same schedule. FLOPs are counted by torch's FLOP counter over a whole step:
the extra of a mode over ``"never"`` is what it recomputes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from goose_core import ParallelContext, full_state_dict
from goose_core.engine import block_recompute, selective
from goose_core.engine.activations import LiveActivations
from goose_core.engine.block_recompute import BLOCK_MODES, recompute_blocks
from goose_core.pipeline import local_pipeline
from goose_core.pipeline import stage as stage_module
from goose_core.pipeline.split import split_model_for
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, at_layout, reference_run,
                                run_distributed, train_loop)

MODES = ("never", *BLOCK_MODES, "always")


def _step(spec: TrainSpec, mode: str, pp: int = 2, m: int = 2, schedule: str = "gpipe",
          ) -> dict[str, object]:
    """One training step of ``spec`` under ``mode``: FLOPs, saved bytes alive after the forward
    (GPipe; 1F1B's forward runs the backward too), gradients."""
    model = local_pipeline(spec.build_model(), pp, num_microbatches=m, recompute=mode, schedule=schedule)
    torch.manual_seed(7)  # the dropout masks of this step
    with FlopCounterMode(display=False) as flops, LiveActivations(model.parameters()) as live:
        loss = model(**spec.batch(0)).loss
        saved = live.bytes
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"flops": flops.get_total_flops(), "saved": saved, "grads": grads}


class _Ops(TorchDispatchMode):
    """Every aten op run, in order, with the FLOPs torch's counter gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        count = flop_registry.get(func._overloadpacket)
        self.flops.append(count(*args, **(kwargs or {}), out_val=out) if count else 0)
        return out


def _needed_block_flops(spec: TrainSpec) -> int:
    """FLOPs a replay of every block must run: each block's forward up to its last save for
    backward. Autograd saves an op's inputs before running it, its outputs after; the ops after
    the block's last save produce nothing its backward reads (Llama's ``down_proj``, whose
    output only joins the residual sum). torch's checkpoint stops its replay there."""
    model = spec.build_model()
    ops, spans = _Ops(), []

    inside = [False]

    def begin(module: nn.Module, args: object) -> None:
        spans.append([len(ops.flops), len(ops.flops)])
        inside[0] = True

    def end(module: nn.Module, args: object, output: object) -> None:
        inside[0] = False

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0]:
            spans[-1][1] = len(ops.flops)  # the ops run before this save
        return t

    for block in split_model_for(model).blocks:
        block.register_forward_pre_hook(begin)
        block.register_forward_hook(end)
    with ops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**spec.batch(0))
    return sum(sum(ops.flops[start:last]) for start, last in spans)


def _check_flops(spec: TrainSpec, steps: dict[str, dict[str, object]]) -> None:
    """``blocks`` recomputes exactly the blocks' forward; ``selective`` no counted FLOP."""
    extra = {mode: steps[mode]["flops"] - steps["never"]["flops"] for mode in steps}
    assert extra["blocks"] == _needed_block_flops(spec), extra
    assert extra["selective"] == 0, extra
    assert extra["always"] > extra["blocks"], extra  # the cell mode recomputes the head too


def _check_saved(steps: dict[str, dict[str, object]]) -> None:
    saved = {mode: steps[mode]["saved"] for mode in steps}
    assert saved["never"] > saved["selective"] > saved["blocks"] >= saved["always"] > 0, saved


def _check_grads(steps: dict[str, dict[str, object]]) -> None:
    never = steps["never"]["grads"]
    for mode in BLOCK_MODES:
        grads = steps[mode]["grads"]
        assert grads.keys() == never.keys()
        for name, g in never.items():
            assert torch.equal(grads[name], g), f"{mode}: {name} differs from never"


@pytest.mark.parametrize("family, dropout, pp, schedule", [
    ("gpt2", 0.1, 2, "gpipe"),   # tied embedding over two partitions, dropout in every block
    ("llama", 0.0, 2, "1f1b"),   # rotary tables and a mask as block arguments
    ("bloom", 0.1, 1, "gpipe"),  # one device (pp=1), ALiBi
])
def test_block_modes_recompute_the_minimum_and_keep_never_s_gradients(family: str, dropout: float, pp: int,
                                                                      schedule: str) -> None:
    spec = TrainSpec(family=family, dropout=dropout)
    steps = {mode: _step(spec, mode, pp=pp, schedule=schedule) for mode in MODES}
    _check_grads(steps)
    _check_flops(spec, steps)
    if schedule == "gpipe":
        _check_saved(steps)


@pytest.mark.parametrize("plant", ["cell recomputed too", "replay past the last save"])
def test_a_recompute_beyond_the_minimum_is_caught_by_the_flop_count(monkeypatch: pytest.MonkeyPatch,
                                                                    plant: str) -> None:
    spec = TrainSpec(family="llama")  # its blocks end in a matmul whose output nothing saves
    steps = {mode: _step(spec, mode) for mode in ("never", "selective", "always")}
    if plant == "cell recomputed too":  # the head and the loss recomputed under "blocks"
        monkeypatch.setattr(stage_module, "cell_mode", lambda mode: "always")
    else:  # the whole block forward replayed, down_proj included
        monkeypatch.setattr(block_recompute, "checkpoint", lambda *a, **k: checkpoint(*a, **{**k, "early_stop": False}))
    steps["blocks"] = _step(spec, "blocks")
    _check_grads(steps)  # the gradients cannot tell
    with pytest.raises(AssertionError, match="blocks"):
        _check_flops(spec, steps)


def test_a_policy_that_keeps_no_matmul_is_caught_by_the_flop_count(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TrainSpec(family="llama")
    monkeypatch.setattr(selective, "keeps", lambda op: False)
    steps = {mode: _step(spec, mode) for mode in MODES}
    _check_grads(steps)
    with pytest.raises(AssertionError, match="selective"):
        _check_flops(spec, steps)


def test_a_policy_that_keeps_every_op_is_caught_by_the_saved_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TrainSpec(family="llama")
    monkeypatch.setattr(selective, "keeps", lambda op: True)
    steps = {mode: _step(spec, mode) for mode in MODES}
    _check_grads(steps)
    with pytest.raises(AssertionError, match="selective"):
        _check_saved(steps)


def _autocast_grads(spec: TrainSpec, mode: str, cache: bool) -> dict[str, torch.Tensor]:
    model = local_pipeline(spec.build_model(), 1, num_microbatches=2, recompute=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
        loss = model(**spec.batch(0)).loss
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_block_modes_under_bf16_autocast() -> None:
    """Autocast's weight cache casts a weight on the first micro-batch only, a replay casts it
    again: selective replay still matches its ops (the block turns the cache off, so its weight
    gradients add up in another order); ``blocks``, and every mode without the cache, cast as
    ``never`` does, bit for bit."""
    spec = TrainSpec(family="llama", dtype=torch.float32)
    for cache in (False, True):
        never = _autocast_grads(spec, "never", cache)
        for mode in BLOCK_MODES:
            grads = _autocast_grads(spec, mode, cache)
            if mode == "blocks" or not cache:  # the same casts as never's
                assert all(torch.equal(grads[n], g) for n, g in never.items()), (mode, cache)
            assert all(g.isfinite().all() for g in grads.values()), (mode, cache)


def test_unknown_mode_names_every_mode() -> None:
    spec = TrainSpec(family="gpt2")
    with pytest.raises(ValueError, match=r"'block'.*'blocks', 'selective'"):
        local_pipeline(spec.build_model(), 2, recompute="block")
    with pytest.raises(ValueError, match="'never'"):
        recompute_blocks([nn.Linear(2, 2)], "never")


def test_restore_blocks_gives_back_the_forward() -> None:
    layer = nn.Linear(2, 2)
    recompute_blocks([layer], "selective")
    recompute_blocks([layer], "blocks")  # installed once, whatever was there
    assert isinstance(layer.forward, block_recompute._RecomputedForward)
    assert layer.forward.forward == nn.Linear.forward.__get__(layer)
    block_recompute.restore_blocks([layer])
    assert "forward" not in layer.__dict__


def _composed(ctx: ParallelContext, runs: list[tuple[str, str, str, int]]) -> list[RunResult]:
    """Tensor parallelism inside, data parallelism outside the pipeline, each block mode."""
    results = []
    for family, mode, schedule, m in runs:
        spec = TrainSpec(family=family, steps=2, optimizer="sgd")
        model = at_layout(spec.build_model(), ctx, num_microbatches=m, recompute=mode, schedule=schedule)
        optimizer = spec.build_optimizer(model.parameters())
        losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size))
        results.append(RunResult(losses, full_state_dict(model, ctx)))
    return results


@pytest.mark.parametrize("tp, dp", [(2, 1), (1, 2)])
def test_block_modes_compose_with_tensor_and_data_parallelism(tp: int, dp: int) -> None:
    runs = [("llama", "selective", "1f1b", 4), ("gpt2", "blocks", "gpipe", 2)]
    per_rank = run_distributed(_composed, tp, 2, dp, runs, timeout=150)
    for k, (family, mode, schedule, m) in enumerate(runs):
        reference = reference_run(TrainSpec(family=family, steps=2, optimizer="sgd"))
        for rank, results in enumerate(per_rank):
            try:
                assert_matches_reference(results[k], reference, PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"tp={tp} dp={dp} {family} {mode} {schedule} rank {rank}: {err}") from err

