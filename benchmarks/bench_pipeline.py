"""Pipeline engine: GPipe and 1F1B against the ideal time and against torch.distributed.pipelining.

Three measurements, each in one spawned group of gloo ranks on CPU, the two sides built in the
same ranks and timed in alternating rounds (``benchmarks.paired``), a sample being one step
between barriers:

* sleep-calibrated stages (p=4, M=8, t_f=20 ms, t_b=40 ms): goose's step time against the ideal
  (M + p - 1) * (t_f + t_b), and against ``ScheduleGPipe`` running the same sleeping stages, with
  4 KB activations (nothing to hide) and 16 MB ones (transfers worth overlapping);
* tiny GPT-2 (8 blocks, p=4, M=8, batch 32 x 64 tokens), real compute, manual stages for torch;
* checkpointing, p=2 with 4 blocks per stage: bytes saved for backward with ``always`` against
  ``never``, and the step time with ``always`` against ``never``;
* 1F1B on the same tiny GPT-2 (p=4, M=8): goose's ``schedule="1f1b"`` against torch's
  ``Schedule1F1B`` (same manual stages, same micro-batches), step time; and the peak bytes saved
  for backward alive at once on the first stage (``LiveActivations``), against torch's 1F1B and
  against goose's GPipe (M=8 micro-batches in flight there, p=4 under 1F1B).

The ideal is a constant: its ratio pairs each goose sample of the 4 KB run with it.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from benchmarks.paired import Pairs, alternate
from benchmarks.results import Record
from goose_core import ParallelContext, PipelineParallel
from goose_core.pipeline import LiveActivations, Sleep, SleepPipeline, ideal_gpipe_time, split_model_for
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


def timed_step(step: Callable[[], None]) -> Callable[[], float]:
    """One timed step of the whole pipeline: from a barrier to a barrier."""
    def sample() -> float:
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        return time.perf_counter() - start
    return sample


def _torch_schedule(ctx: ParallelContext, module: nn.Module, loss_fn,
                    cls: type[ScheduleGPipe | Schedule1F1B] = ScheduleGPipe) -> ScheduleGPipe | Schedule1F1B:
    stage = PipelineStage(module, ctx.pp_rank, ctx.pp_size, ctx.device, group=ctx.pp_group)
    return cls(stage, M, loss_fn=loss_fn)


def _torch_step(ctx: ParallelContext, schedule: ScheduleGPipe | Schedule1F1B, x: Tensor,
                target: Tensor | None):
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
    return alternate(timed_step(goose.run_step), timed_step(peer), SLEEP_ROUNDS)


class _GPT2Stage(nn.Module):
    """A manual stage for torch: this rank's blocks, embeddings first, head last (goose's adapter)."""

    def __init__(self, ctx: ParallelContext) -> None:
        super().__init__()
        self.model = GPT2.build_model()
        self.adapter = split_model_for(self.model)
        per = len(self.adapter.blocks) // ctx.pp_size
        self.blocks = range(ctx.pp_rank * per, (ctx.pp_rank + 1) * per)
        self.first, self.last = ctx.is_first_stage, ctx.is_last_stage

    def forward(self, x: Tensor) -> Tensor:
        # The cell goose's stage runs (GPT-2's own forward over these blocks); logits last.
        inputs = {"input_ids": x} if self.first else {}
        h = self.adapter.embed(inputs) if self.first else x
        return self.adapter.run(list(self.blocks), self.first, self.last, h, inputs)


def _gpt2_pair(ctx: ParallelContext, schedule: str) -> tuple[nn.Module, Callable[[], None],
                                                               nn.Module, Callable[[], None]]:
    """goose's pipelined tiny GPT-2 and torch's manual stages under the same schedule: each
    model and a function running one training step of it (forward and backward)."""
    batch = GPT2.batch(0)
    model = PipelineParallel(GPT2.build_model(), ctx, num_microbatches=M, recompute="never",
                             schedule=schedule).parallelize()

    def goose_step() -> None:
        model(**batch).loss.backward()

    stage = _GPT2Stage(ctx)
    loss_fn = lambda logits, labels: stage.model.loss_function(  # noqa: E731
        logits=logits, labels=labels, vocab_size=stage.model.config.vocab_size)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    peer = _torch_step(ctx, _torch_schedule(ctx, stage, loss_fn, cls), batch["input_ids"], batch["labels"])
    return model, goose_step, stage, peer


def _gpt2(ctx: ParallelContext) -> Pairs:
    _, goose_step, _, peer = _gpt2_pair(ctx, "gpipe")
    return alternate(timed_step(goose_step), timed_step(peer), ROUNDS)


def _peak_saved(module: nn.Module, step: Callable[[], None]) -> int:
    """The most bytes saved for backward alive at once during one step, on this rank."""
    with LiveActivations(module.parameters()) as live:
        step()
    return live.peak


def _one_f_one_b(ctx: ParallelContext) -> tuple[Pairs, dict[str, int]]:
    model, goose_step, stage, peer = _gpt2_pair(ctx, "1f1b")
    gpipe_model, gpipe_step, _, _ = _gpt2_pair(ctx, "gpipe")
    for step in (goose_step, peer, gpipe_step):
        step()  # warm up: the first step allocates and plans
    peaks = {"goose 1f1b": _peak_saved(model, goose_step), "torch 1f1b": _peak_saved(stage, peer),
             "goose gpipe": _peak_saved(gpipe_model, gpipe_step)}
    return alternate(timed_step(goose_step), timed_step(peer), ROUNDS), peaks


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
    models = {mode: PipelineParallel(GPT2.build_model(), ctx, num_microbatches=M, recompute=mode).parallelize()
              for mode in ("always", "never")}
    saved = {mode: _saved_bytes(model, batch) for mode, model in models.items()}
    always, never = (timed_step(lambda m=m: m(**batch).loss.backward()) for m in models.values())
    return saved, alternate(always, never, ROUNDS)


def run_1f1b() -> list[Record]:
    """The 1F1B records alone (``python -c 'from benchmarks.bench_pipeline import run_1f1b'``)."""
    pairs, peaks = run_distributed(_one_f_one_b, 1, P, 1, timeout=600)[0]  # rank 0: the first stage
    what = f"tiny GPT-2 fp32 8 blocks, batch 32x64, p={P}, M={M}, gloo on CPU"
    mb = {k: v / 1e6 for k, v in peaks.items()}
    return [
        Record.timed("pipeline_1f1b", f"1F1B step time, {what}", pairs, "torch Schedule1F1B, manual stages"),
        Record.count("pipeline_1f1b", f"1F1B activation peak, first stage, {what}", mb["goose 1f1b"],
                     mb["torch 1f1b"], "torch Schedule1F1B, manual stages", "MB"),
        Record.count("pipeline_1f1b", f"1F1B vs GPipe activation peak, first stage, {what}", mb["goose 1f1b"],
                     mb["goose gpipe"], "goose GPipe", "MB"),
    ]


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
        *run_1f1b(),
    ]
