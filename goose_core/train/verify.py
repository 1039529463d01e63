"""``--verify K``: K steps of the job's layout beside one device, on a float64 copy of the model.

The layout runs with everything the job uses (its wrappers, ZeRO-1, micro-batches, schedule,
recompute, clipping, the learning-rate schedule and the same global batches), but in float64,
where goose proves every layout equal to one device at ``PARALLEL``; rank 0 trains the same
model unwrapped on the whole global batch. A model above :data:`SHRINK_ABOVE` parameters is
verified with fewer layers (seeded weights): the layout's code paths are the same at any depth.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from goose_core.data import BatchStream
from goose_core.distributed.context import ParallelContext
from goose_core.state import full_state_dict
from goose_core.testing.reference import RunResult, largest_errors, snapshot
from goose_core.testing.tolerances import PARALLEL
from goose_core.train.build import build_model, build_optimizer, wrap
from goose_core.train.config import TrainConfig, is_family
from goose_core.train.loop import step
from goose_core.train.schedule import lr_at

__all__ = ["SHRINK_ABOVE", "VerifyError", "shrunk_layers", "verify", "verify_runs"]

#: Models larger than this many parameters are verified with as few layers as the pipeline needs.
SHRINK_ABOVE = 50_000_000


class VerifyError(RuntimeError):
    """The layout differs from one device beyond PARALLEL."""


def _run(config: TrainConfig, ctx: ParallelContext | None, inputs: Any, layers: int | None,
         after_backward: Any) -> RunResult:
    """K steps in float64: at ctx's layout, or (``ctx=None``) on one device."""
    model = build_model(config, inputs.tokenizer.vocab_size, torch.float64, layers=layers)
    stream = BatchStream(inputs.data, config.batch_size, seed=config.seed, split="train")
    losses: list[float] = []
    if ctx is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        for k in range(config.verify):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(k, config.lr, config.steps, config.warmup, config.min_lr)
            loss = model(**stream.next()).loss
            loss.backward()
            if config.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        return RunResult(losses, snapshot(model))
    model = wrap(model, ctx, config)
    optimizer, _ = build_optimizer(model, ctx, config, torch.float64)
    for k in range(config.verify):
        lr = lr_at(k, config.lr, config.steps, config.warmup, config.min_lr)
        losses.append(step(model, optimizer, ctx, stream.next(), lr, config.clip, config.microbatches,
                           after_backward=after_backward)[0])
    return RunResult(losses, {name: p.cpu() for name, p in full_state_dict(model, ctx).items()})


def shrunk_layers(config: TrainConfig, ctx: ParallelContext) -> int | None:
    """The depth ``--verify`` uses: the model's own (None), or two layers a stage when the model
    has more than :data:`SHRINK_ABOVE` parameters (counted on the meta device: nothing allocated)."""
    if is_family(config.model):
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model, local_files_only=True))
    size = sum(p.numel() for p in model.parameters())
    return None if size <= SHRINK_ABOVE else 2 * ctx.pipeline_parallel_size


def verify_runs(config: TrainConfig, ctx: ParallelContext, inputs: Any, layers: int | None = None,
                after_backward: Any = None) -> tuple[float, float, float]:
    """(largest parameter error, largest loss error, share of PARALLEL's allowance) of the layout
    beside one device, the same on every rank (rank 0 runs the one-device reference)."""
    config = replace(config, dtype="float64")
    parallel = _run(config, ctx, inputs, layers, after_backward)
    found = torch.zeros(3, dtype=torch.float64)
    if ctx.rank == 0:
        found += torch.tensor(largest_errors(parallel, _run(config, None, inputs, layers, None), PARALLEL),
                              dtype=torch.float64)
    found = found.to(ctx.device)
    dist.all_reduce(found)  # rank 0's verdict to every rank (the others add zeros)
    param, loss, share = found.tolist()
    return param, loss, share


def verify(config: TrainConfig, ctx: ParallelContext, inputs: Any, after_backward: Any = None) -> float:
    """Run ``--verify`` and print its margin on rank 0; returns the share of the allowance used.

    Raises:
        VerifyError: on every rank, when the layout differs from one device beyond PARALLEL.
    """
    layers = shrunk_layers(config, ctx)
    param, loss, share = verify_runs(config, ctx, inputs, layers, after_backward)
    layout = (f"tp={ctx.tensor_parallel_size} x pp={ctx.pipeline_parallel_size} x dp={ctx.data_parallel_size}"
              f"{' + ZeRO-1' if config.zero else ''}")
    report = (f"--verify {config.verify}: {layout} beside one device in float64: max |loss diff| {loss:.1e}, "
              f"max |parameter diff| {param:.1e}, {share:.2%} of PARALLEL's allowance "
              f"({PARALLEL.atol:g} + {PARALLEL.rtol:g} |x|)")
    if share > 1:
        raise VerifyError(report + "; the layout does NOT train as one device does: stop and report it "
                          "(goose_core.testing reproduces it with a TrainSpec)")
    if ctx.rank == 0:
        print(report + ": they agree", flush=True)
    return share
