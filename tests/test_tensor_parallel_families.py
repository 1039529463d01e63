"""Families train tensor-parallel at tp=2 exactly as on one device, each through its own plan.

One spawn runs every family (a spawn per family would cost more than the training). Each family
is here for a style or a family quirk; the reference is the single-device float64 run, SGD (the
AdamW-vs-reference tests of stage 08 cover GPT-2, Llama and Bloom)::

    gpt2, bloom            goose adapters (GPT-2: fused q|k|v in Conv1D; Bloom: ALiBi)
    llama, mistral, qwen2  colwise / rowwise, GQA (qwen2: q/k/v biases; tp=4 below: kv-heads replicated)
    granite                embedding multiplier, logits scaling
    phi3                   colwise_gather_output + rowwise_split_input on fused qkv and gate|up
    olmo2                  colwise_gather_output q/k/v (its q/k norms span all heads)
    qwen3, gemma3_text     replicated_with_grad_allreduce (per-head q/k norms)
    gpt_neox, gptj         embedding_rowwise
    gemma2                 its embedding multiplies by embed_scale (kept by the split embedding)
    mixtral, qwen2_moe     moe_tp_experts with packed_colwise / rowwise experts, router loss on
"""

from typing import Any

import pytest
import torch
from transformers import AutoConfig, PretrainedConfig

from goose_core import ParallelContext, TensorParallel, full_state_dict
from goose_core.tensor_parallel import resolve_plan
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, build_model,
                                reference_run, run_distributed, seeded_model, snapshot, train_loop)

SPEC = TrainSpec(steps=2, optimizer="sgd", batch_size=4, seq_len=16)
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
MOE = dict(num_experts_per_tok=2, output_router_logits=True)

#: family -> (config overrides, the styles its plan must use here).
FAMILIES: dict[str, tuple[dict[str, Any], set[str]]] = {
    "gpt2": ({}, {"fused_qkv_colwise"}),
    "bloom": ({}, {"colwise", "rowwise"}),
    "llama": ({}, {"colwise", "rowwise"}),
    "mistral": ({}, {"colwise", "rowwise"}),
    "qwen2": ({}, {"colwise", "rowwise"}),
    "granite": ({"embedding_multiplier": 3.0, "logits_scaling": 2.0, "residual_multiplier": 0.5},
                {"colwise", "rowwise"}),
    "phi3": ({}, {"colwise_gather_output", "rowwise_split_input"}),
    "olmo2": ({}, {"colwise_gather_output", "rowwise_split_input"}),
    "qwen3": ({}, {"replicated_with_grad_allreduce"}),
    "gemma3_text": ({}, {"replicated_with_grad_allreduce"}),
    "gpt_neox": ({"num_key_value_heads": 4}, {"embedding_rowwise"}),
    "gptj": ({"rotary_dim": 8}, {"embedding_rowwise"}),
    "gemma2": ({}, {"colwise", "rowwise"}),
    "mixtral": ({"num_local_experts": 4, **MOE}, {"moe_tp_experts", "packed_colwise", "rowwise"}),
    "qwen2_moe": ({"num_experts": 4, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, **MOE},
                  {"moe_tp_experts", "packed_colwise", "rowwise"}),
}


def _config(family: str) -> PretrainedConfig:
    # eager experts: torch's grouped_mm has no float64 kernel on CPU.
    return AutoConfig.for_model(family, experts_implementation="eager", **{**SIZES, **FAMILIES[family][0]})


def _build(family: str) -> torch.nn.Module:
    if family in ("gpt2", "bloom"):  # the harness's own tiny configs, goose's adapters
        return build_model(family, SPEC.seed, dtype=SPEC.dtype, num_hidden_layers=2)
    model = seeded_model(_config(family), SPEC.seed, SPEC.dtype)
    return model


def _train(model: torch.nn.Module) -> list[float]:
    return train_loop(model, SPEC.build_optimizer(model.parameters()), (SPEC.batch(s) for s in range(SPEC.steps)))


def _styles(model: torch.nn.Module) -> set[str]:
    plan = resolve_plan(model)
    return {*plan.layers.values(), *plan.params.values()}


def _tp_runs(ctx: ParallelContext, families: list[str]) -> dict[str, tuple[RunResult, set[str], str]]:
    out = {}
    for family in families:
        model = _build(family)
        styles = _styles(model)
        model = TensorParallel(model, ctx).parallelize()
        embedding = type(model.get_input_embeddings()).__name__
        out[family] = (RunResult(_train(model), full_state_dict(model, ctx)), styles, embedding)
    return out


def _declares_a_plan(family: str) -> bool:
    """Whether the installed transformers gives ``family`` a tp plan (GPT-2 and Bloom: goose's
    adapters). Families gain one across versions: 5.17's GPT-J declares none."""
    return family in ("gpt2", "bloom") or bool(_config(family).base_model_tp_plan)


def _required_styles(family: str) -> set[str]:
    """The styles ``family``'s plan must resolve to here, less those the installed transformers'
    plan does not name (5.17's GPT-NeoX plan leaves its embedding whole: no embedding_rowwise,
    which test_embedding_rowwise_splits_an_embedding_besides_the_input_one still covers)."""
    styles = FAMILIES[family][1]
    return styles if family in ("gpt2", "bloom") else styles & set(_config(family).base_model_tp_plan.values())


def test_every_family_equals_its_single_device_run_at_tp2() -> None:
    families = [family for family in FAMILIES if _declares_a_plan(family)]
    for family in FAMILIES.keys() - families:  # refused by name, before any collective
        with pytest.raises(ValueError, match=f"model_type '{family}'.* declares no config.base_model_tp_plan"):
            resolve_plan(_build(family))
    references = {}
    for family in families:
        model = _build(family)
        references[family] = RunResult(_train(model), snapshot(model))
    results = run_distributed(_tp_runs, 2, 1, 1, families, timeout=600)
    for family in families:
        for runs in results:
            result, styles, embedding = runs[family]
            assert _required_styles(family) <= styles, (family, styles)
            assert_matches_reference(result, references[family], PARALLEL)
    # Gemma's scaled embedding is split in place, its forward (the embed_scale product) kept.
    assert results[0]["gemma2"][2] == "VocabParallelGemma2TextScaledWordEmbedding"


def _kv_replicated_run(ctx: ParallelContext) -> RunResult:
    model = TensorParallel(_build("qwen2"), ctx).parallelize()
    return RunResult(_train(model), full_state_dict(model, ctx))


def test_more_ranks_than_kv_heads_replicates_them() -> None:
    model = _build("qwen2")
    reference = RunResult(_train(model), snapshot(model))
    for result in run_distributed(_kv_replicated_run, 4, 1, 1, timeout=300):
        assert_matches_reference(result, reference, PARALLEL)


def _wpe_split_run(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    from goose_core.models import gpt2
    from goose_core.tensor_parallel import Adapter, register_adapter

    # A forked rank: the extra entry never reaches the parent's registry.
    register_adapter("gpt2", Adapter({**gpt2.PLAN, "wpe": "embedding_rowwise"}, gpt2.localize, gpt2.check))
    model = TensorParallel(spec.build_model(), ctx).parallelize()
    assert type(model.transformer.wpe).__name__ == "VocabParallelEmbedding"
    losses = train_loop(model, spec.build_optimizer(model.parameters()), spec.batches())
    return RunResult(losses, full_state_dict(model, ctx))


def test_embedding_rowwise_splits_an_embedding_besides_the_input_one() -> None:
    # GPT-2's position table, split by rows (positions) as transformers' embedding_rowwise does:
    # each rank looks up the positions it owns, one all-reduce assembles them.
    spec = TrainSpec(family="gpt2", steps=3, optimizer="sgd")
    reference = reference_run(spec)
    for result in run_distributed(_wpe_split_run, 2, 1, 1, spec, timeout=120):
        assert_matches_reference(result, reference, PARALLEL)
