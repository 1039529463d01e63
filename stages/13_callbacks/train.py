"""Stage 13: callbacks around every forward, backward and recompute, and the timeline they record.

Each rank holds one GPipe stage. A Timeline callback records when every (micro-batch, stage) cell
ran; after the last step the ranks gather their spans, rank 0 checks each stage's event order
against the GPipe schedule, prints the measured bubble beside GPipe's ideal (p-1)/(M+p-1), draws
the Gantt chart if asked, and prints the losses beside the single-device reference.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/13_callbacks/train.py
    torchrun --standalone --nproc_per_node=4 stages/13_callbacks/train.py --microbatches 8 --gantt gantt.png
    torchrun --standalone --nproc_per_node=2 stages/13_callbacks/train.py --recompute never
    torchrun --standalone --nproc_per_node=4 stages/13_callbacks/train.py --emulate --microbatches 8 --gantt g.png
"""

from __future__ import annotations

import argparse
import os

from goose_core import ParallelContext, PipelineParallel, full_state_dict
from goose_core.pipeline import (MODES, Callback, CallbackList, GPipe, SleepPipeline, Span, Timeline,
                                 bubble_fraction, draw_gantt, recompute_stop, trim_waits)
from goose_core.testing import RunResult, TrainSpec, format_beside_reference, reference_run

#: Eight Llama layers, 128 wide, micro-batches of 64 tokens: enough work per cell to see it.
SPEC = TrainSpec(family="llama", steps=3, batch_size=16, seq_len=64,
                 overrides={"num_hidden_layers": 8, "hidden_size": 128, "intermediate_size": 512})

#: What one rank observes: (kind, phase, micro-batch).
Observed = tuple[str, str, int]


def schedule_events(num_microbatches: int, num_partitions: int, partition: int,
                    recompute: str) -> list[Observed]:
    """The events partition ``partition`` must fire in one GPipe step: every forward in the
    schedule's order, then every backward in its order, each checkpointed micro-batch's
    recompute just before its backward."""
    gpipe = GPipe(num_microbatches, num_partitions)
    stop = recompute_stop(recompute, num_microbatches)
    cells = [("forward", i) for i, j in gpipe.forward_cells() if j == partition]
    for i in gpipe.backward_order(partition):
        cells += [("recompute", i)] * (i < stop) + [("backward", i)]
    return [(kind, phase, i) for kind, i in cells for phase in ("before", "after")]


def train(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int = 4, recompute: str = "except_last",
          callbacks: tuple[Callback, ...] = ()) -> tuple[RunResult, list[Span], list[Observed]]:
    """Train ``spec`` pipelined with a timeline (and ``callbacks``) registered. Returns the run,
    every rank's spans of the last step (gathered), and this rank's events of the last step."""
    timeline, events = Timeline(), []
    model = PipelineParallel(spec.build_model(), ctx, num_microbatches=num_microbatches,
                             recompute=recompute, callbacks=[timeline.callback(), *callbacks]).parallelize()
    observer = model.callbacks.add(Callback(lambda e: events.append((e.kind, e.phase, e.microbatch_idx))))
    optimizer = spec.build_optimizer(model.parameters())
    losses = []
    for step in range(spec.steps):
        timeline.clear()
        events.clear()  # keep the last step only: the first pays for allocations
        loss = model(**spec.batch(step)).loss  # callbacks fire around every forward cell
        loss.backward()  # ... and around every backward and recompute
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.callbacks.remove(observer)
    spans = timeline.gather(ctx.pipeline_parallel_group)
    return RunResult(losses, full_state_dict(model, ctx)), spans, list(events)


def emulated(ctx: ParallelContext, num_microbatches: int, recompute: str, t_forward: float = 0.02,
             t_backward: float = 0.04, steps: int = 3) -> list[Span]:
    """The gathered spans of the last of ``steps`` steps of stage 10's sleep-calibrated pipeline:
    cells that sleep release the CPU, so the chart shows the schedule, not a crowded machine."""
    timeline = Timeline()
    pipe = SleepPipeline(ctx, num_microbatches, t_forward, t_backward, recompute,
                         callbacks=CallbackList([timeline.callback()]))
    for _ in range(steps):
        timeline.clear()
        pipe.step()
    return timeline.gather(ctx.pipeline_parallel_group)


def describe(events: list[Observed]) -> str:
    """``F0 F1 ... B3 R2 B2 ...``: each cell once, at its "before" event."""
    return " ".join(f"{kind[0].upper()}{i}" for kind, phase, i in events if phase == "before")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--recompute", choices=MODES, default="except_last")
    parser.add_argument("--steps", type=int, default=SPEC.steps)
    parser.add_argument("--gantt", default=None, help="write the last step's Gantt chart PNG here")
    parser.add_argument("--emulate", action="store_true",
                        help="time stage 10's sleep-calibrated cells (20 ms forward, 40 ms backward) instead")
    args = parser.parse_args(argv)

    ctx = ParallelContext(pipeline_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    if args.emulate:
        return show_emulated(ctx, args.microbatches, args.recompute, args.gantt)
    spec = TrainSpec(family=SPEC.family, steps=args.steps, batch_size=SPEC.batch_size,
                     seq_len=SPEC.seq_len, overrides=SPEC.overrides)
    m, p = args.microbatches, ctx.pipeline_parallel_size
    result, spans, events = train(ctx, spec, m, args.recompute)
    expected = schedule_events(m, p, ctx.pipeline_parallel_rank, args.recompute)
    if events != expected:
        raise RuntimeError(f"stage {ctx.pipeline_parallel_rank} fired {describe(events)}, but the GPipe "
                           f"schedule is {describe(expected)}")
    if ctx.rank == 0:
        spans = trim_waits(spans)
        print(f"{ctx}: GPipe over {p} stages, M={m}, recompute={args.recompute}")
        print(f"stage 0 events = GPipe schedule: {describe(events)}")
        print(f"bubble {bubble_fraction(spans):.0%} of the last step; GPipe's ideal (p-1)/(M+p-1) = "
              f"{(p - 1) / (m + p - 1):.0%}")
        if args.gantt:
            print(f"Gantt chart: {draw_gantt(spans, args.gantt, title=f'GPipe p={p} M={m} {args.recompute}')}")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
    ctx.destroy()


def show_emulated(ctx: ParallelContext, num_microbatches: int, recompute: str, gantt: str | None) -> None:
    m, p = num_microbatches, ctx.pipeline_parallel_size
    spans = trim_waits(emulated(ctx, m, recompute))
    if ctx.rank == 0:
        print(f"{ctx}: sleep-calibrated GPipe over {p} stages, M={m}, recompute={recompute}")
        print(f"bubble {bubble_fraction(spans):.0%}; GPipe's ideal (p-1)/(M+p-1) = {(p - 1) / (m + p - 1):.0%}")
        if gantt:
            title = f"sleep-calibrated GPipe p={p} M={m} {recompute}"
            print(f"Gantt chart: {draw_gantt(spans, gantt, title=title)}")
    ctx.destroy()


if __name__ == "__main__":
    main()
