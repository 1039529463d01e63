"""ExpertParallel: each EP rank keeps num_experts / E of every MoE layer's experts, and tokens travel to them.

What changes, in place, per rank of the expert-parallel group (parameter names unchanged)::

    each 🤗 experts module      (N, ...) parameters   -> rows [r*N/E, (r+1)*N/E) of each, marked
      (3-D gate_up_proj /                                with the EDP group (their gradients'),
       down_proj, biases)       forward               -> dispatch: all-to-all, 🤗's own forward on
                                                         the local experts, all-to-all back, combine
    the router, its top-k,      unchanged: every rank routes its own tokens with the family's code
      bias, scaling
    shared experts, attention   unchanged (dense: data-parallel over the whole dp group)
    the router loss             exact over the dp group (:mod:`.router_loss`), when the family adds one

Apply it first (before TensorParallel, PipelineParallel, DataParallel): the later wrappers read
the marks it leaves.
"""

from __future__ import annotations

import inspect
import sys
from types import MethodType
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.context import ParallelContext
from goose_core.expert_parallel.dispatch import Routes, dispatch
from goose_core.expert_parallel.router_loss import install_router_loss
from goose_core.metadata import mark_expert, parameters_changed

__all__ = ["ExpertParallel", "expert_load", "experts_modules", "is_expert_parallel", "random_routing"]

_SIGNATURE = ("hidden_states", "top_k_index", "top_k_weights")


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The 🤗 experts modules of ``model``: ``num_experts`` stacked in the leading dimension of
    their parameters, called as ``experts(hidden_states, top_k_index, top_k_weights)``."""
    found = []
    for name, module in model.named_modules():
        n = getattr(module, "num_experts", None)
        params = list(module.parameters(recurse=False))
        if not isinstance(n, int) or not params or any(p.dim() < 2 or p.shape[0] != n for p in params):
            continue
        if tuple(inspect.signature(type(module).forward).parameters)[1:4] == _SIGNATURE:
            found.append((name, module))
    return found


def expert_load(model: nn.Module) -> dict[str, list[int]]:
    """Per experts module, the rows each of this rank's experts computed in the last forward
    (from every EP rank): the balance the router reached, per step."""
    return {name: list(getattr(m, "goose_expert_load", [])) for name, m in model.named_modules()
            if hasattr(m, "goose_experts")}


def random_routing(model: nn.Module) -> str | None:
    """Why ``model``'s router draws random numbers per token in training, or None: a jitter its
    config turns on (Mixtral's, PhiMoE's ``router_jitter_noise``), or PhiMoE's sparsemixer, which
    samples its top-k (``torch.rand_like``) whatever the jitter."""
    config = getattr(model, "config", None)
    for attr in ("router_jitter_noise", "input_jitter_noise"):
        if getattr(config, attr, 0):
            return f"config.{attr}={getattr(config, attr)}"
    for _, module in model.named_modules():
        if hasattr(sys.modules[type(module).__module__], "sparsemixer"):
            return f"{type(module).__module__}.sparsemixer samples each token's experts"
    return None


def is_expert_parallel(model: nn.Module) -> bool:
    """Whether :class:`ExpertParallel` spread this model's experts."""
    return bool(getattr(model, "goose_expert_parallel", False))


class ExpertParallel:
    """Expert parallelism over ``ctx``'s expert-parallel group (``ParallelContext(...,
    expert_parallel_size=E)``), in place on a 🤗 mixture-of-experts causal LM.

    Args:
        model: a 🤗 MoE model whose experts modules hold every expert as stacked parameters
            (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...).
        ctx: the parallel context; its ``experts`` groups are used.

    Raises:
        ValueError: the model has no such experts module (its family keeps each expert in its own
            module or routes inside one opaque forward), or E does not divide its expert count.
    """

    def __init__(self, model: nn.Module, ctx: ParallelContext) -> None:
        self.model, self.ctx = model, ctx
        self.modules = experts_modules(model)
        size = ctx.experts.size
        if not self.modules:
            raise ValueError(f"{type(model).__name__} has no experts module that expert parallelism can "
                             f"dispatch to (stacked (num_experts, ...) parameters, called as "
                             f"experts(hidden_states, top_k_index, top_k_weights)): train it with "
                             f"expert_parallel_size=1 (tensor parallelism slices its experts)")
        if ctx.data_parallel_size > 1 and (why := random_routing(model)):
            raise ValueError(f"{type(model).__name__} routes at random in training ({why}): each dp rank "
                             f"draws its own numbers for its shard of the batch, not the single device's "
                             f"for the whole batch; set it to 0 (or call model.eval()), or train without "
                             f"data and expert parallelism")
        for name, module in self.modules:
            if module.num_experts % size:
                raise ValueError(f"{name} holds {module.num_experts} experts, which "
                                 f"expert_parallel_size={size} does not divide: choose a divisor of "
                                 f"{module.num_experts}")

    def gradient_group(self) -> dist.ProcessGroup:
        """The group an expert's gradient is reduced over: the ranks holding the same experts."""
        return self.ctx.experts.edp_group

    def parallelize(self) -> nn.Module:
        """Keep this rank's experts, route tokens to the others', and return the model."""
        if is_expert_parallel(self.model):
            raise ValueError("this model is already expert-parallel: call parallelize() once")
        groups = self.ctx.experts
        if groups.size > 1:
            for _, module in self.modules:
                self._localize(module, groups.size, groups.rank, groups.ep_group)
        install_router_loss(self.model, self.ctx)
        self.model.goose_expert_parallel = True
        parameters_changed(self.model)
        return self.model

    def _localize(self, module: nn.Module, size: int, rank: int, group: dist.ProcessGroup) -> None:
        total = module.num_experts
        local = total // size
        for name, param in list(module.named_parameters(recurse=False)):
            piece = nn.Parameter(param.detach()[rank * local:(rank + 1) * local].clone(),
                                 requires_grad=param.requires_grad)
            setattr(module, name, mark_expert(piece, self.gradient_group()))
        module.num_experts = local  # 🤗's forward loops over the local experts only
        own = type(module).forward

        def forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                    top_k_weights: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            def experts(rows: Tensor, index: Tensor, weights: Tensor) -> Tensor:
                return own(self, rows, index, weights, *args, **kwargs)
            def record(routes: Routes) -> None:
                self.goose_expert_load = routes.received.sum(0).tolist()
            return dispatch(hidden_states, top_k_index, top_k_weights, total, experts, group, record)

        module.forward = MethodType(forward, module)
        module.goose_experts = (rank * local, local, total)  # first expert, how many, of how many
