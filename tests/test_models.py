"""Unit tests of the tiny model zoo."""

import pytest
import torch

from goose_core.testing import FAMILIES, build_model, tiny_config


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sizes_split_by_two_and_four(family: str) -> None:
    c = tiny_config(family)
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    for n in (2, 4):
        assert c.vocab_size % n == 0 and c.num_hidden_layers % n == 0 and c.num_attention_heads % n == 0
    assert kv % 2 == 0


def test_llama_uses_grouped_query_attention() -> None:
    c = tiny_config("llama")
    assert c.num_key_value_heads < c.num_attention_heads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_seeded_weights(family: str) -> None:
    a, b, c = build_model(family, seed=3), build_model(family, seed=3), build_model(family, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_overrides_and_bad_names() -> None:
    assert tiny_config("gpt2", n_layer=8).n_layer == 8
    with pytest.raises(ValueError, match="unknown model family 'opt'"):
        tiny_config("opt")
    with pytest.raises(ValueError, match="has no attribute 'n_lyaer'"):
        tiny_config("gpt2", n_lyaer=8)
