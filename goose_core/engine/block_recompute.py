"""Per-block recompute: each transformer block keeps its input only (or its matmuls), the head keeps all.

The cell modes of :mod:`goose_core.engine.recompute` drop a whole cell, so the backward runs the
LM head and the loss again: on the last stage the head is often the largest matmul of the
cell. The block modes recompute inside the blocks only, as 🤗's
``gradient_checkpointing_enable()`` does (it checkpoints each decoder layer and nothing else:
not the embedding, not the final norm, the head or the loss)::

    embed ─► [block 0] ─► [block 1] ─► ... ─► norm ─► lm_head ─► loss
              ▲ keeps its input          keep every activation (never recomputed)
              │ "blocks":    rebuilt whole in the backward
              │ "selective": keeps its matmul outputs too, rebuilds the rest
              └─ (:mod:`goose_core.engine.selective`)

Each held block's ``forward`` is replaced on the instance by one that runs the original under
torch's non-reentrant checkpoint (:func:`torch.utils.checkpoint.checkpoint`), so parameter
names, hooks and the module tree stay as they were. The checkpoint replays the forward's CPU and
device RNG state (dropout draws the same masks) and autocast state; the replay also runs under
the forward's torch function modes and with :func:`~goose_core.engine.recompute.is_recomputing`
true, as the cell modes' replay does. Every micro-batch is recomputed (no ``except_last``: the
last micro-batch's activations are a small share of a cell once the head keeps its own).

Gradients are bit-identical to ``"never"`` under the same schedule: the replay runs the same
kernels on the same values, a kept matmul output is the tensor the replay would compute, and
each parameter's gradient adds up in the same order. Under ``torch.autocast`` with its weight
cache on (the default), ``"blocks"`` stays bit-identical, while ``"selective"`` casts each weight
at every use (:func:`_no_autocast_cache`) where ``"never"`` reuses the first micro-batch's cast,
so its weight gradients add up in another order; with ``cache_enabled=False`` they are
bit-identical again (as for the cell modes).

What the checkpoint keeps (the block's tensor arguments, and under ``"selective"`` the matmul
outputs) lives outside autograd's saved tensors, so saved-tensor hooks would not see it: an
identity node (:class:`Kept`) on the block's output saves those tensors for backward, so
activation accounting (:class:`~goose_core.engine.activations.LiveActivations`) counts them.
The replay's own short-lived activations (one block at a time, in the backward) are not counted.

The replay is the minimum of its policy: torch's checkpoint stops it at the block's last save
for backward (``early_stop``), so ops whose outputs the backward never reads are not run again
(a Llama block's ``down_proj``, which only joins the residual sum). Its recompute FLOPs are the
block's forward up to that save under ``"blocks"``, none counted under ``"selective"``
(tests/test_selective_recompute.py counts both).

A split backward (:mod:`goose_core.engine.split_backward`) replays each block twice, in B and
in W, where torch's selective checkpoint lets a block's kept outputs be read by one replay
only: with ``twice=True`` they stay readable until the block's graph is freed (after W).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, noop_context_fn
from torch.utils.checkpoint import _CONSUMED  # what a selective replay leaves in place of a read output

from goose_core.engine.recompute import MODES, _flag, _function_modes, recompute_stop
from goose_core.engine.selective import KeepMatmuls, keep_matmuls

__all__ = ["BLOCK_MODES", "RECOMPUTE_MODES", "BlockMode", "Kept", "cell_mode", "recompute_blocks", "restore_blocks"]

BlockMode = Literal["blocks", "selective"]
BLOCK_MODES: tuple[BlockMode, ...] = ("blocks", "selective")
#: Every ``recompute=`` a pipeline takes: the cell modes, then the block modes.
RECOMPUTE_MODES: tuple[str, ...] = (*MODES, *BLOCK_MODES)


def cell_mode(mode: str, num_microbatches: int = 1) -> str:
    """The executor's cell mode for a pipeline's ``recompute=``: ``"never"`` under a block mode
    (the blocks recompute themselves), else ``mode`` itself.

    Raises:
        ValueError: ``mode`` is none of :data:`RECOMPUTE_MODES`.
    """
    if mode in BLOCK_MODES:
        return "never"
    if mode not in MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; choose one of {list(RECOMPUTE_MODES)}")
    recompute_stop(mode, num_microbatches)
    return mode


_SELECTIVE = functools.partial(create_selective_checkpoint_contexts, keep_matmuls)


class Kept(torch.autograd.Function):
    """Identity on a block's output that saves what the block's checkpoint keeps, so that
    saved-tensor hooks see it. It holds no extra memory (the checkpoint holds the same tensors);
    its backward runs just before the block's, so accounting sees them freed one block early."""

    @staticmethod
    def forward(ctx, output: Tensor, *kept: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(*kept)
        ctx.num_kept = len(kept)
        return output.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (grad,) + (None,) * ctx.num_kept


class _Rereadable(dict):
    """One op's kept outputs in a selective checkpoint's storage, left in place when a replay
    reads them (torch marks each read entry consumed: a second replay would raise)."""

    def __setitem__(self, key: int, value: Any) -> None:
        if value is not _CONSUMED:
            super().__setitem__(key, value)


def _rereadable_contexts(policy: Callable[..., Any]) -> tuple[Any, Any]:
    """Torch's selective checkpoint contexts for ``policy``, over a storage any replay reads."""
    caching, cached = create_selective_checkpoint_contexts(policy)
    caching.storage = cached.storage = defaultdict(_Rereadable)
    return caching, cached


class _RecomputedForward:
    """A block's forward under the checkpoint of ``mode`` (installed on the instance); with
    ``twice``, its kept outputs readable by every replay."""

    def __init__(self, forward: Callable[..., Any], mode: BlockMode, twice: bool = False) -> None:
        self.forward, self.mode, self.twice = forward, mode, twice
        functools.update_wrapper(self, forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        args, kwargs = _without_cache(args, kwargs)
        if torch.compiler.is_compiling():
            return self._traced(*args, **kwargs)
        policy = KeepMatmuls() if self.mode == "selective" else None
        contexts = _rereadable_contexts if self.twice else create_selective_checkpoint_contexts
        context_fn = functools.partial(contexts, policy) if policy is not None else noop_context_fn
        out = checkpoint(self._replayable(), *args, use_reentrant=False, context_fn=context_fn,
                         preserve_rng_state=True, early_stop=True, **kwargs)
        kept = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        return _attach(out, kept + (policy.kept if policy is not None else []))

    def _traced(self, *args: Any, **kwargs: Any) -> Any:
        """Inside a compiled block: the checkpoint as a graph region (the compiler's partitioner
        decides the replay under the same policy), with no Python side effect (no flag, no
        accounting: saved-tensor hooks do not see a compiled graph's saves anyway)."""
        if self.mode == "selective":
            kwargs = {**kwargs, "context_fn": _SELECTIVE}
        return checkpoint(self.forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    def _replayable(self) -> Callable[..., Any]:
        """The forward; called again by the checkpoint in the backward, it replays under the
        forward's torch function modes, with ``is_recomputing()`` true."""
        modes, calls = _function_modes(), [0]

        def run(*args: Any, **kwargs: Any) -> Any:
            replay = calls[0] > 0
            calls[0] += 1
            with ExitStack() as stack:
                stack.enter_context(_flag("recomputing" if replay else "discarding"))
                if self.mode == "selective":
                    stack.enter_context(_no_autocast_cache())
                if replay:
                    for mode in modes:
                        stack.enter_context(mode)
                return self.forward(*args, **kwargs)
        return run


@contextmanager
def _no_autocast_cache() -> Iterator[None]:
    """Autocast casts every use of a weight afresh. Selective replay matches each op of the
    replay to the forward's by its count, and with the cache on a forward casts a weight only
    on its first micro-batch while every replay casts it again (the counts would differ)."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


def _without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The block's arguments with no KV cache (a 🤗 ``Cache``, by keyword or position) and
    ``use_cache`` off: the replay would append its keys a second time. 🤗's gradient
    checkpointing drops the cache the same way; a pipeline stage runs without one."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: None if _is_cache(v) else v for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _is_cache(x: Any) -> bool:
    return not isinstance(x, Tensor) and hasattr(x, "get_seq_length") and hasattr(x, "update")


def _attach(out: Any, kept: list[Tensor]) -> Any:
    """``out`` with :class:`Kept` on its first tensor (the hidden states) when it needs grad."""
    first = out[0] if isinstance(out, tuple) else out
    if not isinstance(first, Tensor) or not first.requires_grad:
        return out
    first = Kept.apply(first, *kept)
    return (first, *out[1:]) if isinstance(out, tuple) else first


def recompute_blocks(blocks: Iterable[nn.Module], mode: str, twice: bool = False) -> None:
    """Install ``mode``'s per-block recompute on every module of ``blocks`` (idempotent);
    ``twice``: a backward replays each block twice (a split backward's B and W).

    Raises:
        ValueError: ``mode`` is not one of :data:`BLOCK_MODES`.
    """
    if mode not in BLOCK_MODES:
        raise ValueError(f"unknown block recompute mode {mode!r}; choose one of {list(BLOCK_MODES)}")
    for block in blocks:
        restore_blocks([block])
        block.forward = _RecomputedForward(block.forward, mode, twice)  # type: ignore[method-assign]


def restore_blocks(blocks: Iterable[nn.Module]) -> None:
    """Undo :func:`recompute_blocks`: each block's own forward again."""
    for block in blocks:
        if isinstance(block.__dict__.get("forward"), _RecomputedForward):
            del block.forward
