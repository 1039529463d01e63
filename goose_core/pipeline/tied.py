"""One weight on two stages: the tied input/output embedding's gradients, summed after backward."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.context import ParallelContext
from goose_core.distributed.missing import naming_missing
from goose_core.metadata import mark_duplicate, wide_grad_of

__all__ = ["TiedGradients"]


class TiedGradients:
    """Sum this backward's gradient of ``param`` between the first and the last stage.

    Only what this backward added is exchanged (a hook collects it), so gradients accumulated over
    several backward calls stay right.

    Args:
        param: the tied weight (the embedding on the first stage, the head on the last).
        group: the process group of the first and the last stage of this pipeline.
    """

    def __init__(self, param: nn.Parameter, group: dist.ProcessGroup) -> None:
        self.param, self.group = param, group
        self.added: Tensor | None = None
        param.register_hook(self._collect)

    @classmethod
    def create(cls, model: nn.Module, ctx: ParallelContext, path: str) -> "TiedGradients | None":
        """The tied weight at ``path`` on the first or the last stage (over
        ``ctx.pipeline_ends_group``); None on a middle stage, or when there is one stage."""
        group = ctx.pipeline_ends_group
        if group is None:
            return None
        weight = model.get_submodule(path).weight
        if dist.get_rank(group) == 1:
            mark_duplicate(weight)  # the last stage's copy: the gradient norm counts it once
        return cls(weight, group)

    def _collect(self, grad: Tensor) -> None:
        # Summed as this stage's own gradient is: in fp32 where it accumulates wider than the
        # parameter (fp32 masters, fp32 buckets), else in the parameter's dtype, so that both
        # stages end with (their sum) + (the other's sum) of the same two numbers.
        if (wide := wide_grad_of(self.param)) is not None:
            grad = grad.to(wide[0])
        self.added = grad.clone() if self.added is None else self.added + grad

    def sync(self) -> None:
        """Add the other stage's contribution to this stage's gradient (collective over the two).

        Runs before data parallelism reduces (the pipeline defers it to the end of its
        backward): averaging over dp is linear, so the summed local gradients average right, and
        ZeRO-1 still finds the whole gradient in ``param.grad``."""
        wide = wide_grad_of(self.param)
        dtype = wide[0] if wide is not None else self.param.dtype
        mine = self.added if self.added is not None else torch.zeros_like(self.param, dtype=dtype)
        both = [torch.empty_like(mine) for _ in range(2)]
        with naming_missing(self.group):
            dist.all_gather(both, mine.contiguous(), group=self.group)
        other = both[1] if dist.get_rank(self.group) == 0 else both[0]
        if wide is not None:
            wide[1]().add_(other)  # into the fp32 sum the backward's own gradients went to
        elif self.param.grad is None:
            self.param.grad = other.clone()  # this stage never used the weight this step
        else:
            self.param.grad.add_(other)
        self.added = None
