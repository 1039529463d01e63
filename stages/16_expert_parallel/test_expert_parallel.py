"""Expert parallelism equals the single-device run at PARALLEL (float64) for four 🤗 MoE families.

Mixtral, Qwen2-MoE (a shared expert), OLMoE and DeepSeek-V3 (biased sigmoid router, scaling, a
dense first layer, a shared expert), router loss on where the family adds one, right padding,
two SGD steps: at dp=2 x ep=2 and dp=4 x ep=4 (one expert per rank), and composed: ep2 x tp2,
ep2 x pp2 (2 micro-batches), dp4 x ep2 with ZeRO-2 and tp2 x pp2 x ep2 with ZeRO-1 (both clipped), every family
of a layout in one spawn. Uneven loads: DeepSeek-V3's own correction bias sends every token to expert 0 and
none to expert 3. Planted bugs: a token sent to the wrong rank, expert gradients averaged over
the whole dp group, experts counted by dp rank 0 alone in the norm, each shard's own router
loss, the pipeline's router sums not joined over dp; each must fail.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from goose_core import DataParallel, PipelineParallel, TensorParallel, full_state_dict
from goose_core.distributed import ParallelContext
from goose_core.expert_parallel import ExpertParallel
from goose_core.optim import DistributedOptimizer, clip_grad_norm_
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, noise_floor_runs,
                                noise_floor_tolerances, reference_run, run_distributed, seeded_model, train_loop)
from sweep.families import tiny_family_config

FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v3")
# SGD (AdamW's normalisation would hide a gradient scale off by E), right padding: the router
# loss's masked sums see real and padded tokens. 4 rows: one or two per dp rank.
SPEC = TrainSpec(steps=2, optimizer="sgd", lr=0.1, padding="right", batch_size=4, seq_len=16)
#: (family, uneven load, router loss, clipped)
Case = tuple[str, bool, bool, bool]
# Below the tiny models' gradient norm (~1 to 3): the clipping scales every step.
MAX_NORM = 0.5


def build(family: str, uneven: bool = False, router: bool = True, clip: bool = False) -> torch.nn.Module:
    config = tiny_family_config(family)
    if getattr(config, "router_aux_loss_coef", None):
        config.router_aux_loss_coef = 0.5  # large enough that a wrong aux gradient shows
    # DeepSeek-V3 routes without an auxiliary loss: nothing to record.
    config.output_router_logits = router and bool(getattr(config, "router_aux_loss_coef", None))
    model = seeded_model(config, SPEC.seed, SPEC.dtype)
    if uneven:  # DeepSeek-V3's own bias: expert 0 chosen by every token, expert 3 by none
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(torch.tensor([10.0, 0.0, 0.0, -10.0]))
    return model


@functools.cache
def reference(case: Case) -> RunResult:
    model = build(*case)
    clip = (lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)) if case[3] else None
    return RunResult(train_loop(model, SPEC.build_optimizer(model.parameters()), SPEC.batches(), clip),
                     {n: p.detach().clone() for n, p in model.named_parameters()})


def _runs(ctx: ParallelContext, cases: list[Case], zero: int = 0, microbatches: int = 1) -> dict[Case, RunResult]:
    results = {}
    for case in cases:
        model = ExpertParallel(build(*case), ctx).parallelize()
        if ctx.tp_size > 1:  # experts whole per EP rank, attention tp-split
            model = TensorParallel(model, ctx).parallelize()
        if ctx.pp_size > 1:
            model = PipelineParallel(model, ctx, num_microbatches=microbatches).parallelize()
        model = DataParallel(model, ctx, zero_stage=max(zero, 1)).parallelize()
        optimizer = SPEC.build_optimizer(model.parameters())
        if zero:  # experts' state (ZeRO-2: and gradients) sharded over their expert-data-parallel group
            optimizer = DistributedOptimizer(optimizer, ctx)
        clip = (lambda: clip_grad_norm_(model.parameters(), MAX_NORM, ctx)) if case[3] else None
        losses = train_loop(model, optimizer, SPEC.batches(ctx.dp_rank, ctx.dp_size), clip)
        results[case] = RunResult(losses, full_state_dict(model, ctx))
    return results


def _check(results: list[dict[Case, RunResult]], cases: list[Case]) -> None:
    for rank, by_case in enumerate(results):
        for case in cases:
            try:
                assert_matches_reference(by_case[case], reference(case), PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"{case}, rank {rank}: {err}") from err


EVERY = [(f, False, True, False) for f in FAMILIES]


# ep2 x pp2: the router loss's sums ride the stages, 2 micro-batches each, then join over dp.
PIPELINED = [(f, False, True, False) for f in ("mixtral", "qwen2_moe", "deepseek_v3")]


@pytest.mark.parametrize("tp, pp, dp, ep, cases, zero, microbatches", [
    (1, 1, 2, 2, [*EVERY, ("deepseek_v3", True, True, False)], 0, 1),
    (1, 1, 4, 2, [("mixtral", False, True, True), ("qwen2_moe", False, True, True)], 2, 1),  # 2 EP groups
    (1, 1, 4, 4, [*EVERY, ("deepseek_v3", True, True, False)], 0, 1),  # rank 3's expert: no token
    (2, 1, 2, 2, EVERY, 0, 1),
    (1, 2, 2, 2, PIPELINED, 0, 2),
    (2, 2, 2, 2, [("mixtral", False, True, True)], 1, 1),
], ids=["ep2", "ep2xdp2_zero2_clipped", "ep4", "ep2xtp2", "ep2xpp2", "tp2xpp2xep2_zero1_clipped"])
def test_every_family_equals_the_single_device_run(tp: int, pp: int, dp: int, ep: int, cases: list[Case],
                                                   zero: int, microbatches: int) -> None:
    _check(run_distributed(_runs, tp, pp, dp, cases, zero, microbatches, ep=ep, timeout=300), cases)


# bf16 with fp32 masters (stage 01's recipe), SGD as stage 07's bf16 tests (AdamW turns rounding
# noise of near-zero gradients into lr-sized steps). No router loss: the floor's micro-batched
# runs would each add their own aux loss, another loss, not rounding noise.
BF16 = TrainSpec(steps=3, optimizer="sgd", lr=0.1, padding="right", batch_size=8, seq_len=16, precision="bf16")


def _bf16_mixtral() -> torch.nn.Module:
    config = tiny_family_config("mixtral")
    config.output_router_logits = False
    return seeded_model(config, BF16.seed, BF16.model_dtype)


def _bf16(ctx: ParallelContext) -> RunResult:
    model = DataParallel(ExpertParallel(_bf16_mixtral(), ctx).parallelize(), ctx).parallelize()
    losses = train_loop(model, BF16.recipe_optimizer(model.parameters()), BF16.batches(ctx.dp_rank, ctx.dp_size))
    return RunResult(losses, full_state_dict(model, ctx))


def test_bf16_equals_the_one_device_bf16_recipe_within_its_noise_floor() -> None:
    reference = reference_run(BF16, build=_bf16_mixtral)
    losses, params = noise_floor_tolerances(reference, noise_floor_runs(BF16, _bf16_mixtral))
    for rank, result in enumerate(run_distributed(_bf16, 1, 1, 2, ep=2, timeout=180)):
        try:
            assert_matches_reference(result, reference, losses, params)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}\n({losses.why}; {params.why})") from err


def test_a_token_sent_to_the_wrong_rank_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # Expert e's rows go to the rank of expert e + 1 (mod N): computed by another expert.
    monkeypatch.setattr(sys.modules["goose_core.expert_parallel.dispatch"], "destinations",
                        lambda index: (index.reshape(-1) + 1) % 4)
    cases = [("mixtral", False, True, False)]
    with pytest.raises(AssertionError, match="differ beyond"):
        _check(run_distributed(_runs, 1, 1, 2, cases, ep=2, timeout=120), cases)


def test_expert_gradients_averaged_over_the_whole_dp_group_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    # At dp=4 x ep=2 the dp group mixes ranks holding experts 0-1 with ranks holding experts 2-3.
    monkeypatch.setattr(sys.modules["goose_core.data_parallel.reducer"], "expert_group_of", lambda p: None)
    cases = [("olmoe", False, True, False)]
    with pytest.raises(AssertionError, match="differ beyond"):
        _check(run_distributed(_runs, 1, 1, 4, cases, ep=2, timeout=120), cases)


def test_experts_counted_by_dp_rank_0_alone_in_the_norm_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a dense weight: dp rank 0 holds experts 0-1 only, so experts 2-3 leave the global norm.
    monkeypatch.setattr(sys.modules["goose_core.optim.clip"], "expert_group_of", lambda p: None)
    cases = [("mixtral", False, True, True)]
    with pytest.raises(AssertionError, match="differ beyond"):
        _check(run_distributed(_runs, 1, 1, 2, cases, ep=2, timeout=120), cases)




def test_the_pipelines_router_sums_of_each_shard_alone_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    # ep2 x pp2: the stages' sums left per dp shard (never joined over dp), averaged by DataParallel.
    split = sys.modules["goose_core.pipeline.split"]
    check = split.SplitModel.check
    monkeypatch.setattr(split.SplitModel, "check", lambda self, m, schedule=split.GPipe, dp_group=None: check(
        self, m, schedule))
    cases = [("mixtral", False, True, False)]
    with pytest.raises(AssertionError, match="differ beyond"):
        _check(run_distributed(_runs, 1, 2, 2, cases, 0, 2, ep=2, timeout=120), cases)


def test_the_router_loss_of_each_shard_alone_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each dp rank's own aux loss (🤗's, on its shard), averaged by DataParallel: another loss.
    router_loss = sys.modules["goose_core.expert_parallel.router_loss"]
    monkeypatch.setattr(router_loss, "exact_over_dp", lambda router, logits, mask, group: router.loss(
        router.add(router.zeros(logits[0].device), logits, mask)))
    cases = [("qwen2_moe", False, True, False)]
    with pytest.raises(AssertionError, match="differ beyond"):
        _check(run_distributed(_runs, 1, 1, 2, cases, ep=2, timeout=120), cases)
