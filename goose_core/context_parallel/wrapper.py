"""ContextParallel: split every sequence over the cp ranks, attention by the ring (or Ulysses)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from goose_core.context_parallel import attention
from goose_core.context_parallel.attention import CP_ATTENTION, refuse_unsupported
from goose_core.context_parallel.ring import RingSpec, ring_attention
from goose_core.context_parallel.slicing import balanced_positions, slice_batch
from goose_core.distributed.batch_check import install_batch_check, model_vocab
from goose_core.distributed.context import ParallelContext
from goose_core.metadata import module_grad_sync
from goose_core.pipeline.parallel import is_pipelined
from goose_core.pipeline.stage import CellScope

__all__ = ["ContextParallel", "METHODS"]

METHODS = ("ring", "ulysses")


class ContextParallel:
    """Context parallelism over ``ctx``'s cp group, in place on a 🤗 causal LM.

    ``parallelize()`` returns the same module with:

    * its attention implementation set to :data:`~goose_core.context_parallel.attention.CP_ATTENTION`
      (🤗's attention interface: no model code replaced);
    * the batch check (:mod:`goose_core.distributed.batch_check`) along cp: the cp peers must be
      fed the same batch;
    * a forward pre-hook that keeps this rank's positions of the
      batch (:func:`~goose_core.context_parallel.slicing.slice_batch`: load-balanced chunks i and
      2C-1-i, global position ids, labels shifted before slicing) and sets the ring for the
      attention calls of the forward. Every cp rank of a dp shard is fed the same batch.

    On a pipelined model (``PipelineParallel`` before it) the slice is what the pipeline cuts
    into micro-batches, and the ring is set around each cell (its forward and its recompute)
    with the padding mask of that micro-batch's rows (:class:`~goose_core.pipeline.stage.CellScope`).

    The loss is the token-weighted mean over the whole sequence: each rank's token-loss sum is
    divided by the targets of the whole batch, counted over dp x cp by ``DataParallel``, which
    must wrap the model too (at any data_parallel_size): cp ranks hold the same weights, and
    DataParallel averages their gradients over dp x cp (:attr:`ParallelContext.replica_group`)
    and reports ``loss`` as the global mean on every rank.

    Args:
        module: a 🤗 causal LM whose attention goes through 🤗's attention interface.
        ctx: the parallel context; its cp group is used.
        method: ``"ring"`` (key/value blocks around the ring, online-softmax merge) or
            ``"ulysses"`` (all-to-all swaps the sequence split for a head split).

    Raises:
        ValueError: an unknown method; a family whose attention the ring does not reproduce
            (softcapping, ALiBi, sinks; or one whose attention does not go through the interface,
            at its first forward); a sequence length that is not a multiple of 2 * cp; a forward
            without DataParallel around the model while cp > 1; PipelineParallel applied after
            it (at the first forward, before any collective).

    Order: ``TensorParallel`` (before or after it), ``PipelineParallel`` (before it), then
    ``ContextParallel``, then ``DataParallel``.
    """

    def __init__(self, module: nn.Module, ctx: ParallelContext, method: str = "ring") -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "ulysses" and not attention.ulysses_available():
            raise ValueError("method='ulysses' needs goose_core.context_parallel.ulysses, which this "
                             "installation does not have; use method='ring'")
        if module_grad_sync(module) is not None:
            raise ValueError("ContextParallel must wrap the model before DataParallel: DataParallel counts "
                             "the targets of the slices ContextParallel makes (TensorParallel, then "
                             "ContextParallel, then DataParallel)")
        refuse_unsupported(module)
        self.module, self.ctx, self.method = module, ctx, method
        self._checked = False
        self._cell_calls = 0  # attention calls in the pipeline's cells of this forward
        self._pipelined = is_pipelined(module)  # a pipeline applied later is refused at the first forward

    def parallelize(self) -> nn.Module:
        """Install the attention and the slicing hook; return the module."""
        config = self.module.config
        set_attn = getattr(self.module, "set_attn_implementation", None)
        if set_attn is not None:
            set_attn(CP_ATTENTION)
        else:
            config._attn_implementation = CP_ATTENTION
        if self.ctx.context_parallel_size > 1 and model_vocab(self.module) is not None:
            # The cp peers must be fed one batch: checked on the whole batch, before the slicing hook.
            install_batch_check(self.module, self.ctx, "cp")
        self.module.register_forward_pre_hook(self._slice, with_kwargs=True)
        # First of all hooks: a wrapper applied after this one is refused before any collective.
        self.module.register_forward_pre_hook(self._check_order, prepend=True)
        self.module.register_forward_hook(self._after, with_kwargs=True, always_call=True)
        return self.module

    def _check_order(self, module: nn.Module, args: tuple) -> None:
        if not self._checked and is_pipelined(module) and not self._pipelined:
            raise ValueError("PipelineParallel was applied after ContextParallel: the pipeline must be built "
                             "first, so that ContextParallel's slice of each batch is what it cuts into "
                             "micro-batches; apply the wrappers in the order TensorParallel, "
                             "PipelineParallel, ContextParallel, DataParallel")

    def _attention(self) -> Callable[..., Tensor]:
        return ring_attention if self.method == "ring" else attention.ulysses_method

    def _slice(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            raise ValueError("call a context-parallel model with keyword arguments "
                             "(model(input_ids=..., labels=...)): goose slices them by name")
        if self.ctx.context_parallel_size > 1 and module_grad_sync(module) is None:
            raise ValueError("context parallelism needs DataParallel(model, ctx) around the model too "
                             "(at any data_parallel_size): the cp ranks hold the same weights and "
                             "their gradients must be averaged over dp x cp")
        ids = kwargs.get("input_ids")
        ids = ids if ids is not None else kwargs["inputs_embeds"]
        positions = balanced_positions(ids.shape[1], self.ctx.context_parallel_size)
        mask = kwargs.get("attention_mask")
        key_mask = None if mask is None else mask.to(torch.bool)
        held = tuple(p.to(ids.device) for p in positions)
        sliced = slice_batch(kwargs, positions[self.ctx.context_parallel_rank])
        self._cell_calls = 0
        if is_pipelined(module):  # the ring is set per cell, for its micro-batch's rows
            return (), {**sliced, "cell_scope": CellScope(lambda rows: self._cell(held, rows), key_mask)}
        attention.begin(RingSpec(self.ctx.context_parallel_group, held, key_mask), self._attention())
        return (), sliced

    @contextmanager
    def _cell(self, positions: tuple[Tensor, ...], key_mask: Tensor | None) -> Iterator[None]:
        """One pipeline cell's attention calls run over the ring, masked by its rows' padding."""
        attention.begin(RingSpec(self.ctx.context_parallel_group, positions, key_mask), self._attention())
        try:
            yield
        finally:
            self._cell_calls += attention.end()

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        # always_call: a forward that raised still ends the ring, so no later call sees it.
        calls = attention.end() + self._cell_calls
        if output is None:  # the forward raised: let its error be the one the caller sees
            return output
        if not self._checked and calls == 0:
            family = getattr(module.config, "model_type", type(module).__name__)
            raise ValueError(f"context parallelism does not support {family!r}: its attention does not "
                             f"go through 🤗's attention interface, so goose's ring cannot take its place")
        self._checked = True
        return output
