"""Stage 17: the assembled run: tp=2 x pp=2 x dp=2 with ZeRO-1 and clipping on 8 ranks, stopped, resumed, exported.

Every piece of the course in one loop. The run trains beside the single-device reference with a
progress bar, saves a sharded checkpoint half way, and goes on; then a new model and optimizer
load that checkpoint and train the second half again, which must give the same losses bit for
bit; the result is exported to a plain 🤗 folder that ``from_pretrained`` loads on one device
with the same logits. At the end one PNG shows both loss curves and one step's pipeline timeline.

The run trains in float64, as the reference harness does, so each check is a stated tolerance:
``PARALLEL`` beside one device, ``EXACT`` for the resume (see goose_core/testing/tolerances.py).

Run it (``make demo`` runs the first line):

    torchrun --standalone --nproc_per_node=8 stages/17_3d_parallelism/train.py
    torchrun --standalone --nproc_per_node=8 stages/17_3d_parallelism/train.py --model llama --steps 12
    torchrun --standalone --nproc_per_node=8 stages/17_3d_parallelism/train.py --model demo-out/export
    torchrun --standalone --nproc_per_node=4 stages/17_3d_parallelism/train.py --tp 2 --pp 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from goose_core import (DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel, TensorParallel,
                        clip_grad_norm_, export_pretrained, load_checkpoint, save_checkpoint)
from goose_core.data import shard_batch
from goose_core.loss import causal_lm_loss
from goose_core.pipeline import Span, Timeline, draw_gantt, trim_waits
from goose_core.testing import (EAGER_IN_DTYPE, EXACT, PARALLEL, TINY_MODELS, Tolerance, TrainSpec,
                                format_beside_reference, reference_run, widen_float32)

#: The founding example's Bloom, tiny: 4 layers, 64 wide, a 256-byte vocabulary. Global batches
#: of 8 x 32 tokens, AdamW, the gradient norm clipped to 1.0 (it is 1.2 to 2.3 in these steps: the clip acts).
SPEC = TrainSpec(family="bloom", steps=12, batch_size=8, seq_len=32, max_grad_norm=1.0)


@dataclass(frozen=True)
class FolderSpec(TrainSpec):
    """A :class:`TrainSpec` whose model is a local 🤗 folder (its own weights) instead of a family."""

    folder: str = ""

    def build_model(self) -> PreTrainedModel:
        # Softmax in the model's dtype where the family takes 🤗's attention interface (Llama's
        # eager runs it in fp32); families with their own attention (Bloom, GPT-2) ignore it.
        model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=self.dtype,
                                                     attn_implementation=EAGER_IN_DTYPE)
        model.loss_function = causal_lm_loss  # goose's loss keeps float64 (see goose_core.loss)
        return widen_float32(model).train()  # its float32 casts too, in a float64 run


def spec_for(model: str, steps: int) -> TrainSpec:
    """:data:`SPEC` with ``model`` (a family name or a local folder) and ``steps``.

    Raises:
        ValueError: ``model`` is neither a family nor a folder holding a config.json.
    """
    fields: dict[str, Any] = {"steps": steps, "batch_size": SPEC.batch_size, "seq_len": SPEC.seq_len,
                              "max_grad_norm": SPEC.max_grad_norm}
    if model in TINY_MODELS:
        return TrainSpec(family=model, **fields)
    if (Path(model) / "config.json").is_file():
        return FolderSpec(family="", folder=model, **fields)
    raise ValueError(f"--model {model!r} is neither a family ({', '.join(sorted(TINY_MODELS))}) nor a folder "
                     f"with a config.json; pass one of those")


def build(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int,
          timeline: Timeline | None = None) -> tuple[Any, DistributedOptimizer]:
    """The model at ctx's layout (tp inside pp inside dp) and its ZeRO-1 optimizer."""
    model = TensorParallel(spec.build_model(), ctx).parallelize()
    callbacks = [timeline.callback()] if timeline is not None else []
    model = PipelineParallel(model, ctx, num_microbatches=num_microbatches, callbacks=callbacks).parallelize()
    model = DataParallel(model, ctx).parallelize()
    return model, DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)


class Progress:
    """A progress bar on rank 0's stdout: step, loss (beside one device's), tokens/s and ETA.

    On a terminal it redraws one line; into a pipe or a file it writes a line a step.
    """

    def __init__(self, first: int, last: int, tokens_per_step: int, stream: TextIO = sys.stdout,
                 width: int = 20) -> None:
        self.first, self.last, self.tokens, self.stream, self.width = first, last, tokens_per_step, stream, width
        self.start = time.perf_counter()
        self.redraw, self.shown = stream.isatty(), 0

    def restart(self, first: int) -> None:
        """Count from step ``first`` (a resumed run) and from now."""
        self.first, self.start = first, time.perf_counter()

    def line(self, step: int, loss: float, reference: float | None, elapsed: float) -> str:
        """The bar after step ``step`` (0-based) of ``first..last``, ``elapsed`` seconds in."""
        done = step + 1 - self.first
        per_step = elapsed / done
        filled = round(self.width * (step + 1) / self.last)
        ref = "" if reference is None else f" (1 device {reference:.6f})"
        count = f"{step + 1:>{len(str(self.last))}}/{self.last}"
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {count} steps  loss {loss:.6f}{ref}"
                f"  {self.tokens / per_step:,.0f} tok/s  ETA {per_step * (self.last - step - 1):.1f}s")

    def update(self, step: int, loss: float, reference: float | None = None) -> None:
        text = self.line(step, loss, reference, time.perf_counter() - self.start)
        end = "" if self.redraw and step + 1 < self.last else "\n"
        if self.redraw:  # blank out what a longer previous line left behind
            text, self.shown = "\r" + text.ljust(self.shown), len(text)
        self.stream.write(text + end)
        self.stream.flush()


def train(ctx: ParallelContext, model: Any, optimizer: DistributedOptimizer, spec: TrainSpec, first: int,
          last: int, save_at: int | None = None, path: str = "", timeline: Timeline | None = None,
          progress: Progress | None = None, reference: list[float] | None = None) -> list[float]:
    """Steps ``first..last-1``: this dp rank's shard of each global batch, forward and backward
    through the pipeline, clip, the ZeRO-1 step. After ``save_at`` steps, a checkpoint at
    ``path``; the timeline keeps the last step."""
    losses = []
    for step in range(first, last):
        if timeline is not None:
            timeline.clear()
        batch = shard_batch(spec.batch(step), ctx.dp_rank, ctx.dp_size)
        loss = model(**batch).loss  # every rank gets the global batch's loss
        loss.backward()  # tp all-reduces, pipeline sends, dp gradient reduce-scatter
        clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)  # the whole model's norm
        optimizer.step()  # each dp rank steps its ZeRO shard, then all-gathers the parameters
        optimizer.zero_grad()
        losses.append(loss.item())
        if progress is not None:
            progress.update(step, losses[-1], None if reference is None else reference[step])
        if step + 1 == save_at:
            save_checkpoint(path, model, optimizer, ctx, step=save_at)
    return losses


def resume(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int, path: str, last: int,
           progress: Progress | None = None, reference: list[float] | None = None) -> tuple[Any, int, list[float]]:
    """A new model and optimizer, the checkpoint at ``path`` loaded, trained up to ``last``.
    Returns the model, the step it resumed at, and the losses from there."""
    model, optimizer = build(ctx, spec, num_microbatches)
    step = load_checkpoint(path, model, optimizer, ctx)["step"]
    if progress is not None:
        progress.restart(step)
    return model, step, train(ctx, model, optimizer, spec, step, last, progress=progress, reference=reference)


def same_everywhere(ctx: ParallelContext, a: Any, b: Any) -> bool:
    """Whether two models hold the same bits on every rank (each rank compares its own pieces)."""
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    flag = torch.tensor([0 if same else 1])
    dist.all_reduce(flag)  # a sum of "differs" over the world
    return int(flag) == 0


def export_check(ctx: ParallelContext, model: Any, spec: TrainSpec, path: str) -> tuple[float, float]:
    """Export ``model`` to ``path``, load it on one device, and return (on every rank) the largest
    logit difference beside the parallel model on one probe batch and its share of PARALLEL's allowance."""
    export_pretrained(model, ctx, path)
    probe = spec.batch(spec.steps)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=probe).logits  # a collective: every rank runs its stage
    found = torch.zeros(2, dtype=torch.float64)
    if ctx.pipeline_parallel_rank == ctx.pipeline_parallel_size - 1 and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        single = AutoModelForCausalLM.from_pretrained(path, dtype=spec.dtype)  # as any 🤗 user loads it
        widen_float32(single)  # and float64 throughout, as the harness ran the 3D model
        with torch.no_grad():
            want = single(input_ids=probe).logits
        found += torch.tensor([(logits - want).abs().max(), allowance_used(logits, want, PARALLEL)])
    dist.all_reduce(found)  # the one rank that checked tells every rank (the others add zeros)
    return float(found[0]), float(found[1])


def allowance_used(got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> float:
    """max |got - want| / (atol + rtol |want|): above 1 is outside ``tol``."""
    return float(((got - want).abs() / (tol.atol + tol.rtol * want.abs())).max())


def draw(losses: list[float], resumed: list[float], at: int, reference: list[float], spans: list[Span],
         path: Path, model: str, ctx: ParallelContext) -> Path:
    """One PNG: the loss curves (3D run, resumed run, one device) above one step's pipeline timeline."""
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    layout = f"tp={ctx.tp_size} x pp={ctx.pp_size} x dp={ctx.dp_size}"
    gantt = draw_gantt(spans, path.with_name(path.stem + "-timeline.png"), title=f"one step, pp={ctx.pp_size}")
    fig = Figure(figsize=(10, 7.5))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1.2, 1]})
    steps = range(1, len(reference) + 1)
    top.plot(steps, reference, "k-", linewidth=4, alpha=0.25, label="1 device (reference_run)")
    top.plot(steps, losses, "o-", label=f"{layout}, ZeRO-1")
    top.plot(range(at + 1, at + len(resumed) + 1), resumed, "x--", markersize=9,
             label=f"resumed from the checkpoint after {at} steps")
    top.axvline(at + 0.5, color="grey", linestyle=":")
    top.set(xlabel="step", ylabel="loss", title=f"{model} at {layout}, ZeRO-1")
    top.legend()
    bottom.imshow(mpimg.imread(gantt))
    bottom.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SPEC.family, help="a family (bloom, gpt2, llama) or a local 🤗 folder")
    parser.add_argument("--steps", type=int, default=SPEC.steps)
    parser.add_argument("--save-at", type=int, default=None, help="checkpoint after this step (default: half way)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--out", default="demo-out", help="folder for the checkpoint, the export and the PNG")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # 🤗's bars for writing and loading the export: ours is enough
    save_at = args.steps // 2 if args.save_at is None else args.save_at
    if not 0 < save_at < args.steps:
        raise ValueError(f"--save-at {save_at} must lie strictly between 0 and --steps {args.steps}")
    spec = spec_for(args.model, args.steps)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = ParallelContext(args.tp, args.pp, max(world // (args.tp * args.pp), 1))
    out = Path(args.out)
    checkpoint, export = str(out / "checkpoint"), str(out / "export")
    lead = ctx.rank == 0

    reference = None
    if lead:
        what = args.model if isinstance(spec, FolderSpec) else f"{spec.family} (tiny)"
        print(f"goose stage 17: {what}, {str(spec.dtype).replace('torch.', '')}, tp={ctx.tp_size} x "
              f"pp={ctx.pp_size} x dp={ctx.dp_size} = {ctx.world_size} ranks, ZeRO-1, clip "
              f"{spec.max_grad_norm}, {args.microbatches} micro-batches, {spec.steps} steps")
        started = time.perf_counter()
        reference = reference_run(spec).losses
        print(f"single-device reference: {spec.steps} steps in {time.perf_counter() - started:.1f}s")
    tokens = spec.batch_size * spec.seq_len

    timeline = Timeline()
    model, optimizer = build(ctx, spec, args.microbatches, timeline)
    progress = Progress(0, spec.steps, tokens) if lead else None
    losses = train(ctx, model, optimizer, spec, 0, spec.steps, save_at, checkpoint, timeline, progress, reference)
    spans = trim_waits(timeline.gather(ctx.pipeline_parallel_group))
    if lead:
        print(f"checkpoint after {save_at} steps: {checkpoint} ({size_of(Path(checkpoint))})")
        print(f"resume: a new model and optimizer load {checkpoint} and train the last "
              f"{spec.steps - save_at} steps again")

    progress = Progress(save_at, spec.steps, tokens) if lead else None
    resumed_model, at, resumed = resume(ctx, spec, args.microbatches, checkpoint, spec.steps, progress, reference)
    bits = same_everywhere(ctx, model, resumed_model)
    logits = export_check(ctx, resumed_model, spec, export)
    if lead:
        report(losses, resumed, at, bits, logits, export, reference)
        print(f"picture: {draw(losses, resumed, at, reference, spans, out / 'demo.png', args.model, ctx)}")
    ctx.destroy()


def report(losses: list[float], resumed: list[float], at: int, bits: bool, logits: tuple[float, float],
           export: str, reference: list[float]) -> None:
    """Print the checks, raising if one fails."""
    same = resumed == losses[at:]
    verdict = {True: "bit for bit", False: "DIFFER"}
    print(f"resumed (steps {at}-{len(losses) - 1} below) == uninterrupted: losses {verdict[same]}, "
          f"every rank's parameters {verdict[bits]} (EXACT)")
    print(f"export: {export} loads with AutoModelForCausalLM.from_pretrained on one device; its logits "
          f"beside the 3D model's: max |diff| {logits[0]:.1e}, {logits[1]:.2%} of PARALLEL's allowance")
    print(format_beside_reference(losses, reference))
    got, want = torch.tensor(losses, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    beside = allowance_used(got, want, PARALLEL)
    print(f"3D beside one device: max |diff| {float((got - want).abs().max()):.1e}, {beside:.2%} of PARALLEL's "
          f"allowance ({PARALLEL.atol:g} + {PARALLEL.rtol:g} |loss|: {PARALLEL.why})")
    failed = [name for name, bad in [("resume (losses)", not same), ("resume (parameters)", not bits),
                                     ("export logits", logits[1] > 1), ("3D beside one device", beside > 1)] if bad]
    if failed:
        raise RuntimeError(f"the demo's checks failed: {', '.join(failed)} (EXACT={EXACT.why!r})")


def size_of(folder: Path) -> str:
    files = [f for f in folder.rglob("*") if f.is_file()]
    return f"{len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB"


if __name__ == "__main__":
    main()
