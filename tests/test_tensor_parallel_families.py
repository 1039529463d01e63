"""Families that declare ``base_model_tp_plan`` train tensor-parallel with no goose code for them.

Mistral, Qwen2 (q/k/v biases, GQA) and GPT-NeoX (fused, head-interleaved QKV; parallel residual)
are not goose's test families; they only bring their own plan. float64, as the harness trains;
SGD keeps the test about the plan (the AdamW-vs-reference tests of stage 04 cover GPT-2, Llama
and Bloom).
"""

import pytest
import torch
from transformers import GPTNeoXConfig, MistralConfig, PretrainedConfig, Qwen2Config

from goose_core import ParallelContext, TensorParallel, full_state_dict
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed, seeded_model, snapshot, train_loop)

SPEC = TrainSpec(steps=3, optimizer="sgd")
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def _config(family: str) -> PretrainedConfig:
    if family == "gpt_neox":
        return GPTNeoXConfig(**SIZES)
    return {"mistral": MistralConfig, "qwen2": Qwen2Config}[family](num_key_value_heads=2, **SIZES)


def _build(family: str) -> torch.nn.Module:
    return seeded_model(_config(family), SPEC.seed, SPEC.dtype)


def _train(model: torch.nn.Module) -> list[float]:
    return train_loop(model, SPEC.build_optimizer(model.parameters()), (SPEC.batch(s) for s in range(SPEC.steps)))


def _tp_run(ctx: ParallelContext, family: str) -> RunResult:
    model = TensorParallel(_build(family), ctx).parallelize()
    return RunResult(_train(model), full_state_dict(model, ctx))


@pytest.mark.parametrize("family, tp", [("mistral", 2), ("qwen2", 4), ("gpt_neox", 2)])
def test_a_declared_plan_is_enough(family: str, tp: int) -> None:
    model = _build(family)
    reference = RunResult(_train(model), snapshot(model))
    for result in run_distributed(_tp_run, tp, 1, 1, family, timeout=120):
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
