"""What expert parallelism sends, and where: the groups, the all-to-all bytes against the routes, refusals.

Integers only (ranks, bytes, token counts): no verdict here depends on a floating-point kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from goose_core.data import shard_batch
from goose_core.distributed import ParallelContext, ProcessGrid, count_traffic
from goose_core.distributed.expert_groups import check_expert_parallel_size, expert_lines
from goose_core.expert_parallel import ExpertParallel, expert_load, experts_modules
from goose_core.testing import build_model, run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from test_expert_parallel import SPEC, build  # noqa: E402  (the tiny configs)


def test_the_groups_are_carved_from_each_data_parallel_line() -> None:
    # tp=2, dp=4: dp lines {0,2,4,6} and {1,3,5,7}; E=2 cuts each in two runs.
    ep, edp = expert_lines(ProcessGrid(tp=2, dp=4), 2)
    assert ep == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert edp == [[0, 4], [2, 6], [1, 5], [3, 7]]


@pytest.mark.parametrize("size, message", [(3, "does not divide data_parallel_size=4"),
                                           (0, "integer >= 1")])
def test_a_bad_expert_parallel_size_is_refused(size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_expert_parallel_size(size, 4)


def _refusals(ctx: ParallelContext) -> list[str]:
    found = []
    jittered = build("mixtral")
    jittered.config.router_jitter_noise = 0.1  # each token's own random jitter: not the shard's to draw
    for model in (build_model("llama"), jittered):  # a dense family: nothing to dispatch
        try:
            ExpertParallel(model, ctx)
        except ValueError as err:
            found.append(str(err))
    return found


def test_a_model_without_experts_or_routing_at_random_is_refused_by_name_on_every_rank() -> None:
    for found in run_distributed(_refusals, 1, 1, 2, ep=2, timeout=60):
        assert len(found) == 2 and "LlamaForCausalLM has no experts module" in found[0]
        assert "routes at random in training (config.router_jitter_noise=0.1)" in found[1]


def _forward_traffic(ctx: ParallelContext) -> dict:
    """One forward of DeepSeek-V3 with the uneven router: this rank's routes, loads and bytes."""
    model = ExpertParallel(build("deepseek_v3", uneven=True), ctx).parallelize()
    routes: list[torch.Tensor] = []
    for _, module in experts_modules(model):
        module.register_forward_pre_hook(lambda m, args: routes.append(args[1].clone()))
    batch = shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size)
    with count_traffic(ctx) as traffic:
        model(**batch)
    return {"routes": routes, "load": expert_load(model), "calls": [c for c in traffic.calls if c.group == "ep"]}


def test_all_to_all_bytes_and_expert_loads_are_the_routes() -> None:
    """Per MoE layer, rank r sends H x 8 bytes (float64) for each of its (token, k) pairs whose
    expert lives on another rank, and sends back as many for each pair another rank sent it;
    plus the counts: (E-1)/E x N int64. Summed over the ranks, each direction moves
    k x T x H x 8 bytes less the pairs that stay home."""
    results = run_distributed(_forward_traffic, 1, 1, 2, ep=2, timeout=120)
    n_experts, hidden, width = 4, 64, 8
    local = n_experts // 2
    for r, mine in enumerate(results):
        out_rows = sum(int((idx // local != r).sum()) for idx in mine["routes"])
        in_rows = sum(int((idx // local == r).sum()) for s, other in enumerate(results) if s != r
                      for idx in other["routes"])
        layers = len(mine["routes"])
        want = (out_rows + in_rows) * hidden * width + layers * n_experts * 8 // 2
        assert sum(c.sent for c in mine["calls"]) == want, (r, mine["calls"], want)
        assert len(mine["calls"]) == 3 * layers  # counts, rows out, rows back
    # The bias sends every token to expert 0 and none to expert 3: the load shows it.
    tokens = SPEC.batch_size * SPEC.seq_len
    for name, load in results[0]["load"].items():
        assert load[0] == tokens and results[1]["load"][name][1] == 0, (name, load, results[1]["load"][name])
