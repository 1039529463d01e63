"""Schedules that shrink the bubble: goose's interleaved 1F1B, ZB-H1 and ZBV against torch.distributed.pipelining's.

Each measurement is one spawned group of p=4 gloo ranks on CPU, M=8 micro-batches, the two sides
built in the same ranks and timed in alternating rounds (``benchmarks.paired``), a sample being
one training step between barriers:

* sleep-calibrated stages (stage 10's: a stage sleeps t_f=20 ms forward, t_b=40 ms backward; a
  chunk of V=2 half of that; a split backward sleeps half in B and half in W): goose's
  ``interleaved-1f1b`` against torch's ``ScheduleInterleaved1F1B``, goose's ``zb-h1`` against
  torch's ``ScheduleInterleavedZeroBubble`` with one stage per rank, and goose's ``zbv`` against
  torch's ``ScheduleZBVZeroBubble`` (V-shaped, 2 chunks per rank);
* the measured bubble of each: 1 - M(t_f + t_b) / step time (every rank has exactly M(t_f + t_b)
  of sleeping to do), beside the formula of its timetable;
* tiny GPT-2 (8 blocks, batch 32 x 64 tokens, fp32): goose's ``interleaved-1f1b`` against torch's
  ``ScheduleInterleaved1F1B`` on manual stages running the same cells.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import (PipelineStage, ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                                          ScheduleZBVZeroBubble)

from benchmarks.bench_pipeline import timed_step
from benchmarks.paired import Pairs, alternate
from benchmarks.results import Record
from goose_core import ParallelContext, PipelineParallel
from goose_core.pipeline import Sleep, SleepPipeline, SleepWeight, schedule_named, split_model_for, timetable_bubble
from goose_core.testing import TrainSpec, run_distributed

P, M, V, TF, TB = 4, 8, 2, 0.02, 0.04
HIDDEN = 1024
ROUNDS = 9  # a sleep step takes ~0.6 s
GPT2 = TrainSpec(family="gpt2", batch_size=32, seq_len=64, dtype=torch.float32, overrides={"n_layer": 8})


class _SleepChunk(nn.Module):
    """The cell goose's SleepPipeline runs, as a module for torch: a chunk of 1/v of a stage,
    its backward split half in the input gradient and half in the weight's when ``split``."""

    def __init__(self, v: int, split: bool) -> None:
        super().__init__()
        self.v, self.split = v, split
        self.scale = nn.Parameter(torch.ones(HIDDEN))
        self.weight = SleepWeight(HIDDEN, TB / v / 2) if split else None

    def forward(self, x: Tensor) -> Tensor:
        y = Sleep.apply(x * self.scale, TF / self.v, TB / self.v / (2 if self.split else 1))
        return y + self.weight(y) if self.weight is not None else y


def _torch_step(ctx: ParallelContext, schedule, x: Tensor, target: Tensor, first: bool, last: bool):
    def step() -> None:
        kwargs = {"target": target, "losses": []} if last else {}
        schedule.step(x, **kwargs) if first else schedule.step(**kwargs)
    return step


def _torch_sleep(ctx: ParallelContext, kind: str) -> Callable[[], None]:
    """torch's schedule over the same sleeping chunks: round-robin (interleaved), one per rank
    (zero bubble, H1-like), or V-shaped (ZBV: rank r holds chunks r and 2p-1-r)."""
    r, p = ctx.pp_rank, ctx.pp_size
    placed = {"interleaved": [r, r + p], "zb": [r], "zbv": [r, 2 * p - 1 - r]}[kind]
    n = len(placed) * p
    stages = [PipelineStage(_SleepChunk(n // p, kind != "interleaved"), c, n, ctx.device, group=ctx.pp_group)
              for c in placed]
    cls = {"interleaved": ScheduleInterleaved1F1B, "zb": ScheduleInterleavedZeroBubble,
           "zbv": ScheduleZBVZeroBubble}[kind]
    schedule = cls(stages, M, loss_fn=lambda out, target: out.sum())
    return _torch_step(ctx, schedule, torch.ones(M, HIDDEN), torch.zeros(M), 0 in placed, n - 1 in placed)


def _goose_sleep(ctx: ParallelContext, name: str) -> Callable[[], None]:
    virtual = V if name == "interleaved-1f1b" else None  # zbv has its own 2
    return SleepPipeline(ctx, M, TF, TB, "never", hidden=HIDDEN, schedule=schedule_named(name, virtual)).run_step


def _sleep(ctx: ParallelContext) -> dict[str, Pairs]:
    goose = {name: _goose_sleep(ctx, name) for name in ("interleaved-1f1b", "zb-h1", "zbv")}
    peers = {kind: _torch_sleep(ctx, kind) for kind in ("interleaved", "zb", "zbv")}
    for step in (*goose.values(), *peers.values()):
        step()  # warm up: the first step plans and allocates
    return {"interleaved": alternate(timed_step(goose["interleaved-1f1b"]), timed_step(peers["interleaved"]), ROUNDS),
            "zb": alternate(timed_step(goose["zb-h1"]), timed_step(peers["zb"]), ROUNDS),
            "zbv": alternate(timed_step(goose["zbv"]), timed_step(peers["zbv"]), ROUNDS)}


class _GPT2Chunk(nn.Module):
    """A manual chunk for torch: chunk c's blocks, embeddings on chunk 0, head on the last."""

    def __init__(self, chunk: int, chunks: int) -> None:
        super().__init__()
        self.model = GPT2.build_model()
        self.adapter = split_model_for(self.model)
        per = len(self.adapter.blocks) // chunks
        self.blocks = list(range(chunk * per, (chunk + 1) * per))
        self.first, self.last = chunk == 0, chunk == chunks - 1

    def forward(self, x: Tensor) -> Tensor:
        inputs = {"input_ids": x} if self.first else {}
        h = self.adapter.embed(inputs) if self.first else x
        return self.adapter.run(self.blocks, self.first, self.last, h, inputs)


def _gpt2(ctx: ParallelContext) -> Pairs:
    batch = GPT2.batch(0)
    model = PipelineParallel(GPT2.build_model(), ctx, num_microbatches=M, recompute="never",
                             schedule="interleaved-1f1b", virtual_stages=V).parallelize()
    r, p = ctx.pp_rank, ctx.pp_size
    chunks = [_GPT2Chunk(c, p * V) for c in (r, r + p)]
    stages = [PipelineStage(m, c, p * V, ctx.device, group=ctx.pp_group) for m, c in zip(chunks, (r, r + p))]
    loss_fn = lambda logits, labels: chunks[0].model.loss_function(  # noqa: E731
        logits=logits, labels=labels, vocab_size=chunks[0].model.config.vocab_size)
    peer = _torch_step(ctx, ScheduleInterleaved1F1B(stages, M, loss_fn=loss_fn), batch["input_ids"],
                       batch["labels"], r == 0, r == p - 1)

    def goose_step() -> None:
        model(**batch).loss.backward()

    goose_step(), peer()
    return alternate(timed_step(goose_step), timed_step(peer), ROUNDS)


def _bubble(seconds: float) -> float:
    return 1 - M * (TF + TB) / seconds


def run() -> list[Record]:
    sleep = run_distributed(_sleep, 1, P, 1, timeout=900)[0]
    gpt2 = run_distributed(_gpt2, 1, P, 1, timeout=900)[0]
    where = f"p={P}, M={M}, gloo on CPU"
    stages = f"sleep stages t_f={TF * 1e3:.0f} ms t_b={TB * 1e3:.0f} ms"
    formula = {"interleaved-1f1b": timetable_bubble(schedule_named("interleaved-1f1b", V)(M, P * V)),
               "zb-h1": timetable_bubble(schedule_named("zb-h1")(M, P)),
               "zbv": timetable_bubble(schedule_named("zbv")(M, 2 * P))}
    records = [
        Record.timed("schedules", f"interleaved 1F1B V={V}, {stages}, {where}", sleep["interleaved"],
                     "torch ScheduleInterleaved1F1B"),
        Record.timed("schedules", f"ZB-H1, {stages}, {where}", sleep["zb"],
                     "torch ScheduleInterleavedZeroBubble, 1 stage per rank"),
        Record.timed("schedules", f"ZBV, {stages}, {where}", sleep["zbv"],
                     "torch ScheduleZBVZeroBubble, 2 chunks per rank"),
        Record.timed("schedules", f"interleaved 1F1B V={V}, tiny GPT-2 fp32 8 blocks, batch 32x64, {where}", gpt2,
                     "torch ScheduleInterleaved1F1B, manual chunks"),
    ]
    for name, key in (("interleaved-1f1b", "interleaved"), ("zb-h1", "zb"), ("zbv", "zbv")):
        measured = _bubble(statistics.median(sleep[key].goose))
        records.append(Record.count("schedules", f"{name} bubble, measured (1 - M(t_f+t_b)/step), {stages}, {where}",
                                    measured, formula[name], "its timetable's bubble", "fraction"))
    # torch's measured bubbles, beside the timetable of goose's schedule of the same kind.
    for kind, pairs in sleep.items():
        name = {"interleaved": "interleaved-1f1b", "zb": "zb-h1", "zbv": "zbv"}[kind]
        records.append(Record.count("schedules", f"torch {kind} bubble, measured, {stages}, {where}",
                                    _bubble(statistics.median(pairs.peer)), formula[name],
                                    f"goose's {name} timetable bubble", "fraction"))
    return records


if __name__ == "__main__":
    for record in run():
        print(record)
