"""ZeRO-1 state dicts: gather shards into the plain single-device format, and cut it back.

The consolidated form is exactly what ``torch.optim.<Optimizer>(model.parameters())`` writes:
parameters numbered in param-group order, per-element state (``exp_avg``, ``momentum_buffer``)
shaped like each parameter, scalars (``step``) repeated per parameter. Padding is dropped on the
way out and comes back as zeros, which is what it holds anyway (zero gradient, zero weight).
Under mixed precision the fp32 master weights ride along as ``"master_weights"``: parameter
number -> fp32 tensor shaped like the parameter, the key :class:`~goose_core.optim.MasterWeights`
writes on one device (a plain torch optimizer's ``load_state_dict`` ignores it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.data_parallel.bucket import Bucket
from goose_core.distributed.compat import all_gather_flat

__all__ = ["consolidate", "shard_consolidated", "gather_masters", "shard_masters", "shapes_of"]


def shapes_of(bucket: Any) -> list[torch.Size]:
    """The shapes of a bucket's parameters: their own, or those ZeRO-3 recorded (a sharded
    parameter is empty between uses)."""
    return list(getattr(bucket, "shapes", None) or [p.shape for p in bucket.params])


def _numbering(params: list[list[Any]]) -> dict[Any, int]:
    return {p: i for i, p in enumerate(p for ps in params for p in ps)}


def _options(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _is_per_element(value: Any, like: torch.Size, key: str) -> bool:
    return torch.is_tensor(value) and value.shape == like and not (key == "step" and value.dim() == 0)


def _copy(value: Any) -> Any:
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


def _group_of(bucket: Bucket, dp_group: dist.ProcessGroup) -> dist.ProcessGroup:
    """The group a bucket is sharded over: an expert bucket's own (ExpertParallel), else dp's."""
    return dp_group if bucket.reduce_group is None else bucket.reduce_group


def _rank_in(bucket: Bucket, dp_rank: int) -> int:
    """This rank's shard of ``bucket``: its place in an expert bucket's group, else ``dp_rank``."""
    return dp_rank if bucket.reduce_group is None else dist.get_rank(bucket.reduce_group)


def consolidate(optimizer: torch.optim.Optimizer, buckets: list[Bucket], shards: list[nn.Parameter],
                group_params: list[list[nn.Parameter]], group: dist.ProcessGroup) -> dict[str, Any]:
    """Every rank's shard state all-gathered into the plain format (collective over ``group``)."""
    index = _numbering(group_params)
    state: dict[int, dict[str, Any]] = {}
    for bucket, shard in zip(buckets, shards):
        shard_state = optimizer.state.get(shard, {})
        for key in sorted(shard_state):  # same keys, same order on every rank
            value = shard_state[key]
            if _is_per_element(value, shard.shape, key):
                full = torch.empty(bucket.padded_numel, dtype=value.dtype, device=value.device)
                all_gather_flat(full, value.contiguous(), group=_group_of(bucket, group))
                pieces = [full[o : o + s.numel()].view(s) for o, s in zip(bucket.offsets, shapes_of(bucket))]
            else:
                pieces = [value] * len(bucket.params)
            for p, piece in zip(bucket.params, pieces):
                state.setdefault(index[p], {})[key] = _copy(piece)
    groups = [{**_options(g), "params": [index[p] for p in ps]}
              for g, ps in zip(optimizer.param_groups, group_params)]
    return {"state": state, "param_groups": groups}


def _check_groups(state_dict: dict[str, Any], group_params: list[list[nn.Parameter]]) -> None:
    theirs = [len(g["params"]) for g in state_dict["param_groups"]]
    mine = [len(ps) for ps in group_params]
    if theirs != mine:
        raise ValueError(f"the state dict has param groups of sizes {theirs}, this optimizer {mine}; "
                         f"load a state dict saved from the same model and param groups")


def _shard_entries(entries: list[dict[str, Any]], bucket: Bucket, lo: int, hi: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entries[0].items():
        if _is_per_element(value, shapes_of(bucket)[0], key):
            flat = torch.zeros(bucket.padded_numel, dtype=value.dtype)
            for o, s, entry in zip(bucket.offsets, shapes_of(bucket), entries):
                flat[o : o + s.numel()].copy_(entry[key].reshape(-1))
            out[key] = flat[lo:hi].clone()
        else:
            out[key] = _copy(value)
    return out


def shard_consolidated(state_dict: dict[str, Any], optimizer: torch.optim.Optimizer, buckets: list[Bucket],
                       shards: list[nn.Parameter], group_params: list[list[nn.Parameter]],
                       rank: int) -> dict[str, Any]:
    """The wrapped optimizer's state dict for rank ``rank``'s shards, cut from a plain one.

    Raises:
        ValueError: the param groups differ, or a bucket's parameters have state only in part.
    """
    _check_groups(state_dict, group_params)
    index = _numbering(group_params)
    shard_index = _numbering([g["params"] for g in optimizer.param_groups])
    saved = {int(k): v for k, v in state_dict["state"].items()}
    state: dict[int, dict[str, Any]] = {}
    for bucket, shard in zip(buckets, shards):
        entries = [saved.get(index[p]) for p in bucket.params]
        if all(e is None for e in entries):
            continue
        if any(e is None for e in entries):
            raise ValueError("some parameters in the state dict have optimizer state and others sharing "
                             "their bucket do not; step every trainable parameter before saving")
        lo, hi = bucket.shard_range(_rank_in(bucket, rank))
        state[shard_index[shard]] = _shard_entries(entries, bucket, lo, hi)
    groups = [{**_options(saved_g), "params": [shard_index[s] for s in g["params"]]}
              for saved_g, g in zip(state_dict["param_groups"], optimizer.param_groups)]
    return {"state": state, "param_groups": groups}


def gather_masters(buckets: list[Bucket], shards: list[nn.Parameter], group_params: list[list[nn.Parameter]],
                   group: dist.ProcessGroup) -> dict[int, Tensor]:
    """Every rank's master shards all-gathered: parameter number -> master shaped like it."""
    index = _numbering(group_params)
    masters: dict[int, Tensor] = {}
    for bucket, shard in zip(buckets, shards):
        full = torch.empty(bucket.padded_numel, dtype=shard.dtype, device=shard.device)
        all_gather_flat(full, shard.detach().contiguous(), group=_group_of(bucket, group))
        for o, p, s in zip(bucket.offsets, bucket.params, shapes_of(bucket)):
            masters[index[p]] = _copy(full[o : o + s.numel()].view(s))
    return masters


def shard_masters(masters: dict[Any, Tensor], buckets: list[Bucket], shards: list[nn.Parameter],
                  group_params: list[list[nn.Parameter]], rank: int) -> list[Tensor]:
    """Rank ``rank``'s master shard of every bucket, cut from :func:`gather_masters`' form.

    Raises:
        ValueError: a trainable parameter has no master weight in ``masters``.
    """
    index = _numbering(group_params)
    saved = {int(k): v for k, v in masters.items()}
    out = []
    for bucket, shard in zip(buckets, shards):
        missing = [index[p] for p in bucket.params if index[p] not in saved]
        if missing:
            raise ValueError(f"the state dict's master_weights lack parameters {missing}; save it from "
                             f"the same model with MasterWeights or DistributedOptimizer")
        flat = torch.zeros(bucket.padded_numel, dtype=shard.dtype)
        for o, p, s in zip(bucket.offsets, bucket.params, shapes_of(bucket)):
            flat[o : o + s.numel()].copy_(saved[index[p]].reshape(-1))
        lo, hi = bucket.shard_range(_rank_in(bucket, rank))
        out.append(flat[lo:hi].to(shard.device))
    return out
