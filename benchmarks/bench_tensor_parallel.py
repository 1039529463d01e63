"""Tensor parallelism: goose TensorParallel beside torch DTensor ``parallelize_module``, tiny Llama, tp=2.

Both sides train the same seeded fp32 model on the same batches with AdamW, built side by side
in the same 2 forked gloo ranks and timed in alternating rounds (``benchmarks.paired``): a sample
is the mean step (forward, backward, optimizer) over STEPS steps between barriers. DTensor gets
Megatron's layout: Colwise/Rowwise on the block's linears (the plan Llama declares), a row-split
embedding and a column-split LM head with gathered logits (DTensor's loss_parallel needs logits
as a DTensor, which HF's loss does not take). goose splits the same layers and keeps the logits
split through its vocab-parallel loss.

Where DTensor cannot run at all (probed, reported by ``probe()``): GPT-2, whose ``Conv1D``
layers are not ``nn.Linear``; Llama with 2 kv-heads at tp=4 (a rank would hold half a kv-head).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.paired import alternate
from benchmarks.results import Record
from goose_core import ParallelContext, TensorParallel
from goose_core.data import shard_batch
from goose_core.testing import TrainSpec, run_distributed

TP = 2
ROUNDS = 12
STEPS = 5  # training steps per sample
SPEC = TrainSpec(family="llama", batch_size=8, seq_len=64, dtype=torch.float32)


def _dtensor(model: nn.Module, tp: int, blocks: dict[str, str] | None = None) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (tp,))
    names = {id(m): n for n, m in model.named_modules()}
    plan: dict = {names[id(model.get_input_embeddings())]: RowwiseParallel(input_layouts=Replicate()),
                  "lm_head": ColwiseParallel(output_layouts=Replicate())}
    prefix = model.base_model_prefix
    for key, style in (blocks or model.config.base_model_tp_plan).items():
        for i in range(model.config.num_hidden_layers):
            name = f"{prefix}.{key.replace('*', str(i))}"
            plan[name] = ColwiseParallel() if style == "colwise" else RowwiseParallel()
    return parallelize_module(model, mesh, plan)


def _goose(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    return TensorParallel(model, ctx).parallelize()


class Trainer:
    """One side's model and optimizer; each call trains ``steps`` more steps of ``spec``'s batches
    (this dp rank's shard of each: ``shard`` = (rank, size)) and returns seconds per step."""

    def __init__(self, model: nn.Module, spec: TrainSpec = SPEC, steps: int = STEPS,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.model, self.optimizer = model, spec.build_optimizer(model.parameters())
        self.spec, self.steps, self.shard = spec, steps, shard
        self.losses: list[float] = []

    def __call__(self) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(self.steps):
            loss = self.model(**shard_batch(self.spec.batch(len(self.losses)), *self.shard)).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.losses.append(loss.item())
        dist.barrier()
        return (time.perf_counter() - start) / self.steps


def _paired(ctx: ParallelContext) -> dict[str, Any]:
    goose = Trainer(_goose(SPEC.build_model(), ctx))
    peer = Trainer(_dtensor(SPEC.build_model(), ctx.tp_size))
    pairs = alternate(goose, peer, ROUNDS)
    # Same init, same batches: the two must train alike, or the timing compares different work.
    drift = max(abs(a - b) for a, b in zip(goose.losses, peer.losses))
    return {"pairs": pairs, "drift": drift}


def _try(ctx: ParallelContext, family: str, blocks: dict[str, str] | None = None) -> str:
    try:
        model = _dtensor(TrainSpec(family=family).build_model(), ctx.tp_size, blocks)
        model(**SPEC.batch(0)).loss.backward()
        return "ran"
    except Exception as err:  # noqa: BLE001 (the failure is the finding)
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def _probe_gpt2(ctx: ParallelContext) -> str:
    return _try(ctx, "gpt2", {"h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"})


def _probe_llama(ctx: ParallelContext) -> str:
    return _try(ctx, "llama")


def probe() -> dict[str, str]:
    """What DTensor TP does where goose's adapters and kv-head replication are needed."""
    return {"gpt2 tp=2 (Conv1D)": run_distributed(_probe_gpt2, 2, timeout=120)[0],
            "llama tp=4 (2 kv-heads)": run_distributed(_probe_llama, 4, timeout=120)[0]}


def run() -> list[Record]:
    result = run_distributed(_paired, TP, 1, 1, timeout=600)[0]
    pairs = result["pairs"]
    for case, outcome in probe().items():
        print(f"DTensor {case}: {outcome}")
    print(f"goose / DTensor {pairs.ratio:.3f}, max |loss diff| {result['drift']:.2e}")
    return [Record.timed("tensor_parallel", f"tiny Llama fp32 tp=2 step (fwd+bwd+AdamW), batch "
                         f"{SPEC.batch_size}x{SPEC.seq_len}, {ROUNDS} rounds x {STEPS} steps", pairs,
                         "torch DTensor parallelize_module")]
