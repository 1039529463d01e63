"""goose bf16 (fp32 masters, fp32 reduction) beside its formula and torch's ZeRO + autocast.

Four measurements, each on the fullest rank where it is per rank:

* bytes per parameter (bf16 weights + fp32 gradient buffers + fp32 masters and AdamW moments
  under ZeRO-1) against Megatron's 2 + 4 + 12/dp, at dp = 2 and 4;
* the bf16-reduction flag's trade-off: gradient bytes moved per step, and the error of the
  accumulated (4 micro-batches) and dp-averaged gradient against an fp64 reduction of the same
  bf16 micro-batch gradients, for fp32 buckets (the default) and bf16 buckets;
* step time, paired: goose's bf16 model with ZeRO-1 master shards against torch DDP +
  ZeroRedundancyOptimizer on an fp32 model under ``torch.autocast(bfloat16)`` (CPU here: bf16
  matmuls are not faster than fp32 on most CPUs; the ratio that matters is on a GPU);
* the loss curves of fp32, bf16 + fp32 masters, fp16 + fp32 masters + GradScaler and plain bf16
  (no masters) over 30 steps on one device, drawn into docs/img/mixed_precision_loss.png.

    python -m benchmarks mixed_precision
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from benchmarks.bench_data_parallel import paired_steps
from benchmarks.results import Record
from goose_core import DataParallel, DistributedOptimizer, GradScaler, ParallelContext, clip_grad_norm_, spawn
from goose_core.data import shard_batch
from goose_core.data_parallel import no_sync, reducer_of
from goose_core.optim import MasterWeights
from goose_core.testing import TrainSpec

#: ~3.2M parameters in bf16, as bench_data_parallel's model.
SPEC = TrainSpec(family="gpt2", batch_size=8, seq_len=64, precision="bf16", overrides={"n_embd": 256, "n_layer": 4})
CURVE = TrainSpec(family="llama", steps=30, batch_size=8, seq_len=32, max_grad_norm=1.0, dtype=torch.float32)
PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "mixed_precision_loss.png"


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    fresh = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
             if t.untyped_storage().data_ptr() not in seen}
    seen.update(fresh)
    return sum(fresh.values())


def _memory_body() -> dict[str, float]:
    ctx = ParallelContext(data_parallel_size=int(os.environ["WORLD_SIZE"]))
    model = DataParallel(SPEC.build_model(), ctx).parallelize()
    optimizer = DistributedOptimizer(SPEC.build_optimizer(model.parameters()), ctx)
    for step in range(2):
        model(**shard_batch(SPEC.batch(step), ctx.dp_rank, ctx.dp_size)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    seen: set[int] = set()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    held = (_storage_bytes(params, seen) + _storage_bytes([b.grad for b in optimizer.buckets], seen)
            + _storage_bytes(list(optimizer.shards), seen) + _storage_bytes(state, seen))
    return {"held": held / n, "formula": 2 + 4 + 12 / ctx.dp_size}


def _reduction_body(reduce_dtype: torch.dtype | None) -> dict[str, float]:
    """The averaged gradient after 4 accumulated micro-batches, and the bytes one sync moves."""
    ctx = ParallelContext(data_parallel_size=int(os.environ["WORLD_SIZE"]))
    bf16 = SPEC.build_model()
    exact = [torch.zeros_like(p, dtype=torch.float64) for p in bf16.parameters()]
    batch = shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size)
    pieces = [shard_batch(batch, i, 4) for i in range(4)]
    for piece in pieces:  # the same bf16 micro-batch gradients, summed in fp64: the truth
        grads = torch.autograd.grad(bf16(**piece).loss / 4, list(bf16.parameters()))
        for e, g in zip(exact, grads):
            e.add_(g.double())
    for e in exact:
        torch.distributed.all_reduce(e, group=ctx.dp_group)
        e.div_(ctx.dp_size)
    model = DataParallel(SPEC.build_model(), ctx, reduce_dtype=reduce_dtype).parallelize()
    for i, piece in enumerate(pieces):
        with no_sync(model) if i < 3 else nullcontext():
            (model(**piece).loss / 4).backward()
    reducer = reducer_of(model)
    assert reducer is not None
    got = [reducer.main_grad(p) if reducer.main_grad(p) is not None else p.grad for p in model.parameters()]
    err = sum(float((g.double() - e).square().sum()) for g, e in zip(got, exact)) ** 0.5
    norm = sum(float(e.square().sum()) for e in exact) ** 0.5
    return {"error": err / norm, "bytes": sum(b.grad.numel() * b.grad.element_size() for b in reducer.buckets)}


class _Autocast(nn.Module):
    """An fp32 model whose forward runs under bf16 autocast (torch's mixed-precision recipe)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(**kwargs)


def _time_body() -> Any:
    ctx = ParallelContext(data_parallel_size=int(os.environ["WORLD_SIZE"]))
    fp32 = replace(SPEC, precision="full", dtype=torch.float32)

    def goose() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = DataParallel(SPEC.build_model(), ctx).parallelize()
        return model, DistributedOptimizer(SPEC.build_optimizer(model.parameters()), ctx)

    def torch_zero_autocast() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = DistributedDataParallel(_Autocast(fp32.build_model()), process_group=ctx.dp_group)
        optimizer = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, process_group=ctx.dp_group,
                                            lr=SPEC.lr, weight_decay=SPEC.weight_decay)
        return model, optimizer

    return paired_steps(ctx, goose, torch_zero_autocast)


def _curve(recipe: str) -> list[float]:
    """30 single-device steps of ``recipe`` on the shipped corpus; fp16 with a GradScaler."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "plain bf16": torch.bfloat16}[recipe]
    ctx = ParallelContext()
    model = replace(CURVE, dtype=dtype).build_model()
    optimizer = CURVE.build_optimizer(model.parameters())
    if recipe in ("bf16", "fp16"):
        optimizer = MasterWeights(optimizer)
    scaler = GradScaler(ctx) if recipe == "fp16" else None
    losses = []
    for step in range(CURVE.steps):
        loss = model(**CURVE.batch(step)).loss
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip_grad_norm_(model.parameters(), CURVE.max_grad_norm, ctx)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _curves_body() -> dict[str, list[float]]:
    return {recipe: _curve(recipe) for recipe in ("fp32", "bf16", "fp16", "plain bf16")}


def draw(curves: dict[str, list[float]], path: Path = PLOT) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    fp32 = curves["fp32"]
    for name, losses in curves.items():
        label = {"bf16": "bf16 + fp32 masters", "fp16": "fp16 + fp32 masters + GradScaler"}.get(name, name)
        top.plot(losses, label=label)
        bottom.plot([abs(a - b) / b for a, b in zip(losses, fp32)], label=label)
    bottom.axhline(2.0**-9, color="grey", linestyle=":", label="2**-9 (the stage 01 bound)")
    top.set_ylabel("training loss")
    top.set_title("GQA Llama (tiny), 30 AdamW steps on the shipped corpus, one device")
    top.legend()
    bottom.set_ylabel("|loss - fp32| / fp32")
    bottom.set_xlabel("step")
    bottom.set_yscale("symlog", linthresh=1e-5)
    bottom.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run() -> list[Record]:
    records = []
    for dp in (2, 4):
        worst = max(spawn(_memory_body, dp, timeout=600), key=lambda r: r["held"])
        records.append(Record.count("mixed_precision", f"bytes per parameter on the fullest rank, gpt2 3.2M bf16, "
                                    f"ZeRO-1 AdamW, dp={dp}", worst["held"], worst["formula"],
                                    f"2 + 4 + 12/{dp} (Megatron's formula)", "B"))
    fp32, bf16 = (max(spawn(_reduction_body, 2, dtype, timeout=600), key=lambda r: r["error"])
                  for dtype in (None, torch.bfloat16))
    records.append(Record.count("mixed_precision", "gradient bytes reduced per step, gpt2 3.2M bf16, dp=2, "
                                "bf16 buckets against fp32 (default)", bf16["bytes"], fp32["bytes"], "fp32 buckets", "B"))
    records.append(Record.count("mixed_precision", "relative L2 error of the averaged gradient (4 micro-batches, "
                                "dp=2) against fp64, bf16 buckets against fp32 (default)", bf16["error"],
                                fp32["error"], "fp32 buckets", "1"))
    pairs = spawn(_time_body, 2, timeout=600)[0]
    records.append(Record.timed("mixed_precision", "step time, gpt2 3.2M, dp=2: bf16 model + ZeRO-1 fp32 masters "
                                "against an fp32 model under bf16 autocast", pairs, "torch DDP + ZeroRedundancyOptimizer"))
    curves = spawn(_curves_body, 1, timeout=900)[0]
    print(f"loss curves drawn: {draw(curves)}")
    for name in ("bf16", "fp16", "plain bf16"):
        drift = max(abs(a - b) / b for a, b in zip(curves[name], curves["fp32"]))
        records.append(Record.count("mixed_precision", f"largest relative loss gap to fp32 over 30 steps, {name}",
                                    drift, 2.0**-9, "2**-9 (stage 01's bound)", "1"))
    return records
