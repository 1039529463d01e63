"""PipelineParallel: turn a Hugging Face causal LM into this rank's pipeline stage.

Every rank of the pipeline group calls ``PipelineParallel(model, ctx, ...).parallelize()``; each
keeps its blocks (and the embeddings on the first stage, the head on the last) and replaces the
rest with placeholders, so parameter names stay the single-device model's. The model's
``forward`` becomes the pipeline's: the same training loop runs on every rank::

    loss = model(input_ids=..., labels=...).loss   # global batch mean, on every stage
                                                    # (or PipelineParallel(..., loss_fn=...))
    loss.backward()                                 # runs the whole backward schedule
                                                    # (1F1B: ran in the forward; this hands
                                                    #  over the gradients)

With input and output embeddings tied (GPT-2, Bloom), the first stage holds the embedding and
the last the head, one Parameter seen from two ranks: after each backward their gradients are
summed over the two, so both keep one value.

On the model: ``forward`` becomes the stage's (:class:`~goose_core.pipeline.stage.Stage`), and
``model.callbacks`` (the :class:`CallbackList`) and ``model.pipeline`` (the executor) are added.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import Tensor, nn

from goose_core.distributed.batch_check import check_policy, install_batch_check
from goose_core.distributed.context import ParallelContext
from goose_core.distributed.progress import count_forwards
from goose_core.finite import watch
from goose_core.metadata import parameters_changed, router_loss_over_dp
from goose_core.partition import Partitioner, partition_blocks
from goose_core.engine.callbacks import Callback, CallbackList
from goose_core.engine.block_recompute import cell_mode
from goose_core.pipeline.custom_loss import CustomLoss, LossFn
from goose_core.engine.p2p import DistributedTransport
from goose_core.engine.pipeline import Pipeline
from goose_core.engine.schedule import schedule_named
from goose_core.pipeline.generate import advertise, refuse_unsupported_generate
from goose_core.pipeline.split import SplitModel, drop_modules, split_model_for
from goose_core.pipeline.stage import Stage
from goose_core.engine.transport import LocalTransport, Transport

__all__ = ["PipelineParallel", "is_pipelined", "local_pipeline"]

_PROFILED = ("time", "memory")


class PipelineParallel:
    """Split ``model`` over the pipeline-parallel group of ``ctx``.

    Args:
        model: a transformers causal LM (GPT-2, Bloom, or a family with ``base_model_pp_plan``).
        ctx: this rank's ParallelContext.
        num_microbatches: M, the number of equal micro-batches each batch is cut into.
        recompute: which micro-batches drop their activations in the forward and recompute them
            before their backward: ``"always"``, ``"except_last"`` (the default) or ``"never"``
            (see :mod:`goose_core.engine.recompute`); or every micro-batch recomputes inside the
            transformer blocks only, head and loss kept: ``"blocks"`` (each block whole, as 🤗's
            gradient checkpointing) or ``"selective"`` (each block's non-matmul ops; see
            :mod:`goose_core.engine.block_recompute`). ``checkpoint=`` is its deprecated name.
        partitioner: how many blocks each stage gets (see :func:`goose_core.partition.partition_blocks`).
        callbacks: fired around every forward, backward and recompute of a (micro-batch, stage) cell.
        sample: for the profiling partitioners, hidden states of one micro-batch (default: one
            sequence of 32 tokens).
        check_batch: when to compare a checksum of every stage's batch: ``"first"`` forward,
            ``"always"`` or ``"never"`` (shapes and ids are agreed on every forward regardless,
            in the same small all-reduce).
        schedule: ``"gpipe"`` (default: every forward, then ``loss.backward()`` runs every
            backward), ``"1f1b"`` (at most p micro-batches in flight instead of M: the forward
            call runs each micro-batch's backward too, and ``loss.backward()`` hands over the
            gradients; see :mod:`goose_core.engine.parked`) or ``"interleaved-1f1b"`` (1F1B over
            ``virtual_stages`` chunks per rank: a bubble V times smaller; M a multiple of p).
        virtual_stages: V, the chunks of blocks each rank holds with ``"interleaved-1f1b"``
            (default 2): the model is cut into p·V partitions and rank r holds r, r + p, ...
        loss_fn: a loss computed from the logits, per micro-batch on the last stage, instead of
            the model's own: ``loss_fn(logits, labels)`` (a mean; the M are averaged) or
            ``loss_fn(logits, labels, num_items_in_batch)`` (🤗's token-weighted convention);
            the loop passes its targets as ``labels=`` (see :mod:`goose_core.pipeline.custom_loss`).

    A forward with gradients enabled needs ``labels`` (and then a loss inside the pipeline):
    without them no stage could build a loss to train on, so it is refused on every rank.

    Order: apply it after ``TensorParallel`` (which refuses a model already split into stages);
    ``DataParallel`` may come before or after it (its reducer is rebuilt over this stage's
    parameters). Every stage must be fed the same batch by the training loop: every forward
    agrees on its shapes and id range, and by default the first forward also compares a
    checksum of the inputs, over the pipeline group; a bad or different batch raises on every
    rank (see :mod:`goose_core.distributed.batch_check`).

    Raises:
        ValueError: on every rank, before any collective: M < 1, an unknown schedule,
            recompute mode or ``check_batch``, a ``loss_fn`` with a router loss, a model already pipelined, a model that cannot be split, fewer
            blocks than stages (p·V with virtual stages), a bad partition, M not a multiple of
            p for interleaved 1F1B, ``virtual_stages`` with a schedule that takes none.
    """

    def __init__(self, model: nn.Module, ctx: ParallelContext, num_microbatches: int = 1,
                 recompute: str | None = None, partitioner: Partitioner = "uniform",
                 callbacks: Iterable[Callback] = (), sample: Tensor | None = None,
                 check_batch: str = "first", schedule: str = "gpipe", loss_fn: LossFn | None = None, *,
                 checkpoint: str | None = None, virtual_stages: int | None = None) -> None:
        recompute = _recompute_mode(recompute, checkpoint, "PipelineParallel")
        self.schedule = schedule_named(schedule, virtual_stages)
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        cell_mode(recompute, num_microbatches)  # validates the mode
        self.check_batch = check_policy(check_batch)
        self.num_chunks = ctx.pipeline_parallel_size * self.schedule.virtual_stages
        self.schedule(num_microbatches, self.num_chunks)  # its conditions on M, on every rank
        if is_pipelined(model):
            raise ValueError("this model is already split into pipeline stages: call "
                             "PipelineParallel(...).parallelize() once")
        self.model, self.ctx, self.num_microbatches = model, ctx, num_microbatches
        self.recompute = recompute
        self.callbacks = CallbackList(callbacks)
        self.split_model = split_model_for(model)
        over_dp = router_loss_over_dp(model) and ctx.data_parallel_size > 1  # expert parallelism's
        self.split_model.check(num_microbatches, self.schedule, ctx.data_parallel_group if over_dp else None)
        self.counts = _split(self.split_model, self.num_chunks, partitioner, num_microbatches, sample)
        self.loss = None if loss_fn is None else CustomLoss(loss_fn, num_microbatches, model)

    def parallelize(self) -> nn.Module:
        """This rank's stage: ``model`` itself, trimmed, with a pipelined ``forward``, the
        :class:`CallbackList` as ``model.callbacks`` and the executor as ``model.pipeline``."""
        ctx, model, split_model = self.ctx, self.model, self.split_model
        j, n = ctx.pipeline_parallel_rank, ctx.pipeline_parallel_size
        chunks = self._chunks(j)
        held = [b for blocks in chunks.values() for b in blocks]
        tied = _tied_path(model)
        drop = [f"{split_model.blocks_path}.{b}" for b in range(len(split_model.blocks)) if b not in held]
        first, last = 0 in chunks, self.num_chunks - 1 in chunks  # both on rank 0 under ZBV
        if not first:
            drop += [p for p in split_model.embed_paths if not (last and p == tied)]
        if not last:
            drop += list(split_model.head_paths)
        install_batch_check(model, ctx, "pp", self.check_batch)  # before the embedding is dropped
        drop_modules(model, drop)
        model.to(ctx.device)
        transport: Transport = (LocalTransport([ctx.device] * self.num_chunks) if n == 1 else DistributedTransport(
            ctx.pipeline_parallel_group, ctx.prev_pipeline_rank, ctx.next_pipeline_rank, ctx.device,
            ctx.group_ranks("pp")))
        stage = Stage(model, split_model, chunks, self.num_chunks, transport, self.num_microbatches,
                      self.recompute, self.callbacks, ctx, tied, [ctx.device] * self.num_chunks,
                      self.schedule, self.loss)
        _install(model, stage)
        count_forwards(model)  # the step in this rank's progress record
        parameters_changed(model)  # a DataParallel applied before re-buckets over this stage
        watch(model, ctx)  # non-finite gradients stop the step (this stage's parameters marked)
        return model

    def _chunks(self, rank: int) -> dict[int, list[int]]:
        """{partition: its blocks} for every partition ``rank`` holds (with virtual stages, chunk
        c on rank c mod p; else partition ``rank`` alone)."""
        placement = self.schedule(self.num_microbatches, self.num_chunks)
        starts = [sum(self.counts[:c]) for c in range(self.num_chunks)]
        return {c: list(range(starts[c], starts[c] + self.counts[c])) for c in placement.partitions_of(rank)}


def _split(split_model: SplitModel, num_stages: int, partitioner: Partitioner, num_microbatches: int,
           sample: Tensor | None = None) -> list[int]:
    """Blocks per stage; the time and memory partitioners profile the blocks on ``sample`` (one
    micro-batch of hidden states; a 1 x 32 embedding when not given)."""
    num_blocks = len(split_model.blocks)
    if not (isinstance(partitioner, str) and partitioner in _PROFILED):
        return partition_blocks(num_blocks, num_stages, partitioner)
    if sample is None:
        with torch.no_grad():
            # the ids on the table's device: a model already on a GPU looks them up there
            table = split_model.model.get_input_embeddings().weight
            sample = split_model.embed({"input_ids": torch.zeros(1, 32, dtype=torch.long, device=table.device)})
    return partition_blocks(num_blocks, num_stages, partitioner, block_fns=split_model.block_fns(),
                            sample=sample, num_microbatches=num_microbatches)


def local_pipeline(model: nn.Module, num_partitions: int, num_microbatches: int = 1,
                   recompute: str | None = None, partitioner: Partitioner = "uniform",
                   callbacks: Iterable[Callback] = (), devices: list[torch.device] | None = None,
                   schedule: str = "gpipe", loss_fn: LossFn | None = None, *,
                   checkpoint: str | None = None, virtual_stages: int | None = None) -> nn.Module:
    """Every partition of ``model`` in this process (torchgpipe's setting): partition j on
    ``devices[j]`` (default: all on CPU), tensors hopping devices on copy streams. No processes,
    no collectives: how the engine is tested without ranks, and how one GPU exercises streams.
    ``recompute``, ``schedule``, ``loss_fn`` and ``virtual_stages`` as for
    :class:`PipelineParallel` (with V of them, ``num_partitions`` is the depth p: chunk c on
    ``devices[c mod p]``).

    Raises:
        ValueError: as :class:`PipelineParallel`, or ``devices`` of the wrong length.
    """
    recompute = _recompute_mode(recompute, checkpoint, "local_pipeline")
    schedule_cls = schedule_named(schedule, virtual_stages)
    devices = [torch.device(d) for d in (devices or ["cpu"] * num_partitions)]
    if len(devices) != num_partitions:
        raise ValueError(f"{len(devices)} devices for {num_partitions} partitions: give one per partition")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if is_pipelined(model):
        raise ValueError("this model is already split into pipeline partitions: pipeline it once")
    cell_mode(recompute, num_microbatches)  # validates the mode
    devices = [devices[c % num_partitions] for c in range(num_partitions * schedule_cls.virtual_stages)]
    num_partitions = len(devices)  # chunks, from here on
    schedule_cls(num_microbatches, num_partitions)  # its conditions on M
    split_model = split_model_for(model)
    split_model.check(num_microbatches, schedule_cls)
    counts = _split(split_model, num_partitions, partitioner, num_microbatches)
    loss = None if loss_fn is None else CustomLoss(loss_fn, num_microbatches, model)
    starts = [sum(counts[:j]) for j in range(num_partitions)]
    held = {j: list(range(starts[j], starts[j] + counts[j])) for j in range(num_partitions)}
    for j, blocks in held.items():
        for b in blocks:
            split_model.blocks[b].to(devices[j])
    for path in split_model.embed_paths:
        model.get_submodule(path).to(devices[0])
    for path in split_model.head_paths:
        model.get_submodule(path).to(devices[-1])
    if _tied_path(model) is not None and devices[0] != devices[-1]:
        raise ValueError("tied input/output embeddings need the first and last partitions on one device")
    stage = Stage(model, split_model, held, num_partitions, LocalTransport(devices), num_microbatches,
                   recompute, CallbackList(callbacks), devices=devices, schedule=schedule_cls, loss=loss)
    return _install(model, stage)


def _recompute_mode(recompute: str | None, checkpoint: str | None, caller: str) -> str:
    """``recompute=``, or ``checkpoint=``, its deprecated name (with a DeprecationWarning);
    ``"except_last"`` when neither is given.

    Raises:
        TypeError: both are given.
    """
    if checkpoint is None:
        return "except_last" if recompute is None else recompute
    if recompute is not None:
        raise TypeError(f"{caller}() got both recompute={recompute!r} and checkpoint={checkpoint!r}: "
                        f"checkpoint= is the deprecated name of recompute=, pass recompute= only")
    warnings.warn(f"{caller}(checkpoint=...) is deprecated: pass recompute={checkpoint!r} instead",
                  DeprecationWarning, stacklevel=3)
    return checkpoint


def is_pipelined(model: nn.Module) -> bool:
    """Whether ``model`` was returned by ``PipelineParallel.parallelize()`` or ``local_pipeline``."""
    return isinstance(getattr(model, "pipeline", None), Pipeline)


def _install(model: nn.Module, stage: Stage) -> nn.Module:
    # Its signature adds the family's generation inputs: 🤗's generate reads it (generate.py).
    model.forward = advertise(stage.forward, model)  # type: ignore[method-assign]
    if hasattr(model, "generate"):
        refuse_unsupported_generate(model)
    model.callbacks = stage.pipeline.callbacks
    model.pipeline = stage.pipeline
    return model


def _tied_path(model: nn.Module) -> str | None:
    """The input embedding's module path when the output embedding shares its weight."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp.weight is not out.weight:
        return None
    return next(name for name, module in model.named_modules() if module is inp)
