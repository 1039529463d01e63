"""DataParallel: replicate a model over the data-parallel group and average its gradients."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.data_parallel.loss import count_items_over, global_mean, replica_items
from goose_core.data_parallel.reducer import GradReducer, trainable
from goose_core.data_parallel.replicas import broadcast_replicas, check_replicas, expert_groups
from goose_core.data_parallel.zero3 import ShardedParameters
from goose_core.distributed.batch_check import extremes, install_batch_check, model_vocab
from goose_core.distributed.context import ParallelContext
from goose_core.distributed.progress import count_forwards
from goose_core.loss import count_items
from goose_core.finite import watch
from goose_core.metadata import module_grad_sync, parameters_changed, router_loss_over_dp, set_module_grad_sync

# parameters_changed lives in goose_core.metadata (the wrapper-order rule); re-exported here.
__all__ = ["DataParallel", "no_sync", "parameters_changed", "reducer_of"]


class DataParallel:
    """Data parallelism over ``ctx``'s data-parallel group, in place on ``module``.

    ``parallelize()`` returns the same module (parameter names unchanged) with:

    * per-parameter gradient hooks that average gradients over the dp group in buckets of
      ``bucket_size_mb``, overlapping the backward pass (see :mod:`.reducer`);
    * a forward pre-hook that makes the loss token-weighted: when ``labels`` is passed (by
      keyword) it counts the targets over the dp group, N, and passes the model
      ``num_items_in_batch = N / dp`` (see :mod:`.loss`); a caller's own ``num_items_in_batch``
      (gradient accumulation: the targets of the whole optimizer step, every micro-step and
      every dp rank) replaces the count. Models whose forward takes no ``num_items_in_batch``
      (nor ``**kwargs``) are called unchanged while every rank holds as many targets, and
      refused on every rank when they don't;
    * a forward hook that replaces ``output.loss`` by its mean over the dp group, a
      :class:`~goose_core.data_parallel.loss.PendingMean` whose async all-reduce overlaps the
      backward (its gradient stays the local loss's: the hooks do the averaging). With the
      pre-hook's denominator it is the mean over every target of the global batch, as on one
      device, however padding and ``-100`` labels fall across ranks;
    * a check that parameters and buffers are identical on every dp rank (or a broadcast);
    * on a model with an input embedding, the batch check of
      :mod:`goose_core.distributed.batch_check`: a training forward's ids outside the vocabulary
      or labels that do not fit ``input_ids``, on any dp rank, raise on every dp rank.

    It may come before, between or after ``TensorParallel`` and ``PipelineParallel``: a later
    wrapper that replaces or drops parameters calls
    :func:`~goose_core.metadata.parameters_changed`, and the reducer (the model's
    :class:`~goose_core.grad_sync.GradSync`) is rebuilt over the parameters the module holds
    then. Build the optimizer (and ``DistributedOptimizer``) after the last wrapper, from
    ``model.parameters()``.

    Each rank feeds its own shard of the global batch (``goose_core.data.shard_batch``), as with
    torch DDP. Frozen parameters (``requires_grad=False``) are left alone. A parameter that
    requires a gradient but gets none in a step counts as a zero gradient, so every rank issues
    the same collectives. When several backward passes make one step (gradient accumulation,
    micro-batches driven by hand), run all but the last inside ``no_sync()``.

    Args:
        module: any ``nn.Module``; a Hugging Face model's ``.loss`` becomes the global mean.
        ctx: the parallel context; only its data-parallel group is used.
        bucket_size_mb: gradient bytes per bucket (torch DDP's default: 25 MB).
        broadcast: copy dp rank 0's parameters and buffers to every rank instead of checking.
        reduce_dtype: the dtype gradients are accumulated and averaged in (default:
            :func:`~goose_core.data_parallel.main_dtype`: fp32 for a bf16 or fp16 model, each
            parameter's own dtype from fp32 up). A buffer wider than the parameters sums every
            micro-batch's gradient as it comes (Megatron's main_grad). ``torch.bfloat16`` on a
            bf16 model halves the bytes moved and sums in bf16 (stage 17's mixed-precision tests measure the error).
            ZeRO-1's shards and their optimizer state live in it, or in fp32 if it is narrower.
        zero_stage: what a ``DistributedOptimizer`` built on this model shards. 1: optimizer
            state (ZeRO-1; without one, plain data parallelism). 2: gradients too: each bucket
            is reduce-scattered as the backward finishes it and its full buffer released, the
            rank keeps only its shard (:mod:`.reducer`); needs a ``DistributedOptimizer``.
            3: parameters too, gathered per decoder block for its forward and backward,
            gradients reduce-scattered (:mod:`.zero3`; needs ``DistributedOptimizer``, and
            DataParallel as the last wrapper). Stage 3's every backward reduce-scatters, inside
            ``no_sync()`` too: the shards sum the micro-batches (keeping a full gradient until
            the last one would undo what stage 3 saves); stage 2's ``no_sync`` keeps the full
            gradients until the last micro-batch, as ZeRO-1 (:mod:`.reducer` weighs the two).

    Raises:
        ValueError: ``bucket_size_mb`` is not positive; ``zero_stage`` is not 1, 2 or 3; replicas
            differ (on every rank); a MoE model whose router loss is on, at dp > 1 (that loss is
            not a sum over tokens).
    """

    def __init__(self, module: nn.Module, ctx: ParallelContext, bucket_size_mb: float = 25.0,
                 broadcast: bool = False, reduce_dtype: torch.dtype | None = None,
                 zero_stage: int = 1) -> None:
        if zero_stage not in (1, 2, 3) or isinstance(zero_stage, bool):
            raise ValueError(f"zero_stage must be 1, 2 or 3, got {zero_stage!r}")
        if not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb must be > 0, got {bucket_size_mb!r}; torch DDP uses 25")
        if reduce_dtype is not None and not reduce_dtype.is_floating_point:
            raise ValueError(f"reduce_dtype must be a floating-point dtype, got {reduce_dtype}; "
                             f"leave it None to average in each parameter's own dtype")
        if module_grad_sync(module) is not None:
            raise ValueError("this module is already wrapped by DataParallel; wrap it once")
        if ctx.data_parallel_size > 1:  # (ContextParallel refuses the router loss at cp > 1)
            _refuse_router_loss(module)
        self.module = module
        self.ctx = ctx
        self.bucket_bytes = int(bucket_size_mb * 2**20)
        self.broadcast = broadcast
        self.reduce_dtype = reduce_dtype
        self.zero_stage = zero_stage
        self.reducer: GradReducer | ShardedParameters | None = None

    def parallelize(self) -> nn.Module:
        """Install the hooks and return the module, ready for ``model(**batch).loss.backward()``."""
        if self.zero_stage == 3 and expert_groups(self.module):
            raise ValueError("DataParallel(zero_stage=3) does not shard ExpertParallel's experts (they "
                             "differ across the dp group): use zero_stage=1 or 2 with expert parallelism")
        group = self.ctx.replica_group  # dp x cp: context-parallel ranks hold the same weights too
        for replicas in (group, *expert_groups(self.module)):  # experts: alike over their own group
            if self.broadcast:
                broadcast_replicas(self.module, replicas)
            else:
                check_replicas(self.module, replicas)
        if self.zero_stage == 3:  # parameters sharded too: gathered per block (see .zero3)
            self.reducer = ShardedParameters(self.module, group, self.reduce_dtype,
                                             reshard_after_forward=self.ctx.pipeline_parallel_size == 1)
        else:
            self.reducer = GradReducer(trainable(self.module), group, self.bucket_bytes, self.reduce_dtype,
                                       zero_stage=self.zero_stage)
        if model_vocab(self.module) is not None:  # a language model: its batch checked before the count
            install_batch_check(self.module, self.ctx)
        self.module.register_forward_pre_hook(self._count_items, with_kwargs=True)
        self.module.register_forward_hook(self._global_loss)
        count_forwards(self.module)  # the step in this rank's progress record
        set_module_grad_sync(self.module, self.reducer)  # later wrappers: parameters_changed
        watch(self.module, self.ctx)  # non-finite gradients stop the step
        return self.module

    def _count_items(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
                     ) -> tuple[tuple, dict[str, Any]] | None:
        """Hand the model the global batch's denominator (N / replicas) for its token-loss sum.

        Replicas are dp x cp: a context-parallel rank holds a slice of the sequence, its labels
        already shifted (``shift_labels``, :mod:`goose_core.context_parallel.slicing`), so the
        slices' targets add up to the sequence's."""
        dp, group = self.ctx.replica_size, self.ctx.replica_group
        if dp == 1 or kwargs.get("labels") is None:
            return None
        shifted = kwargs.get("shift_labels") is not None
        labels = kwargs["shift_labels"] if shifted else kwargs["labels"]
        if not _takes_num_items(module):
            _refuse_uneven_targets(labels, group, self.ctx.device, shifted)
            return None
        n = kwargs.get("num_items_in_batch")
        if n is None:  # one forward is the whole step: its targets over every replica
            n = count_items_over(labels, group, self.ctx.device, shifted=shifted)
        return args, {**kwargs, "num_items_in_batch": replica_items(n, dp)}

    def _global_loss(self, module: nn.Module, args: Any, output: Any) -> Any:
        loss = getattr(output, "loss", None)
        if loss is not None:
            output.loss = global_mean(loss, self.ctx.replica_group)
        return output

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally: no communication until a backward outside this block."""
        assert self.reducer is not None, "call parallelize() first"
        with self.reducer.no_sync():
            yield


def _refuse_uneven_targets(labels: Tensor, group: dist.ProcessGroup, device: torch.device,
                           shifted: bool = False) -> None:
    """A forward that cannot take ``num_items_in_batch`` leaves each rank its own mean, and the
    dp mean of those is the global token mean only when every rank holds as many targets: raise
    on every rank (one all-reduce of the count's max and min) rather than train on another mean.
    """
    high, low = (int(v) for v in extremes(count_items(labels, shifted=shifted).to(device), [group]))
    if high != low:
        raise ValueError(f"the data-parallel ranks hold between {low} and {high} targets "
                         f"(labels other than -100), and this module's forward takes no num_items_in_batch: "
                         f"the mean of the ranks' means would not be the batch's token mean. Accept "
                         f"num_items_in_batch (or **kwargs) and divide the token-loss sum by it, as 🤗 "
                         f"models do, or feed every rank as many targets")


def _takes_num_items(module: nn.Module) -> bool:
    """Whether ``module``'s forward (as it is now: a pipeline replaces it) takes the keyword."""
    params = inspect.signature(module.forward).parameters.values()
    return any(p.name == "num_items_in_batch" or p.kind is p.VAR_KEYWORD for p in params)


def reducer_of(module: nn.Module) -> GradReducer | ShardedParameters | None:
    """The gradient reducer DataParallel installed on ``module``, if any."""
    sync = module_grad_sync(module)
    return sync if isinstance(sync, (GradReducer, ShardedParameters)) else None


@contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """``DataParallel.no_sync()`` for a module returned by ``parallelize()``.

    Raises:
        ValueError: ``module`` was not parallelized by DataParallel.
    """
    sync = module_grad_sync(module)
    if sync is None:
        raise ValueError("no_sync(model) needs a model returned by DataParallel(model, ctx).parallelize()")
    with sync.no_sync():
        yield


def _refuse_router_loss(module: nn.Module) -> None:
    """A MoE load-balancing loss is a product of two means over the whole batch (tokens per
    expert x router probability per expert), not a sum over tokens: dp ranks each computing it on
    their shard and averaging would train on another loss than one device's, silently."""
    config = getattr(module, "config", None)
    if router_loss_over_dp(module):  # ExpertParallel made it the whole batch's
        return
    if getattr(config, "output_router_logits", False) and getattr(config, "router_aux_loss_coef", 1.0):
        raise ValueError(
            f"{type(module).__name__} has output_router_logits=True: its auxiliary router loss is "
            f"nonlinear in the batch, so data parallelism (dp > 1) cannot reproduce the single-device "
            f"value from per-shard losses. Set config.output_router_logits=False (or "
            f"router_aux_loss_coef=0), or train it without data parallelism (tensor parallelism "
            f"keeps it exact, the pipeline at one micro-batch)")
