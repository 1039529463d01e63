"""Per-block profilers: forward+backward time and training memory, measured without disturbing the model.

Each block is a callable ``hidden -> hidden``. Profiling never changes the model or the training
run it sits in:

- an ``nn.Module`` block runs as a deep copy (its buffers and parameters stay untouched);
- gradients come from ``torch.autograd.grad``, which returns them instead of writing ``.grad``,
  for the input and for every leaf tensor the block's graph reaches (so a closure over a module
  is measured with its weight gradients too);
- the CPU and CUDA random generators are forked, so dropout inside a block does not advance the
  stream the training run will draw from.

Blocks are chained: block i sees block i-1's output on the sample, as it will in the pipeline.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["BlockFn", "ADAM_FACTOR", "profile_times", "profile_memory", "block_memory"]

#: One pipeline block: hidden states in, hidden states out.
BlockFn = Callable[[Tensor], Tensor]

#: Bytes of training state per byte of fp32 weight under AdamW: the weight, its gradient, and
#: the two moments (exp_avg, exp_avg_sq).
ADAM_FACTOR = 4.0


def profile_times(block_fns: Sequence[BlockFn], sample: Tensor, repeat: int = 5,
                  warmup: int = 1) -> list[float]:
    """Seconds of forward + backward of each block on ``sample`` (one micro-batch of hidden
    states), the device synchronised around each run so asynchronous kernels are counted.

    The blocks are timed round-robin, ``warmup`` untimed rounds then ``repeat`` timed ones, and
    each block's fastest run counts: another process stealing the CPU only ever adds time (on a
    shared 2-core box a stolen time slice adds ~100 ms to a 0.2 ms block), and round-robin spreads
    any slow period over all blocks instead of one.

    Raises:
        ValueError: ``repeat < 1`` or ``warmup < 0``, or no blocks.
    """
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    with _sandbox(sample):
        pairs = list(_chained(block_fns, sample))
        times = [float("inf")] * len(pairs)
        for round_ in range(warmup + repeat):
            for i, (block, x) in enumerate(pairs):
                _synchronize(x)
                tick = time.perf_counter()
                _forward_backward(block, x)
                _synchronize(x)
                if round_ >= warmup:
                    times[i] = min(times[i], time.perf_counter() - tick)
    return times


def profile_memory(block_fns: Sequence[BlockFn], sample: Tensor, num_microbatches: int = 1,
                   optimizer_factor: float = ADAM_FACTOR) -> list[float]:
    """Training bytes each block holds: ``num_microbatches`` times the activation bytes it saves
    for backward on one micro-batch (``sample``), plus its parameter bytes times
    ``optimizer_factor`` (weight, gradient and optimizer state; 4 for AdamW in fp32).

    GPipe keeps every micro-batch's activations until the backward, hence the multiplication.

    Raises:
        ValueError: ``num_microbatches < 1`` or ``optimizer_factor < 0``, or no blocks.
    """
    if num_microbatches < 1 or optimizer_factor < 0:
        raise ValueError(f"num_microbatches must be >= 1 and optimizer_factor >= 0, got "
                         f"{num_microbatches} and {optimizer_factor}")
    sizes = []
    with _sandbox(sample):
        for block, x in _chained(block_fns, sample):
            activations, params = block_memory(block, x)
            sizes.append(num_microbatches * activations + optimizer_factor * params)
    return sizes


def block_memory(block: BlockFn, x: Tensor) -> tuple[int, int]:
    """``(activation bytes, parameter bytes)`` of one forward of ``block`` on ``x``.

    Activations are what the forward keeps alive for the backward. On CUDA the allocator's
    ``memory_allocated`` grows by exactly what the graph and the output hold, once one forward
    without a graph has made CUDA's one-time allocations (see :func:`_warm_up`). On CPU, where no
    allocator counts, the tensors autograd saves are caught by ``saved_tensors_hooks``, each
    storage once. Parameters are the leaves the graph reaches (the weights the block trains),
    found the same way for a module or a closure, and never counted as activations.
    """
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if x.is_cuda:
        _warm_up(block, x)
    _synchronize(x)
    before = torch.cuda.memory_allocated(x.device) if x.is_cuda else 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _hidden(block(x))
    _synchronize(x)
    weights = {w.untyped_storage().data_ptr(): w.numel() * w.element_size() for w in _leaves(out)}
    weights.pop(x.untyped_storage().data_ptr(), None)  # the input is a leaf here, not a weight
    if x.is_cuda:
        activations = torch.cuda.memory_allocated(x.device) - before
    else:
        # A weight saved by a matmul (or a transposed view of it) shares the weight's storage.
        activations = sum(n for ptr, n in saved.items() if ptr not in weights)
    return activations, sum(weights.values())


def _warm_up(block: BlockFn, x: Tensor) -> None:
    """One forward of ``block`` without a graph, its random draws undone. The first matmul on a
    stream makes cuBLAS allocate that stream's workspace through the caching allocator and keep
    it (32 MiB on Hopper): measured in the forward, it would count as the block's activations."""
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device]):
        block(x)


def _chained(block_fns: Sequence[BlockFn], sample: Tensor) -> Iterator[tuple[BlockFn, Tensor]]:
    """Each block (a copy, if a module) with the input it sees in the pipeline."""
    if len(block_fns) == 0:
        raise ValueError("no blocks to profile")
    x = sample.detach()
    for fn in block_fns:
        block = copy.deepcopy(fn) if isinstance(fn, nn.Module) else fn
        x = x.detach().requires_grad_(x.is_floating_point())
        yield block, x
        with torch.no_grad():
            x = _hidden(block(x))


def _forward_backward(block: BlockFn, x: Tensor) -> None:
    out = _hidden(block(x))
    inputs = _leaves(out)  # the weights, and the input itself (a leaf that requires grad)
    if inputs:
        torch.autograd.grad(out, inputs, torch.ones_like(out))


def _hidden(out: Tensor | tuple) -> Tensor:
    # Some Hugging Face layers return (hidden, ...) tuples; the pipeline passes on the first.
    return out[0] if isinstance(out, (tuple, list)) else out


def _leaves(out: Tensor) -> list[Tensor]:
    """The leaf tensors (weights) the graph of ``out`` would accumulate gradients into."""
    leaves, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: the gradient sink of a leaf
            leaves.append(node.variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return leaves


def _synchronize(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


@contextmanager
def _sandbox(sample: Tensor) -> Iterator[None]:
    """Leave the random generators as they were (dropout draws from them) and grads enabled."""
    devices = []
    if sample.is_cuda:
        devices = [sample.device.index if sample.device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        yield
