"""Pipeline engine: GPipe against its ideal time and against torch.distributed.pipelining.

Three measurements, each in one spawned group of gloo ranks on CPU:

* sleep-calibrated stages (p=4, M=8, t_f=20 ms, t_b=40 ms): goose's step time against the ideal
  (M + p - 1) * (t_f + t_b), and against ``ScheduleGPipe`` running the same sleeping stages, with
  4 KB activations (nothing to hide) and 16 MB ones (transfers worth overlapping);
* tiny GPT-2 (8 blocks, p=4, M=8, batch 32 x 64 tokens), real compute, manual stages for torch;
* checkpointing, p=2 with 4 blocks per stage: bytes saved for backward with ``always`` against
  ``never``, and the step time with ``always`` against ``never``.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from benchmarks.results import Record
from goose_core import ParallelContext, PipelineParallel
from goose_core.pipeline.emulation import Sleep, SleepPipeline, ideal_gpipe_time
from goose_core.pipeline.split import adapter_for
from goose_core.testing import TrainSpec, run_distributed

P, M, TF, TB = 4, 8, 0.02, 0.04
REPEATS = 3
SMALL, BIG = 1024, 2**22  # floats per activation: 4 KB (nothing to hide), 16 MB (transfers to hide)
GPT2 = TrainSpec(family="gpt2", batch_size=32, seq_len=64, overrides={"n_layer": 8})


class _SleepStage(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: Tensor) -> Tensor:
        return Sleep.apply(x * self.weight, TF, TB)


def _timed(step, ctx: ParallelContext) -> float:
    step()  # warm-up (shape exchange, allocations)
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return min(times)


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


def _sleep(ctx: ParallelContext, hidden: int) -> tuple[float, float]:
    goose = SleepPipeline(ctx, M, TF, TB, hidden=hidden)
    goose_time = _timed(goose.run_step, ctx)
    schedule = _torch_schedule(ctx, _SleepStage(hidden), lambda out, target: out.sum())
    torch_time = _timed(_torch_step(ctx, schedule, torch.ones(M, hidden), torch.zeros(M)), ctx)
    return goose_time, torch_time


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
        h = self.adapter.embed({"input_ids": x}) if self.first else x
        context = self.adapter.context(h, {})
        for b in self.blocks:
            h = self.adapter.block(b, h, context)
        return self.adapter.head(h) if self.last else h


def _gpt2(ctx: ParallelContext) -> tuple[float, float]:
    batch = GPT2.batch(0)
    model = PipelineParallel(GPT2.build_model(), ctx, num_microbatches=M, checkpoint="never").parallelize()

    def goose_step() -> None:
        model(**batch).loss.backward()

    goose_time = _timed(goose_step, ctx)
    stage = _GPT2Stage(ctx)
    loss_fn = lambda logits, labels: stage.model.loss_function(  # noqa: E731
        logits=logits, labels=labels, vocab_size=stage.model.config.vocab_size)
    schedule = _torch_schedule(ctx, stage, loss_fn)
    torch_time = _timed(_torch_step(ctx, schedule, batch["input_ids"], batch["labels"]), ctx)
    return goose_time, torch_time


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


def _checkpointing(ctx: ParallelContext) -> dict[str, tuple[int, float]]:
    batch = GPT2.batch(0)
    models = {mode: PipelineParallel(GPT2.build_model(), ctx, num_microbatches=M, checkpoint=mode).parallelize()
              for mode in ("always", "never")}
    saved = {mode: _saved_bytes(model, batch) for mode, model in models.items()}
    times: dict[str, list[float]] = {mode: [] for mode in models}
    for _ in range(2 * REPEATS):  # alternate, so both modes see the same load on a shared machine
        for mode, model in models.items():
            times[mode].append(_timed(lambda: model(**batch).loss.backward(), ctx))
    return {mode: (saved[mode], min(times[mode])) for mode in models}


def run() -> list[Record]:
    ideal = ideal_gpipe_time(M, P, TF, TB)
    sleep_goose, sleep_torch = run_distributed(_sleep, 1, P, 1, SMALL, timeout=600)[0]
    big_goose, big_torch = run_distributed(_sleep, 1, P, 1, BIG, timeout=600)[0]
    gpt2_goose, gpt2_torch = run_distributed(_gpt2, 1, P, 1, timeout=600)[0]
    ckpt = run_distributed(_checkpointing, 1, 2, 1, timeout=600)
    mem_always = max(r["always"][0] for r in ckpt)
    mem_never = max(r["never"][0] for r in ckpt)
    t_always, t_never = ckpt[0]["always"][1], ckpt[0]["never"][1]
    where = f"p={P}, M={M}, gloo on CPU"
    return [
        Record("pipeline", f"sleep stages t_f={TF * 1e3:.0f} ms t_b={TB * 1e3:.0f} ms, {where}",
               sleep_goose, ideal, "ideal GPipe (M+p-1)(t_f+t_b)"),
        Record("pipeline", f"sleep stages, 4 KB activations, {where}", sleep_goose, sleep_torch,
               "torch ScheduleGPipe"),
        Record("pipeline", f"sleep stages, 16 MB activations, {where}", big_goose, big_torch,
               "torch ScheduleGPipe"),
        Record("pipeline", f"tiny GPT-2 8 blocks, batch 32x64, {where}", gpt2_goose, gpt2_torch,
               "torch ScheduleGPipe, manual stages"),
        Record("pipeline", "checkpoint always vs never: bytes saved for backward, p=2, 4 blocks/stage",
               mem_always / 1e6, mem_never / 1e6, "checkpoint never", unit="MB"),
        Record("pipeline", "checkpoint always vs never: step time, p=2, 4 blocks/stage, M=8",
               t_always, t_never, "checkpoint never"),
    ]
