"""The stage a rank runs: a pipelined forward in, the batch loss out, gradients synced after backward.

What one training step does on a stage, around the executor (:mod:`goose_core.engine.pipeline`)::

    forward   inputs -> M micro-batches -> Pipeline.run -> last stage: sum of micro-batch losses
              (+ the MoE router loss of the whole batch, once: see :mod:`.router_loss`)
              loss broadcast from the last stage over the pipeline group, so every stage
              returns the same value, wrapped in Root (its backward drives this stage's part)
    backward  Root.backward: begin  -> defer the gradient syncs of this stage's parameters
              ... every cell's backward, in the schedule's order ...
              engine callback: end  -> wait for the last gradient sends
                                    -> sum the tied embedding's gradient over the first/last stage
                                    -> flush the gradient syncs (data-parallel reduction)

With 1F1B (``schedule="1f1b"``) the backward runs inside the forward: ``defer``, every cell's
forward and backward in the schedule's order, the tied sum, then the gradients are parked
(:mod:`goose_core.engine.parked`); ``loss.backward()`` adds seed x parked to ``.grad`` and flushes.

The stage knows data parallelism only through :class:`goose_core.grad_sync.GradSync`.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from goose_core.compile import refuse_whole_model_compile
from goose_core.distributed.context import ParallelContext
from goose_core.distributed.missing import naming_missing
from goose_core.grad_sync import GradSync
from goose_core.loss import count_items, loss_dtype, nonzero
from goose_core.metadata import grad_syncs
from goose_core.engine.block_recompute import BLOCK_MODES, cell_mode, recompute_blocks
from goose_core.engine.callbacks import CallbackList
from goose_core.pipeline.custom_loss import CustomLoss
from goose_core.pipeline.generate import Generation
from goose_core.engine.microbatch import gather, scatter
from goose_core.engine.parked import ParkedGradients
from goose_core.engine.pipeline import Partition, Pipeline, Root, StepOutput
from goose_core.engine.schedule import GPipe, Schedule
from goose_core.pipeline.split import SplitModel
from goose_core.pipeline.tied import TiedGradients
from goose_core.engine.transport import Transport

__all__ = ["Stage", "CellScope"]


@dataclass(frozen=True)
class CellScope:
    """What a wrapper outside the pipeline sets around every cell of one step (its forward, and
    its recompute in the backward): ``enter(rows)`` with the cell's micro-batch rows of ``rows``.

    Context parallelism passes one: its ring attention needs the padding mask of the whole
    sequence for the micro-batch's rows, which no single forward of the model sees."""

    enter: Callable[[Tensor | None], AbstractContextManager[Any]]
    rows: Tensor | None = None  # [b, ...]: cut into micro-batches with the batch


class Stage:
    """The pipelined forward of the partitions held here: micro-batches in, loss (or logits) out.

    With a ParallelContext it holds one partition and talks to its neighbours; without one it
    holds them all (the local transport) and needs no collective.

    Args:
        model: the (trimmed) 🤗 model whose blocks the partitions run.
        split_model: how to call the model's pieces (:func:`goose_core.pipeline.split.split_model_for`).
        held: partition index -> the blocks it runs, for every partition held here.
        num_partitions: the pipeline's depth.
        transport: moves activations and gradients between partitions.
        num_microbatches: M.
        recompute: a cell mode (``"always"``, ``"except_last"``, ``"never"``) or a block mode
            (``"blocks"``, ``"selective"``: installed on the held blocks here, see
            :mod:`goose_core.engine.block_recompute`).
        callbacks: fired around every cell.
        ctx: this rank's context (None: every partition here, no collective).
        tied: the module path of an input embedding tied to the LM head, if any.
        devices: partition j's device (default: all CPU).
        schedule: the schedule class (GPipe by default).
        loss: a loss computed from the logits on the last stage (``PipelineParallel(...,
            loss_fn=...)``) instead of the model's own.
    """

    def __init__(self, model: nn.Module, split_model: SplitModel, held: dict[int, list[int]],
                 num_partitions: int, transport: Transport, num_microbatches: int,
                 recompute: str, callbacks: CallbackList, ctx: ParallelContext | None = None,
                 tied: str | None = None, devices: list[torch.device] | None = None,
                 schedule: type[Schedule] = GPipe, loss: CustomLoss | None = None) -> None:
        placement = schedule(num_microbatches, num_partitions)
        _refuse_split_tie(model, schedule, transport.connected or placement.num_ranks == 1)
        self.model, self.split_model, self.ctx, self.transport = model, split_model, ctx, transport
        self.num_microbatches, self.num_partitions = num_microbatches, num_partitions
        self.is_last = num_partitions - 1 in held
        devices = devices or [torch.device("cpu")] * num_partitions
        # Each cell runs the family's own forward over this partition's blocks (SplitModel.run).
        partitions = [Partition(j, _scoped(functools.partial(split_model.run, blocks, j == 0, j == num_partitions - 1)),
                                split_model.embed if j == 0 else None, devices[j])
                      for j, blocks in held.items()]
        if loss is not None and self.is_last:
            partitions[-1].body = loss.wrap(partitions[-1].body)
        self.loss = loss
        self.block_recompute = recompute if recompute in BLOCK_MODES else None
        self.device = devices[max(held)]
        if recompute in BLOCK_MODES:
            recompute_blocks([split_model.blocks[b] for blocks in held.values() for b in blocks], recompute,
                             twice=schedule.split_backward)
        self.pipeline = Pipeline(partitions, num_partitions, transport, cell_mode(recompute), callbacks, schedule)
        # Both ends on one rank (ZBV's V puts the first and last chunk on rank 0): one weight, no sum.
        apart = placement.rank_of(0) != placement.rank_of(num_partitions - 1)
        self.tied = TiedGradients.create(model, ctx, tied) if ctx is not None and tied and apart else None
        self.last_rank = placement.rank_of(num_partitions - 1)
        self.generation = Generation(model, self.pipeline, sorted(b for blocks in held.values() for b in blocks),
                                     self.is_last, ctx if num_partitions > 1 else None)
        self._deferred: list[GradSync] = []  # the gradient syncs held during this backward

    def forward(self, input_ids: Tensor | None = None, labels: Tensor | None = None,
                attention_mask: Tensor | None = None, num_items_in_batch: Tensor | float | None = None,
                shift_labels: Tensor | None = None, cell_scope: CellScope | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """The batch's loss (with ``labels``) or logits (without), as the unsplit model's; a
        generation step (``model.generate``'s: a cache, positions or kept logits given, no labels)
        is :class:`~goose_core.pipeline.generate.Generation`'s, the logits on every rank.

        Args:
            num_items_in_batch: the denominator of the token-loss sum (🤗's convention): the
                targets of the whole step this batch belongs to (data parallelism passes it).
                Default: this batch's own targets, so the loss is its token mean.
            shift_labels: each position's target, already shifted (context parallelism's slice
                of a sequence: its last target lies on another rank); with ``labels``, as
                ``position_ids`` (the global positions of the tokens held) then may be.
            cell_scope: entered around every cell (see :class:`CellScope`).
        """
        refuse_whole_model_compile("pipelined model")  # before any message: every rank raises
        if input_ids is not None and labels is None and Generation.wanted(kwargs):
            return self.generation.forward(input_ids, attention_mask, **kwargs)  # model.generate's step
        # With labels (training), the rows' positions travel with them: context parallelism's slice.
        rows = {k: v for k, v in (("position_ids", kwargs.pop("position_ids", None) if labels is not None else None),
                                  ("shift_labels", shift_labels)) if v is not None}
        if cell_scope is not None and cell_scope.rows is not None:
            rows["scope_rows"] = cell_scope.rows
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and k != "use_cache")
        if input_ids is None or unsupported:
            raise ValueError(f"the pipelined model takes input_ids, labels, attention_mask and "
                             f"num_items_in_batch (and, without labels, model.generate's cache, position_ids, "
                             f"use_cache and logits_to_keep); got input_ids="
                             f"{'given' if input_ids is not None else None}, other arguments {unsupported}")
        self._refuse_no_loss(labels)
        self._refuse_unscoped(shift_labels, cell_scope)
        inputs = {k: v for k, v in (("input_ids", input_ids), ("labels", labels),
                                    ("attention_mask", attention_mask)) if v is not None}
        inputs.update(rows)
        # Each micro-batch knows its index: the router loss keys its whole-batch record by it.
        microbatches = [{**mb, "microbatch": i, "cell_scope": cell_scope}
                        for i, mb in enumerate(scatter(inputs, self.num_microbatches))]
        if labels is None:  # inference: no loss would reach the backward, so build no graph
            with torch.no_grad():
                outputs = self._outputs(self.pipeline.run(microbatches))
            return CausalLMOutputWithPast(logits=gather(outputs) if self.is_last else None)
        own = count_items(labels) if shift_labels is None else count_items(shift_labels, shifted=True)
        n = nonzero(own if num_items_in_batch is None else num_items_in_batch)
        microbatches = [{**mb, "num_items_in_batch": n} for mb in microbatches]
        if torch.is_grad_enabled() and self.pipeline.schedule_cls.backward_in_step:
            return CausalLMOutputWithPast(loss=self._step_with_backward(microbatches))
        if self.split_model.probs is not None:
            self.split_model.probs.reset()  # a recompute of the last step's cells recorded again
        step = self.pipeline.run(microbatches)
        return CausalLMOutputWithPast(loss=self._loss(self._total(step), step.roots))

    def _refuse_no_loss(self, labels: Tensor | None) -> None:
        """Every rank, before any point-to-point message: a step that could build no loss.

        Only the last stage holds logits, one micro-batch at a time, so a loss computed from
        ``.logits`` after the forward has nothing to differentiate on any stage."""
        if self.loss is not None and (labels is not None or torch.is_grad_enabled()):
            self.loss.check(labels)
        elif labels is None and torch.is_grad_enabled():
            raise ValueError(
                "a pipelined forward with gradients enabled needs a loss computed inside the pipeline: "
                "only the last stage holds logits, one micro-batch at a time, so a loss computed from "
                "model(...).logits cannot train. Pass labels= (the model's own loss), or "
                "PipelineParallel(..., loss_fn=...) and labels=targets (loss_fn(logits, labels) per "
                "micro-batch); for logits alone, run under torch.no_grad()")

    def _refuse_unscoped(self, shift_labels: Tensor | None, cell_scope: CellScope | None) -> None:
        """Every rank, before any point-to-point message: what the scope or the shifted labels
        would not reach. A block recompute reruns a block inside the backward, outside every
        cell's scope; a ``loss_fn`` shifts ``labels`` itself."""
        if cell_scope is not None and self.block_recompute is not None:
            raise ValueError(f"recompute={self.block_recompute!r} reruns each block inside the backward, "
                             f"outside the cell scope a wrapper set (context parallelism's ring); use "
                             f"recompute='always', 'except_last' or 'never', which recompute whole cells")
        if shift_labels is not None and self.loss is not None:
            raise ValueError("PipelineParallel(..., loss_fn=...) takes the labels unshifted, and this batch's "
                             "are already shifted (shift_labels: context parallelism's slice); drop loss_fn "
                             "(the model's own loss takes shift_labels) or context parallelism")

    def _total(self, step: StepOutput) -> Tensor | None:
        """The last stage's batch loss: the micro-batch losses' sum, plus the router loss of the
        whole batch when the stage adds it (every stage joins the all-reduce of its routers'
        whole-batch sums, so the last one adds 🤗's value; see :mod:`.router_loss`)."""
        router = self.split_model.batch_router()
        if router is None:
            return sum(self._outputs(step)) if self.is_last else None
        dp_group = self.split_model.dp_group
        per_router = self.split_model.probs.sums(self.num_microbatches, self.device, dp_group)
        if self.ctx is not None and self.num_partitions > 1:
            with naming_missing(self.ctx.pipeline_parallel_group):
                dist.all_reduce(per_router, group=self.ctx.pipeline_parallel_group)  # zeros elsewhere: exact
        return router.finish(self._outputs(step), per_router, dp_group) if self.is_last else None

    def _step_with_backward(self, microbatches: list[dict[str, Any]]) -> Tensor:
        """1F1B: the forward and the backward of every micro-batch, now; the returned loss's
        backward hands the parked gradients to ``.grad`` and flushes data parallelism."""
        parked = ParkedGradients(list(self.model.parameters()))
        try:
            self._begin_backward()
            step = self.pipeline.run(microbatches)
            if self.tied is not None:
                self.tied.sync()  # a collective of the two end stages, which both run this now
            parked.park()
        finally:
            if parked.grads is None:  # the step failed: drop its partial gradients
                parked.restore()
        total = sum(self._outputs(step)) if self.is_last else None
        return self._loss(total, [], parked)

    @staticmethod
    def _outputs(step: StepOutput) -> list[Tensor]:
        return [step.outputs[i] for i in sorted(step.outputs)]

    def _loss(self, total: Tensor | None, roots: list[Tensor],
              parked: ParkedGradients | None = None) -> Tensor:
        """The batch loss on every stage; its backward drives this stage's part of the schedule."""
        # Every stage broadcasts in one dtype: the loss's for this stage's parameters (fp32 or wider).
        dtype = loss_dtype(next(p.dtype for p in self.model.parameters() if p.is_floating_point()))
        value = (total.detach().to(dtype, copy=True) if total is not None
                 else torch.zeros((), dtype=dtype, device=self.device))
        if self.ctx is not None and self.num_partitions > 1:
            last = self.ctx.group_ranks("pp")[self.last_rank]
            with naming_missing(self.ctx.pipeline_parallel_group):
                dist.broadcast(value, last, group=self.ctx.pipeline_parallel_group)
        if not torch.is_grad_enabled():
            return total if total is not None else value
        anchor = total if total is not None else value
        if parked is not None:
            return parked.loss(anchor, self._flush)
        return Root.apply(self._begin_backward, self._end_backward, anchor, *roots)

    def _begin_backward(self) -> None:
        # Recomputed cells accumulate each parameter's gradient in a nested backward pass per
        # micro-batch, so data parallelism must not reduce on its per-parameter hooks: it
        # reduces once, when this stage's whole backward has ended. Looked up now, not when the
        # stage was built: a DataParallel applied after the pipeline comes later.
        self._deferred = grad_syncs(self.model.parameters())
        for sync in self._deferred:
            sync.defer()

    def _end_backward(self) -> None:
        self.transport.end_backward()
        if self.tied is not None:
            self.tied.sync()  # before the dp reduction: it must average the summed gradient
        self._flush()

    def _flush(self) -> None:
        for sync in self._deferred:
            sync.flush()
        self._deferred = []


def _scoped(body: Callable[[Tensor, dict[str, Any]], Tensor]) -> Callable[[Tensor, dict[str, Any]], Tensor]:
    """``body`` run inside its micro-batch's :class:`CellScope`, when the step has one."""
    def run(x: Tensor, inputs: dict[str, Any]) -> Tensor:
        scope = inputs.get("cell_scope")
        if scope is None:
            return body(x, inputs)
        with scope.enter(inputs.get("scope_rows")):
            return body(x, inputs)
    return run


def _refuse_split_tie(model: nn.Module, schedule: type[Schedule], one_graph: bool) -> None:
    """A split backward of a model whose token table is its LM head, with every stage in one
    autograd graph (one process, or one rank): refused before any step.

    W of the head asks autograd for the head weight's gradient from the head's output; in one
    graph that weight is also the token table at the graph's far end, so autograd would run the
    whole backward again down to the lookup and add the table's share to the head's, and the
    table's own W would add it once more. Across ranks each end is a graph of its own (ZBV's
    ends share rank 0, but the V between them passes through the other ranks).

    Raises:
        ValueError: naming the schedule and the fixes.
    """
    if not (schedule.split_backward and one_graph):
        return
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    if table is None or head is None or table.weight is not head.weight:
        return
    raise ValueError(f"schedule={schedule.name!r} splits each backward into B and W, and {type(model).__name__} "
                     f"ties its input and output embeddings: with both ends in one process (one autograd "
                     f"graph) the head's W would reach the tied weight through the whole network back to the "
                     f"token lookup too, counting the embedding's gradient twice. Use schedule='1f1b' or "
                     f"'interleaved-1f1b' here, or PipelineParallel over processes (the ends then sit on "
                     f"different ranks), or untie the embeddings (config.tie_word_embeddings=False)")
