"""The causal-LM loss as goose computes it: a token-weighted sum over one denominator.

A single device takes the mean over every non-ignored target token of the global batch. Cut the
batch into data-parallel shards or micro-batches and the mean of per-piece means differs from
it whenever the pieces hold different numbers of real tokens (padding, ``-100`` labels). goose
follows 🤗's ``num_items_in_batch`` convention instead: every piece returns
``sum of its token losses / num_items_in_batch``, where ``num_items_in_batch`` counts the
targets of the whole batch, so the pieces' losses (and gradients) add up to the single-device
mean, and a piece with no target contributes exactly 0, never 0/0::

    tokens    [a b c d | e f _ _]        _ = -100 (padding)     N = 6 targets after the shift
    pieces    sum(a..d)/N  +  sum(e f)/N  = the one-device mean

The loss keeps the logits' precision when it is fp32 or wider (🤗's own loss casts to fp32,
which would turn a float64 reference run into an fp32 one) and upcasts half types to fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "targets_of", "count_items", "loss_dtype", "nonzero", "causal_lm_loss"]

#: The label of a token that is not a target (🤗 and ``F.cross_entropy``'s default).
IGNORE_INDEX = -100


def targets_of(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The target of every position: position t predicts token t+1; the last has none."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def count_items(labels: Tensor, ignore_index: int = IGNORE_INDEX, shifted: bool = False) -> Tensor:
    """How many targets ``labels`` (unshifted, as passed to the model; ``shifted``: already each
    position's target) hold: an int64 scalar."""
    return ((labels if shifted else targets_of(labels, ignore_index)) != ignore_index).sum()


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the loss is computed in: ``dtype`` if fp32 or wider, else fp32."""
    return dtype if torch.finfo(dtype).bits >= 32 else torch.float32


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int | None = None,
                   num_items_in_batch: Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                   shift_labels: Tensor | None = None, **_: Any) -> Tensor:
    """🤗's ``ForCausalLMLoss`` (same signature, installable as ``model.loss_function``), except
    that it keeps float64 logits in float64 and returns 0 rather than NaN when there is no target.

    Args:
        num_items_in_batch: the denominator, the number of targets of the whole batch this piece
            belongs to; ``None`` counts this call's own targets (the plain mean).
    """
    targets = shift_labels if shift_labels is not None else targets_of(labels, ignore_index)
    targets = targets.to(logits.device)
    flat = logits.to(loss_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
    total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (targets != ignore_index).sum()
    return total / nonzero(num_items_in_batch, total.device)


def nonzero(num_items_in_batch: Tensor | float, device: torch.device | None = None) -> Tensor | float:
    """The denominator ``num_items_in_batch`` with 0 replaced by 1 (a tensor moved to ``device``).

    With no target the token-loss sum is exactly 0, and 0/1 keeps it 0 where 0/0 would be NaN.
    Only 0 is replaced, not everything below 1: data parallelism passes ``N / dp``, which is
    fractional when a global batch holds fewer targets than there are ranks.
    """
    if torch.is_tensor(num_items_in_batch):
        n = num_items_in_batch.to(device) if device is not None else num_items_in_batch
        return n.masked_fill(n == 0, 1)
    return num_items_in_batch if num_items_in_batch != 0 else 1
