"""goose's block recompute beside 🤗's gradient checkpointing: step time (paired) and FLOPs per step.

One process, one partition (``local_pipeline(model, 1)``, the pipeline's pp=1 path), so the
comparison is the recompute alone: goose's ``recompute="blocks"`` against the same model with
``gradient_checkpointing_enable()`` (each decoder layer under torch's non-reentrant checkpoint,
🤗's default). Both replay the same blocks, so the FLOPs are equal (a count) and the times
should be; ``"selective"`` is measured beside 🤗 too (no counted FLOP replayed, more memory).
Saved bytes are not compared: 🤗's checkpoint keeps its inputs where saved-tensor hooks do not
see them (goose shows its own to the hooks; stages/11_recompute/NOTES.md has goose's per mode).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.paired import alternate
from benchmarks.results import Record
from goose_core.pipeline import local_pipeline
from goose_core.testing import TrainSpec

ROUNDS = 12
STEPS = 3  # training steps per sample
#: ~3.2M parameters in fp32, as users train (bench_data_parallel's model).
SPEC = TrainSpec(family="gpt2", batch_size=8, seq_len=64, dtype=torch.float32,
                 overrides={"n_embd": 256, "n_layer": 4})
WHAT = "gpt2 3.2M params fp32, one process"

Built = tuple[nn.Module, torch.optim.Optimizer]


def goose(mode: str) -> Built:
    model = local_pipeline(SPEC.build_model(), 1, recompute=mode)
    return model, SPEC.build_optimizer(model.parameters())


def huggingface() -> Built:
    model = SPEC.build_model()
    # gradient_checkpointing_enable()'s newer name, where 🤗 has it (the same switch)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    return model, SPEC.build_optimizer(model.parameters())


def timed_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = STEPS) -> float:
    """Seconds per training step (forward, backward, step, zero_grad)."""
    start = time.perf_counter()
    for step in range(steps):
        model(**SPEC.batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def counted(build: Callable[[], Built]) -> int:
    """FLOPs of one training step (torch's FLOP counter)."""
    model, _ = build()
    with FlopCounterMode(display=False) as flops:
        model(**SPEC.batch(0)).loss.backward()
    return flops.get_total_flops()


def run() -> list[Record]:
    records = []
    hf_flops = counted(huggingface)
    peer = "🤗 gradient_checkpointing_enable()"
    for mode in ("blocks", "selective"):
        a, b = goose(mode), huggingface()
        pairs = alternate(lambda: timed_steps(*a), lambda: timed_steps(*b), ROUNDS)
        flops = counted(lambda: goose(mode))
        records += [
            Record.timed("recompute", f'step time, recompute="{mode}", {WHAT}, {ROUNDS} rounds x {STEPS} steps',
                         pairs, peer),
            Record.count("recompute", f'FLOPs of a step, recompute="{mode}", {WHAT}', flops, hf_flops, peer, "FLOP"),
        ]
    return records
