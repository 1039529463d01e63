"""goose_core.tensor_parallel.sequence: g and ḡ, SP's exact traffic and saved bytes, refusals."""

from fractions import Fraction
from typing import Any

import pytest
import torch

from goose_core import ParallelContext, PipelineParallel, TensorParallel
from goose_core.distributed.traffic import count_traffic
from goose_core.engine.activations import LiveActivations
from goose_core.tensor_parallel import resolve_plan
from goose_core.tensor_parallel.sequence import (block_problems, check_sequence_length, gather_sequence,
                                                 reduce_scatter_sequence, scatter_sequence, sequence_problems)
from goose_core.testing import TrainSpec, build_model, run_distributed

SPEC = TrainSpec(family="llama", steps=1)  # 4 blocks, hidden 64, batch 8 x 32 tokens, float64
B, S, H, LAYERS, ELEMENT = 8, 32, 64, 4, 8


def _collectives(ctx: ParallelContext) -> list[torch.Tensor]:
    group, rank = ctx.tensor_parallel_group, ctx.tensor_parallel_rank
    whole = torch.arange(2 * 4 * 3, dtype=torch.float64).view(2, 4, 3)
    mine = (whole.chunk(2, dim=1)[rank] + 0).requires_grad_()
    gathered = gather_sequence(mine, group)  # g: every token
    (gathered * (rank + 1)).sum().backward()  # rank r's partial gradient: r + 1 everywhere
    partial = (whole * (rank + 1)).requires_grad_()
    scattered = reduce_scatter_sequence(partial, group)  # ḡ: summed, my tokens
    scattered.backward(torch.ones_like(scattered))
    kept = scatter_sequence(whole.clone().requires_grad_(), group)
    return [gathered.detach(), mine.grad, scattered.detach(), partial.grad, kept.detach()]


def test_g_gathers_the_sequence_and_reduce_scatters_its_gradient_and_g_bar_the_reverse() -> None:
    whole = torch.arange(2 * 4 * 3, dtype=torch.float64).view(2, 4, 3)
    for rank, (gathered, grad, scattered, partial_grad, kept) in enumerate(run_distributed(_collectives, 2,
                                                                                           timeout=60)):
        assert torch.equal(gathered, whole)
        assert torch.equal(grad, torch.full_like(grad, 1.0 + 2.0))  # the partial gradients summed
        assert torch.equal(scattered, 3 * whole.chunk(2, dim=1)[rank])
        assert torch.equal(partial_grad, torch.ones_like(whole))  # all-gathered ones
        assert torch.equal(kept, whole.chunk(2, dim=1)[rank])


def _step(ctx: ParallelContext, sequence_parallel: bool) -> tuple[dict[str, Fraction], int]:
    model = TensorParallel(SPEC.build_model(), ctx, sequence_parallel=sequence_parallel).parallelize()
    if ctx.pp_size > 1:
        model = PipelineParallel(model, ctx, num_microbatches=2).parallelize()
    batch = SPEC.batch(0)
    model(**batch).loss.backward()  # the first step's one-off checks (batch, replica gradients)
    with count_traffic(ctx) as traffic, LiveActivations(model.parameters()) as live:
        loss = model(**batch).loss
        saved = live.bytes  # every tensor the forward saved for backward, alive now
        loss.backward()
    return traffic.bytes, saved


def _tp_and_sp(ctx: ParallelContext) -> list[tuple[dict[str, Fraction], int]]:
    return [_step(ctx, False), _step(ctx, True)]


def test_sp_sends_tp_bytes_plus_the_entry_gather_and_the_norm_gradients() -> None:
    # Per block, g + ḡ (all-gather + reduce-scatter) are TP's all-reduce, forward and backward,
    # so a gather per projection (3x the attention's) would show here. What SP adds: the first
    # block's input gradient all-gathered (🤗's parent reads the sequence length off the
    # embedding, so the embedding stays whole), and every whole parameter on token shards summed
    # (2 RMSNorms a block and the final norm, H each).
    tp = 2
    for (tp_bytes, tp_saved), (sp_bytes, sp_saved) in run_distributed(_tp_and_sp, tp, timeout=120):
        entry_gather = Fraction(tp - 1, tp) * B * S * H * ELEMENT
        norm_grads = 2 * Fraction(tp - 1, tp) * (2 * LAYERS + 1) * H * ELEMENT
        assert sp_bytes["tp"] - tp_bytes["tp"] == entry_gather + norm_grads
        # Saved activations: each block's two RMSNorms save their input, their normalized
        # output (B x S x H each) and 1/rms (B x S): on S/tp tokens under SP. The region's
        # gathered input, saved by its column layers, is whole in both.
        norms = 2 * LAYERS * (2 * B * S * H + B * S) * ELEMENT
        assert tp_saved - sp_saved == Fraction(tp - 1, tp) * norms


def test_pipeline_boundaries_send_each_ranks_tokens_only() -> None:
    # tp2 x pp2, 2 micro-batches: stage 0 sends activations, stage 1 their gradients, B x S x H
    # in all per step each; under SP each rank sends its S/tp tokens of them.
    results = run_distributed(_tp_and_sp, 2, 2, 1, timeout=120)
    for (tp_bytes, _), (sp_bytes, _) in results:
        assert tp_bytes["pp"] - sp_bytes["pp"] == Fraction(1, 2) * B * S * H * ELEMENT


def _odd_length(ctx: ParallelContext) -> None:
    model = TensorParallel(SPEC.build_model(), ctx, sequence_parallel=True).parallelize()
    batch = SPEC.batch(0)
    model(**{k: v[:, :31] for k, v in batch.items()})


def test_a_sequence_that_does_not_split_is_refused_on_every_rank_with_the_fix() -> None:
    with pytest.raises(Exception, match=r"has 31 tokens per row: pad the batch to a multiple of 2"):
        run_distributed(_odd_length, 2, timeout=60)
    with pytest.raises(ValueError, match="pad_to_multiple_of=4"):
        check_sequence_length(30, 4)


def test_plans_sp_cannot_run_are_refused_by_name() -> None:
    layers = {"model.layers.0.mlp.experts": "moe_tp_experts", "model.layers.0.self_attn.q_proj": "colwise",
              "model.layers.0.self_attn.o_proj": "rowwise", "model.layers.0.mlp.up_proj": "colwise"}
    problems = sequence_problems(layers, {"model.layers.0.mlp.experts.gate_up_proj": "packed_colwise"})
    assert problems == [
        "model.layers.0.mlp.experts: style 'moe_tp_experts' (sequence parallelism supports ['colwise', "
        "'packed_colwise', 'fused_qkv_colwise', 'rowwise', 'embedding_rowwise', "
        "'replicated_with_grad_allreduce', 'replicate', 'sequence_parallel'])",
        "model.layers.0.mlp.experts.gate_up_proj: parameter style 'packed_colwise' (its module's output would "
        "be a partial sum over whole tokens)",
        "model.layers.0.mlp.up_proj: a colwise layer with no rowwise layer beside it, so no region gathers "
        "its tokens"]
    # OPT keeps fc1 and fc2 in the decoder layer: no MLP module to gather the tokens at.
    opt = {"model.decoder.layers.0.fc1": "colwise", "model.decoder.layers.0.fc2": "rowwise"}
    assert sequence_problems(opt, {}, "model.decoder.layers") == [
        "model.decoder.layers.0: its column and row layers sit in the decoder block itself, not in an attention "
        "or MLP module the tokens could be gathered at"]


def test_a_block_child_outside_every_region_is_refused_unless_a_norm() -> None:
    # An attention the plan leaves whole (or a Mamba mixer) would mix a slice of the sequence.
    model = build_model("llama")
    layers = {name: style for name, style in resolve_plan(model).layers.items() if "self_attn" not in name}
    problems = block_problems(model, "model.layers", layers)
    assert len(problems) == LAYERS and problems[0].startswith(
        "model.layers.0.self_attn (LlamaAttention) holds no tensor-parallel region, so it would run on this "
        "rank's S/tp tokens; only norms may")
    assert block_problems(model, "model.layers", resolve_plan(model).layers) == []


def test_the_plans_sequence_parallel_style_turns_sp_on() -> None:
    model = build_model("llama")
    model.config.base_model_tp_plan = {**model.config.base_model_tp_plan,
                                       "layers.*.input_layernorm": "sequence_parallel",
                                       "norm": "sequence_parallel"}
    plan = resolve_plan(model)
    assert plan.sequence_parallel and plan.layers["model.norm"] == "sequence_parallel"
    assert not resolve_plan(build_model("llama")).sequence_parallel
    assert run_distributed(_entries, 2, timeout=60) == [True, True]


def _entries(ctx: ParallelContext) -> Any:
    model = build_model("llama")
    model.config.base_model_tp_plan = {**model.config.base_model_tp_plan, "norm": "sequence_parallel"}
    TensorParallel(model, ctx).parallelize()
    return model.model.layers[0].self_attn.o_proj.region.sequence_parallel
