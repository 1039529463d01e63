"""Tensor-parallel plans: which HF modules and parameters each style splits, and what must divide by tp.

A plan maps module- or parameter-name patterns (``*`` = a layer index) to a style, in the format
transformers configs declare as ``config.base_model_tp_plan`` (relative to the base model)::

    {"layers.*.self_attn.q_proj": "colwise", ..., "layers.*.self_attn.o_proj": "rowwise"}

A family that declares one (Llama, Mistral, Qwen2, GPT-NeoX, ...) needs no goose code. A family
that declares none registers an :class:`Adapter` (see ``goose_core.models``): the plan, plus a
``localize`` step that makes its attention read per-rank head counts.

Every style transformers 5.24 declares, as goose implements it (Megatron-style, no DTensor)::

    on a Linear (or Conv1D)
    colwise              split by output features, output stays split   -> ColumnParallelLinear
    packed_colwise       the same, output = gate | up, each block split  -> ColumnParallelLinear(blocks=2)
    fused_qkv_colwise    the same, output = q | k | v (goose only)       -> ColumnParallelLinear(blocks=3)
    colwise_gather_output  split by output features, output all-gathered -> ColumnParallelLinear(gather_output)
    rowwise              split by input features, input arrives split    -> RowParallelLinear
    rowwise_split_input  the same, input replicated: keep my slice       -> RowParallelLinear(input_is_parallel=False)
    rowwise_scatter_output  rowwise, then keep my slice of the output   -> RowParallelLinear(scatter_output)
                         (goose only: Doge's dt_proj, all heads' values -> this rank's kv-heads)
    on an Embedding (a family subclass keeps its own forward: Gemma's embed_scale)
    embedding_rowwise    split by vocabulary rows, one all-reduce        -> VocabParallelEmbedding
    embedding_colwise    split by hidden columns, one all-gather         -> ColumnParallelEmbedding
    on a parameter (its module's own forward runs on the shard)
    colwise / packed_colwise   split dim -2 (dim 0 of a vector), packed: gate | up block by block
    rowwise / packed_rowwise   split dim -1 (a vector is replicated), packed: block by block
    on any module (the family's module is kept; styles.py adds the collectives)
    moe_tp_experts       every expert split (its parameters' entries), routing unchanged:
                         f on the float inputs, one all-reduce of the expert outputs (g)
    all_reduce           the same f ... g around a module whose output is a partial sum
    moe_identity_expert  inputs divided by tp, inside moe_tp_experts (its sum adds tp copies)
    replicated_with_grad_allreduce  replicated norm on split heads: gradient all-reduced
    mla_kv_a_proj        replicated MLA kv_a: all-reduce of the rope part's gradient
    local_params, replicate   nothing to do: goose's parameters are already local tensors
    sequence_parallel    turns on sequence parallelism (:mod:`.sequence`): the residual stream
                         between regions, the named norms among it, split along the sequence

Any unknown style is refused by name, before anything is sharded; so is what a style would silently change: a linear
subclass with its own forward, a parameter held whole in a module that runs on a share, a
``gate_up`` weight split plainly (transformers 5.24 declares ``colwise`` for Inkling's packed one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from torch import nn
from transformers.pytorch_utils import Conv1D

from goose_core.models.family import TensorParallelAdapter as Adapter
from goose_core.models.registry import TENSOR_PARALLEL, register_tensor_parallel
from goose_core.tensor_parallel.heads import layer_values, module_heads, module_value

__all__ = ["Adapter", "ADAPTERS", "register_adapter", "TPPlan", "resolve_plan", "check_sizes",
           "STYLE_BLOCKS", "ROW_STYLES", "GATHERED_STYLES", "EMBEDDING_STYLES", "MODULE_STYLES",
           "PARTIAL_SUM_STYLES", "PARAM_STYLES", "STYLES", "KV_PROJECTIONS", "param_split"]

#: Linear styles -> fused blocks along the output (gate|up = 2; GPT-2's q|k|v = 3).
STYLE_BLOCKS = {"colwise": 1, "packed_colwise": 2, "fused_qkv_colwise": 3, "colwise_gather_output": 1,
                "rowwise": 1, "rowwise_split_input": 1, "rowwise_scatter_output": 1}

#: Linear styles split by input features (the rest split by output features).
ROW_STYLES = ("rowwise", "rowwise_split_input", "rowwise_scatter_output")

#: Linear styles whose replicated side faces the rest of the block (no region, no per-rank heads).
GATHERED_STYLES = ("colwise_gather_output", "rowwise_split_input")

#: Embedding styles: the table split by vocabulary rows or by hidden columns (transformers 5.24
#: declares rowwise for GPT-NeoX's ``embed_in``, GPT-J's ``wte``, ...).
EMBEDDING_STYLES = ("embedding_rowwise", "embedding_colwise")

#: Styles on a module whose parameters the plan splits (or keeps): its output is a sum of
#: partial results over tp (f on its inputs, g on its output).
PARTIAL_SUM_STYLES = ("moe_tp_experts", "all_reduce")

#: Styles that keep the family's module and add collectives around it (see styles.py).
MODULE_STYLES = (*PARTIAL_SUM_STYLES, "moe_identity_expert", "replicated_with_grad_allreduce",
                 "mla_kv_a_proj", "local_params", "replicate", "sequence_parallel")

#: Styles on a parameter -> (dimension counted from the end for a matrix, blocks); a vector
#: under a row style is replicated (a bias added after the sum).
PARAM_STYLES = {"colwise": (2, 1), "packed_colwise": (2, 2), "rowwise": (1, 1), "packed_rowwise": (1, 2),
                "replicate": (0, 1)}

#: Every style goose implements.
STYLES = (*STYLE_BLOCKS, *EMBEDDING_STYLES, *MODULE_STYLES, "packed_rowwise")

#: Separate key/value projections: split by kv-heads, replicated when tp > kv-heads.
KV_PROJECTIONS = ("k_proj", "v_proj")

#: Owners whose forward may run on split parameters (the others would compute with a piece).
_PARAM_OWNERS = (*PARTIAL_SUM_STYLES, "local_params")


def param_split(style: str, ndim: int) -> tuple[int, int] | None:
    """(dim, blocks) a parameter style splits a tensor of ``ndim`` dimensions along, or None
    when it stays replicated (``replicate``; a vector under a row style)."""
    from_end, blocks = PARAM_STYLES[style]
    if from_end == 0 or (ndim == 1 and from_end == 1):
        return None
    return (0 if ndim == 1 else ndim - from_end), blocks


#: model_type -> Adapter: a view of the tensor-parallel halves in goose_core.models.registry.
ADAPTERS = TENSOR_PARALLEL


def register_adapter(model_type: str, adapter: Adapter) -> None:
    """Teach goose a family without a declared plan (``config.model_type`` names it)."""
    register_tensor_parallel(model_type, adapter)


@dataclass(frozen=True)
class TPPlan:
    """A plan resolved against one model: full module names -> style, full parameter names ->
    style (entries naming a parameter, as MoE experts' weights), and the localize step."""

    layers: dict[str, str]
    localize: Callable[[nn.Module, int, int], None] | None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def sequence_parallel(self) -> bool:
        """Whether the plan asks for sequence parallelism (🤗's ``sequence_parallel`` entries)."""
        return "sequence_parallel" in self.layers.values()


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


def _unsupported(key: str, style: str, model: nn.Module) -> ValueError:
    why = "goose does not know this style"
    return ValueError(f"plan entry {key!r}: style {style!r} is not supported by goose ({why}; "
                      f"supported: {sorted(STYLES)}); replace or drop that entry of "
                      f"model.config.base_model_tp_plan, or register an Adapter for "
                      f"{getattr(model.config, 'model_type', '?')!r}")


def _base_prefix(model: nn.Module) -> str:
    """Where the plan's names start: the base model's attribute. 🤗's ``base_model_prefix`` names
    it, except where a class keeps its base model elsewhere (Llama 4's text model declares
    ``language_model`` and holds ``model``): then ``model``, else the root."""
    children = dict(model.named_children())
    declared = getattr(model, "base_model_prefix", "")
    return next((p for p in (declared, "model") if p and p in children), "")


def resolve_plan(model: nn.Module) -> TPPlan:
    """Match ``model``'s declared plan (or its family's adapter) against its module and
    parameter names.

    Raises:
        ValueError: no plan and no adapter, a style goose does not implement, or a style put
            on a parameter that only applies to modules.
    """
    adapter = ADAPTERS.get(getattr(model.config, "model_type", ""))
    declared = adapter.plan if adapter else getattr(model.config, "base_model_tp_plan", None)
    if not declared:
        raise _no_plan_error(model)
    prefix = _base_prefix(model)
    modules = [name for name, _ in model.named_modules()]
    params = [name for name, _ in model.named_parameters()]
    layers: dict[str, str] = {}
    split_params: dict[str, str] = {}
    for key, style in declared.items():
        if style not in STYLES:
            raise _unsupported(key, style, model)
        pattern = _pattern(prefix, key)
        layers.update({name: style for name in modules if pattern.match(name)})
        named = {name: style for name in params if pattern.match(name)}
        if named and style not in PARAM_STYLES:
            raise ValueError(f"plan entry {key!r} names parameters ({next(iter(named))}) but style "
                             f"{style!r} applies to modules; on a parameter goose supports "
                             f"{sorted(PARAM_STYLES)}")
        split_params.update(named)
    if not layers and not split_params:
        raise ValueError(f"the tensor-parallel plan of {type(model).__name__} matches none of its modules")
    whole = _whole_experts(model)
    layers = {name: style for name, style in layers.items() if not _inside(name, whole)}
    split_params = {name: style for name, style in split_params.items() if not _inside(name, whole)}
    return TPPlan(layers, adapter.localize if adapter else None, split_params)


def _whole_experts(model: nn.Module) -> set[str]:
    """The experts modules ExpertParallel spread (``goose_experts``): kept whole on every
    tensor-parallel rank (Megatron's default: attention tp-split, experts split by EP only)."""
    return {name for name, m in model.named_modules() if hasattr(m, "goose_experts")}


def _inside(name: str, modules: set[str]) -> bool:
    return any(name == m or name.startswith(f"{m}.") for m in modules)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_sizes(model: nn.Module, plan: TPPlan, tp: int) -> None:
    """Raise one ValueError listing every size that does not split over ``tp`` ranks, and every
    module a style cannot split without changing its numbers.

    Pure: reads only the config and module shapes, so every rank raises the same error before
    any collective.
    """
    config = model.config
    modules = dict(model.named_modules())
    all_heads, all_kv = layer_values(config)  # one value each, or one per kind of layer
    all_kv += [kv for kv in dict.fromkeys(module_heads(modules[n.rpartition(".")[0]], config)[1]
                                          for n in plan.layers if n.endswith(KV_PROJECTIONS)) if kv not in all_kv]
    problems = []
    for heads in all_heads:
        if heads % tp:
            problems.append(f"num_attention_heads={heads} does not divide by tp={tp}: "
                            f"choose tp in {_divisors(heads)}")
    for kv_heads in all_kv:
        if kv_heads % tp and tp % kv_heads:
            problems.append(f"num_key_value_heads={kv_heads} and tp={tp}: one must divide the other "
                            f"(kv-heads are split when tp <= {kv_heads}, replicated when tp is a multiple)")
    if config.vocab_size % tp:
        problems.append(f"vocab_size={config.vocab_size} does not divide by tp={tp}: pad the vocabulary, "
                        f"e.g. model.resize_token_embeddings(n, pad_to_multiple_of={tp})")
    for name, style in plan.layers.items():
        kv_heads = module_heads(modules[name.rpartition(".")[0]], config)[1]
        problems += _layer_problem(name, modules[name], style, tp, kv_heads)
        problems += _module_problem(name, modules[name], style, plan,
                                    module_value(modules[name.rpartition(".")[0]], config, "qk_rope_head_dim"))
    params = dict(model.named_parameters())
    for name, style in plan.params.items():
        problems += _param_problem(name, params[name], style, tp, plan)
    adapter = ADAPTERS.get(getattr(config, "model_type", ""))
    if adapter is not None:
        problems += adapter.check(config, tp)
    if problems:
        raise ValueError(f"cannot split {type(model).__name__} over tp={tp}:\n  " + "\n  ".join(problems))


def _embedding_problem(name: str, module: nn.Module, style: str, tp: int) -> list[str]:
    if not isinstance(module, nn.Embedding):
        return [f"{name} ({type(module).__name__}) is not an nn.Embedding; {style} splits the table "
                f"of an nn.Embedding (or of a subclass whose forward calls nn.Embedding.forward)"]
    if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
        return [f"{name}: a split embedding supports neither max_norm, sparse=True nor scale_grad_by_freq"]
    size, what = (module.num_embeddings, "rows") if style == "embedding_rowwise" else \
        (module.embedding_dim, "columns")
    if size % tp:
        return [f"{name}: {size} {what} do not split into {tp} equal parts: pad the table to a "
                f"multiple of tp={tp}"]
    return []


def _linear_problem(name: str, module: nn.Module, style: str, tp: int, kv_heads: int) -> list[str]:
    if not isinstance(module, (nn.Linear, Conv1D)):
        return [f"{name} ({type(module).__name__}) is not a linear layer; {style} splits nn.Linear "
                f"and Conv1D"]
    base = Conv1D if isinstance(module, Conv1D) else nn.Linear
    if type(module).forward is not base.forward:
        # goose's parallel linear computes x W^T + b only: what the subclass adds would vanish.
        return [f"{name} ({type(module).__name__}) overrides {base.__name__}.forward; {style} would "
                f"replace it by a plain split matmul and lose what it adds: declare that entry "
                f"'replicate' or register an Adapter that splits it"]
    if _packed_problem(name, style):
        return _packed_problem(name, style)
    transposed = isinstance(module, Conv1D)
    out_features, in_features = module.weight.shape[::-1] if transposed else module.weight.shape
    if style == "rowwise_scatter_output" and out_features % tp:
        return [f"{name}: {out_features} output features do not split into {tp} parts (rowwise_scatter_output "
                f"keeps each rank's slice of the output)"]
    size, what = (in_features, "input features") if style in ROW_STYLES else (out_features, "output features")
    # split kv projections with tp > kv-heads are cut into kv-heads pieces, each on tp/kv ranks.
    replicated = name.endswith(KV_PROJECTIONS) and tp > kv_heads and style not in GATHERED_STYLES
    parts = kv_heads if replicated else tp
    blocks = STYLE_BLOCKS[style]
    if size % (blocks * parts):
        return [f"{name}: {size} {what} do not split into {blocks} block(s) x {parts} parts "
                f"(e.g. intermediate_size must divide by tp={tp})"]
    return []


def _packed_problem(name: str, style: str) -> list[str]:
    # transformers 5.24 declares plain colwise for Inkling's experts.gate_up_proj, whose forward
    # chunks it into gate | up: a plain split gives rank 0 the gates and rank 1 the ups.
    if "gate_up" in name.rpartition(".")[2] and style in ("colwise", "rowwise"):
        return [f"{name}: the name says gate | up are packed, and a plain {style} split would give the "
                f"first ranks only gates and the last only ups; declare it packed_{style} in "
                f"model.config.base_model_tp_plan"]
    return []


def _module_problem(name: str, module: nn.Module, style: str, plan: TPPlan, rope_dim: object) -> list[str]:
    if style in _PARAM_OWNERS:
        # Its forward runs on this rank's share (of the heads, of every expert): a parameter
        # held whole would get only this rank's share of its gradient (and, in a summed
        # output, be counted once per rank).
        whole = [f"{name}.{p}" for p, param in module.named_parameters(recurse=False)
                 if f"{name}.{p}" not in plan.params or param_split(plan.params[f"{name}.{p}"], param.dim()) is None]
        if whole:
            return [f"{name} ({type(module).__name__}, {style}): its forward runs on this rank's share, so "
                    f"every parameter it holds must be split by its own plan entry (colwise, rowwise, "
                    f"packed_colwise, packed_rowwise on a matrix; colwise on a vector); held whole: {whole}"]
    if style == "mla_kv_a_proj":
        if not isinstance(module, nn.Linear):
            return [f"{name} ({type(module).__name__}): mla_kv_a_proj expects an nn.Linear"]
        if not isinstance(rope_dim, int):
            return [f"{name}: mla_kv_a_proj needs config.qk_rope_head_dim (the width of the rope part "
                    f"of its output)"]
    return []


def _layer_problem(name: str, module: nn.Module, style: str, tp: int, kv_heads: int) -> list[str]:
    if style in EMBEDDING_STYLES:
        return _embedding_problem(name, module, style, tp)
    if style in STYLE_BLOCKS:
        return _linear_problem(name, module, style, tp, kv_heads)
    if style == "packed_rowwise":
        return [f"{name}: packed_rowwise applies to a parameter (an experts' gate_up_proj), not to a "
                f"{type(module).__name__} module"]
    return []


def _param_problem(name: str, param: nn.Parameter, style: str, tp: int, plan: TPPlan) -> list[str]:
    owner = name.rpartition(".")[0]
    if style == "replicate":  # whole, as if unnamed (an owner that splits its work refuses it)
        return []
    if plan.layers.get(owner) not in _PARAM_OWNERS:
        return [f"{name}: a parameter entry ({style}) needs its module {owner!r} styled one of "
                f"{list(_PARAM_OWNERS)}, whose forward runs on the split parameter; it has "
                f"{plan.layers.get(owner)!r}"]
    split = param_split(style, param.dim())
    if split is not None and _packed_problem(name, style):
        return _packed_problem(name, style)
    if split is not None and param.shape[split[0]] % (split[1] * tp):
        return [f"{name}: dimension {split[0]} of size {param.shape[split[0]]} does not split into "
                f"{split[1]} block(s) x {tp} parts"]
    return []
