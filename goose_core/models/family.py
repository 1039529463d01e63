"""What goose knows about one model family: its tensor-parallel half and its pipeline half."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn
from transformers import PretrainedConfig

__all__ = ["TensorParallelAdapter", "PipelineParts", "PipelineLayout", "Family", "unsplittable"]


def _no_problems(config: PretrainedConfig, tp: int) -> list[str]:
    return []


def _splittable(config: PretrainedConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class TensorParallelAdapter:
    """What goose needs to shard a family that declares no ``base_model_tp_plan``.

    Args:
        plan: patterns relative to the base model -> style (as ``base_model_tp_plan``).
        localize: ``localize(model, tp, tp_rank)`` sets per-rank head counts (and anything else
            the attention reads) after the layers are sharded; None: goose's generic one (every
            module owning column-parallel layers gets per-rank ``num_heads`` and kv-heads).
        check: ``check(config, tp)`` -> problems (strings) that make the model unsplittable.
    """

    plan: dict[str, str]
    localize: Callable[[nn.Module, int, int], None] | None = None
    check: Callable[[PretrainedConfig, int], list[str]] = field(default=_no_problems)


@dataclass(frozen=True)
class PipelineParts:
    """Where a causal LM's pieces live, as module paths from the ``...ForCausalLM`` model.

    The pipeline split runs the family's own forward on every stage; the parts say only which
    modules the first stage holds (``embed``: the token embedding and whatever the parent applies
    to it before the first block), which the last (``head``: after the last block), and where the
    decoder blocks are (``blocks``, an ``nn.ModuleList``, the only thing partitioned).

    Args:
        tuple_blocks: the parent unpacks each block's output as ``(hidden, attn_weights)``
            (Bamba), so a block a stage does not run hands on ``(hidden, None)``.
        check: ``check(config)`` -> what this config has that the split cannot reproduce
            (strings naming it and the fix); raised before any collective.
    """

    embed: tuple[str, ...]
    blocks: str
    head: tuple[str, ...]
    tuple_blocks: bool = False
    check: Callable[[PretrainedConfig], list[str]] = field(default=_splittable, compare=False)


#: The former name of :class:`PipelineParts`, kept for code that registers families with it.
PipelineLayout = PipelineParts


@dataclass(frozen=True)
class Family:
    """One family's knowledge beyond what its config declares (``config.model_type`` names it).

    ``tp`` replaces a missing ``base_model_tp_plan``, ``pp`` a missing ``base_model_pp_plan``;
    None for a half the config's own plan covers.
    """

    model_type: str
    tp: TensorParallelAdapter | None = None
    pp: PipelineParts | None = None


def unsplittable(reason: str) -> PipelineParts:
    """The pipeline half of a family the split refuses whatever its config: ``reason`` says why."""
    return PipelineParts(embed=(), blocks="", head=(), check=lambda config: [reason])
