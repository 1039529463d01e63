"""The optimizer's state as checkpoint entries under full parameter names, and back.

Every optimizer goes through the plain single-device format (``torch.optim``'s state dict;
``MasterWeights.state_dict()``; for ``DistributedOptimizer`` its ``consolidated_state_dict()``,
which all-gathers the ZeRO-1 shards over the data-parallel group: for the save's duration each
rank holds its tp shard of its stage's whole state, as without ZeRO), so whatever state an
optimizer keeps rides along, its fp32 master weights included::

    plain:   {"state": {3: {"step": s, "exp_avg": m}}, "param_groups": [{"lr": ..., "params": [..3..]}],
              "master_weights": {3: w}}                                 (mixed precision only)
    entries: optim/state/model.layers.0.mlp.up_proj.weight/step       s (whole)
             optim/state/model.layers.0.mlp.up_proj.weight/exp_avg    m, cut like its parameter
             optim/master_weights/model.layers.0.mlp.up_proj.weight   w (fp32), cut like its parameter
             optim/param_groups                                       [{"lr": ...}]  (no params)

A per-element state (shaped like its parameter) is stored in the parameter's pieces, so it
reshards as the parameter does; on load, ``DistributedOptimizer`` cuts it into this layout's
ZeRO shards (``load_consolidated_state_dict``). The masters are such a state: a bf16 model's
parameters are only their rounding, so a resume without them would not be bit-exact.

Masters: a master as wide as its parameter is the parameter (an fp32 model's; MasterWeights
steps those as they are), so only wider ones are saved. On load, the saved master of a parameter
goes where this optimizer keeps that parameter's master: its fp32 copy (``MasterWeights``,
mixed ``DistributedOptimizer``), or the parameter itself when the parameter holds it exactly
(an fp32 model with a plain optimizer continues from the fp32 masters, not from their bf16
rounding); a narrower parameter with no master (pure bf16) is already the master's rounding.
Without saved masters (an fp32 run, a checkpoint from before they were saved) a mixed optimizer's
masters are the loaded parameters, as after a weights-only load.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from goose_core.checkpoint.chunks import Pieces, whole
from goose_core.optim.master import MasterWeights
from goose_core.optim.wrapper import OptimizerWrapper
from goose_core.optim.zero import DistributedOptimizer

__all__ = ["GROUPS", "optimizer_problems", "state_entries", "state_destinations", "load_masters", "load_state"]

STATE = "optim/state/"
GROUPS = "optim/param_groups"
# The masters under a prefix of their own, not as a key of optim/state/<name>/: the plain format
# keeps them apart from "state" (which the wrapped torch optimizer's load_state_dict takes as it
# is), so the entries map one to one, a master never reaches a plain optimizer as a state key it
# does not know, and a checkpoint saved without masters is told by the prefix's absence.
MASTERS = "optim/master_weights/"

#: A parameter's tensor (or one shaped like it) as the pieces of the full tensor.
Cutter = Callable[[nn.Parameter, Tensor], Pieces]


def _groups(optimizer: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
    if isinstance(optimizer, OptimizerWrapper):
        # the model's parameters, as the plain format numbers them: the wrapped optimizer's groups
        # hold ZeRO-1's flat shards or MasterWeights' fp32 masters, in the same order
        return optimizer.group_params
    return [list(g["params"]) for g in optimizer.param_groups]


def _ordered(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for ps in _groups(optimizer) for p in ps]


def _plain(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The plain format (a collective over the dp group for ``DistributedOptimizer``)."""
    if isinstance(optimizer, DistributedOptimizer):
        return optimizer.consolidated_state_dict()
    return optimizer.state_dict()


def _kept_apart(optimizer: torch.optim.Optimizer) -> set[nn.Parameter]:
    """The parameters whose master this optimizer keeps in a wider copy of its own."""
    if isinstance(optimizer, MasterWeights):
        return set(optimizer.masters)
    if isinstance(optimizer, DistributedOptimizer):
        return {p for b, s in zip(optimizer.buckets, optimizer.shards) if s.dtype != b.params[0].dtype
                for p in b.params}
    return set()


def _holds(param: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``param``'s dtype holds every value of ``dtype`` (an fp32 master in an fp32 or fp64 one)."""
    return torch.promote_types(param.dtype, dtype) == param.dtype


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
    """The optimizer's entries, its masters wider than their parameters included (a collective
    over the dp group for ``DistributedOptimizer``)."""
    labels = _named(optimizer, names)
    plain = _plain(optimizer)
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
    for index, master in plain.get("master_weights", {}).items():
        param = params[int(index)]
        if master.dtype != param.dtype:  # one as wide as its parameter is the parameter, saved already
            entries[MASTERS + labels[int(index)]] = cut(param, master)
    entries[GROUPS] = [{k: v for k, v in g.items() if k != "params"} for g in plain["param_groups"]]
    return entries


def _saved_keys(metadata: Metadata) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for fqn in metadata.state_dict_metadata:
        if fqn.startswith(STATE):
            name, key = fqn[len(STATE):].rsplit("/", 1)
            keys.setdefault(name, []).append(key)
    return keys


def _master_destination(param: nn.Parameter, name: str, md: TensorStorageMetadata, cut: Cutter,
                        errors: list[str]) -> Pieces | None:
    """An empty fp32 tensor cut like ``param`` to read its saved master into."""
    master = cut(param, torch.empty(param.shape, dtype=md.properties.dtype, device=param.device))
    if master.size != md.size:
        errors.append(f"the master weight of {name} is {tuple(md.size)} in the checkpoint, "
                      f"{tuple(master.size)} in this model")
        return None
    return master


def _masters_wanted(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str], cut: Cutter,
                    metadata: Metadata, errors: list[str]) -> dict[str, Any]:
    """Where each saved master is read to: those this optimizer has a place for (its own wider
    copy, or the parameter itself where the parameter holds it exactly); others are not read."""
    kept = _kept_apart(optimizer)
    dests: dict[str, Any] = {}
    for param, name in zip(_ordered(optimizer), _named(optimizer, names)):
        md = metadata.state_dict_metadata.get(MASTERS + name)
        if isinstance(md, TensorStorageMetadata) and (param in kept or _holds(param, md.properties.dtype)):
            if (master := _master_destination(param, name, md, cut, errors)) is not None:
                dests[MASTERS + name] = master
    return dests


def state_destinations(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str], cut: Cutter,
                       metadata: Metadata, errors: list[str]) -> dict[str, Any]:
    """Where each saved state entry (and master) of this rank's parameters is read to (empty
    tensors cut like their parameters, or whole); problems are appended to ``errors``."""
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
    dests.update(_masters_wanted(optimizer, names, cut, metadata, errors))
    return dests


def _value(entry: Any) -> Any:
    """A loaded entry's value: the tensor its pieces were read into, or the object."""
    return entry.local if isinstance(entry, Pieces) else entry


def load_masters(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str], loaded: dict[str, Any]) -> None:
    """Parameters that are their own master (no wider copy in this optimizer) take their saved
    master: call it after the weights are read and before the keepers re-read them."""
    kept = _kept_apart(optimizer)
    with torch.no_grad():
        for param, name in zip(_ordered(optimizer), _named(optimizer, names)):
            if param not in kept and MASTERS + name in loaded:
                param.detach().copy_(_value(loaded[MASTERS + name]))


def _master_weights(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str],
                    loaded: dict[str, Any]) -> dict[int, Tensor] | None:
    """The plain format's ``"master_weights"`` for the copies this optimizer keeps, or None when
    the checkpoint has none for them (the masters are then the loaded parameters). A parameter
    without a saved master (one saved as wide as its master) is its own: its loaded value."""
    kept = _kept_apart(optimizer)
    params = _ordered(optimizer)
    if not any(p in kept and MASTERS + names[p] in loaded for p in params):
        return None
    return {i: _value(loaded[MASTERS + names[p]]) if p in kept and MASTERS + names[p] in loaded else p.detach()
            for i, p in enumerate(params)}


def load_state(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str], loaded: dict[str, Any]) -> None:
    """Rebuild the plain state dict from the loaded entries and give it to the optimizer (after
    the keepers re-read the weights: saved masters are the last write, and win)."""
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
    plain: dict[str, Any] = {"state": by_index,
                             "param_groups": [{**g, "params": [index[p] for p in ps]} for g, ps in zip(groups, mine)]}
    if (masters := _master_weights(optimizer, names, loaded)) is not None:
        plain["master_weights"] = masters
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.load_consolidated_state_dict(plain)
    else:
        optimizer.load_state_dict(plain)
