"""The one registry of model families: ``config.model_type`` -> :class:`Family`, listed explicitly.

A family whose config declares ``base_model_tp_plan`` and ``base_model_pp_plan`` needs no entry.
The built-in entries are written out below (no module registers itself when imported): the
modules of families that need more than their pipeline parts, then the table of pipeline parts
(:mod:`goose_core.models.pipeline_parts`: the standard-shaped families that declare no
``base_model_pp_plan``, and those refused). Users add theirs with :func:`register_family`::

    register_family(Family("my_lm", pp=PipelineParts(embed=("model.embed_tokens",),
                                                      blocks="model.layers",
                                                      head=("model.norm", "lm_head"))))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from goose_core.models import (apertus, bloom, doge, falcon, gemma4_text, gpt2, inkling, opt, pipeline_parts,
                                sarvam_moe, stablelm)
from goose_core.models.family import Family, PipelineParts, TensorParallelAdapter

__all__ = ["FAMILIES", "PIPELINE", "TENSOR_PARALLEL", "family", "register_family", "register_tensor_parallel"]

#: model_type -> Family: goose's built-in knowledge.
FAMILIES: dict[str, Family] = {
    **{name: Family(name, pp=parts)
       for name, parts in {**pipeline_parts.PIPELINE_PARTS, **pipeline_parts.REFUSED}.items()},
    **{f.model_type: f for f in (gpt2.FAMILY, bloom.FAMILY, opt.FAMILY, falcon.FAMILY, stablelm.FAMILY,
                                 *gemma4_text.FAMILIES)},
    # tp: a declared plan plus the entries it lacks
    **{f.model_type: f for f in (*apertus.FAMILIES, doge.FAMILY, *inkling.FAMILIES, sarvam_moe.FAMILY)},
}


def family(model_type: str | None) -> Family | None:
    """The registered family of ``model_type``, or None."""
    return FAMILIES.get(model_type or "")


def register_family(entry: Family) -> None:
    """Teach goose a family (replaces an entry of the same ``model_type``)."""
    FAMILIES[entry.model_type] = entry


def register_tensor_parallel(model_type: str, adapter: TensorParallelAdapter) -> None:
    """Set the tensor-parallel half of ``model_type``'s entry, keeping its pipeline half."""
    old = FAMILIES.get(model_type)
    FAMILIES[model_type] = Family(model_type, tp=adapter, pp=old.pp if old else None)


class _Half(Mapping[str, object]):
    """A read-only view of one half of every registered family (model_type -> that half)."""

    def __init__(self, half: str) -> None:
        self.half = half

    def __getitem__(self, model_type: str) -> object:
        value = getattr(FAMILIES[model_type], self.half) if model_type in FAMILIES else None
        if value is None:
            raise KeyError(model_type)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, f in FAMILIES.items() if getattr(f, self.half) is not None])

    def __len__(self) -> int:
        return len(list(iter(self)))


#: model_type -> TensorParallelAdapter, for every family with a tensor-parallel half.
TENSOR_PARALLEL: Mapping[str, TensorParallelAdapter] = _Half("tp")  # type: ignore[assignment]

#: model_type -> PipelineParts, for every family with a pipeline half.
PIPELINE: Mapping[str, PipelineParts] = _Half("pp")  # type: ignore[assignment]
