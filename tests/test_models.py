"""Unit tests of the tiny model zoo."""

import pytest
import torch

from goose_core.testing import TINY_MODELS, build_model, tiny_config


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_sizes_split_by_two_and_four(family: str) -> None:
    c = tiny_config(family)
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    for n in (2, 4):
        assert c.vocab_size % n == 0 and c.num_hidden_layers % n == 0 and c.num_attention_heads % n == 0
    assert kv % 2 == 0


def test_llama_uses_grouped_query_attention() -> None:
    c = tiny_config("llama")
    assert c.num_key_value_heads < c.num_attention_heads


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
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
    """Gemma's norm computes ``_norm(x.float()) * (1 + w.float())``: widened in a float64 model."""
    from transformers import AutoConfig

    from goose_core.testing.models import seeded_model
    from goose_core.testing.widen import is_widened

    config = AutoConfig.for_model("gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=256)
    model = seeded_model(config, 0, torch.float64)
    norm = model.model.norm
    x = torch.randn(2, 3, 32, dtype=torch.float64, requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad.dtype == torch.float64
    expected = x.detach() * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm.weight.grad, expected.sum((0, 1)), rtol=1e-15, atol=1e-15)
    assert is_widened(model) and not is_widened(seeded_model(config, 0, torch.float32))  # float64 only


def test_widened_model_keeps_float32_requests_in_float64() -> None:
    from torch import nn

    from goose_core.testing.widen import widen_float32

    class Narrowing(nn.Module):  # the 🤗 idioms for "at least float32"
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x.float(), x.to(torch.float32), x.to("cpu", torch.float32), x.to(dtype=torch.float32),
                    x.softmax(-1, dtype=torch.float32), torch.zeros(2, dtype=torch.float32),
                    x.type(torch.float32), torch.arange(3).float(), x.to(torch.bfloat16), self.w * x]

    outer = nn.Sequential(Narrowing()).double()
    x = torch.randn(3, dtype=torch.float64)
    assert [t.dtype for t in outer(x)][:3] == [torch.float32] * 3  # not widened: float32 as asked
    widen_float32(outer)
    assert [t.dtype for t in outer(x)] == [torch.float64] * 8 + [torch.bfloat16, torch.float64]
    assert outer[0](x)[0].dtype == torch.float64  # an inner module called alone is covered too
    assert x.float().dtype == torch.float32  # only while the model runs
    with pytest.raises(RuntimeError):
        outer(torch.randn(2, 5, dtype=torch.float64))  # the mode is left when the forward raises
    assert x.float().dtype == torch.float32
