"""Bytes saved for the backward per rank at cp = 1, 2, 4 (tiny float64 Llama): NOTES.md's table.

    python stages/15_long_sequences/memory.py
"""

from __future__ import annotations

from torch import Tensor, nn

from goose_core import ContextParallel, DataParallel, ParallelContext, spawn
from goose_core.engine.activations import LiveActivations
from goose_core.testing import TrainSpec

SPEC = TrainSpec(family="llama", steps=1, batch_size=2, seq_len=64)


def held_bytes(model: nn.Module, batch: dict[str, Tensor]) -> int:
    """The bytes ``model``'s forward on ``batch`` leaves alive for its backward (then run)."""
    with LiveActivations(model.parameters()) as live:
        loss = model(**batch).loss
        size = live.bytes
    loss.backward()
    return size


def held(cp: int, ring: bool = True) -> int:
    """This rank's bytes for :data:`SPEC` (``ring=False``: the model's own eager attention, no
    context parallelism)."""
    ctx = ParallelContext(context_parallel_size=cp, backend="gloo", device="cpu")
    model = SPEC.build_model()
    if ring:
        model = ContextParallel(model, ctx).parallelize()
    return held_bytes(DataParallel(model, ctx).parallelize(), SPEC.batch(0))


def main() -> None:
    print("| cp | tokens a rank holds | bytes saved a rank | vs cp = 1 |")
    print("|---:|---:|---:|---:|")
    tokens = SPEC.batch_size * SPEC.seq_len
    eager = spawn(held, 1, 1, False, timeout=300)[0]
    print(f"| 1, eager attention | {tokens} | {eager:,} | |")
    base = None
    for cp in (1, 2, 4):
        size = spawn(held, cp, cp, timeout=300)[0]
        base = base or size
        print(f"| {cp} | {tokens // cp} | {size:,} | {size / base:.3f} |")


if __name__ == "__main__":
    main()
