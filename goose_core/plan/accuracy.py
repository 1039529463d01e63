"""Plan against accounting: each layout run for two steps on forked ranks, the second measured
(:func:`~goose_core.instruments.accounting.measure_step`), beside :func:`~.predict.predict`.

    python -m goose_core.plan.accuracy            # the table of docs/plan.md (a few minutes)

Parameters, gradients, masters, optimizer state, FLOPs and traffic must be equal; the
activation peak's error is reported per case (the page states the worst).
"""

from __future__ import annotations

import sys
from fractions import Fraction
from typing import Any

import torch

from goose_core.amp import GradScaler
from goose_core.data_parallel import DataParallel
from goose_core.distributed import ParallelContext, spawn
from goose_core.instruments.accounting import Account, measure_step
from goose_core.optim import DistributedOptimizer, MasterWeights
from goose_core.pipeline import PipelineParallel
from goose_core.plan.predictor import DTYPES, Layout, RankPlan, model_config, predict
from goose_core.tensor_parallel import TensorParallel
from goose_core.testing.models import build_model

__all__ = ["MATRIX", "EXTRA", "CASES", "measure", "compare", "main"]

#: Layouts of four ranks (one spawned group runs them all), small batches.
MATRIX: list[Layout] = [
    Layout(tp=2, dp=2, zero=1, batch_size=4, seq_len=16),
    Layout(tp=4, batch_size=2, seq_len=16),
    Layout(dp=4, zero=2, batch_size=4, seq_len=16),
    Layout(tp=2, pp=2, microbatches=2, batch_size=4, seq_len=16),
    Layout(pp=2, dp=2, zero=1, microbatches=2, batch_size=4, seq_len=16),
    Layout(pp=4, microbatches=4, schedule="1f1b", batch_size=4, seq_len=16),
    Layout(tp=2, pp=2, microbatches=2, schedule="1f1b", recompute="except_last", batch_size=4, seq_len=16),
    Layout(pp=2, dp=2, microbatches=2, recompute="always", batch_size=8, seq_len=16),
    Layout(tp=2, pp=2, microbatches=2, dtype="bf16", batch_size=4, seq_len=16),  # fp32 masters
]
FAMILIES = ("llama", "gpt2", "bloom")
_SMALL = {"batch_size": 4, "seq_len": 16}
#: One family each: ZeRO-3, the block recompute modes, the schedules of more than one chunk or
#: a split backward, fp16 with its loss scaler (and the combinations most likely to go wrong).
EXTRA: list[tuple[str, Layout]] = [
    ("llama", Layout(dp=4, zero=3, **_SMALL)),                       # each block gathered again for its backward
    ("gpt2", Layout(tp=2, dp=2, zero=3, dtype="fp16", **_SMALL)),    # fp16 masters, the loss scaler
    ("bloom", Layout(pp=2, dp=2, zero=3, microbatches=2, **_SMALL)),  # units gathered once a step
    ("gpt2", Layout(pp=2, dp=2, zero=3, microbatches=2, schedule="zb-h1", dtype="bf16", **_SMALL)),
    ("llama", Layout(pp=2, dp=2, microbatches=2, recompute="blocks", **_SMALL)),
    ("bloom", Layout(tp=2, pp=2, microbatches=2, schedule="1f1b", recompute="blocks", **_SMALL)),
    ("gpt2", Layout(tp=2, pp=2, microbatches=2, schedule="1f1b", recompute="selective", **_SMALL)),
    ("llama", Layout(tp=2, pp=2, microbatches=2, recompute="selective", **_SMALL)),
    ("llama", Layout(pp=2, dp=2, microbatches=2, schedule="interleaved-1f1b", **_SMALL)),
    ("gpt2", Layout(pp=2, dp=2, microbatches=2, schedule="interleaved-1f1b", recompute="always", **_SMALL)),
    ("bloom", Layout(pp=2, dp=2, microbatches=2, schedule="zb-h1", **_SMALL)),
    ("llama", Layout(pp=4, microbatches=4, schedule="zb-h1", recompute="always", **_SMALL)),
    ("llama", Layout(tp=2, pp=2, microbatches=4, schedule="zbv", **_SMALL)),
    ("bloom", Layout(tp=2, pp=2, microbatches=4, schedule="zbv", recompute="except_last", **_SMALL)),
    ("bloom", Layout(dp=4, dtype="fp16", **_SMALL)),
]
#: Every case the test and the page hold the plan against.
CASES: list[tuple[str, Layout]] = [(f, layout) for f in FAMILIES for layout in MATRIX] + EXTRA


def _run(ctx: ParallelContext, family: str, layout: Layout) -> Account:
    model = build_model(family, dtype=DTYPES[layout.dtype])
    if layout.tp > 1:
        model = TensorParallel(model, ctx).parallelize()
    if layout.pp > 1:
        model = PipelineParallel(model, ctx, num_microbatches=layout.microbatches, schedule=layout.schedule,
                                 recompute=layout.recompute).parallelize()
    if layout.dp > 1:
        model = DataParallel(model, ctx, zero_stage=max(layout.zero, 1)).parallelize()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    low = DTYPES[layout.dtype] in (torch.bfloat16, torch.float16)  # fp32 masters, as goose train keeps
    optimizer = DistributedOptimizer(plain, ctx) if layout.zero else MasterWeights(plain) if low else plain
    scaler = GradScaler(ctx) if DTYPES[layout.dtype] == torch.float16 else None  # fp16 scales the loss
    g = torch.Generator().manual_seed(0)
    local = layout.batch_size // layout.dp
    ids = torch.randint(0, model.config.vocab_size, (layout.batch_size, layout.seq_len), generator=g)
    ids = ids[ctx.dp_rank * local:(ctx.dp_rank + 1) * local]

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        (scaler.scale(loss) if scaler is not None else loss).backward()

    measure_step(model, optimizer, ctx, step, scaler)  # the first step: one-time checks, state created
    return measure_step(model, optimizer, ctx, step, scaler)


def _body(cases: list[tuple[str, Layout]]) -> list[Account]:
    out = []
    for family, layout in cases:
        ctx = ParallelContext(layout.tp, layout.pp, layout.dp)
        out.append(_run(ctx, family, layout))
        ctx.destroy() if (family, layout) == cases[-1] else None
    return out


def measure(cases: list[tuple[str, Layout]], timeout: float = 300.0) -> list[list[Account]]:
    """Per case, every rank's :class:`Account` (one spawned group of the cases' world size)."""
    worlds = {layout.world for _, layout in cases}
    assert len(worlds) == 1, "one spawned group: the cases share a world size"
    ranks = spawn(_body, worlds.pop(), cases, timeout=timeout)
    return [[ranks[r][i] for r in range(len(ranks))] for i in range(len(cases))]


EXACT = ("params_bytes", "grads_bytes", "masters_bytes", "optimizer_bytes", "flops_per_step")


def compare(planned: RankPlan, measured: Account) -> dict[str, Any]:
    """Fields that differ (``{name: (planned, measured)}``) and the activation error (a fraction)."""
    wrong = {k: (getattr(planned, k), getattr(measured, k)) for k in EXACT
             if getattr(planned, k) is not None and getattr(planned, k) != getattr(measured, k)}
    for axis, sent in planned.sent_bytes.items():
        if sent is not None and sent != measured.sent_bytes.get(axis, Fraction(0)):
            wrong[f"sent_{axis}"] = (sent, measured.sent_bytes.get(axis))
    act = planned.activations_peak_bytes
    error = None if act is None else (act - measured.activations_peak_bytes) / measured.activations_peak_bytes
    return {"wrong": wrong, "activation_error": error}


def main() -> None:
    cases = CASES
    measured = measure(cases, timeout=1200)
    print("| family | layout | ranks exact | activation peak (plan / measured, worst rank) |")
    print("|---|---|---|---|")
    for (family, layout), accounts in zip(cases, measured):
        plans = predict(model_config(family, layout.seq_len), layout)
        results = [compare(p, a) for p, a in zip(plans, accounts)]
        exact = sum(not r["wrong"] for r in results)
        errors = [(abs(r["activation_error"]), r["activation_error"], a) for r, a in zip(results, accounts)
                  if r["activation_error"] is not None]
        act = f"{max(errors, key=lambda e: e[0])[1]:+.2%}"
        name = (f"tp{layout.tp} pp{layout.pp} dp{layout.dp} zero{layout.zero} M{layout.microbatches}"
                + (f" {layout.dtype}" if layout.dtype != "float32" else "")
                + (f" {layout.schedule}" if layout.pp > 1 else "")
                + (f" recompute {layout.recompute}" if layout.recompute != "never" else ""))
        print(f"| {family} | {name} | {exact}/{len(results)} | {act} |")
        for r in results:
            if r["wrong"]:
                print(f"|  |  | differs: {r['wrong']} |  |", file=sys.stderr)


if __name__ == "__main__":
    main()
