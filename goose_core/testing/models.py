"""Tiny Hugging Face causal LMs built from configs with seeded weights: no hub, milliseconds a step."""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from goose_core.data import ByteTokenizer
from goose_core.loss import causal_lm_loss

__all__ = ["FAMILIES", "tiny_config", "build_model"]

VOCAB = ByteTokenizer.vocab_size  # 256: divides by 2, 4 and 8


def _gpt2(dropout: float) -> PretrainedConfig:
    # GPT-2's default bos/eos id (50256) lies outside a byte vocabulary.
    return GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=4, n_head=4,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                      bos_token_id=0, eos_token_id=0)


def _llama(dropout: float) -> PretrainedConfig:
    # GQA: 4 query heads share 2 key/value heads.
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       attention_dropout=dropout)


def _bloom(dropout: float) -> PretrainedConfig:
    return BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=4, n_head=4,
                       hidden_dropout=dropout, attention_dropout=dropout)


#: Family name -> config factory. Every size divides by 2 and 4 (heads, kv-heads, vocab, layers).
FAMILIES: dict[str, Callable[[float], PretrainedConfig]] = {"gpt2": _gpt2, "llama": _llama, "bloom": _bloom}


def tiny_config(family: str, dropout: float = 0.0, **overrides: Any) -> PretrainedConfig:
    """The tiny config of ``family`` with ``overrides`` applied (e.g. ``num_hidden_layers=8``).

    Raises:
        ValueError: an unknown family or an override the config does not have.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    config = FAMILIES[family](dropout)
    config.loss_type = "ForCausalLM"  # name HF's default causal-LM loss explicitly
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    return config


def build_model(family: str, seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float32,
                **overrides: Any) -> PreTrainedModel:
    """A tiny causal LM with weights drawn from ``torch.manual_seed(seed)`` in fp32, cast to
    ``dtype``, on CPU, its loss goose's :func:`~goose_core.loss.causal_lm_loss`.

    The weights are drawn in fp32 whatever ``dtype`` is, so an fp32 and an fp64 model start
    from the same values. The loss is goose's because 🤗's casts the logits to fp32, which
    would make a float64 run an fp32 one where it matters most (and it gives NaN, not 0, for
    a piece of a batch with no target). Eager attention everywhere: Bloom supports nothing
    else, and one attention kernel for all families keeps every comparison about parallelism.
    """
    config = tiny_config(family, dropout, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype)
    model.loss_function = causal_lm_loss
    return model.train()
