"""Styles that keep the family's module and add the collectives around it: experts, norms, MLA.

The module's own forward runs unchanged (its routing, its activation, its parameter names);
forward hooks put Megatron's conjugate collectives at its edges::

    moe_tp_experts / all_reduce      every expert's weights split (the plan's parameter entries)
        hidden, top_k_weights --f-->  experts.forward (each rank: its slice of every expert)
                                   --g-->  sum of the partial outputs (one all-reduce)
    moe_identity_expert              inside the experts: input / tp, so g adds back one copy
    replicated_with_grad_allreduce   a replicated norm on split heads (Qwen3's q_norm): each rank's
                                     gradient covers its heads only -> all-reduce the gradient
    mla_kv_a_proj                    replicated kv_a; its rope part feeds every rank's heads
                                     directly -> f on that part (the rest meets kv_b's own f)

``f`` goes on every floating input of a partial-sum module: each rank's output depends on the
whole input through its own slice only, so the input gradient is the sum over ranks. Inputs
narrower than the widest one are widened first (Mixtral's router hands float32 weights to
float64 experts): the partial gradients are then summed wide and rounded once, as on one
device, instead of being rounded on every rank before the sum. The widening is exact, and the
experts promote to the wide dtype anyway.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.collectives import copy_to_region, reduce_from_region
from goose_core.tensor_parallel.layers import split_parameter
from goose_core.tensor_parallel.plan import param_split
from goose_core.tensor_parallel.sequence import sum_grads_over

__all__ = ["split_parameters", "partial_sum", "identity_expert", "all_reduce_grads", "mla_kv_a_proj"]


def _map_floats(fn: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def one(x: Any) -> Any:
        return fn(x) if isinstance(x, Tensor) and x.is_floating_point() else x
    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def split_parameters(module: nn.Module, styles: dict[str, str], group: dist.ProcessGroup) -> None:
    """Replace ``module``'s own parameters named in ``styles`` (local name -> parameter style) by
    this rank's piece; ``replicate`` (and a vector under a row style) stays whole."""
    for name, style in styles.items():
        param = module._parameters[name]
        assert param is not None
        split = param_split(style, param.dim())
        if split is not None:
            setattr(module, name, split_parameter(param, split[0], group, blocks=split[1]))


def partial_sum(module: nn.Module, group: dist.ProcessGroup) -> None:
    """``moe_tp_experts`` / ``all_reduce``: the module's output on each rank is its share of a sum
    (its slice of every expert): f on the floating inputs, g on the output."""

    def enter(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        floats = [x for x in (*args, *kwargs.values()) if isinstance(x, Tensor) and x.is_floating_point()]
        wide = functools.reduce(torch.promote_types, (x.dtype for x in floats), floats[0].dtype) if floats else None
        return _map_floats(lambda x: copy_to_region(x.to(wide), group), args, kwargs)

    def leave(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(f"{type(mod).__name__} returned {type(output).__name__}; goose's partial-sum "
                            f"styles (moe_tp_experts, all_reduce) sum one output tensor over the tp ranks")
        return reduce_from_region(output, group)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True)


def identity_expert(module: nn.Module, tp: int) -> None:
    """``moe_identity_expert``: an expert that returns its input, called inside a
    ``moe_tp_experts`` module whose output g sums over tp ranks: divide the input by tp."""

    def enter(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _map_floats(lambda x: x / tp, args, kwargs)

    module.register_forward_pre_hook(enter, with_kwargs=True)


def all_reduce_grads(module: nn.Module, group: dist.ProcessGroup) -> None:
    """``replicated_with_grad_allreduce``: every parameter of ``module`` is whole on each rank
    but meets only this rank's heads, so its gradient is summed over the tp group.

    A hook on the leaf fires once per backward with that backward's gradient (before it is
    accumulated), so gradient accumulation and pipeline micro-batches each sum only their own."""
    sum_grads_over(list(module.parameters()), group)


def mla_kv_a_proj(module: nn.Module, rope_dim: int, group: dist.ProcessGroup) -> None:
    """``mla_kv_a_proj``: DeepSeek-style ``kv_a_proj_with_mqa`` stays whole; the last ``rope_dim``
    features of its output (k_rot) go straight to this rank's heads, so f on them sums their
    gradient over the ranks (the rest goes through ``kv_b_proj``, a column layer with its own f)."""

    def leave(mod: nn.Module, args: tuple, output: Tensor) -> Tensor:
        rest, rope = output.split([output.shape[-1] - rope_dim, rope_dim], dim=-1)
        return torch.cat([rest, copy_to_region(rope, group)], dim=-1)

    module.register_forward_hook(leave)
