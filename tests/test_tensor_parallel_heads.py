"""Unit tests of the head counts tensor parallelism reads: per layer, per attention module."""

from transformers import AutoConfig
from torch import nn

from goose_core.tensor_parallel.heads import layer_values, module_heads, module_value


def _config(**per_layer: dict) -> object:
    return AutoConfig.for_model("llama", num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                num_hidden_layers=2, **({"per_layer_config": per_layer} if per_layer else {}))


def _attention(layer_idx: int, **attrs: int) -> nn.Module:
    module = nn.Module()
    module.layer_idx = layer_idx
    for name, value in attrs.items():
        setattr(module, name, value)
    return module


def test_layer_values_reads_every_layer_of_a_heterogeneous_config() -> None:
    assert layer_values(_config()) == ([4], [2])
    assert layer_values(_config(**{"1": {"num_key_value_heads": 4}})) == ([4], [2, 4])  # no global read


def test_module_heads_prefer_the_modules_own_counts() -> None:
    plain, mixed = _config(), _config(**{"1": {"num_key_value_heads": 4}})
    assert module_heads(_attention(0), plain) == (4, 2)
    # MiMo-V2-Flash's sliding layers: twice the config's kv-heads, kept only as the group size
    assert module_heads(_attention(0, num_key_value_groups=1), plain) == (4, 4)
    assert module_heads(_attention(0, num_heads=8, num_key_value_heads=8), plain) == (8, 8)
    assert module_heads(_attention(0), mixed) == (4, 2) and module_heads(_attention(1), mixed) == (4, 4)


def test_module_value_falls_back_on_its_layers_config() -> None:
    config = _config(**{"1": {"head_dim": 8}})
    assert module_value(_attention(1, head_dim=32), config, "head_dim") == 32
    assert module_value(_attention(1), config, "head_dim") == 8
    assert module_value(_attention(0), config, "no_such_field") is None
