"""The pipeline split runs each family's own forward: every family equals its single-device run.

What each family adds to the parent model's forward is kept because the stages call that forward
(see goose_core/pipeline/split.py): Gemma2's embedding scale, final-logit softcapping and
sliding-window layers, Granite's embedding multiplier and logit scaling, Mistral's sliding
window, Gemma3's per-layer-type masks and rotary tables, the partial rotary of GPT-NeoX, Phi and
StableLM, Bloom's ALiBi, OPT's mask-derived positions, and Mixtral's and Qwen2-MoE's auxiliary
router loss (carried along the pipeline as running sums). float64, as the harness trains.

Cost: one pp=2 spawn trains every family in turn (micro-batches, checkpointing), one tp=2 x pp=2
spawn two of them; pp=4 runs in this process (``local_pipeline``: the same split, four partitions), as does each refusal.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig, PretrainedConfig

from goose_core import ParallelContext, PipelineParallel, TensorParallel, full_state_dict
from goose_core.models import registry
from goose_core.pipeline import local_pipeline
from goose_core.testing import TINY_MODELS, tiny_config as harness_config
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, run_distributed,
                                seeded_model, snapshot, train_loop)

# Two SGD steps (AdamW's normalisation would hide a wrong gradient scale; the second step runs
# with the hooks and swaps of the first gone), right padding: the families' masks, positions and
# router sums see real and padded tokens. 4 x 16 tokens: still 4 sliding windows per row.
SPEC = TrainSpec(steps=2, optimizer="sgd", lr=0.1, padding="right", batch_size=4, seq_len=16)
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
_MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)

#: model_type -> what makes the family's own code matter (besides SIZES).
FEATURES: dict[str, dict] = {
    "gpt2": {}, "bloom": {}, "llama": {},                                # the harness's own tiny configs
    "mistral": dict(sliding_window=4),
    "qwen2": {},
    "gemma2": dict(sliding_window=4, head_dim=16),                       # softcapping on by default
    "granite": dict(embedding_multiplier=3.0, logits_scaling=2.5, residual_multiplier=0.5,
                    attention_multiplier=0.2),
    "gemma3_text": dict(sliding_window=4, head_dim=16, sliding_window_pattern=2),
    "gpt_neox": {},                                                      # rotary_pct=0.25
    "phi": {},                                                           # partial_rotary_factor=0.5
    "stablelm": {},                                                      # partial_rotary_factor=0.25
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),       # rotary, parallel attention
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0, layerdrop=0.0),
    "mixtral": dict(num_local_experts=4, **_MOE),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **_MOE),
}

# Families whose own code upcasts to fp32 inside a layer (Gemma's RMSNorm and eager softmax):
# splitting the batch into micro-batches reorders those fp32 sums, ~1e-9, so they run M=1.
# Mixtral and Qwen2-MoE run M=2: the router loss of the whole batch is exact at any M
# (tests/test_router_loss.py).
_ONE_MICROBATCH = {"gemma2", "gemma3_text"}
# Attention implemented by the family alone (no 🤗 attention interface), or softcapped (Gemma2's
# eager attention applies attn_logit_softcapping, goose's fp64 stand-in would drop it).
_EAGER = {"gpt2", "bloom", "falcon", "gemma2"}


def tiny_config(model_type: str) -> PretrainedConfig:
    if model_type in TINY_MODELS:
        return harness_config(model_type)
    sizes = {k: v for k, v in SIZES.items() if not (model_type == "opt" and k == "num_key_value_heads")}
    config = AutoConfig.for_model(model_type, **{**sizes, **FEATURES[model_type]})
    config._experts_implementation = "eager"  # grouped_mm takes no float64
    return config


def build(model_type: str) -> torch.nn.Module:
    attention = "eager" if model_type in _EAGER else "goose_eager_in_dtype"
    return seeded_model(tiny_config(model_type), SPEC.seed, SPEC.dtype, attention)


def microbatches(model_type: str) -> int:
    return 1 if model_type in _ONE_MICROBATCH else 2


def _train(model: torch.nn.Module) -> list[float]:
    return train_loop(model, SPEC.build_optimizer(model.parameters()), (SPEC.batch(s) for s in range(SPEC.steps)))


@functools.cache
def reference(model_type: str) -> RunResult:
    model = build(model_type)
    return RunResult(_train(model), snapshot(model))


def _pp_runs(ctx: ParallelContext, families: list[str]) -> dict[str, RunResult]:
    results = {}
    for family in families:
        model = PipelineParallel(build(family), ctx, num_microbatches=microbatches(family)).parallelize()
        results[family] = RunResult(_train(model), full_state_dict(model, ctx))
    return results


def test_every_family_at_pp2_equals_the_single_device_run() -> None:
    families = list(FEATURES)
    references = {f: reference(f) for f in families}
    for rank, results in enumerate(run_distributed(_pp_runs, 1, 2, 1, families, timeout=300)):
        for family in families:
            try:
                assert_matches_reference(results[family], references[family], PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"{family}, rank {rank}: {err}") from err


def _tp_pp_runs(ctx: ParallelContext, families: list[str]) -> dict[str, RunResult]:
    results = {}
    for family in families:
        model = TensorParallel(build(family), ctx).parallelize()
        model = PipelineParallel(model, ctx, num_microbatches=microbatches(family)).parallelize()
        results[family] = RunResult(_train(model), full_state_dict(model, ctx))
    return results


def test_tensor_parallel_stages_run_the_family_code_too() -> None:
    # GPT-NeoX's embed_in is vocab-parallel (embedding_rowwise): the first stage looks it up
    # across the tp group, later stages put a full-width stand-in in its place. Gemma2: its
    # embedding scale and softcapping stay the family's under tp x pp. Mixtral: its experts split
    # over tp, its router loss over 2 micro-batches and 2 stages.
    families = ["gpt_neox", "gemma2", "mixtral"]
    for rank, results in enumerate(run_distributed(_tp_pp_runs, 2, 2, 1, families, timeout=300)):
        for family in families:
            try:
                assert_matches_reference(results[family], reference(family), PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"{family}, rank {rank}: {err}") from err


@pytest.mark.parametrize("family", list(FEATURES))
def test_four_partitions_equal_the_single_device_run(family: str) -> None:
    # Two middle stages (no embedding, early exit). One micro-batch, no checkpointing: the pp=2
    # run covers both, and this one stays as cheap as the reference.
    model = local_pipeline(build(family), 4, recompute="never")
    assert_matches_reference(RunResult(_train(model), snapshot(model)), reference(family), PARALLEL)


def test_the_router_loss_is_in_the_pipelined_loss() -> None:
    # The aux loss is a visible share of the loss; dropping it would move the loss by ~1.
    off = build("mixtral")
    off.config.output_router_logits = False
    batch = SPEC.batch(0)
    without = off(**batch).loss.item()
    pipelined = local_pipeline(build("mixtral"), 2)(**batch).loss.item()
    assert pipelined == pytest.approx(build("mixtral")(**batch).loss.item(), rel=1e-12)
    assert pipelined - without > 0.4


def test_a_router_loss_computed_otherwise_is_refused() -> None:
    from transformers import MixtralForCausalLM

    class OtherRouterLoss(MixtralForCausalLM):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return super().forward(*args, **kwargs)

    model = OtherRouterLoss(tiny_config("mixtral"))
    with pytest.raises(ValueError, match="OtherRouterLoss has output_router_logits=True.*cannot be reproduced "
                                         "across pipeline stages.*output_router_logits=False"):
        local_pipeline(model, 2)


def test_a_family_without_a_layout_is_told_how_to_declare_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # GPTBigCode declares no base_model_pp_plan; without its registry entry (taken away here) the
    # error shows the plan to declare, and declaring it is enough.
    monkeypatch.setattr(registry, "FAMILIES", {k: v for k, v in registry.FAMILIES.items() if k != "gpt_bigcode"})
    config = AutoConfig.for_model("gpt_bigcode", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = seeded_model(config, 0, torch.float64, "eager")
    with pytest.raises(ValueError, match=r"model_type='gpt_bigcode'.*config\.base_model_pp_plan = .*register_family"):
        local_pipeline(model, 2)
    model.config.base_model_pp_plan = {"wte": (["input_ids"], ["inputs_embeds"]), "wpe": ([], []),
                                       "drop": ([], []), "h": ([], []), "ln_f": ([], [])}
    batch = SPEC.batch(0)
    want = seeded_model(config, 0, torch.float64, "eager")(**batch).loss
    assert local_pipeline(model, 2)(**batch).loss.item() == pytest.approx(want.item(), rel=1e-12)
