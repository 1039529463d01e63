"""The job: tokenizer and data, the model at its layout and precision, resume, the step loop,
checkpoints, evaluation, export. ``run(config)`` on every rank."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from goose_core.amp import GradScaler
from goose_core.checkpoint import export_pretrained, load_checkpoint, save_checkpoint
from goose_core.data import CORPUS_PATH, BatchStream, TextData, load_tokenizer
from goose_core.data_parallel import DataParallel
from goose_core.distributed.context import ParallelContext
from goose_core.loss import causal_lm_loss
from goose_core.optim import DistributedOptimizer, MasterWeights
from goose_core.pipeline import PipelineParallel
from goose_core.tensor_parallel import TensorParallel
from goose_core.testing.models import EAGER_IN_DTYPE, _uses_attention_interface, build_model as tiny_model
from goose_core.testing.widen import widen_float32
from goose_core.train import checkpoints, watch
from goose_core.train.config import ConfigError, TrainConfig, is_family
from goose_core.train.loop import evaluate, maybe_die, step
from goose_core.train.schedule import lr_at

__all__ = ["TORCH_DTYPES", "VOCAB_MULTIPLE", "Inputs", "prepare", "build_model", "wrap", "build_optimizer",
           "run"]

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bf16": torch.bfloat16,
                "fp16": torch.float16}
#: A tiny family's vocabulary is the tokenizer's rounded up to this (as Megatron pads it): every
#: tp size up to 128 then splits the embedding evenly.
VOCAB_MULTIPLE = 128


@dataclass
class Inputs:
    """What every rank prepares before any process group: the tokenizer and the packed data."""

    tokenizer: Any
    data: Any


def prepare(config: TrainConfig) -> Inputs:
    """The tokenizer and the packed, split data; a vocabulary the model cannot embed is refused.

    Raises:
        ConfigError: the tokenizer's ids do not fit the model folder's vocabulary.
    """
    folder = None if is_family(config.model) else config.model
    tokenizer = load_tokenizer(tokenizer=config.tokenizer or None, model=folder)
    cache = config.data_cache or (str(Path(config.checkpoint_dir) / "tokens") if config.checkpoint_dir else None)
    data = TextData(config.data or [str(CORPUS_PATH)], tokenizer, config.seq_len,
                    eval_fraction=config.eval_fraction, seed=config.seed, cache_dir=cache)
    if len(data.train) < config.batch_size:
        raise ConfigError(f"--data holds {len(data.train)} training windows of --seq-len {config.seq_len}, fewer "
                          f"than --batch-size {config.batch_size}; give more text or shorter windows")
    if folder is not None:
        vocab = AutoConfig.from_pretrained(folder, local_files_only=True).vocab_size
        if tokenizer.vocab_size > vocab:
            raise ConfigError(f"the tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but --model "
                              f"{folder!r} embeds {vocab}; pass the model's own tokenizer (--tokenizer)")
    return Inputs(tokenizer, data)


def build_model(config: TrainConfig, vocab_size: int, dtype: torch.dtype, seed: int | None = None,
                layers: int | None = None) -> PreTrainedModel:
    """The model on one device, before any wrapper: a local folder's weights, or a seeded tiny
    family sized to the tokenizer (``layers`` shrinks either; then its weights are seeded)."""
    seed = config.seed if seed is None else seed
    if is_family(config.model):
        overrides: dict[str, Any] = {"vocab_size": -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE}
        positions = {"llama": "max_position_embeddings", "gpt2": "n_positions"}.get(config.model)
        if positions is not None:
            overrides[positions] = max(128, config.seq_len)
        if layers is not None:
            overrides["num_hidden_layers" if config.model == "llama" else "n_layer"] = layers
        return tiny_model(config.model, seed, 0.0, dtype, **overrides)
    hf_config = AutoConfig.from_pretrained(config.model, local_files_only=True)
    attention = EAGER_IN_DTYPE if _uses_attention_interface(hf_config) else "eager"
    if layers is not None:
        from goose_core.testing.models import seeded_model

        hf_config.num_hidden_layers = layers
        return seeded_model(hf_config, seed, dtype, attention)
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, local_files_only=True,
                                                 attn_implementation=attention)
    model.loss_function = causal_lm_loss  # keeps float64 in a float64 run (see goose_core.loss)
    return (widen_float32(model) if dtype == torch.float64 else model).train()


def wrap(model: nn.Module, ctx: ParallelContext, config: TrainConfig) -> nn.Module:
    """``model`` at ctx's layout, in the supported order: TP, then PP, then DP (sizes of 1 skipped)."""
    if ctx.tensor_parallel_size > 1:
        model = TensorParallel(model, ctx).parallelize()
    if ctx.pipeline_parallel_size > 1:
        model = PipelineParallel(model, ctx, num_microbatches=config.microbatches, schedule=config.schedule,
                                 recompute=config.recompute).parallelize()
    if ctx.data_parallel_size > 1:
        model = DataParallel(model, ctx).parallelize()
    return model


def build_optimizer(model: nn.Module, ctx: ParallelContext, config: TrainConfig,
                    dtype: torch.dtype) -> tuple[Any, GradScaler | None]:
    """AdamW over the wrapped model: ZeRO-1's shards if ``--zero`` (they keep fp32 masters of a
    low-precision model), else fp32 MasterWeights for bf16/fp16; fp16 also scales the loss."""
    plain = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    low = dtype in (torch.bfloat16, torch.float16)
    optimizer = DistributedOptimizer(plain, ctx) if config.zero else MasterWeights(plain) if low else plain
    return optimizer, GradScaler(ctx) if dtype == torch.float16 else None


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


def run(config: TrainConfig, after_backward: Any = None) -> list[float]:
    """Train ``config`` (validated) on this rank; returns this run's losses.

    ``after_backward(model)`` runs after every backward (tests plant bugs with it)."""
    hf_logging.disable_progress_bar()
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
        from goose_core.train.verify import verify

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
        loss, norm = step(model, optimizer, ctx, batch, lr, config.clip, config.microbatches, scaler,
                          after_backward)
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
