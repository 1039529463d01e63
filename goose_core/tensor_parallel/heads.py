"""Head counts where they really live: per layer (heterogeneous configs) and per attention module.

A config's ``num_attention_heads`` / ``num_key_value_heads`` is not always what a layer computes
with::

    MiMo-V2-Flash   sliding layers have twice the config's kv-heads (a module attribute:
                    num_key_value_groups = heads / its own kv-heads)
    Dots 3 Note     per_layer_config: the global value raises (AmbiguousGlobalPerLayerAttribute)

so the size checks read every layer's value, and the localize step and the kv-replica decision
read each attention module's own counts, falling back on its layer's config.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["HEAD_ATTRS", "KV_ATTRS", "layer_values", "module_heads", "module_value"]

#: Attribute names an attention module keeps its query-head count under.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads")

#: Attribute names an attention module keeps its key/value-head count under.
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _layer_configs(config: Any) -> list[Any]:
    if getattr(config, "is_heterogeneous", False):
        return [config.per_layer_config[i] for i in range(config.num_hidden_layers)]
    return [config]


def _kv_of(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def layer_values(config: Any) -> tuple[list[int], list[int]]:
    """The distinct (query-head, kv-head) counts over ``config``'s layers, in layer order."""
    layers = _layer_configs(config)
    heads = list(dict.fromkeys(c.num_attention_heads for c in layers))
    kv = list(dict.fromkeys(_kv_of(c) for c in layers))
    return heads, kv


def _first_int(module: nn.Module, names: tuple[str, ...]) -> int | None:
    return next((v for n in names if isinstance(v := getattr(module, n, None), int)), None)


def _layer_of(module: nn.Module, config: Any) -> Any:
    layers = _layer_configs(config)
    index = getattr(module, "layer_idx", None)
    return layers[index] if len(layers) > 1 and isinstance(index, int) and 0 <= index < len(layers) \
        else layers[0]


def module_value(module: nn.Module, config: Any, name: str) -> Any:
    """``module``'s own attribute ``name`` where it is an int, else its layer's config value (None
    when neither has it), e.g. MLA's ``qk_rope_head_dim``."""
    own = getattr(module, name, None)
    return own if isinstance(own, int) else getattr(_layer_of(module, config), name, None)


def module_heads(module: nn.Module, config: Any) -> tuple[int, int]:
    """(query heads, kv-heads) ``module`` computes with: its own attributes where it has them,
    kv-heads from its ``num_key_value_groups``, else its layer's config (``layer_idx``)."""
    layer = _layer_of(module, config)
    heads = _first_int(module, HEAD_ATTRS) or layer.num_attention_heads
    kv = _first_int(module, KV_ATTRS)
    groups = getattr(module, "num_key_value_groups", None)
    if kv is None and isinstance(groups, int) and groups > 0 and heads % groups == 0:
        kv = heads // groups
    return heads, kv or _kv_of(layer)
