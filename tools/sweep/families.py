"""Every causal-LM family of the installed transformers, each as a tiny seeded config.

The sweep (:mod:`sweep.coverage`) runs every family that declares its plans
(``base_model_tp_plan`` and/or ``base_model_pp_plan``), plus a few decoder-only families that
declare none (:data:`PLANLESS`), at one tiny size::

    hidden 64, 4 heads, 2 kv-heads, head_dim 16, 4 layers, vocab 256, 128 positions
    MoE: 4 experts, top-2, expert width 32, the router's auxiliary loss on
    MLA: kv rank 16, q rank 32, rope/nope head dims 8/8, value head dim 16
    sliding windows of 8 tokens (shorter than the 32-token batch, so a dropped window shows),
    multipliers and scales away from 1 (Granite's), so a dropped one shows,
    layer types alternating sliding/full where the family has both

A field is set only where the family's config has it, so one table serves every family; the
config's own constructor then derives the rest (layer types, rope tables, head dims).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = ["SweepFamily", "PLANLESS", "TINY", "NotBuildable", "families", "expert_families", "tiny_family_config"]

#: Decoder-only families without declared plans that the sweep lists anyway: goose's own
#: adapters (GPT-2, Bloom) and what users ask for (OPT, Falcon, StableLM, ...).
PLANLESS: tuple[str, ...] = ("gpt2", "bloom", "opt", "falcon", "stablelm", "gpt_neo", "gpt_bigcode",
                             "persimmon", "biogpt", "xglm")

#: The tiny size, by 🤗 config field name; a family gets the fields its config has.
TINY: dict[str, Any] = {
    "vocab_size": 256, "unpadded_vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128,
    # mixtures of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "output_router_logits": True,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    # windows shorter than the batch's 32 tokens
    "sliding_window": 8,
    # linear-attention and state-space layers of hybrids
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_head_dim": 16, "linear_num_heads": 4,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_ssm": 128, "mamba_d_state": 16, "mamba_chunk_size": 16,
    # partial rotary dimensions (GPT-J, CodeGen): half of a 16-wide head
    "rotary_dim": 8,
    # GPT-Neo: one global and one local layer, twice
    "attention_types": [[["global", "local"], 2]],
    # Granite's multipliers (its 3.0 2B values: 1.0, the default, would hide a dropped one)
    "embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
    "attention_multiplier": 0.015625,
    # Gemma 4: the per-layer-input embedding (262144 x 1024 by default: 2 GB a float64 copy) and
    # the full-attention layers' head dim (512 by default: scaled-1.0 logits over 512-wide normed
    # heads amplify float64 noise ~1000x) at the tiny size too
    "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16, "global_head_dim": 16,
    # training: no key/value cache (hybrids whose 4 tiny layers hold no attention layer have none)
    "use_cache": False,
}

#: TINY fields some constructors take only as keyword arguments they pop (no config attribute).
_POPPED = ("global_head_dim",)
_SLIDING_AND_FULL = ["sliding_attention", "full_attention"]


class NotBuildable(Exception):
    """A family that the sweep cannot build at the tiny size (the message says why)."""


@dataclass(frozen=True)
class SweepFamily:
    """One 🤗 model type with a causal-LM class, and the plans its config declares."""

    model_type: str
    model_class: str
    tp_plan: bool
    pp_plan: bool

    @property
    def declares(self) -> str:
        """Which plans the config declares: "tp+pp", "tp", "pp" or "none"."""
        return "+".join(k for k, has in (("tp", self.tp_plan), ("pp", self.pp_plan)) if has) or "none"


def families(include_planless: bool = True) -> list[SweepFamily]:
    """The causal-LM families of the installed transformers that declare a tp or pp plan (and,
    with ``include_planless``, those of :data:`PLANLESS` that this transformers has), by name."""
    found = []
    for model_type, model_class in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        if model_type not in CONFIG_MAPPING:
            continue
        config_class = CONFIG_MAPPING[model_type]
        family = SweepFamily(model_type, model_class, bool(getattr(config_class, "base_model_tp_plan", None)),
                             bool(getattr(config_class, "base_model_pp_plan", None)))
        if family.tp_plan or family.pp_plan or (include_planless and model_type in PLANLESS):
            found.append(family)
    return found


#: The config fields that count a mixture's experts, under the families' names.
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def expert_families() -> list[str]:
    """The model types of :func:`families` whose tiny config has more than one expert (what the
    expert-parallel modes sweep); families whose tiny config cannot be built are left out."""
    found = []
    for family in families():
        try:
            config = tiny_family_config(family.model_type)
        except NotBuildable:
            continue
        if any((getattr(config, k, None) or 0) > 1 for k in _EXPERT_COUNTS):
            found.append(family.model_type)
    return found


def _fields(config_class: type[PretrainedConfig]) -> set[str]:
    """The field names ``config_class`` accepts, under 🤗's generic names where it maps them."""
    if dataclasses.is_dataclass(config_class):
        names = {f.name for f in dataclasses.fields(config_class)}
    else:
        names = set(inspect.signature(config_class.__init__).parameters)
    return names | set(getattr(config_class, "attribute_map", {}))


def _source(config_class: type[PretrainedConfig]) -> str:
    try:
        return inspect.getsource(config_class)
    except (OSError, TypeError):
        return ""


def tiny_family_config(model_type: str) -> PretrainedConfig:
    """``model_type``'s config at the :data:`TINY` size, no dropout, token ids inside the vocabulary.

    Raises:
        NotBuildable: the config has sub-configs (a composite model: its text model is swept
            under its own name) or refuses the tiny fields (its message says why).
    """
    config_class = CONFIG_MAPPING[model_type]
    if getattr(config_class, "sub_configs", None):
        raise NotBuildable(f"composite config (sub-configs {sorted(config_class.sub_configs)}); "
                           f"not a plain text model at the tiny size")
    fields = _fields(config_class) | {k for k in _POPPED if f'kwargs.pop("{k}"' in _source(config_class)}
    tiny = {k: v for k, v in TINY.items() if k in fields}
    if "kv_lora_rank" in fields:  # MLA: the rotary part of a head is its head_dim; no GQA
        tiny.update(head_dim=TINY["qk_rope_head_dim"], num_key_value_heads=TINY["num_attention_heads"])
    config = _construct(config_class, tiny)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and set(layer_types) <= set(_SLIDING_AND_FULL) \
            and "sliding_attention" in layer_types:
        # both kinds of layer in 4 (the constructor derives per-layer fields from them)
        alternating = [_SLIDING_AND_FULL[i % 2] for i in range(config.num_hidden_layers)]
        config = _construct(config_class, {**tiny, "layer_types": alternating})
    _settle(config)
    return config


def _construct(config_class: type[PretrainedConfig], fields: dict[str, Any]) -> PretrainedConfig:
    try:
        return config_class(**fields)
    except Exception as err:  # any validation error of the config is the reason
        raise NotBuildable(f"config rejects the tiny size: {type(err).__name__}: {err}") from err


def _settle(config: PretrainedConfig) -> None:
    """No dropout, every token id inside the vocabulary, MoE experts run eagerly."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
        elif key.endswith("_token_id") and isinstance(value, int) and value >= TINY["vocab_size"]:
            setattr(config, key, 0)  # GPT-2's 50256 and the like lie outside a byte vocabulary
        elif key.endswith("_token_id") and isinstance(value, list):
            setattr(config, key, [v for v in value if v < TINY["vocab_size"]] or 0)
    # 🤗's grouped-matmul experts take no float64; the eager loop is the reference semantics
    config._experts_implementation = "eager"
    config.loss_type = "ForCausalLM"
