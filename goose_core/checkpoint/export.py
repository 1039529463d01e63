"""export_pretrained: a parallel model as a plain 🤗 ``save_pretrained`` folder, from any layout.

``save_pretrained`` on a rank's piece of a model would write that piece (a tp shard, one
pipeline stage) as if it were the model: a broken folder without an error. goose makes it raise
instead, pointing here; :func:`export_pretrained` gathers the full weights (``full_state_dict``)
and rank 0 writes them through a fresh, unsplit model of the same config, so the folder is
exactly what 🤗 writes for the single-device model (safetensors, config, tied weights once).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from goose_core.data_parallel.zero3 import sync_of
from goose_core.distributed.context import ParallelContext
from goose_core.metadata import is_split_guard, mark_split_guard, shard_spec
from goose_core.pipeline.split import Placeholder
from goose_core.state import full_state_dict

__all__ = ["export_pretrained", "is_split"]


def is_split(model: nn.Module) -> bool:
    """Whether ``model`` holds only part of the single-device model (tp shards, pipeline stages,
    ZeRO-3's dp shards)."""
    return (any(shard_spec(p) is not None for p in model.parameters())
            or any(isinstance(m, Placeholder) for m in model.modules())
            or sync_of(model) is not None)


def export_pretrained(model: PreTrainedModel, ctx: ParallelContext, path: str | Path, **kwargs: Any) -> None:
    """Write ``model`` (any tp x pp x dp layout) to ``path`` as ``save_pretrained`` does for the
    unsplit model; ``AutoModelForCausalLM.from_pretrained(path)`` then loads it on one device.

    Collective over the whole world (call it on every rank); rank 0 writes. ``kwargs`` go to
    ``save_pretrained`` (``safe_serialization`` is on by default there).
    """
    state = full_state_dict(model, ctx)
    if ctx.rank == 0:
        single = _single_device_model(model.config, state)
        single.save_pretrained(path, **kwargs)
    dist.barrier()  # the folder is complete when any rank returns


def _single_device_model(config: Any, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A fresh model of ``config`` holding ``state``, built on the meta device (nothing initialised)."""
    config = copy.deepcopy(config)
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        single = AutoModelForCausalLM.from_config(config, dtype=dtype)
    single.to_empty(device="cpu")  # non-persistent buffers (rotary tables) are not saved
    single.tie_weights()  # to_empty gave each tied name its own tensor; 🤗 writes a tied one once
    single.load_state_dict(state, strict=True)
    return single


def _refuse_split(save: Any) -> Any:
    @functools.wraps(save)
    def save_pretrained(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        if is_split(self):
            raise ValueError(f"{type(self).__name__} is split by goose (tensor- or pipeline-parallel, or "
                             f"ZeRO-3): "
                             f"save_pretrained would write this rank's part only. Call "
                             f"goose_core.export_pretrained(model, ctx, path) on every rank instead")
        return save(self, *args, **kwargs)
    mark_split_guard(save_pretrained)
    return save_pretrained


# One guard for every wrapper order: the split is detected on the model itself when it is saved.
if not is_split_guard(PreTrainedModel.save_pretrained):
    PreTrainedModel.save_pretrained = _refuse_split(PreTrainedModel.save_pretrained)  # type: ignore[method-assign]
