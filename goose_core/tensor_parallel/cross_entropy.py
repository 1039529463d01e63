"""Vocab-parallel cross-entropy: the loss of vocab-split logits, without ever gathering them.

Rank r holds the logits of vocabulary rows ``[r V/tp, (r+1) V/tp)``. Softmax cross-entropy
needs only three numbers per token, each a max or a sum over the vocabulary, so two small
all-reduces replace a gather of the whole ``(tokens, V)`` logits::

    m      = max_v z_v                      all-reduce MAX   (for a stable exp)
    z_t    = z_target - m                   only the owner of the target id has it, others 0
    S      = sum_v exp(z_v - m)             } one all-reduce SUM of the pair (z_t, S)
    loss   = log S - z_t

    d loss / d z_v = softmax(z)_v - [v == target]     local: each rank its own columns

Tokens whose label is ``ignore_index`` get loss 0 and gradient 0. :class:`VocabParallelCausalLMLoss`
adds HF's label shift and the token-weighted reduction of :mod:`goose_core.loss` (the sum over
``num_items_in_batch``, 0 for no target), so it can be installed as an HF model's ``loss_function``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from goose_core.loss import loss_dtype, nonzero, targets_of
from goose_core.distributed.missing import naming_missing

__all__ = ["vocab_parallel_cross_entropy", "VocabParallelCausalLMLoss"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, group: dist.ProcessGroup,
                ignore_index: int) -> Tensor:
        rows = logits.shape[-1]
        start = dist.get_rank(group) * rows
        logits_max = logits.detach().amax(dim=-1)
        with naming_missing(group):
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        valid = target != ignore_index
        owned = valid & (target >= start) & (target < start + rows)
        local = (target - start).masked_fill(~owned, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)

        exp = shifted.exp()
        stats = torch.stack([target_logit, exp.sum(dim=-1)])
        with naming_missing(group):
            dist.all_reduce(stats, group=group)
        target_logit, sum_exp = stats[0], stats[1]

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, owned, valid)
        return (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None, None]:
        softmax, local, owned, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -owned.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, group: dist.ProcessGroup,
                                 ignore_index: int = -100) -> Tensor:
    """Per-token cross-entropy of vocab-split ``logits`` ``(..., V/tp)`` against ``target`` ``(...)``.

    Returns the unreduced loss, 0 where ``target == ignore_index``, identical on every tp rank.
    """
    if dist.get_world_size(group) == 1:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)


class VocabParallelCausalLMLoss:
    """HF's ``ForCausalLMLoss`` on vocab-split logits: installed as ``model.loss_function``.

    Keeps HF's contract: labels are shifted left by one (or ``shift_labels`` is used as given),
    ``ignore_index`` tokens are left out, the mean is over counted tokens or
    ``sum / num_items_in_batch`` when the caller passes it (data parallelism, micro-batches,
    gradient accumulation). As :func:`goose_core.loss.causal_lm_loss`: fp32 and wider logits keep
    their precision, and no target gives 0, not NaN.

    Args:
        group: the tensor-parallel group the vocabulary is split over.
        vocab_size: the full vocabulary; each rank's logits must hold ``vocab_size / tp`` of it.
    """

    def __init__(self, group: dist.ProcessGroup, vocab_size: int) -> None:
        self.group, self.vocab_size = group, vocab_size

    def __call__(self, logits: Tensor, labels: Tensor, vocab_size: int | None = None,
                 num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100,
                 shift_labels: Tensor | None = None, **_: Any) -> Tensor:
        rows = self.vocab_size // dist.get_world_size(self.group)
        if logits.shape[-1] != rows:
            raise ValueError(f"vocab-parallel loss expects logits with {rows} vocabulary columns "
                             f"(vocab {self.vocab_size} / tp), got {logits.shape[-1]}")
        if shift_labels is None:
            shift_labels = targets_of(labels, ignore_index)
        shift_labels = shift_labels.to(logits.device)
        per_token = vocab_parallel_cross_entropy(logits.to(loss_dtype(logits.dtype)), shift_labels,
                                                 self.group, ignore_index)
        if num_items_in_batch is None:
            num_items_in_batch = (shift_labels != ignore_index).sum()
        return per_token.sum() / nonzero(num_items_in_batch, per_token.device)
