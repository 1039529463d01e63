"""The all-to-all bytes of one forward of the chapter's tiny Mixtral at ep=2, beside the formula.

Per MoE layer and direction, rank r sends ``rows x hidden x 8`` bytes (float64): going out, its
(token, k) pairs whose expert lives on the other rank; coming back, the pairs the other rank
sent it. Summed over both ranks, each direction is ``k x T x hidden x 8`` less the pairs that
stay home (here T = 4 x 16 tokens per rank, k = 2, hidden = 64). The counts exchange adds
``(E-1)/E x N x 8`` bytes per layer.

    python stages/16_expert_parallel/measure.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from goose_core.data import shard_batch
from goose_core.distributed import ParallelContext, count_traffic
from goose_core.expert_parallel import ExpertParallel, experts_modules
from goose_core.testing import TrainSpec, run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from train import MIXTRAL, build  # noqa: E402

SPEC = TrainSpec(batch_size=8, padding="right")


def _forward(ctx: ParallelContext) -> dict:
    model = ExpertParallel(build(SPEC), ctx).parallelize()
    routes: list[torch.Tensor] = []
    for _, module in experts_modules(model):
        module.register_forward_pre_hook(lambda m, args: routes.append(args[1].clone()))
    with count_traffic(ctx) as traffic:
        model(**shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size))
    return {"routes": routes, "sent": sum(c.sent for c in traffic.calls if c.group == "ep")}


def main() -> None:
    results = run_distributed(_forward, 1, 1, 2, ep=2, timeout=120)
    hidden, n, width = MIXTRAL["hidden_size"], MIXTRAL["num_local_experts"], 8
    print("| rank | pairs k x T | rows out | rows back | formula (bytes) | measured (bytes) |")
    print("|---|---|---|---|---|---|")
    for r, mine in enumerate(results):
        out = sum(int((idx // (n // 2) != r).sum()) for idx in mine["routes"])
        back = sum(int((idx // (n // 2) == r).sum()) for s, o in enumerate(results) if s != r for idx in o["routes"])
        formula = (out + back) * hidden * width + len(mine["routes"]) * n * width // 2
        pairs = sum(idx.numel() for idx in mine["routes"])
        print(f"| {r} | {pairs} | {out} | {back} | {formula} | {int(mine['sent'])} |")


if __name__ == "__main__":
    main()
