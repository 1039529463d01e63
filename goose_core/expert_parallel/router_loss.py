"""The router's load-balancing loss over the whole data-parallel batch, as one device computes it.

🤗's auxiliary loss is ``coef * E * sum_e (tokens_e / rows) * (probs_e / rows)``: sums over every
token of the batch (:mod:`goose_core.pipeline.router_loss` mirrors them). Each dp rank holds a
shard, so its own aux loss is another function; the exact one needs the sums of the whole batch::

    rank r:  sums_r = (tokens_r, probs_r, rows_r)   all_reduce(detached) ─► (tokens, probs, rows)
             loss_r = lm_r + value(tokens, probs, rows)            (the same on every rank)
                           + dp * coef * E * sum_e tokens_e / rows^2 * (probs_r,e - detached)

The last line is zero in value; its gradient is rank r's share of the exact gradient times dp,
which DataParallel's averaging over dp (it divides by dp) turns into the exact gradient:
``d aux / d probs_e = coef * E * tokens_e / rows^2`` depends on the counts only, and the counts
(top-k choices, unmasked rows) carry no gradient. Its value is 🤗's to the bit: the float32
``probs`` are summed over the whole batch's rows at once (:func:`_whole_batch_probs`, as
:mod:`goose_core.pipeline.router_loss` does across micro-batches). Per step: one all-reduce of
2E + 1 floats, one all-gather of layers x tokens x E float32 probabilities. With pipeline
parallelism the stages add the same terms (:meth:`RouterLoss.finish` with its ``dp_group``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from goose_core.distributed.context import ParallelContext
from goose_core.metadata import set_router_loss_over_dp
from goose_core.pipeline.router_loss import RouterLoss, gather_rows, router_loss_of

__all__ = ["install_router_loss", "exact_over_dp"]


def exact_over_dp(router: RouterLoss, logits: list[torch.Tensor], attention_mask: torch.Tensor | None,
                  group: dist.ProcessGroup) -> torch.Tensor:
    """``coef * aux`` of the whole dp batch in value; rank's share of its gradient times dp."""
    rows: list[torch.Tensor] = []
    mine = router.add(router.zeros(logits[0].device), logits, attention_mask, lambda k, r: rows.append(r))
    whole = mine.detach().clone()
    dist.all_reduce(whole, group=group)
    e, dp = router.num_experts, dist.get_world_size(group)
    whole[e:2 * e] = _whole_batch_probs(rows, group)
    share = router.loss(torch.cat([whole[:e], mine[e:2 * e], whole[2 * e:]]))
    return router.loss(whole) + dp * (share - share.detach())


def _whole_batch_probs(rows: list[torch.Tensor], group: dist.ProcessGroup) -> torch.Tensor:
    """🤗's float32 ``probs``, to the bit: each layer's probability rows of every dp rank, in
    batch order (dp rank order), summed at once, then the layers added in order. (The sum of the
    ranks' float32 sums rounds differently, ~1e-8 relative.)"""
    batch = gather_rows(torch.stack(rows), group)  # [layers, T, E]
    probs = torch.zeros(batch.shape[2], dtype=torch.float32, device=batch.device)
    for layer in batch:
        probs = probs + layer.sum(dim=0)  # 🤗's layer loop
    return probs


def install_router_loss(model: nn.Module, ctx: ParallelContext) -> None:
    """Make ``model``'s loss carry the exact router loss over the dp group (nothing to do at dp 1
    or for a family that adds none).

    With pipeline parallelism the stages carry the sums (:mod:`goose_core.pipeline.router_loss`):
    the mark left here makes PipelineParallel add them over the dp group too.
    """
    router = router_loss_of(model)
    if router is None:  # the forward adds none (DeepSeek-V3's aux-loss-free routing): exact as it is
        set_router_loss_over_dp(model)
        return
    if ctx.data_parallel_size == 1:
        return
    if ctx.pipeline_parallel_size > 1:  # the model's forward never runs whole: the stages add it
        set_router_loss_over_dp(model)
        return
    group = ctx.data_parallel_group

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        aux, logits = getattr(output, "aux_loss", None), getattr(output, "router_logits", None)
        if getattr(output, "loss", None) is None or aux is None or not logits:
            return output
        exact = exact_over_dp(router, list(logits), kwargs.get("attention_mask"), group)
        output.loss = output.loss - router.coef * aux.to(output.loss.device) + exact.to(output.loss.dtype)
        return output

    # prepend: inside the model's call as seen by its other hooks (a float64 test model's widening
    # is left by a forward hook: the sums are then float64, as 🤗's are inside the forward).
    model.register_forward_hook(hook, with_kwargs=True, prepend=True)
    set_router_loss_over_dp(model)
