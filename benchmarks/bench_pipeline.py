"""Pipeline engine: GPipe against its ideal time and against torch.distributed.pipelining.

Three measurements, each in one spawned group of gloo ranks on CPU, the two sides built in the
same ranks and timed in alternating rounds (``benchmarks.paired``), a sample being one step
between barriers:

* sleep-calibrated stages (p=4, M=8, t_f=20 ms, t_b=40 ms): goose's step time against the ideal
  (M + p - 1) * (t_f + t_b), and against ``ScheduleGPipe`` running the same sleeping stages, with
  4 KB activations (nothing to hide) and 16 MB ones (transfers worth overlapping);
* tiny GPT-2 (8 blocks, p=4, M=8, batch 32 x 64 tokens), real compute, manual stages for torch;
* checkpointing, p=2 with 4 blocks per stage: bytes saved for backward with ``always`` against
  ``never``, and the step time with ``always`` against ``never``.

The ideal is a constant: its ratio pairs each goose sample of the 4 KB run with it.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from benchmarks.paired import Pairs, alternate
from benchmarks.results import Record
from goose_core import ParallelContext, PipelineParallel
from goose_core.pipeline import Sleep, SleepPipeline, adapter_for, ideal_gpipe_time
from goose_core.testing import TrainSpec, run_distributed

P, M, TF, TB = 4, 8, 0.02, 0.04
SLEEP_ROUNDS = 9  # a sleep step takes ~0.7 s
ROUNDS = 12
SMALL, BIG = 1024, 2**22  # floats per activation: 4 KB (nothing to hide), 16 MB (transfers to hide)
GPT2 = TrainSpec(family="gpt2", batch_size=32, seq_len=64, dtype=torch.float32, overrides={"n_layer": 8})


class _SleepStage(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: Tensor) -> Tensor:
        return Sleep.apply(x * self.weight, TF, TB)


def _sample(step: Callable[[], None]) -> Callable[[], float]:
    """One timed step of the whole pipeline: from a barrier to a barrier."""
    def sample() -> float:
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        return time.perf_counter() - start
    return sample


def _torch_schedule(ctx: ParallelContext, module: nn.Module, loss_fn) -> ScheduleGPipe:
    stage = PipelineStage(module, ctx.pp_rank, ctx.pp_size, ctx.device, group=ctx.pp_group)
    return ScheduleGPipe(stage, M, loss_fn=loss_fn)


def _torch_step(ctx: ParallelContext, schedule: ScheduleGPipe, x: Tensor, target: Tensor | None):
    def step() -> None:
        if ctx.is_first_stage:
            schedule.step(x)
        elif ctx.is_last_stage:
            schedule.step(target=target, losses=[])
        else:
            schedule.step()
    return step


def _sleep(ctx: ParallelContext, hidden: int) -> Pairs:
    goose = SleepPipeline(ctx, M, TF, TB, hidden=hidden)
    schedule = _torch_schedule(ctx, _SleepStage(hidden), lambda out, target: out.sum())
    peer = _torch_step(ctx, schedule, torch.ones(M, hidden), torch.zeros(M))
    return alternate(_sample(goose.run_step), _sample(peer), SLEEP_ROUNDS)


class _GPT2Stage(nn.Module):
    """A manual stage for torch: this rank's blocks, embeddings first, head last (goose's adapter)."""

    def __init__(self, ctx: ParallelContext) -> None:
        super().__init__()
        self.model = GPT2.build_model()
        self.adapter = adapter_for(self.model)
        per = len(self.adapter.blocks) // ctx.pp_size
        self.blocks = range(ctx.pp_rank * per, (ctx.pp_rank + 1) * per)
        self.first, self.last = ctx.is_first_stage, ctx.is_last_stage

    def forward(self, x: Tensor) -> Tensor:
        # The cell goose's stage runs (GPT-2's own forward over these blocks); logits last.
        inputs = {"input_ids": x} if self.first else {}
        h = self.adapter.embed(inputs) if self.first else x
        return self.adapter.run(list(self.blocks), self.first, self.last, h, inputs)


def _gpt2(ctx: ParallelContext) -> Pairs:
    batch = GPT2.batch(0)
    model = PipelineParallel(GPT2.build_model(), ctx, num_microbatches=M, checkpoint="never").parallelize()

    def goose_step() -> None:
        model(**batch).loss.backward()

    stage = _GPT2Stage(ctx)
    loss_fn = lambda logits, labels: stage.model.loss_function(  # noqa: E731
        logits=logits, labels=labels, vocab_size=stage.model.config.vocab_size)
    schedule = _torch_schedule(ctx, stage, loss_fn)
    peer = _torch_step(ctx, schedule, batch["input_ids"], batch["labels"])
    return alternate(_sample(goose_step), _sample(peer), ROUNDS)


def _saved_bytes(model: nn.Module, batch: dict) -> int:
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss  # the forward's savings; the backward frees them
    loss.backward()
    return saved


def _checkpointing(ctx: ParallelContext) -> tuple[dict[str, int], Pairs]:
    batch = GPT2.batch(0)
    models = {mode: PipelineParallel(GPT2.build_model(), ctx, num_microbatches=M, checkpoint=mode).parallelize()
              for mode in ("always", "never")}
    saved = {mode: _saved_bytes(model, batch) for mode, model in models.items()}
    always, never = (_sample(lambda m=m: m(**batch).loss.backward()) for m in models.values())
    return saved, alternate(always, never, ROUNDS)


def run() -> list[Record]:
    ideal = ideal_gpipe_time(M, P, TF, TB)
    small = run_distributed(_sleep, 1, P, 1, SMALL, timeout=600)[0]
    big = run_distributed(_sleep, 1, P, 1, BIG, timeout=600)[0]
    gpt2 = run_distributed(_gpt2, 1, P, 1, timeout=600)[0]
    ckpt = run_distributed(_checkpointing, 1, 2, 1, timeout=600)
    mem_always = max(saved["always"] for saved, _ in ckpt)
    mem_never = max(saved["never"] for saved, _ in ckpt)
    where = f"p={P}, M={M}, gloo on CPU"
    return [
        Record.timed("pipeline", f"sleep stages t_f={TF * 1e3:.0f} ms t_b={TB * 1e3:.0f} ms, {where}",
                     Pairs(small.goose, (ideal,) * len(small.goose)), "ideal GPipe (M+p-1)(t_f+t_b)"),
        Record.timed("pipeline", f"sleep stages, 4 KB activations, {where}", small, "torch ScheduleGPipe"),
        Record.timed("pipeline", f"sleep stages, 16 MB activations, {where}", big, "torch ScheduleGPipe"),
        Record.timed("pipeline", f"tiny GPT-2 fp32 8 blocks, batch 32x64, {where}", gpt2,
                     "torch ScheduleGPipe, manual stages"),
        Record.count("pipeline", "checkpoint always vs never: bytes saved for backward, p=2, 4 blocks/stage",
                     mem_always / 1e6, mem_never / 1e6, "checkpoint never", "MB"),
        Record.timed("pipeline", "checkpoint always vs never: step time, p=2, 4 blocks/stage, M=8",
                     ckpt[0][1], "checkpoint never"),
    ]
