"""Expert parallelism beside goose's TP-sliced experts: a tiny Mixtral step on 2 ranks, ep=2 against tp=2.

The same global batch per step on both sides, in the same 2 forked gloo ranks, timed in
alternating rounds (``benchmarks.paired``): EP (``ExpertParallel`` + ``DataParallel``, each rank
its half of the batch, its 2 of the 4 experts, two all-to-alls per MoE layer) against TP
(``TensorParallel``: every rank the whole batch, a slice of every expert and of attention, an
all-reduce per MoE layer and per attention). A sample is the mean step (forward, backward, SGD)
over STEPS steps between barriers. The peer here is goose's own TP-sliced experts: torch has no
expert-parallel module to pair with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from benchmarks.bench_tensor_parallel import Trainer
from benchmarks.paired import alternate
from benchmarks.results import Record
from goose_core import DataParallel, ParallelContext, TensorParallel
from goose_core.expert_parallel import ExpertParallel
from goose_core.testing import TrainSpec, run_distributed, seeded_model

WORLD = 2
ROUNDS = 10
STEPS = 3  # training steps per sample
SPEC = TrainSpec(batch_size=8, seq_len=64, dtype=torch.float32, optimizer="sgd", lr=0.01)
MIXTRAL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2)


def _model() -> nn.Module:
    config = AutoConfig.for_model("mixtral", experts_implementation="eager", **MIXTRAL)
    return seeded_model(config, SPEC.seed, SPEC.dtype)


def _paired(ctx: ParallelContext) -> dict[str, Any]:
    tp_ctx = ParallelContext(tensor_parallel_size=WORLD, backend="gloo", device="cpu")  # the same world
    ep = Trainer(DataParallel(ExpertParallel(_model(), ctx).parallelize(), ctx).parallelize(), SPEC, STEPS,
                 (ctx.dp_rank, WORLD))
    tp = Trainer(TensorParallel(_model(), tp_ctx).parallelize(), SPEC, STEPS)
    pairs = alternate(ep, tp, ROUNDS)
    drift = max(abs(a - b) for a, b in zip(ep.losses, tp.losses))  # the same training, or no comparison
    return {"pairs": pairs, "drift": drift}


def run() -> list[Record]:
    result = run_distributed(_paired, 1, 1, WORLD, ep=WORLD, timeout=600)[0]
    pairs = result["pairs"]
    low, high, _ = pairs.interval
    print(f"EP / TP-sliced experts {pairs.ratio:.3f} [{low:.3f}, {high:.3f}], max |loss diff| {result['drift']:.2e}")
    return [Record.timed("expert_parallel", f"tiny Mixtral fp32 step (fwd+bwd+SGD), 4 experts top-2, batch "
                         f"{SPEC.batch_size}x{SPEC.seq_len}, ep=2 vs tp=2, {ROUNDS} rounds x {STEPS} steps",
                         pairs, "goose TensorParallel (experts sliced)")]


if __name__ == "__main__":
    run()
