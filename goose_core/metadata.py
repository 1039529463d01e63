"""What goose records on parameters and models: typed accessors, the one home of the attribute names.

Wrappers leave facts on the tensors and modules they change, and other wrappers read them::

    fact                                    accessors                       set by -> read by
    how tensor parallelism cut a parameter  ShardSpec, mark_sharded,        tensor_parallel.layers ->
                                              shard_spec                      state, optim.clip, optim.zero
    a tied copy, counted on another stage   mark_duplicate, is_duplicate    pipeline.tied ->
                                                                              optim.clip, optim.zero
    a ZeRO-1 flat shard (disjoint over dp)  mark_dp_shard, is_dp_shard      optim.zero -> optim.clip
    where ZeRO-1 holds a parameter's grad   set_grad_shards, grad_shards    optim.zero -> optim.clip
    the GradSync averaging a parameter      link_grad_sync, grad_sync_of,   data_parallel.reducer ->
                                              grad_syncs                      pipeline.stage, optim.zero
    the GradSync of a model                 set_module_grad_sync,           data_parallel.wrapper ->
                                              module_grad_sync,               tensor_parallel, pipeline
                                              parameters_changed
    a model's same-batch check              set_batch_check, batch_check_of distributed.batch_check
    save_pretrained refusing a split model  mark_split_guard, is_split_guard checkpoint.export
    the finite check of a model / tensor    set_finite_watch, finite_watch  finite (wrappers, optim.zero,
                                                                              optim.master)
    an optimizer keeping its own copy of a  link_keeper, keepers_of         optim.zero, optim.master ->
      parameter (ZeRO-1 shard, fp32 master)                                   checkpoint.io
    where a gradient accumulates wider than set_wide_grad, wide_grad_of     data_parallel.reducer,
      its parameter (fp32 slot or master)                                     optim.master -> pipeline.tied
    an expert held by some ranks only: its  mark_expert, expert_group_of    expert_parallel ->
      gradient's group (expert data par.)                                     data_parallel, optim.clip
    a model whose router loss is exact      set_router_loss_over_dp,        expert_parallel ->
      over the dp group                       router_loss_over_dp             data_parallel, pipeline

Each fact is one ``_goose_*`` attribute, named here alone. A fact is not carried over when a
wrapper replaces a parameter: whoever makes the new one marks it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Protocol, TypeVar

import torch
from torch import Tensor, nn

from goose_core.grad_sync import GradSync

__all__ = ["ShardSpec", "mark_sharded", "shard_spec", "mark_duplicate", "is_duplicate", "mark_dp_shard",
           "is_dp_shard", "set_grad_shards", "grad_shards", "link_grad_sync", "unlink_grad_sync",
           "grad_sync_of", "grad_syncs", "set_module_grad_sync", "module_grad_sync", "parameters_changed",
           "set_batch_check", "batch_check_of", "mark_split_guard", "is_split_guard", "set_finite_watch",
           "finite_watch", "CopyKeeper", "link_keeper", "keepers_of", "set_wide_grad", "clear_wide_grad",
           "wide_grad_of", "mark_expert", "expert_group_of",
           "set_router_loss_over_dp", "router_loss_over_dp"]

T = TypeVar("T")


class _Fact(Generic[T]):
    """One fact on an object, stored as the attribute ``_goose_<name>``."""

    def __init__(self, name: str) -> None:
        self.attr = f"_goose_{name}"

    def get(self, obj: object) -> T | None:
        return getattr(obj, self.attr, None)

    def set(self, obj: object, value: T) -> None:
        setattr(obj, self.attr, value)

    def clear(self, obj: object) -> None:
        if hasattr(obj, self.attr):
            delattr(obj, self.attr)


# -- tensor parallelism ----------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """How a tensor-parallel parameter was cut.

    Args:
        dim: the dimension split across the tensor-parallel group.
        blocks: a fused parameter (GPT-2's ``c_attn`` is q|k|v) is ``blocks`` equal blocks along
            ``dim``, each split across ranks separately; rank r holds block_0[r] | block_1[r] | ...
        replicas: consecutive tp ranks holding the same shard (GQA with more tp ranks than
            key/value heads: ranks 2k and 2k+1 share kv-head k at replicas=2); gather keeps one.
    """

    dim: int
    blocks: int = 1
    replicas: int = 1

    def gather(self, shards: list[Tensor]) -> Tensor:
        """Reassemble the full tensor from every rank's shard, in tp-rank order."""
        per_rank = [s.chunk(self.blocks, dim=self.dim) for s in shards[::self.replicas]]
        return torch.cat([piece for b in range(self.blocks) for piece in (p[b] for p in per_rank)],
                         dim=self.dim)


_SHARD: _Fact[ShardSpec] = _Fact("shard")


def mark_sharded(param: nn.Parameter, spec: ShardSpec) -> nn.Parameter:
    """Record on ``param`` how it was split (``full_state_dict`` and the gradient norm read it)."""
    _SHARD.set(param, spec)
    return param


def shard_spec(param: Tensor) -> ShardSpec | None:
    """The :class:`ShardSpec` of ``param``, or None if it is whole on this rank."""
    return _SHARD.get(param)


# -- the gradient norm -----------------------------------------------------------------------
_DUPLICATE: _Fact[bool] = _Fact("norm_duplicate")
_DP_SHARD: _Fact[bool] = _Fact("dp_shard")
_GRAD_SHARDS: _Fact[Callable[[], list[Tensor]]] = _Fact("grad_shards")


def mark_duplicate(param: Tensor) -> Tensor:
    """Leave ``param`` out of the norm: it is a tied copy of a parameter counted elsewhere."""
    _DUPLICATE.set(param, True)
    return param


def is_duplicate(param: Tensor) -> bool:
    """Whether ``param`` is a tied copy (:func:`mark_duplicate`)."""
    return bool(_DUPLICATE.get(param))


def mark_dp_shard(tensor: Tensor) -> Tensor:
    """Count ``tensor`` on every dp rank: each holds a different shard (ZeRO-1)."""
    _DP_SHARD.set(tensor, True)
    return tensor


def is_dp_shard(tensor: Tensor) -> bool:
    """Whether ``tensor`` is one dp rank's shard (:func:`mark_dp_shard`)."""
    return bool(_DP_SHARD.get(tensor))


def set_grad_shards(param: Tensor, shards: Callable[[], list[Tensor]]) -> None:
    """ZeRO-1 holds ``param``'s gradient elsewhere: ``shards()`` returns the tensors (dp shards)
    whose ``.grad`` stands for it in the norm and the clipping."""
    _GRAD_SHARDS.set(param, shards)


def grad_shards(param: Tensor) -> Callable[[], list[Tensor]] | None:
    """What :func:`set_grad_shards` recorded on ``param``, if anything."""
    return _GRAD_SHARDS.get(param)


# -- gradient synchronisation (goose_core.grad_sync) -------------------------------------------
_GRAD_SYNC: _Fact[GradSync] = _Fact("grad_sync")


def link_grad_sync(param: Tensor, sync: GradSync) -> None:
    """``sync`` averages ``param``'s gradient."""
    _GRAD_SYNC.set(param, sync)


def unlink_grad_sync(param: Tensor, sync: GradSync) -> None:
    """``sync`` no longer averages ``param``'s gradient (a link to another sync is kept)."""
    if _GRAD_SYNC.get(param) is sync:
        _GRAD_SYNC.clear(param)


def grad_sync_of(param: Tensor) -> GradSync | None:
    """The :class:`GradSync` that averages ``param``'s gradient, if any."""
    return _GRAD_SYNC.get(param)


def grad_syncs(params: Iterable[Tensor]) -> list[GradSync]:
    """The distinct syncs of ``params``, in the order their parameters come."""
    found: dict[int, GradSync] = {}
    for p in params:
        if (sync := grad_sync_of(p)) is not None:
            found.setdefault(id(sync), sync)
    return list(found.values())


def set_module_grad_sync(model: nn.Module, sync: GradSync) -> None:
    """``sync`` averages the gradients of ``model``'s trainable parameters (DataParallel)."""
    _GRAD_SYNC.set(model, sync)


def module_grad_sync(model: nn.Module) -> GradSync | None:
    """The :class:`GradSync` DataParallel installed on ``model``, if any."""
    return _GRAD_SYNC.get(model)


def parameters_changed(model: nn.Module) -> None:
    """The rule that lets wrappers compose in any order.

    A wrapper whose ``parallelize()`` changes which ``Parameter`` objects ``model`` holds
    (``TensorParallel`` replaces each split layer, ``PipelineParallel`` drops the other stages)
    calls this at its end, and the model's :class:`GradSync` (a ``DataParallel`` applied
    earlier) re-buckets over the parameters it holds now. A no-op without one.

    Raises:
        ValueError: a ``DistributedOptimizer`` already took the sync over.
    """
    sync = module_grad_sync(model)
    if sync is not None:
        sync.track(model)


# -- the same-batch check (goose_core.distributed.batch_check) ---------------------------------
# Opaque here: batch_check owns the hook's type (importing it would make a cycle).
_BATCH_CHECK: _Fact[object] = _Fact("batch_check")


def set_batch_check(model: nn.Module, check: object) -> None:
    """``check`` is the same-batch hook installed on ``model`` (one per model)."""
    _BATCH_CHECK.set(model, check)


def batch_check_of(model: nn.Module) -> object | None:
    """The same-batch hook installed on ``model``, if any."""
    return _BATCH_CHECK.get(model)


# -- the save_pretrained guard (goose_core.checkpoint.export) ---------------------------------
_SPLIT_GUARD: _Fact[bool] = _Fact("split_guard")


def mark_split_guard(fn: Callable[..., Any]) -> None:
    """``fn`` is goose's ``save_pretrained`` that refuses a split model (installed once)."""
    _SPLIT_GUARD.set(fn, True)


def is_split_guard(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is that guard already."""
    return bool(_SPLIT_GUARD.get(fn))



# -- the finite check (goose_core.finite) -----------------------------------------------------
# Opaque here too: goose_core.finite owns the guard's type.
_FINITE: _Fact[object] = _Fact("finite")


def set_finite_watch(obj: object, watch: object) -> None:
    """``watch`` checks ``obj`` (a model's guard, or a tensor's mark) before each optimizer step."""
    _FINITE.set(obj, watch)


def finite_watch(obj: object) -> object | None:
    """What :func:`set_finite_watch` recorded on ``obj``, if anything."""
    return _FINITE.get(obj)


# -- optimizers keeping their own copy of parameters (goose_core.optim) -----------------------
class CopyKeeper(Protocol):
    """An optimizer that steps its own copy of parameters (ZeRO-1's shards, fp32 masters)."""

    def reload_params(self) -> None:
        """Make the copy exactly the parameters' values now (after they were written)."""


class _Keepers:
    """The keepers of one parameter, held weakly: a dropped optimizer is not kept alive by the
    model. A copied or pickled parameter starts with none (no optimizer keeps the copy)."""

    def __init__(self) -> None:
        self.refs: weakref.WeakSet[Any] = weakref.WeakSet()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return _Keepers, ()


_KEEPERS: _Fact[_Keepers] = _Fact("keepers")


def link_keeper(param: Tensor, keeper: CopyKeeper) -> None:
    """``keeper`` steps a copy of ``param`` and writes it back: it must re-read the copy when
    ``param`` is loaded (``load_checkpoint`` asks every keeper of the model's parameters)."""
    keepers = _KEEPERS.get(param)
    if keepers is None:
        keepers = _Keepers()
        _KEEPERS.set(param, keepers)
    keepers.refs.add(keeper)


def keepers_of(params: Iterable[Tensor]) -> list[CopyKeeper]:
    """The live keepers of any of ``params``, each once."""
    found: dict[int, CopyKeeper] = {}
    for p in params:
        if (keepers := _KEEPERS.get(p)) is not None:
            for keeper in list(keepers.refs):
                found.setdefault(id(keeper), keeper)
    return list(found.values())


# -- where a gradient accumulates, when wider than its parameter --------------------------------
_WIDE_GRAD: _Fact[tuple[torch.dtype, Callable[[], Tensor]]] = _Fact("wide_grad")


def set_wide_grad(param: Tensor, dtype: torch.dtype, target: Callable[[], Tensor]) -> None:
    """``target()`` is the tensor of the wider ``dtype`` (fp32 for a bf16 parameter) that
    ``param``'s gradient is summed into as the backward produces it: a gradient added after the
    backward (the pipeline's tied embedding) goes there too, in the same dtype, or the two
    stages' sums would round apart."""
    _WIDE_GRAD.set(param, (dtype, target))


def clear_wide_grad(param: Tensor) -> None:
    """``param``'s gradient no longer accumulates in a wider tensor."""
    _WIDE_GRAD.clear(param)


def wide_grad_of(param: Tensor) -> tuple[torch.dtype, Callable[[], Tensor]] | None:
    """Where ``param``'s gradient accumulates when wider than it (:func:`set_wide_grad`), if anywhere."""
    return _WIDE_GRAD.get(param)


# -- expert parallelism ------------------------------------------------------------------------
_EXPERT: _Fact[Any] = _Fact("expert_group")


def mark_expert(param: Tensor, group: Any) -> Tensor:
    """``param`` holds this rank's experts: its gradient is reduced over ``group`` (the ranks that
    hold the same experts), not the whole data-parallel group; other EP ranks hold other values."""
    _EXPERT.set(param, group)
    return param


def expert_group_of(param: Tensor) -> Any:
    """The expert-data-parallel group of an expert parameter (:func:`mark_expert`), else None."""
    return _EXPERT.get(param)


_ROUTER_OVER_DP: _Fact[bool] = _Fact("router_loss_over_dp")


def set_router_loss_over_dp(model: nn.Module) -> None:
    """``model``'s loss carries the router loss of the whole dp batch (expert_parallel.router_loss)."""
    _ROUTER_OVER_DP.set(model, True)


def router_loss_over_dp(model: nn.Module) -> bool:
    """Whether :func:`set_router_loss_over_dp` was called on ``model``."""
    return bool(_ROUTER_OVER_DP.get(model))
