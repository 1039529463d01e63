"""The optimizer's state as checkpoint entries under full parameter names, and back.

Both optimizers go through the plain single-device format (``torch.optim``'s state dict; for
``DistributedOptimizer`` its ``consolidated_state_dict()``, which all-gathers the ZeRO-1 shards
over the data-parallel group: for the save's duration each rank holds its tp shard of its
stage's whole state, as without ZeRO), so whatever state an optimizer keeps rides along::

    plain:   {"state": {3: {"step": s, "exp_avg": m}}, "param_groups": [{"lr": ..., "params": [..3..]}]}
    entries: optim/state/model.layers.0.mlp.up_proj.weight/step       s (whole)
             optim/state/model.layers.0.mlp.up_proj.weight/exp_avg    m, cut like its parameter
             optim/param_groups                                       [{"lr": ...}]  (no params)

A per-element state (shaped like its parameter) is stored in the parameter's pieces, so it
reshards as the parameter does; on load, ``DistributedOptimizer`` cuts it into this layout's
ZeRO shards (``load_consolidated_state_dict``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from goose_core.checkpoint.chunks import Pieces, whole
from goose_core.optim.zero import DistributedOptimizer

__all__ = ["GROUPS", "optimizer_problems", "state_entries", "state_destinations", "load_state"]

STATE = "optim/state/"
GROUPS = "optim/param_groups"

#: A parameter's tensor (or one shaped like it) as the pieces of the full tensor.
Cutter = Callable[[nn.Parameter, Tensor], Pieces]


def _groups(optimizer: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
    if isinstance(optimizer, DistributedOptimizer):
        return optimizer.group_params  # the model's parameters, as the consolidated format numbers them
    return [list(g["params"]) for g in optimizer.param_groups]


def _ordered(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for ps in _groups(optimizer) for p in ps]


def _per_element(value: Any, param: Tensor, key: str) -> bool:
    """The plain format's rule (zero_state): shaped like the parameter, and not a 0-d step."""
    return torch.is_tensor(value) and value.shape == param.shape and not (key == "step" and value.dim() == 0)


def optimizer_problems(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> list[str]:
    """Why the optimizer's state cannot go under the model's names (empty if it can)."""
    missing = sum(p not in names for p in _ordered(optimizer))
    if missing:
        return [f"the optimizer holds {missing} parameters that are not the model's; build it from "
                f"model.parameters() after every wrapper"]
    return []


def _named(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> list[str]:
    return [names[p] for p in _ordered(optimizer)]  # optimizer_problems() checked every one is there


def state_entries(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str], cut: Cutter) -> dict[str, Any]:
    """The optimizer's entries (a collective over the dp group for ``DistributedOptimizer``)."""
    labels = _named(optimizer, names)
    plain = (optimizer.consolidated_state_dict() if isinstance(optimizer, DistributedOptimizer)
             else optimizer.state_dict())
    params = _ordered(optimizer)
    entries: dict[str, Any] = {}
    for index, state in plain["state"].items():
        param = params[int(index)]
        for key, value in state.items():
            fqn = f"{STATE}{labels[int(index)]}/{key}"
            if _per_element(value, param, key):
                entries[fqn] = cut(param, value)
            else:
                entries[fqn] = whole(value) if torch.is_tensor(value) else value
    entries[GROUPS] = [{k: v for k, v in g.items() if k != "params"} for g in plain["param_groups"]]
    return entries


def _saved_keys(metadata: Metadata) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for fqn in metadata.state_dict_metadata:
        if fqn.startswith(STATE):
            name, key = fqn[len(STATE):].rsplit("/", 1)
            keys.setdefault(name, []).append(key)
    return keys


def state_destinations(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str], cut: Cutter,
                       metadata: Metadata, errors: list[str]) -> dict[str, Any]:
    """Where each saved state entry of this rank's parameters is read to (empty tensors cut
    like their parameters, or whole); problems are appended to ``errors``."""
    if problems := optimizer_problems(optimizer, names):
        errors += problems
        return {}
    if GROUPS not in metadata.state_dict_metadata:
        errors.append("the checkpoint holds no optimizer state (it was saved with optimizer=None); "
                      "pass optimizer=None to load_checkpoint, or load a checkpoint saved with one")
        return {}
    saved = _saved_keys(metadata)
    dests: dict[str, Any] = {GROUPS: None}
    for param, name in zip(_ordered(optimizer), _named(optimizer, names)):
        for key in saved.get(name, []):
            fqn = f"{STATE}{name}/{key}"
            md = metadata.state_dict_metadata[fqn]
            if isinstance(md, BytesStorageMetadata):
                dests[fqn] = None
                continue
            assert isinstance(md, TensorStorageMetadata)
            like = cut(param, param.detach())
            if md.size == like.size and not (key == "step" and len(md.size) == 0):
                dests[fqn] = cut(param, torch.empty(param.shape, dtype=md.properties.dtype, device=param.device))
            else:
                dests[fqn] = whole(torch.empty(md.size, dtype=md.properties.dtype))
    return dests


def _value(entry: Any) -> Any:
    """A loaded entry's value: the tensor its pieces were read into, or the object."""
    return entry.local if isinstance(entry, Pieces) else entry


def load_state(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str], loaded: dict[str, Any]) -> None:
    """Rebuild the plain state dict from the loaded entries and give it to the optimizer."""
    groups = loaded[GROUPS]
    mine = _groups(optimizer)
    if len(groups) != len(mine):
        raise ValueError(f"the checkpoint's optimizer has {len(groups)} param groups, this one {len(mine)}; "
                         f"build the optimizer with the same groups as the saved run")
    index = {p: i for i, p in enumerate(_ordered(optimizer))}
    state: dict[str, dict[str, Any]] = {}  # by parameter name
    for fqn, entry in loaded.items():
        if fqn.startswith(STATE):
            name, key = fqn[len(STATE):].rsplit("/", 1)
            state.setdefault(name, {})[key] = _value(entry)
    by_index = {index[p]: state[names[p]] for p in index if names[p] in state}
    plain = {"state": by_index,
             "param_groups": [{**g, "params": [index[p] for p in ps]} for g, ps in zip(groups, mine)]}
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.load_consolidated_state_dict(plain)
    else:
        optimizer.load_state_dict(plain)
