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


def test_gemma_style_norms_run_in_the_model_dtype_in_float64() -> None:
    from transformers import AutoConfig

    from goose_core.testing.models import norms_in_dtype, seeded_model

    config = AutoConfig.for_model("gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=256)
    model = seeded_model(config, 0, torch.float64)
    norm = model.model.norm
    x = torch.randn(2, 3, 32, dtype=torch.float64, requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad.dtype == torch.float64
    expected = x.detach() * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm.weight.grad, expected.sum((0, 1)), rtol=1e-15, atol=1e-15)
    fp32 = seeded_model(config, 0, torch.float32)
    assert "forward" in norm.__dict__ and "forward" not in fp32.model.norm.__dict__  # float64 only
    assert norms_in_dtype(fp32) == ["Gemma3RMSNorm"]
