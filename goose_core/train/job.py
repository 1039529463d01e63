"""The job: ``run(config)`` on every rank: resume, the step loop, checkpoints, evaluation, what
rank 0 shows, the export."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging as hf_logging

from goose_core.amp import GradScaler
from goose_core.checkpoint import export_pretrained, load_checkpoint, save_checkpoint
from goose_core.data import BatchStream
from goose_core.distributed.context import ParallelContext
from goose_core.instruments.accounting import Account, Accounting, gathered_table
from goose_core.train import checkpoints, watch
from goose_core.train.build import TORCH_DTYPES, Inputs, build_model, build_optimizer, prepare, wrap
from goose_core.train.config import TrainConfig, is_family
from goose_core.train.loop import evaluate, maybe_die, step
from goose_core.train.schedule import lr_at
from goose_core.train.verify import verify

__all__ = ["run"]


def _resume_point(config: TrainConfig, ctx: ParallelContext) -> Path | None:
    """Rank 0 chooses the checkpoint (the others could list the folder at another moment)."""
    chosen = [None]
    if ctx.rank == 0:
        path = checkpoints.resume_path(config.resume, config.checkpoint_dir)
        chosen = [None if path is None else str(path)]
    dist.broadcast_object_list(chosen, src=0, device=ctx.device)
    return None if chosen[0] is None else Path(chosen[0])


def _save(config: TrainConfig, ctx: ParallelContext, model: nn.Module, optimizer: Any,
          scaler: GradScaler | None, stream: Any, completed: int) -> Path:
    path = checkpoints.folder(config.checkpoint_dir, completed)
    extra: dict[str, Any] = {"step": completed, "stream": stream.state_dict()}
    if scaler is not None:
        extra["scaler"] = scaler.state_dict()
    save_checkpoint(path, model, optimizer, ctx, **extra)
    if ctx.rank == 0:
        checkpoints.rotate(config.checkpoint_dir, config.keep)
    return path


def _eval_batches(config: TrainConfig, data: Any) -> list[dict[str, torch.Tensor]]:
    if len(data.eval) < config.batch_size:
        return []
    stream = BatchStream(data, config.batch_size, seed=config.seed, split="eval")
    return [stream.next() for _ in range(config.eval_batches)]


class _Watch:
    """Rank 0's outputs (every other rank gets one that does nothing)."""

    def __init__(self, config: TrainConfig, ctx: ParallelContext, first: int) -> None:
        self.on = ctx.rank == 0
        self.config, self.device = config, ctx.device
        self.progress = watch.Progress(first, config.steps) if self.on and config.progress else None
        self.log = watch.JsonlLog(config.log_jsonl, first) if self.on and config.log_jsonl else None
        self.board = watch.Board(config.tensorboard, first) if self.on and config.tensorboard else None
        self.history: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float]] = []

    def say(self, text: str) -> None:
        if not self.on:
            return
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def step(self, record: dict[str, Any]) -> None:
        if not self.on:
            return
        self.history.append((record["step"], record["loss"]))
        if "eval_loss" in record:
            self.evals.append((record["step"], record["eval_loss"]))
        if self.progress is not None:
            note = f"  eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
            self.progress.update(record["step"], record["loss"], record["tokens_per_s"], note)
        if self.log is not None:
            self.log.write(record)
        if self.board is not None:
            scalars = {k: float(record[k]) for k in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_mb")}
            self.board.write(record["step"], scalars)
            if "eval_loss" in record:
                self.board.write(record["step"], {"loss": record["eval_loss"]}, prefix="eval")

    def close(self, title: str) -> None:
        if not self.on:
            return
        for part in (self.progress, self.log, self.board):
            if part is not None:
                part.close()
        if self.config.plot:
            history, evals, resumed = self.history, self.evals, []
            if self.config.log_jsonl:  # the whole run, across restarts
                records = watch.read_jsonl(self.config.log_jsonl)
                history = [(r["step"], r["loss"]) for r in records]
                evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
                resumed = [r["resumed_from"] for r in records if "resumed_from" in r]
            path = watch.draw_losses(history, evals, self.config.plot, title, resumed)
            print(f"loss plot: {path}", flush=True)


def _layout(config: TrainConfig, ctx: ParallelContext) -> str:
    zero = " + ZeRO-1" if config.zero else ""
    return (f"tp={ctx.tensor_parallel_size} x pp={ctx.pipeline_parallel_size} x "
            f"dp={ctx.data_parallel_size}{zero}")


def _describe(config: TrainConfig, ctx: ParallelContext, inputs: Inputs, model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    what = f"{config.model} (tiny, seeded)" if is_family(config.model) else config.model
    return (f"goose train: {what}, {params:,} parameters, {config.dtype}, {_layout(config, ctx)}, "
            f"{config.microbatches} micro-batch(es)\n"
            f"  data: {len(inputs.data.train)} training / {len(inputs.data.eval)} eval windows of {config.seq_len} "
            f"tokens, tokenizer {inputs.tokenizer.name!r} ({inputs.tokenizer.vocab_size} ids); "
            f"{config.batch_size} sequences a step, {config.steps} steps")


def run(config: TrainConfig, inputs: Inputs | None = None, after_backward: Any = None) -> list[float]:
    """Train ``config`` (validated) on this rank; returns this run's losses.

    ``inputs``: :func:`~goose_core.train.build.prepare`'s, if the caller already read them.
    ``after_backward(model)`` runs after every backward (tests plant bugs with it)."""
    hf_logging.disable_progress_bar()
    if inputs is None:
        inputs = prepare(config)  # every rank, before any process group: a bad input fails everywhere
    dtype = TORCH_DTYPES[config.dtype]
    ctx = ParallelContext(config.tp, config.pp, config.dp, seed=config.seed,
                          timeout=timedelta(seconds=config.timeout))
    try:
        return _train(config, ctx, inputs, dtype, after_backward)
    finally:
        ctx.destroy()


def _train(config: TrainConfig, ctx: ParallelContext, inputs: Inputs, dtype: torch.dtype,
           after_backward: Any) -> list[float]:
    if config.checkpoint_dir:
        checkpoints.check_shared(config.checkpoint_dir, ctx)
    if config.verify:
        # Its seeded builds and steps draw from the generators: the job then starts from the same
        # random state as without --verify (dropout masks included).
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            verify(config, ctx, inputs)
    base = build_model(config, inputs.tokenizer.vocab_size, dtype)
    title = _describe(config, ctx, inputs, base)
    model = wrap(base, ctx, config)
    optimizer, scaler = build_optimizer(model, ctx, config, dtype)
    stream = BatchStream(inputs.data, config.batch_size, seed=config.seed, split="train")
    first, resumed = 0, _resume_point(config, ctx)
    if resumed is not None:
        extra = load_checkpoint(resumed, model, optimizer, ctx)
        first = int(extra["step"])
        stream.load_state_dict(extra["stream"])
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
    seen = _Watch(config, ctx, first)
    seen.say(title)
    if resumed is not None:
        seen.say(f"resumed from {resumed} after step {first}")
    evals = _eval_batches(config, inputs.data)
    losses: list[float] = []
    for completed in range(first + 1, config.steps + 1):
        started = time.perf_counter()
        lr = lr_at(completed - 1, config.lr, config.steps, config.warmup, config.min_lr)
        batch = stream.next()
        counted = config.account and completed == first + 2  # after the first step's one-time checks
        with Accounting(model, optimizer, ctx) if counted else contextlib.nullcontext() as accounting:
            hook = _both(after_backward, accounting.after_backward) if counted else after_backward
            loss, norm = step(model, optimizer, ctx, batch, lr, config.clip, config.microbatches, scaler, hook)
        if counted:
            _print_accounts(ctx, accounting.account)
        losses.append(loss)
        tokens = batch["input_ids"].numel()
        record: dict[str, Any] = {"step": completed, "loss": loss, "lr": lr, "grad_norm": norm,
                                  "tokens": tokens * completed,
                                  "tokens_per_s": tokens / (time.perf_counter() - started),
                                  "memory_mb": watch.memory_mb(ctx.device)}
        if completed == first + 1 and resumed is not None:
            record["resumed_from"] = first
        maybe_die(ctx, completed)
        if evals and (completed == config.steps or (config.eval_every and completed % config.eval_every == 0)):
            record["eval_loss"] = evaluate(model, ctx, evals)
        seen.step(record)
        if config.checkpoint_dir and (completed % config.checkpoint_every == 0 or completed == config.steps):
            path = _save(config, ctx, model, optimizer, scaler, stream, completed)
            seen.say(f"checkpoint: {path}")
    if config.export:
        export_pretrained(model, ctx, config.export)
        if ctx.rank == 0:
            inputs.tokenizer.save_pretrained(config.export)  # its files beside the weights (bytes: none)
        seen.say(f"export: {config.export} (loads with AutoModelForCausalLM.from_pretrained on one device)")
    if seen.evals:
        seen.say(f"eval loss after step {seen.evals[-1][0]}: {seen.evals[-1][1]:.6f}")
    name = config.model if is_family(config.model) else Path(config.model).name
    seen.close(f"{name} at {_layout(config, ctx)}, {config.dtype}")
    return losses


def _both(*hooks: Any) -> Any:
    """One after-backward hook calling each of ``hooks`` that is set."""
    def call(model: Any) -> None:
        for hook in hooks:
            if hook is not None:
                hook(model)
    return call


def _print_accounts(ctx: ParallelContext, account: Account) -> None:
    """Every rank's account gathered to rank 0 and printed there as one table (--account)."""
    table = gathered_table(ctx, account)
    if table is not None:
        print("accounting, step 2 of this run (bytes, FLOPs; goose plan predicts these):\n" + table, flush=True)
