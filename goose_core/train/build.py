"""What a job trains: the tokenizer and data, and the model at its layout and precision (the
wrappers in the supported order, the optimizer and loss scaler its dtype needs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from goose_core.amp import GradScaler
from goose_core.data import CORPUS_PATH, TextData, load_tokenizer
from goose_core.data_parallel import DataParallel
from goose_core.distributed.context import ParallelContext
from goose_core.loss import causal_lm_loss
from goose_core.optim import DistributedOptimizer, MasterWeights
from goose_core.pipeline import PipelineParallel
from goose_core.tensor_parallel import TensorParallel
from goose_core.testing.models import EAGER_IN_DTYPE, _uses_attention_interface, build_model as tiny_model
from goose_core.testing.models import seeded_model
from goose_core.testing.widen import widen_float32
from goose_core.train.config import ConfigError, TrainConfig, is_family

__all__ = ["TORCH_DTYPES", "VOCAB_MULTIPLE", "Inputs", "prepare", "build_model", "wrap", "build_optimizer"]

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
        hf_config.num_hidden_layers = layers
        return seeded_model(hf_config, seed, dtype, attention)
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, local_files_only=True,
                                                 attn_implementation=attention)
    model.loss_function = causal_lm_loss  # keeps float64 in a float64 run (see goose_core.loss)
    return (widen_float32(model) if dtype == torch.float64 else model).train()


def wrap(model: nn.Module, ctx: ParallelContext, config: TrainConfig) -> nn.Module:
    """``model`` on ctx's device at ctx's layout, in the supported order: TP, then PP, then DP
    (sizes of 1 skipped)."""
    model = model.to(ctx.device)
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
