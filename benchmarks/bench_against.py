"""A whole training step of this checkout beside another checkout's, in alternating fresh processes.

What a change costs per step, all of it (new checks, hooks, records), measured as a user would
see it: the same model, data and layout trained by each tree's ``goose_core``, each sample a
fresh ``spawn`` of the ranks in a subprocess whose path starts at that tree. The trees alternate
within each round (``benchmarks.paired``: neighbours share the load of their moment), a sample
is the median time of ``STEPS`` steps after ``WARMUP`` untimed ones, between barriers::

    python -m benchmarks.bench_against /path/to/other/checkout [--rounds 8]

prints, per layout, this tree's and the other's median step and the median paired ratio
(this / other) with its distribution-free 95% interval.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.paired import Pairs, alternate, verdict

HERE = Path(__file__).resolve().parent.parent
WARMUP, STEPS = 3, 12
# (tp, pp, dp, zero): data parallelism alone, tp x pp, and data parallelism with ZeRO-1 (whose
# optimizer step does the most per-step work of its own: the shard's re-read, the all-gather)
LAYOUTS = [(1, 1, 2, 0), (2, 2, 1, 0), (1, 1, 2, 1)]

# Runs in the subprocess, against whichever goose_core its path finds first: only names both
# trees have (the public API of the wrappers and the harness).
_SAMPLE = """
import json, statistics, sys, time
import torch, torch.distributed as dist
from goose_core import DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel, TensorParallel, spawn
from goose_core.data import shard_batch
from goose_core.testing import TrainSpec

SPEC = TrainSpec(family="llama", batch_size=8, seq_len=64, dtype=torch.float32)
tp, pp, dp, zero, warmup, steps = map(int, sys.argv[1:7])

def body():
    torch.set_num_threads(1)
    ctx = ParallelContext(tp, pp, dp)
    model = SPEC.build_model()
    if tp > 1: model = TensorParallel(model, ctx).parallelize()
    if pp > 1: model = PipelineParallel(model, ctx, num_microbatches=2).parallelize()
    if dp > 1: model = DataParallel(model, ctx).parallelize()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if zero: optimizer = DistributedOptimizer(optimizer, ctx)
    times = []
    for step in range(warmup + steps):
        batch = shard_batch(SPEC.batch(step % 4), ctx.dp_rank, ctx.dp_size)
        dist.barrier()
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])

print(json.dumps(spawn(body, tp * pp * dp, timeout=300)[0]))
"""


def sample(tree: Path, layout: tuple[int, int, int, int]) -> float:
    """One fresh run of ``tree``'s goose_core at ``layout``: its median seconds per step."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _SAMPLE, *map(str, layout), str(WARMUP), str(STEPS)],
                         env=env, cwd=tree, capture_output=True, text=True, timeout=600, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (its goose_core/ is imported)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    for layout in LAYOUTS:
        pairs: Pairs = alternate(lambda: sample(HERE, layout), lambda: sample(args.other.resolve(), layout),
                                 args.rounds, warmup=0)
        low, high, coverage = pairs.interval
        this, other = sorted(pairs.goose)[len(pairs.goose) // 2], sorted(pairs.peer)[len(pairs.peer) // 2]
        print(f"tp={layout[0]} pp={layout[1]} dp={layout[2]}{' ZeRO-1' if layout[3] else ''}: this {this * 1e3:.1f} ms/step, other "
              f"{other * 1e3:.1f} ms/step, ratio {pairs.ratio:.3f} [{low:.3f}, {high:.3f}] "
              f"({coverage:.0%}): {verdict(low, high)}", flush=True)


if __name__ == "__main__":
    main()
