"""The first backward's check that every replicated parameter got one gradient on all tp ranks.

A parameter tensor parallelism leaves whole (a norm on the residual stream, a position table, a
router) must end each backward with the same gradient on every tp rank: it is one value in the
single-device model. It does when it only ever meets replicated activations. One that meets
tp-split activations instead (a learnable activation inside the MLP, a per-head norm on split
heads that the plan forgot to mark ``replicated_with_grad_allreduce``) gets each rank's partial
gradient, and the replicas drift apart: a silently wrong model. No plan can list every such
parameter ahead of time, so goose measures it once::

    first backward   post-accumulate hook: checksum of p.grad (position-weighted, float64)
    end of backward  one all-reduce over tp of [sums, -sums] (MAX): max != min -> ValueError

The error is raised on every tp rank alike (they all see the same max and min) from the first
``loss.backward()``, so no optimizer step has run. The hooks run before DataParallel's and
ZeRO-1's, which may move ``.grad`` away.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.batch_check import extremes
from goose_core.metadata import shard_spec

__all__ = ["ReplicaGradCheck"]


def _checksum(grad: Tensor) -> float:
    flat = torch.nan_to_num(grad.detach().reshape(-1).double())
    return float((flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)).sum())


class ReplicaGradCheck:
    """Compare the first backward's gradient of ``model``'s whole (unsharded) parameters over
    ``group``; raise naming those that differ. Installed by ``TensorParallel`` at tp > 1."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group, self.device = group, device
        whole = [(name, p) for name, p in model.named_parameters() if p.requires_grad and shard_spec(p) is None]
        self.names = sorted(name for name, _ in whole)  # names only: a stage may drop the modules
        self.sums: dict[str, float] = {}
        self.queued = False
        self.handles = [p.register_post_accumulate_grad_hook(self._record(name)) for name, p in whole]

    def _record(self, name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if param.grad is not None:
                self.sums.setdefault(name, _checksum(param.grad))
            if not self.queued:
                self.queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self.compare)
        return hook

    def compare(self) -> None:
        """Remove the hooks; raise on every rank if some replicated gradient differs over tp."""
        for handle in self.handles:
            handle.remove()
        names = self.names
        sums = torch.tensor([self.sums.get(n, 0.0) for n in names], dtype=torch.float64, device=self.device)
        high, low = extremes(sums, [self.group])
        differ = [n for n, h, l in zip(names, high.tolist(), low.tolist()) if h != l]
        if differ:
            raise ValueError(
                f"tensor parallelism left these parameters whole, but their gradients differ "
                f"between tp ranks in the first backward: {differ[:6]}{' ...' if len(differ) > 6 else ''}. "
                f"They meet tp-split activations, so each rank holds a partial gradient and the "
                f"replicas would drift apart. Declare them in the plan "
                f"(config.base_model_tp_plan): 'replicated_with_grad_allreduce' for a module whose "
                f"whole weights act on split heads, or split them with the layers they belong to")
