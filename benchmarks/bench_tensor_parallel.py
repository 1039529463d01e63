"""Tensor parallelism: goose TensorParallel beside torch DTensor ``parallelize_module``, tiny Llama, tp=2.

Both sides train the same seeded model on the same batches with AdamW, each on 2 forked gloo
ranks; the time of a step (forward, backward, optimizer) is the median over the timed steps on
rank 0, and the median over REPEATS alternating runs of each side. DTensor gets Megatron's layout: Colwise/Rowwise on the block's linears (the plan Llama
declares), a row-split embedding and a column-split LM head with gathered logits (DTensor's
loss_parallel needs logits as a DTensor, which HF's loss does not take). goose splits the same
layers and keeps the logits split through its vocab-parallel loss.

Where DTensor cannot run at all (probed, reported by ``probe()``): GPT-2, whose ``Conv1D``
layers are not ``nn.Linear``; Llama with 2 kv-heads at tp=4 (a rank would hold half a kv-head).
"""

from __future__ import annotations

import statistics
import time
from torch import nn

from benchmarks.results import Record
from goose_core import ParallelContext, TensorParallel
from goose_core.testing import TrainSpec, run_distributed

TP = 2
WARMUP, STEPS = 3, 20
REPEATS = 3  # goose and DTensor alternate, so load from other work hits both alike
SPEC = TrainSpec(family="llama", steps=WARMUP + STEPS, batch_size=8, seq_len=64)


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


def _step_times(ctx: ParallelContext, peer: bool) -> tuple[float, list[float]]:
    model = _dtensor(SPEC.build_model(), ctx.tp_size) if peer else _goose(SPEC.build_model(), ctx)
    optimizer = SPEC.build_optimizer(model.parameters())
    times, losses = [], []
    for step in range(SPEC.steps):
        batch = SPEC.batch(step)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return statistics.median(times[WARMUP:]), losses


def _median_step(peer: bool) -> tuple[float, list[float]]:
    return run_distributed(_step_times, TP, 1, 1, peer, timeout=300)[0]


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
    goose_runs, peer_runs = [], []
    for _ in range(REPEATS):
        goose_runs.append(_median_step(peer=False))
        peer_runs.append(_median_step(peer=True))
    goose = statistics.median(t for t, _ in goose_runs)
    peer = statistics.median(t for t, _ in peer_runs)
    drift = max(abs(a - b) for a, b in zip(goose_runs[0][1], peer_runs[0][1]))
    for case, outcome in probe().items():
        print(f"DTensor {case}: {outcome}")
    print(f"goose {goose * 1e3:.2f} ms/step, DTensor {peer * 1e3:.2f} ms/step, max |loss diff| {drift:.2e}")
    return [Record("tensor_parallel", f"tiny Llama tp=2 step (fwd+bwd+AdamW), batch {SPEC.batch_size}x"
                   f"{SPEC.seq_len}, median of {STEPS} steps x {REPEATS} runs", goose, peer,
                   "torch DTensor parallelize_module")]
