"""Tiny Hugging Face causal LMs built from configs with seeded weights: no hub, milliseconds a step."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from goose_core.data import ByteTokenizer
from goose_core.loss import causal_lm_loss
from goose_core.testing.widen import widen_float32

__all__ = ["TINY_MODELS", "EAGER_IN_DTYPE", "tiny_config", "build_model", "seeded_model"]

VOCAB = ByteTokenizer.vocab_size  # 256: divides by 2, 4 and 8


#: The name harness models of families with 🤗's attention interface run attention under.
EAGER_IN_DTYPE = "goose_eager_in_dtype"


def _eager_in_dtype(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Tensor | None, scaling: float, dropout: float = 0.0,
                    **_: Any) -> tuple[Tensor, Tensor]:
    """🤗's eager attention (Llama's) with the softmax in the model's own dtype.

    🤗 computes it in fp32 and casts back, so a float64 model is not float64 where attention
    normalises, and a fully masked row (left padding: a pad position sees no real key) turns
    the fp64 mask minimum into -inf in fp32 and the row into NaN.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(weights.softmax(dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(EAGER_IN_DTYPE, _eager_in_dtype)
AttentionMaskInterface.register(EAGER_IN_DTYPE, eager_mask)


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


#: Tiny model name (its family) -> config factory. Every size divides by 2 and 4 (heads, kv-heads, vocab, layers).
TINY_MODELS: dict[str, Callable[[float], PretrainedConfig]] = {"gpt2": _gpt2, "llama": _llama, "bloom": _bloom}
#: The former name of :data:`TINY_MODELS` (``goose_core.models.FAMILIES`` is the family registry).
FAMILIES = TINY_MODELS


def tiny_config(family: str, dropout: float = 0.0, **overrides: Any) -> PretrainedConfig:
    """The tiny config of ``family`` with ``overrides`` applied (e.g. ``num_hidden_layers=8``).

    Raises:
        ValueError: an unknown family or an override the config does not have.
    """
    if family not in TINY_MODELS:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(TINY_MODELS)}")
    config = TINY_MODELS[family](dropout)
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
    a piece of a batch with no target). Eager attention everywhere (Bloom supports nothing
    else, and one kernel for all families keeps every comparison about parallelism), Llama's
    with its softmax in ``dtype`` (:data:`EAGER_IN_DTYPE`).
    """
    # GPT-2's eager attention already normalises in the model's dtype; Bloom's asks for fp32
    # and has no interface to replace it (a float64 model widens that request: widen.py).
    attention = EAGER_IN_DTYPE if family == "llama" else "eager"
    return seeded_model(tiny_config(family, dropout, **overrides), seed, dtype, attention)


def _uses_attention_interface(config: PretrainedConfig) -> bool:
    """Whether the installed transformers runs ``config``'s family through the attention interface
    (so a registered name such as :data:`EAGER_IN_DTYPE` reaches it). Families move onto it across
    versions: GPT-J's 5.17 looks its attention class up in its own table, which knows only 🤗's
    names. Either fact says yes: the class declares it (``is_backend_compatible``), or the
    family's modeling module imports the interface (some hybrids use it without declaring it)."""
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # not in the auto mapping: let from_config say what it says of it, as before
        return True
    module = sys.modules[model_class.__module__]
    return model_class.is_backend_compatible() or hasattr(module, "ALL_ATTENTION_FUNCTIONS")


def seeded_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 attention: str = EAGER_IN_DTYPE) -> PreTrainedModel:
    """Any 🤗 causal LM config as :func:`build_model` builds the tiny families: weights drawn
    from ``torch.manual_seed(seed)`` in fp32, cast to ``dtype``, goose's loss, train mode; a
    float64 model's own float32 casts (norms, routers, activations, rotary tables) run in float64
    (:func:`~goose_core.testing.widen.widen_float32`), so the model is float64 throughout.

    ``attention``: :data:`EAGER_IN_DTYPE` for families whose attention goes through 🤗's
    attention interface (most), ``"eager"`` for those that implement their own (GPT-2, Bloom).
    :data:`EAGER_IN_DTYPE` asked of a family the installed transformers gives no interface
    (GPT-J at 5.17) builds its own ``"eager"``.
    """
    if attention == EAGER_IN_DTYPE and not _uses_attention_interface(config):
        attention = "eager"  # the family has no other; a registered name would be a KeyError in its own table
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(dtype)
    model.loss_function = causal_lm_loss
    widen_float32(model)  # a float64 model's float32 casts stay float64 (see widen.py)
    return model.train()
