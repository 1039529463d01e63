"""ZeRO-3 composed with tensor and pipeline parallelism and checkpoints: tp2 x dp2; pp2 x dp2
under GPipe and 1F1B (GPT-2's embedding tied across the stages); a 2x2x2 run equal to one device
whose checkpoint resumes bit for bit and loads at ZeRO-1 on tp1 x pp2 x dp4; bf16 at pp2 x dp2
within the one-device recipe's noise floor. The cases at dp alone are tests/test_zero3.py's.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from goose_core import (DataParallel, ParallelContext, PipelineParallel, TensorParallel, export_pretrained,
                        full_state_dict, load_checkpoint, save_checkpoint)
from goose_core.testing import EXACT, PARALLEL, RunResult, assert_matches_reference, reference_run, run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from test_zero3 import BF16, GPT2, LLAMA, M, _build, _reference, _run, _train, check_bf16  # noqa: E402


def _layers(model: nn.Module, ctx: ParallelContext, **pipeline: Any) -> nn.Module:
    """TP, then PP, where their sizes are above 1: the wrappers that come before DataParallel."""
    if ctx.tp_size > 1:
        model = TensorParallel(model, ctx).parallelize()
    if ctx.pp_size > 1:
        model = PipelineParallel(model, ctx, **pipeline).parallelize()
    return model


PIPELINE = functools.partial(_layers, num_microbatches=M)


# -- tp, pp --------------------------------------------------------------------------------------------
def _tensor_parallel(ctx: ParallelContext) -> RunResult:
    return _run(ctx, LLAMA, before_dp=_layers, whole=full_state_dict)


def test_tensor_parallel_times_data_parallel() -> None:
    reference = reference_run(LLAMA)
    for found in run_distributed(_tensor_parallel, 2, 1, 2, timeout=120):
        assert_matches_reference(found, reference, PARALLEL)


def _pipelines(ctx: ParallelContext) -> list[RunResult]:
    spec = replace(GPT2, padding=None)  # the pipeline's micro-batches: the tied weight across stages
    # 1F1B twice: recomputing every cell's forward in its backward, and keeping every activation.
    cases = [{"schedule": "gpipe"}, {"schedule": "1f1b", "recompute": "always"},
             {"schedule": "1f1b", "recompute": "never"}]
    return [_run(ctx, spec, before_dp=functools.partial(PIPELINE, **case), whole=full_state_dict) for case in cases]


def test_pipeline_times_data_parallel_gpipe_and_1f1b_with_and_without_recompute() -> None:
    reference = _reference(replace(GPT2, padding=None))
    for found in run_distributed(_pipelines, 1, 2, 2, timeout=180):
        for result in found:
            assert_matches_reference(result, reference, PARALLEL)


# -- 2 x 2 x 2, checkpoints ---------------------------------------------------------------------------
CKPT = replace(LLAMA, steps=4)


def _three_d(ctx: ParallelContext, path: str) -> tuple[RunResult, list[float], bool]:
    """4 steps (a checkpoint after 2), and the resume from it at the same layout."""
    model, optimizer = _build(ctx, CKPT, before_dp=PIPELINE)
    losses = _train(ctx, model, optimizer, CKPT, range(2))
    save_checkpoint(path, model, optimizer, ctx, step=2)
    losses += _train(ctx, model, optimizer, CKPT, range(2, 4))
    resumed_model, resumed_optimizer = _build(ctx, CKPT, before_dp=PIPELINE)
    assert load_checkpoint(path, resumed_model, resumed_optimizer, ctx)["step"] == 2
    resumed = _train(ctx, resumed_model, resumed_optimizer, CKPT, range(2, 4))
    whole, again = full_state_dict(model, ctx), full_state_dict(resumed_model, ctx)
    same = all(torch.equal(whole[name], again[name]) for name in whole)
    with pytest.raises(ValueError, match="export_pretrained"):
        resumed_model.save_pretrained(path + "-refused")  # this rank's shards only
    export_pretrained(resumed_model, ctx, path + "-export")
    return RunResult(losses, whole), resumed, same


def _zero1(ctx: ParallelContext, path: str) -> RunResult:
    model, optimizer = _build(ctx, CKPT, stage=1, before_dp=PIPELINE)
    load_checkpoint(path, model, optimizer, ctx)
    losses = _train(ctx, model, optimizer, CKPT, range(2, 4))
    return RunResult(losses, full_state_dict(model, ctx))


def test_three_d_resumes_bit_exactly_exports_and_loads_at_zero1_on_another_layout(tmp_path: Path) -> None:
    reference = reference_run(CKPT)
    path = str(tmp_path / "ckpt")
    for rank, (result, resumed, same) in enumerate(run_distributed(_three_d, 2, 2, 2, path, timeout=240)):
        assert_matches_reference(result, reference, PARALLEL)
        assert_matches_reference(RunResult(resumed, {}), RunResult(result.losses[2:], {}), EXACT)
        assert same, f"rank {rank}: the resumed parameters differ from the uninterrupted run's"
    exported = AutoModelForCausalLM.from_pretrained(path + "-export", dtype=torch.float64).state_dict()
    assert all(torch.equal(exported[name], tensor) for name, tensor in result.params.items())
    for result in run_distributed(_zero1, 1, 2, 4, path, timeout=240):
        assert_matches_reference(result, replace(reference, losses=reference.losses[2:]), PARALLEL)


def test_bf16_pipeline_times_data_parallel_within_the_noise_floor() -> None:
    check_bf16(1, 2, 2, PIPELINE, full_state_dict)


# -- wrapper order --------------------------------------------------------------------------------------
def _wrapped_after(ctx: ParallelContext) -> str:
    model = DataParallel(LLAMA.build_model(), ctx, zero_stage=3).parallelize()
    later = TensorParallel(model, ctx) if ctx.tp_size > 1 else PipelineParallel(model, ctx)
    with pytest.raises(ValueError) as err:
        later.parallelize()
    return str(err.value)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp", "pp"])
def test_a_wrapper_after_zero3_is_refused_on_every_rank(tp: int, pp: int) -> None:
    for message in run_distributed(_wrapped_after, tp, pp, 2, timeout=60):
        assert "DataParallel last" in message, message


# -- bf16 resume ----------------------------------------------------------------------------------------
BF16_CKPT = replace(BF16, steps=4)


def _bf16_resume(ctx: ParallelContext, path: str) -> tuple[list[float], list[float], bool]:
    """A bf16 run saved after 2 of 4 steps, and its resume: the fp32 master shards travel with it."""
    model, optimizer = _build(ctx, BF16_CKPT)
    losses = _train(ctx, model, optimizer, BF16_CKPT, range(2))
    save_checkpoint(path, model, optimizer, ctx, step=2)
    losses += _train(ctx, model, optimizer, BF16_CKPT, range(2, 4))
    resumed_model, resumed_optimizer = _build(ctx, BF16_CKPT)
    load_checkpoint(path, resumed_model, resumed_optimizer, ctx)
    resumed = _train(ctx, resumed_model, resumed_optimizer, BF16_CKPT, range(2, 4))
    whole, again = full_state_dict(model, ctx), full_state_dict(resumed_model, ctx)
    return losses, resumed, all(torch.equal(whole[name], again[name]) for name in whole)


def test_bf16_resumes_bit_exactly(tmp_path: Path) -> None:
    for rank, (losses, resumed, same) in enumerate(run_distributed(_bf16_resume, 1, 1, 2, str(tmp_path / "c"),
                                                                   timeout=120)):
        assert resumed == losses[2:], f"rank {rank}: resumed losses {resumed}, uninterrupted {losses[2:]}"
        assert same, f"rank {rank}: the resumed bf16 parameters differ from the uninterrupted run's"
