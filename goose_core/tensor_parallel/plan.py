"""Tensor-parallel plans: which HF modules are column- or row-parallel, and what must divide by tp.

A plan maps module-name patterns (``*`` = a layer index) to a style, in the format transformers
configs declare as ``config.base_model_tp_plan`` (relative to the base model)::

    {"layers.*.self_attn.q_proj": "colwise", ..., "layers.*.self_attn.o_proj": "rowwise"}

A family that declares one (Llama, Mistral, Qwen2, GPT-NeoX, ...) needs no goose code. A family
that declares none registers an :class:`Adapter` (see ``goose_core.models``): the plan, plus a
``localize`` step that makes its attention read per-rank head counts.

Styles goose implements (transformers' names and meaning)::

    colwise             Linear split by output features          -> ColumnParallelLinear
    packed_colwise      the same, output = gate | up, each split  -> ColumnParallelLinear(blocks=2)
    fused_qkv_colwise   the same, output = q | k | v (goose only) -> ColumnParallelLinear(blocks=3)
    rowwise             Linear split by input features           -> RowParallelLinear
    embedding_rowwise   Embedding split by vocabulary rows       -> VocabParallelEmbedding
                        (masked lookup of the ids a rank owns, then one all-reduce)

transformers declares more (``colwise_gather_output``, ``embedding_colwise``, ``sequence_parallel``,
...); a plan naming one of those is refused by name, before anything is sharded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn
from transformers.pytorch_utils import Conv1D

from goose_core.models.family import TensorParallelAdapter as Adapter
from goose_core.models.registry import TENSOR_PARALLEL, register_tensor_parallel

__all__ = ["Adapter", "ADAPTERS", "register_adapter", "TPPlan", "resolve_plan", "check_sizes",
           "STYLE_BLOCKS", "EMBEDDING_STYLES", "STYLES", "KV_PROJECTIONS"]

#: Supported linear styles -> fused blocks along the output (gate|up = 2; GPT-2's q|k|v = 3).
STYLE_BLOCKS = {"colwise": 1, "packed_colwise": 2, "fused_qkv_colwise": 3, "rowwise": 1}

#: Supported embedding styles: the table split by vocabulary rows (transformers 5.24 declares it
#: for GPT-NeoX's ``embed_in``, GPT-J's ``wte``, gpt-oss's ``embed_tokens``, ...).
EMBEDDING_STYLES = ("embedding_rowwise",)

#: Every style goose implements.
STYLES = (*STYLE_BLOCKS, *EMBEDDING_STYLES)

#: Separate key/value projections: split by kv-heads, replicated when tp > kv-heads.
KV_PROJECTIONS = ("k_proj", "v_proj")

#: model_type -> Adapter: a view of the tensor-parallel halves in goose_core.models.registry.
ADAPTERS = TENSOR_PARALLEL


def register_adapter(model_type: str, adapter: Adapter) -> None:
    """Teach goose a family without a declared plan (``config.model_type`` names it)."""
    register_tensor_parallel(model_type, adapter)


@dataclass(frozen=True)
class TPPlan:
    """A plan resolved against one model: full module names -> style, and the localize step."""

    layers: dict[str, str]
    localize: Callable[[nn.Module, int, int], None] | None


def _pattern(prefix: str, key: str) -> re.Pattern[str]:
    full = f"{prefix}.{key}" if prefix else key
    return re.compile(re.escape(full).replace(r"\*", r"\d+") + "$")


def _no_plan_error(model: nn.Module) -> ValueError:
    model_type = getattr(model.config, "model_type", "?")
    return ValueError(
        f"{type(model).__name__} (model_type {model_type!r}) declares no config.base_model_tp_plan "
        f"and goose has no adapter for it. Either set one, e.g. config.base_model_tp_plan = "
        f"{{'layers.*.self_attn.q_proj': 'colwise', ..., 'layers.*.self_attn.o_proj': 'rowwise', "
        f"'layers.*.mlp.up_proj': 'colwise', 'layers.*.mlp.down_proj': 'rowwise'}}, or register an "
        f"Adapter with goose_core.tensor_parallel.register_adapter({model_type!r}, ...) "
        f"(see goose_core/models/gpt2.py); known adapters: {sorted(ADAPTERS)}")


def resolve_plan(model: nn.Module) -> TPPlan:
    """Match ``model``'s declared plan (or its family's adapter) against its module names.

    Raises:
        ValueError: no plan and no adapter, or a style goose does not implement.
    """
    adapter = ADAPTERS.get(getattr(model.config, "model_type", ""))
    declared = adapter.plan if adapter else getattr(model.config, "base_model_tp_plan", None)
    if not declared:
        raise _no_plan_error(model)
    prefix = getattr(model, "base_model_prefix", "")
    names = [name for name, _ in model.named_modules()]
    layers: dict[str, str] = {}
    for key, style in declared.items():
        if style not in STYLES:
            raise ValueError(f"plan entry {key!r}: style {style!r} is not supported by goose "
                             f"(supported: {sorted(STYLES)}); replace or drop that entry of "
                             f"model.config.base_model_tp_plan, or register an Adapter for "
                             f"{getattr(model.config, 'model_type', '?')!r}")
        pattern = _pattern(prefix, key)
        layers.update({name: style for name in names if pattern.match(name)})
    if not layers:
        raise ValueError(f"the tensor-parallel plan of {type(model).__name__} matches none of its modules")
    return TPPlan(layers, adapter.localize if adapter else None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_sizes(model: nn.Module, plan: TPPlan, tp: int) -> None:
    """Raise one ValueError listing every size that does not split over ``tp`` ranks.

    Pure: reads only the config and module shapes, so every rank raises the same error before
    any collective.
    """
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads={heads} does not divide by tp={tp}: "
                        f"choose tp in {_divisors(heads)}")
    if kv_heads % tp and tp % kv_heads:
        problems.append(f"num_key_value_heads={kv_heads} and tp={tp}: one must divide the other "
                        f"(kv-heads are split when tp <= {kv_heads}, replicated when tp is a multiple)")
    if config.vocab_size % tp:
        problems.append(f"vocab_size={config.vocab_size} does not divide by tp={tp}: pad the vocabulary, "
                        f"e.g. model.resize_token_embeddings(n, pad_to_multiple_of={tp})")
    modules = dict(model.named_modules())
    for name, style in plan.layers.items():
        problems += _layer_problem(name, modules[name], style, tp, kv_heads)
    adapter = ADAPTERS.get(getattr(config, "model_type", ""))
    if adapter is not None:
        problems += adapter.check(config, tp)
    if problems:
        raise ValueError(f"cannot split {type(model).__name__} over tp={tp}:\n  " + "\n  ".join(problems))


def _embedding_problem(name: str, module: nn.Module, tp: int) -> list[str]:
    # A subclass with its own forward (OPT's learned positions take a mask, not ids) cannot be
    # replaced by a lookup of ids.
    if not isinstance(module, nn.Embedding) or type(module).forward is not nn.Embedding.forward:
        return [f"{name} ({type(module).__name__}) is not a plain nn.Embedding; embedding_rowwise "
                f"replaces a lookup of ids by a vocab-parallel one, so it splits only nn.Embedding"]
    if module.max_norm is not None or module.sparse:
        return [f"{name}: a vocab-parallel embedding supports neither max_norm nor sparse=True"]
    if module.num_embeddings % tp:
        return [f"{name}: {module.num_embeddings} rows do not split into {tp} equal parts: pad the "
                f"table to a multiple of tp={tp}"]
    return []


def _layer_problem(name: str, module: nn.Module, style: str, tp: int, kv_heads: int) -> list[str]:
    if style in EMBEDDING_STYLES:
        return _embedding_problem(name, module, tp)
    if not hasattr(module, "weight") or module.weight.dim() != 2:
        return [f"{name} ({type(module).__name__}) is not a linear layer; the plan can only split "
                f"nn.Linear and Conv1D"]
    transposed = isinstance(module, Conv1D)
    out_features, in_features = module.weight.shape[::-1] if transposed else module.weight.shape
    if style == "rowwise":
        size, what = in_features, "input features"
    else:
        size, what = out_features, "output features"
    # kv projections with tp > kv-heads are cut into kv-heads pieces, each held by tp/kv ranks.
    parts = kv_heads if name.endswith(KV_PROJECTIONS) and tp > kv_heads else tp
    blocks = STYLE_BLOCKS[style]
    if size % (blocks * parts):
        return [f"{name}: {size} {what} do not split into {blocks} block(s) x {parts} parts "
                f"(e.g. intermediate_size must divide by tp={tp})"]
    return []
