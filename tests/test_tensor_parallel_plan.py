"""Unit tests of tensor-parallel plans: declared, adapted, and the errors that say what to change."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTBigCodeConfig, GPTNeoXConfig

from goose_core.tensor_parallel import check_sizes, resolve_plan
from goose_core.testing import build_model


def test_llama_uses_its_declared_plan() -> None:
    plan = resolve_plan(build_model("llama"))
    assert plan.localize is None and len(plan.layers) == 4 * 7
    assert plan.layers["model.layers.3.self_attn.k_proj"] == "colwise"
    assert plan.layers["model.layers.0.mlp.down_proj"] == "rowwise"


@pytest.mark.parametrize("family, fused", [("gpt2", "transformer.h.0.attn.c_attn"),
                                           ("bloom", "transformer.h.0.self_attention.query_key_value")])
def test_families_without_a_plan_use_goose_adapters(family: str, fused: str) -> None:
    plan = resolve_plan(build_model(family))
    assert plan.localize is not None and len(plan.layers) == 4 * 4 and fused in plan.layers


def test_a_plan_starts_at_the_base_model_the_class_really_holds() -> None:
    # Llama 4's text LM declares base_model_prefix "language_model" but keeps its base model at "model".
    from transformers import Llama4TextConfig

    config = Llama4TextConfig(vocab_size=256, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                              num_local_experts=2)
    plan = resolve_plan(AutoModelForCausalLM.from_config(config))
    assert plan.layers["model.layers.0.self_attn.q_proj"] == "colwise"


def test_a_family_without_plan_or_adapter_says_how_to_add_one() -> None:
    # GPTBigCode declares no plan and goose_core.models has no entry for it (OPT now has one).
    config = GPTBigCodeConfig(vocab_size=256, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="model_type 'gpt_bigcode'.*base_model_tp_plan.*register_adapter"):
        resolve_plan(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("overrides, tp, message", [
    ({}, 3, r"num_attention_heads=4 does not divide by tp=3: choose tp in \[1, 2, 4\]"),
    ({"num_key_value_heads": 1, "num_attention_heads": 8}, 8, None),
    ({"num_key_value_heads": 4, "num_attention_heads": 8, "hidden_size": 128}, 8, None),
    ({"vocab_size": 250}, 4, r"vocab_size=250 does not divide by tp=4: pad the vocabulary"),
    ({"intermediate_size": 130}, 4, r"mlp.up_proj: 130 output features do not split into 1 block\(s\) x 4"),
])
def test_sizes_that_do_not_split_name_the_fix(overrides: dict, tp: int, message: str | None) -> None:
    model = build_model("llama", **overrides)
    plan = resolve_plan(model)
    if message is None:  # kv-heads replicated (tp multiple of kv) or split (kv multiple of tp)
        check_sizes(model, plan, tp)
        return
    with pytest.raises(ValueError, match=message):
        check_sizes(model, plan, tp)


def test_kv_heads_and_tp_must_divide_one_way() -> None:
    model = build_model("llama", num_attention_heads=12, num_key_value_heads=3, hidden_size=96)
    with pytest.raises(ValueError, match="num_key_value_heads=3 and tp=2: one must divide the other"):
        check_sizes(model, resolve_plan(model), 2)


def _with_entry(family: str, key: str, style: str, **overrides) -> torch.nn.Module:
    model = build_model(family, **overrides)
    model.config.base_model_tp_plan = {**model.config.base_model_tp_plan, key: style}
    return model


def test_embedding_rowwise_names_the_embedding() -> None:
    # transformers 5.24 declares it for GPT-NeoX's embed_in (older releases do not: add it here).
    config = GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(config)
    model.config.base_model_tp_plan = {**model.config.base_model_tp_plan, "embed_in": "embedding_rowwise"}
    plan = resolve_plan(model)
    assert plan.layers["gpt_neox.embed_in"] == "embedding_rowwise"
    check_sizes(model, plan, 2)


@pytest.mark.parametrize("style, reason", [("colwise_sideways", "goose does not know this style")])
def test_an_unsupported_style_is_refused_by_name(style: str, reason: str) -> None:
    model = _with_entry("llama", "layers.*.input_layernorm", style)
    with pytest.raises(ValueError, match=rf"plan entry 'layers.\*.input_layernorm': style '{style}' is not "
                                         rf"supported by goose \({reason}.*supported: \[.*'embedding_rowwise'.*\]\)"):
        resolve_plan(model)


@pytest.mark.parametrize("key, overrides, message", [
    ("layers.*.mlp.up_proj", {}, r"model.layers.0.mlp.up_proj \(Linear\) is not an nn.Embedding"),
    ("embed_tokens", {"vocab_size": 250}, r"model.embed_tokens: 250 rows do not split into 4 equal parts"),
])
def test_embedding_rowwise_sizes_and_types_name_the_fix(key: str, overrides: dict, message: str) -> None:
    model = _with_entry("llama", key, "embedding_rowwise", **overrides)
    with pytest.raises(ValueError, match=message):
        check_sizes(model, resolve_plan(model), 4)
