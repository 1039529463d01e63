"""The suite on a machine with GPUs: forked ranks never touch CUDA, and the backend choice is explicit.

This machine has no GPU, so the tests fake one: the parent makes ``torch.cuda`` report eight
devices, and every call that would initialise CUDA (``set_device``, ``init``, ``_lazy_init``,
``synchronize``, ...) raises instead. The forked ranks inherit both. On a real GPU machine those
calls are what fail (CUDA cannot be re-initialised in a forked child) or what piles several
ranks onto one GPU under NCCL.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from goose_core import (DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel, TensorParallel,
                        full_state_dict, spawn)
from goose_core.distributed import RankError
from goose_core.distributed.context import BACKEND_ENV, DEVICE_ENV, choose_backend
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run, run_distributed, train_loop

GPUS = 8  # more than any layout below has ranks: the default alone would pick NCCL for all of them

#: torch.cuda calls that initialise CUDA (or need it initialised).
TOUCHES = ("init", "_lazy_init", "set_device", "synchronize", "current_device", "get_rng_state",
           "set_rng_state", "manual_seed", "Stream", "current_stream", "default_stream", "memory_allocated")


class CudaTouched(RuntimeError):
    pass


def _tripwire(name: str) -> Any:
    def touched(*args: Any, **kwargs: Any) -> Any:
        raise CudaTouched(f"torch.cuda.{name} was called: a forked rank must never touch CUDA")
    return touched


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA looks available with GPUS devices; any initialising call raises (in forked ranks too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: GPUS)
    for name in TOUCHES:
        monkeypatch.setattr(torch.cuda, name, _tripwire(name))
    for var in (BACKEND_ENV, DEVICE_ENV):
        monkeypatch.delenv(var, raising=False)


# -- the choice ---------------------------------------------------------------------------------

def test_the_default_is_nccl_only_with_a_gpu_per_local_rank(fake_gpus: None) -> None:
    assert choose_backend(local_rank=3, local_world_size=GPUS) == ("nccl", torch.device("cuda", 3))
    assert choose_backend(local_rank=3, local_world_size=GPUS + 1) == ("gloo", torch.device("cpu"))


def test_the_default_is_gloo_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert choose_backend(local_world_size=1) == ("gloo", torch.device("cpu"))


@pytest.mark.parametrize("backend, device, env, want", [
    ("gloo", None, {}, ("gloo", "cpu")),
    (None, "cpu", {}, ("gloo", "cpu")),
    (None, "cuda", {}, ("nccl", "cuda:1")),
    ("nccl", "cuda:5", {}, ("nccl", "cuda:5")),
    (None, None, {DEVICE_ENV: "cpu"}, ("gloo", "cpu")),
    (None, None, {BACKEND_ENV: "gloo"}, ("gloo", "cpu")),
    ("nccl", None, {DEVICE_ENV: "cpu", BACKEND_ENV: "gloo"}, ("nccl", "cuda:1")),  # an argument wins
])
def test_an_explicit_choice_wins(fake_gpus: None, monkeypatch: pytest.MonkeyPatch, backend: str | None,
                                 device: str | None, env: dict[str, str], want: tuple[str, str]) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    got = choose_backend(backend, device, local_rank=1, local_world_size=2)
    assert got == (want[0], torch.device(want[1]))


@pytest.mark.parametrize("backend, device, message", [
    ("nccl", "cpu", r"backend='nccl' needs a CUDA device, got device='cpu': use backend='gloo'"),
    (None, "cuda:9", r"device='cuda:9' but this machine has 8 CUDA device\(s\): run at most 8 ranks"),
    ("mpi", None, r"backend='mpi' is not supported: use 'gloo' \(CPU\) or 'nccl' \(CUDA\)"),
    (None, "mps", r"device='mps' is not supported"),
])
def test_a_bad_combination_names_the_fix(fake_gpus: None, backend: str | None, device: str | None,
                                         message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_backend(backend, device, local_rank=0, local_world_size=2)


def test_cuda_without_a_gpu_says_to_use_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda:0' but this machine has 0 CUDA device\(s\): pass "
                                         r"backend='gloo', device='cpu'"):
        choose_backend("nccl", local_rank=0, local_world_size=1)


# -- the forked ranks ---------------------------------------------------------------------------

def _touch(ctx: ParallelContext) -> None:
    torch.cuda.set_device(0)


def test_the_tripwire_catches_a_touch_in_a_rank(fake_gpus: None) -> None:
    with pytest.raises(RankError, match="torch.cuda.set_device was called"):
        run_distributed(_touch, 1, 1, 1, timeout=60)


def _defaults() -> tuple[str, str]:
    # No backend, no device: what a stage's train.py does when a test spawns it.
    ctx = ParallelContext(data_parallel_size=int(os.environ["WORLD_SIZE"]))
    return ctx.backend, str(ctx.device)


def test_spawned_ranks_default_to_gloo_on_the_cpu(fake_gpus: None) -> None:
    assert choose_backend(local_world_size=2)[0] == "nccl"  # the fake convinces the parent
    assert spawn(_defaults, 2, timeout=60) == [("gloo", "cpu")] * 2


def _three_d_zero(ctx: ParallelContext, spec: TrainSpec) -> tuple[str, str, RunResult]:
    model = TensorParallel(spec.build_model(), ctx).parallelize()
    model = PipelineParallel(model, ctx, num_microbatches=2).parallelize()
    model = DataParallel(model, ctx).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size))
    return ctx.backend, str(ctx.device), RunResult(losses, full_state_dict(model, ctx))


def test_a_3d_zero1_run_never_touches_cuda(fake_gpus: None) -> None:
    # Every wrapper's path (tp, pp with its streams and recompute RNG, dp, ZeRO-1) on 8 ranks.
    # SGD: the comparison stays about the gradients (AdamW amplifies last-bit reorderings).
    spec = TrainSpec(family="gpt2", steps=2, optimizer="sgd")
    reference = reference_run(spec)
    for rank, (backend, device, result) in enumerate(run_distributed(_three_d_zero, 2, 2, 2, spec, timeout=180)):
        assert (backend, device) == ("gloo", "cpu"), f"rank {rank}"
        assert_matches_reference(result, reference, PARALLEL)
