"""Model FLOPs of a training step and model FLOPs utilisation (MFU).

The count is the matmuls' (2 FLOPs per multiply-add), as PaLM (appendix B) and torchtitan count:

    FLOPs per step = tokens x (6 N + 12 L d T)

    N  weights that multiply activations: every nn.Linear / Conv1D weight of the model, the LM
       head once whether tied to the embedding or not (the lookup is no matmul); biases, norms
       and the embedding lookup are left out (under 1% at these sizes)
    6  2 for the forward, 4 for the backward (the input's gradient and the weight's)
    L  layers; d = attention heads x head dim (the query width, so grouped-query attention's
       smaller keys and values do not shrink it); T the sequence length
    12 L d T  the attention scores Q K^T and their use A V, 2 T d each per token and layer in
       the forward, x3 with the backward; counted in full, without halving for the causal mask

MFU = FLOPs per step / step time / peak FLOP/s. Recomputation under activation checkpointing
is *not* counted (that would be hardware FLOPs utilisation): checkpointing lowers MFU by the
time it spends recomputing, which is the cost it should show.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

__all__ = ["matmul_parameters", "attention_width", "training_flops", "mfu"]


def matmul_parameters(model: nn.Module) -> int:
    """N: the weights of every nn.Linear and transformers Conv1D module (a tied LM head counts once
    as the matmul it is, though its weight is the embedding's)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)))


def attention_width(config: PretrainedConfig) -> int:
    """d: attention heads x head dim (GPT-2's configs have no head_dim: hidden size / heads)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def training_flops(model: nn.Module, batch_size: int, seq_len: int) -> int:
    """Model FLOPs of one training step (forward and backward) on ``batch_size`` sequences of
    ``seq_len`` tokens: tokens x (6 N + 12 L d T), see the module docstring."""
    config = model.config
    tokens = batch_size * seq_len
    return tokens * (6 * matmul_parameters(model) + 12 * config.num_hidden_layers * attention_width(config) * seq_len)


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: the fraction of the peak that the model's FLOPs reach."""
    if step_seconds <= 0 or peak_flops_per_second <= 0:
        raise ValueError(f"MFU needs a positive step time and peak, got {step_seconds} s and "
                         f"{peak_flops_per_second} FLOP/s")
    return flops_per_step / step_seconds / peak_flops_per_second
