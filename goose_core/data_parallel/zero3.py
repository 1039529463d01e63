"""ZeRO-3: parameters sharded over data parallelism, all-gathered per decoder block just before use.

Between uses every dp rank holds ``1/dp`` of each parameter unit (one unit per decoder block, one
more for everything outside the blocks: embeddings, final norm, LM head), flattened and padded
like ZeRO-1's buckets. A unit is all-gathered just before its forward and again before its
backward, the next unit's gather already in flight (prefetch), and freed after use. What one of
dp = 2 ranks holds for a model of three blocks, unit by unit (``#`` whole, ``-`` its shard only,
``~`` its gather in flight)::

    forward                                 rest b0 b1 b2
    between steps                            -   -  -  -
    root pre-hook: rest gathered, b0 sent    #   ~  -  -
    b0 runs, b1 prefetched                   #   #  ~  -
    b1 runs, b2 prefetched; b0 freed         #   -  #  ~
    b2 runs; then the head and the loss      #   -  -  #    b2 freed after its forward

    backward                                rest b0 b1 b2
    the gradient reaches b2's output         #   -  -  #    b2 gathered again
    b2's backward runs, b1 prefetched        #   -  ~  #
    b2's gradients reduce-scattered, freed   #   -  ~  -
    the gradient reaches b1: b0 prefetched   #   ~  #  -
    ... b0's backward, reduce-scattered      #   -  -  -
    end of the backward: the rest too        -   -  -  -

The prefetch timeline of the forward (the backward is its mirror, b2 first)::

    compute  | wait | b0 forward     | b1 forward     | b2 forward     | head, loss
    comm     | rest, b0 | b1 gather -> | b2 gather ->   |
                        ^ b0's pre-hook starts b1's gather before b0 computes

Gradients: each parameter's gradient goes into its unit's flat buffer as autograd produces it
(``p.grad`` is freed); when the gradient reaches the block's *input* (a hook on it: every node of
the block has run then, and autograd accumulates a leaf's gradient as soon as it is ready), the
buffer is reduce-scattered (in the reduce dtype: fp32 for bf16/fp16 parameters; a parameter
without a gradient counts as zeros) and this rank adds ``1/dp`` of the sum to its shard
(``shard_grad``) once the next block's reduce-scatter has started (so one is always in flight,
and at most two blocks' whole gradients exist besides the rest's); the gathered parameters are
freed at once. The rest goes when the backward ends. The trigger is a point of the graph, not the arrival of the unit's last gradient, so every
rank issues its all-gathers and reduce-scatters in one order even when a parameter (an expert)
gets a gradient on some ranks and not on others: counting gradients would start that unit's
reduce-scatter on one rank and not on another, and the ranks would hang on mismatched
collectives (a test plants exactly this). Every backward reduce-scatters, under
``no_sync`` too: keeping the full gradient for the last micro-batch would cost the memory ZeRO-3
saves (FSDP's default trade-off); the shards sum the micro-batches.

Under pipeline parallelism (``reshard_after_forward=False``, what DataParallel chooses when
pp > 1) a unit, once gathered, stays for the whole step: 1F1B and GPipe run every block's forward
and backward once per micro-batch, interleaved, so re-gathering per use would cost 2 x
micro-batches all-gathers per block per step, and the stage's blocks are few (torchtitan keeps
them too). Gradients then accumulate over the micro-batches in the unit's buffer and are
reduce-scattered once, when the pipeline flushes (:meth:`ShardedParameters.flush`); the
pipeline's recompute finds its blocks still gathered.

Frozen parameters (``requires_grad=False``) are left whole on every rank: they have no gradient
and no optimizer state to shard with them. Tied parameters (GPT-2's ``wte``/``lm_head``) are one
parameter of the rest unit; across pipeline stages each stage's copy is its own. The parameters
are views of one flat buffer per bucket for the bucket's whole life, freed by resizing its storage to
0 bytes and gathered again into that same storage (FSDP's way): the weights a block's forward saves
for its backward (``addmm`` saves ``weight.t()``, a view) are views of it too, so freeing the
storage frees them, and the backward's re-gather refills what they see; swapping ``p.data`` for an
empty tensor instead would leave every saved view holding the whole gathered buffer until that
block's backward. ``gathered(model)`` installs every unit (a checkpoint, an export, a
test reads whole weights) and writes what it holds back into the shards on exit.

The optimizer is :class:`~goose_core.optim.DistributedOptimizer`: it takes this sync over
(:meth:`ShardedParameters.shard`), steps its master copy of each shard and writes the result into
``param_shard``; no all-gather follows the step (the next forward gathers).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Hashable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.data_parallel.bucket import flat_layout, main_dtype
from goose_core.distributed.compat import all_gather_flat, reduce_scatter_flat
from goose_core.distributed.missing import naming_missing
from goose_core.distributed.progress import note
from goose_core.grad_sync import GradSync
from goose_core.metadata import (clear_wide_grad, link_grad_sync, module_grad_sync, set_wide_grad,
                                 unlink_grad_sync)
from goose_core.models.registry import PIPELINE

__all__ = ["ShardedBucket", "ShardedParameters", "Unit", "decoder_blocks", "gathered", "parameter_bytes", "sync_of"]


class ShardedBucket:
    """Parameters of one unit (same dtype, same optimizer kind) as one flat, padded, sharded buffer.

    ``param_shard`` is this rank's ``shard_numel`` elements of the flattened parameters (the only
    copy between uses); ``shard_grad`` its piece of the mean gradient, in the reduce dtype. The
    layout attributes are :class:`~goose_core.data_parallel.Bucket`'s, so ZeRO-1's state-dict code
    reads both.

    Args:
        params: the parameters, in slot order, holding their full values now.
        dp: the data-parallel size (the padding and the number of shards).
        rank: this rank's dp rank.
        reduce_dtype: the gradients' dtype (default: :func:`~.bucket.main_dtype`).
    """

    def __init__(self, params: list[nn.Parameter], dp: int, rank: int,
                 reduce_dtype: torch.dtype | None = None) -> None:
        self.params = params
        self.offsets, self.numel, self.padded_numel, self.shard_numel = flat_layout(params, dp)
        self.reduce_group: dist.ProcessGroup | None = None  # the dp group's (experts: refused)
        self.rank = rank
        first = params[0]
        self.shapes = [p.shape for p in params]
        # The gathered flat parameters: one buffer for the bucket's life, every parameter a view of
        # it; between uses its storage is resized to 0 bytes (the views, and those autograd saved,
        # stay) and a gather refills the same storage, so a saved view sees the values again.
        self.full = torch.zeros(self.padded_numel, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for o, p in zip(self.offsets, params):
                self.full[o : o + p.numel()].copy_(p.detach().reshape(-1))
        lo, hi = self.shard_range(rank)
        self.param_shard = self.full[lo:hi].clone()
        grad_dtype = reduce_dtype or main_dtype(first.dtype)
        self.shard_grad = torch.zeros(self.shard_numel, dtype=grad_dtype, device=first.device)
        self._point()
        self.full_grad: Tensor | None = None  # this rank's whole gradient, until reduce-scattered
        self.received: Tensor | None = None   # the reduce-scatter's output, until added to shard_grad
        self.gathering: dist.Work | None = None
        self.reducing: dist.Work | None = None
        self.fresh = True  # DistributedOptimizer's reset marks it; the shard is zeroed by reset()

    def shard_range(self, rank: int) -> tuple[int, int]:
        """The ``[start, end)`` of rank ``rank``'s shard in the flat buffer."""
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    # -- parameters ---------------------------------------------------------------------------
    @property
    def allocated(self) -> bool:
        """Whether ``full``'s storage holds the gathered parameters' bytes now (or their gather's)."""
        return self.full.untyped_storage().nbytes() > 0

    def _point(self) -> None:
        """Every parameter becomes a view of its piece of ``full``."""
        for o, p, shape in zip(self.offsets, self.params, self.shapes):
            p.data = self.full[o : o + shape.numel()].view(shape)

    def start_gather(self, group: dist.ProcessGroup) -> None:
        """Give ``full`` its storage back and all-gather the shards into it (async)."""
        self.full.untyped_storage().resize_(self.padded_numel * self.full.element_size())
        self.gathering = all_gather_flat(self.full, self.param_shard, group=group, async_op=True)

    def install(self, group: dist.ProcessGroup) -> None:
        """Wait for the gather: the parameters, views of ``full``, hold their values."""
        if self.gathering is not None:
            with naming_missing(group):
                self.gathering.wait()
            self.gathering = None

    def release(self) -> None:
        """Free the gathered parameters' storage; the parameters (and any view autograd saved of
        them) keep their shapes and see the values again after the next gather."""
        self.full.untyped_storage().resize_(0)

    def write_back(self) -> None:
        """This rank's part of the installed parameters becomes its shard (after a load: one
        that replaced a parameter's tensor is copied in and the parameter pointed back)."""
        with torch.no_grad():
            for o, p in zip(self.offsets, self.params):
                piece = self.full[o : o + p.numel()]
                if p.data_ptr() != piece.data_ptr():
                    piece.copy_(p.detach().reshape(-1))
            lo, hi = self.shard_range(self.rank)
            self.param_shard.copy_(self.full[lo:hi])
        self._point()

    # -- gradients ----------------------------------------------------------------------------
    def slot(self, i: int) -> Tensor:
        """Parameter ``i``'s piece of this rank's whole gradient (zeroed when first needed)."""
        if self.full_grad is None:
            self.full_grad = torch.zeros(self.padded_numel, dtype=self.shard_grad.dtype,
                                         device=self.shard_grad.device)
        o = self.offsets[i]
        return self.full_grad[o : o + self.shapes[i].numel()].view(self.shapes[i])

    def take_grad(self, i: int) -> None:
        """Add parameter ``i``'s gradient into its slot and free ``p.grad``."""
        p = self.params[i]
        if p.grad is not None:
            self.slot(i).add_(p.grad)
            p.grad = None

    def start_reduce(self, group: dist.ProcessGroup) -> None:
        """Reduce-scatter the whole gradient (zeros where none came), async."""
        if self.full_grad is None:
            self.full_grad = torch.zeros(self.padded_numel, dtype=self.shard_grad.dtype,
                                         device=self.shard_grad.device)
        self.received = torch.empty_like(self.shard_grad)
        self.reducing = reduce_scatter_flat(self.received, self.full_grad, group=group, async_op=True)

    def finish_reduce(self, group: dist.ProcessGroup, dp: int) -> None:
        """Wait, and add ``1/dp`` of this rank's piece of the sum to ``shard_grad``."""
        if self.reducing is not None:
            with naming_missing(group):
                self.reducing.wait()
            self.reducing = None
        assert self.received is not None
        self.shard_grad.add_(self.received.div_(dp))
        self.received = self.full_grad = None


class Unit:
    """Parameters gathered and freed together: one decoder block, or all those outside the blocks."""

    FREE, GATHERING, GATHERED = "free", "gathering", "gathered"

    def __init__(self, name: str, params: list[nn.Parameter], module: nn.Module | None = None) -> None:
        self.name = name
        self.params = params
        self.module = module  # the block whose hooks gather it; None: the rest (the root's hooks)
        self.buckets: list[ShardedBucket] = []
        self.state = Unit.FREE
        self.in_backward = False  # its backward began: a recomputed forward must not free it
        self.launched = False     # its reduce-scatter began this backward

    def start_gather(self, group: dist.ProcessGroup) -> None:
        if self.state == Unit.FREE:
            for bucket in self.buckets:
                bucket.start_gather(group)
            self.state = Unit.GATHERING

    def install(self, group: dist.ProcessGroup) -> None:
        self.start_gather(group)
        if self.state == Unit.GATHERING:
            for bucket in self.buckets:
                bucket.install(group)
            self.state = Unit.GATHERED

    def release(self) -> None:
        if self.state == Unit.GATHERED:
            for bucket in self.buckets:
                bucket.release()
            self.state = Unit.FREE


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of ``model`` (a 🤗 causal LM, whole or a pipeline stage): the modules of
    its family's block list (:mod:`goose_core.models`' pipeline parts), else of its largest
    ``nn.ModuleList``; ``[]`` when it has none (the whole model is then one unit)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PIPELINE:
        blocks = model.get_submodule(PIPELINE[model_type].blocks)
    else:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            return []
        blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(blocks)


def _kind_key(p: nn.Parameter) -> Hashable:
    return (p.dtype, p.device)


class ShardedParameters(GradSync):
    """ZeRO-3 over ``group``: ``module``'s trainable parameters sharded per unit (see the module
    docstring), gathered by hooks, their gradients reduce-scattered into ``shard_grad``.

    Args:
        module: the model (whole, or this rank's pipeline stage and tp shard).
        group: the data-parallel process group.
        reduce_dtype: the gradients' dtype (default: fp32 for bf16/fp16 parameters, else their own).
        reshard_after_forward: free each block after its forward (re-gathered for its backward);
            ``False`` keeps every unit gathered from its first use until the step's gradients are
            reduced (the pipeline's choice).
    """

    zero_stage = 3

    def __init__(self, module: nn.Module, group: dist.ProcessGroup, reduce_dtype: torch.dtype | None = None,
                 reshard_after_forward: bool = True) -> None:
        self.module = module
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        self.deferred = False
        self.taken_over = False  # by DistributedOptimizer: training may begin
        self._callback_queued = False
        self._in_flight: list[Unit] = []  # the last reduce-scatter started, not yet added to shard_grad
        self.units = self._units(module)
        self._build(lambda p: None)
        self._hooks(module)

    # -- building ---------------------------------------------------------------------------------
    def _units(self, module: nn.Module) -> list[Unit]:
        seen: set[nn.Parameter] = set()
        units = []
        for k, block in enumerate(decoder_blocks(module)):
            params = [p for p in block.parameters() if p.requires_grad and p not in seen]
            seen.update(params)
            if params:
                units.append(Unit(f"block {k}", params, block))
        rest = [p for p in module.parameters() if p.requires_grad and p not in seen]
        self.rest = Unit("outside the blocks", rest)
        return [*units, self.rest]

    def _build(self, key: Callable[[nn.Parameter], Hashable]) -> None:
        """One bucket per (unit, dtype, ``key``), cut from the parameters' full values now."""
        for unit in self.units:
            kinds: dict[Hashable, list[nn.Parameter]] = {}
            for p in unit.params:
                kinds.setdefault((_kind_key(p), key(p)), []).append(p)
            unit.buckets = [ShardedBucket(ps, self.size, self.rank, self.reduce_dtype) for ps in kinds.values()]
            for bucket in unit.buckets:
                bucket.release()  # the shard is cut: the full values go
            unit.state = Unit.FREE
        self._where = {p: (u, b, i) for u in self.units for b in u.buckets for i, p in enumerate(b.params)}
        for p, (unit, bucket, i) in self._where.items():
            link_grad_sync(p, self)
            if bucket.shard_grad.element_size() > p.element_size():
                set_wide_grad(p, bucket.shard_grad.dtype, lambda b=bucket, i=i: b.slot(i))
            else:
                clear_wide_grad(p)

    def _hooks(self, module: nn.Module) -> None:
        blocks = self.units[:-1]
        module.register_forward_pre_hook(self._before_root)
        module.register_forward_hook(self._after_root)
        for k, unit in enumerate(blocks):
            following = blocks[k + 1] if k + 1 < len(blocks) else None
            before = blocks[k - 1] if k > 0 else None
            assert unit.module is not None
            unit.module.register_forward_pre_hook(
                lambda m, args, kwargs, u=unit, n=following: self._before_forward(u, n, args, kwargs),
                with_kwargs=True)
            unit.module.register_forward_hook(
                lambda m, args, out, u=unit, b=before: self._after_forward(u, b, out))
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._where]

    # -- the forward ------------------------------------------------------------------------------
    def _before_root(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled() and module.training and not self.taken_over:
            raise ValueError("DataParallel(zero_stage=3) keeps each gradient as a shard that only "
                             "DistributedOptimizer steps: build DistributedOptimizer(optimizer, ctx) over "
                             "model.parameters() before the first training forward")
        self.rest.start_gather(self.group)
        if len(self.units) > 1:
            self.units[0].start_gather(self.group)  # prefetched under the rest's wait
        self.rest.install(self.group)

    def _after_root(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():  # no backward follows: nothing stays gathered
            for unit in self.units:
                unit.release()

    def _before_forward(self, unit: Unit, following: Unit | None, args: tuple, kwargs: dict[str, Any]) -> None:
        unit.install(self.group)
        inputs = [t for t in _tensors([args, kwargs]) if t.requires_grad]
        if inputs and torch.is_grad_enabled() and not unit.in_backward:
            torch.autograd.graph.register_multi_grad_hook(inputs, lambda grads, u=unit: self._after_backward(u))
        if following is not None:
            following.start_gather(self.group)  # prefetch: it overlaps this block's compute

    def _after_forward(self, unit: Unit, before: Unit | None, output: Any) -> None:
        if torch.is_grad_enabled():
            tensors = [t for t in _tensors(output) if t.requires_grad]
            for t in tensors:
                t.register_hook(lambda grad, u=unit, b=before: self._before_backward(u, b))
        if self.reshard_after_forward and not unit.in_backward:
            unit.release()

    # -- the backward -----------------------------------------------------------------------------
    def _before_backward(self, unit: Unit, before: Unit | None) -> None:
        """The gradient reached the block's output: its parameters must be whole for its backward."""
        if not unit.in_backward:
            unit.in_backward = True
            unit.install(self.group)
            if before is not None and not before.in_backward:
                before.start_gather(self.group)  # the next block of the backward, prefetched

    def _after_backward(self, unit: Unit) -> None:
        """The gradient reached the block's input: its backward is over (every node of the block
        ran before the input's, and a leaf's gradient is accumulated as soon as it is ready),
        so its gradients are complete: reduce-scatter them and free the block."""
        if not self.deferred and not unit.launched:
            self._queue_finish()
            self._launch(unit)

    def _on_grad(self, param: nn.Parameter) -> None:
        unit, bucket, i = self._where[param]
        if bucket.shard_grad.element_size() > param.element_size():
            bucket.take_grad(i)  # summed in the wide dtype as it comes (main_grad)
        if self.deferred:
            return  # the pipeline flushes once its whole backward has ended
        if unit.launched:
            raise RuntimeError(f"a gradient of {unit.name} arrived after the unit's reduce-scatter began "
                               f"(the gradient reached the block's input first): a parameter of the block "
                               f"is used outside it; give it requires_grad=False or move it out of the block")
        self._queue_finish()
        bucket.take_grad(i)

    def _queue_finish(self) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def _order(self) -> list[Unit]:
        """The order of the reduce-scatters left at the end: blocks last-first, then the rest."""
        return [*reversed(self.units[:-1]), self.rest]

    def _launch(self, unit: Unit) -> None:
        """Start ``unit``'s reduce-scatter, then finish the ones before it: one unit's whole
        gradient in flight at a time (besides those still filling), not the model's."""
        for bucket in unit.buckets:
            for i in range(len(bucket.params)):
                bucket.take_grad(i)  # a gradient that came outside the hooks (a tied stage's)
            bucket.start_reduce(self.group)
        unit.launched = True
        if not self.deferred:
            unit.release()
        for earlier in self._in_flight:
            for bucket in earlier.buckets:
                bucket.finish_reduce(self.group, self.size)
        self._in_flight = [unit]

    def finish(self) -> None:
        """Reduce-scatter what is left, wait for every unit, free every gathered parameter."""
        note("ZeRO-3 gradient reduce-scatter")
        self._callback_queued = False
        order = self._order()
        for unit in order:
            if not unit.launched:  # its input took no gradient (the rest, always)
                self._launch(unit)
        for unit in self._in_flight:
            for bucket in unit.buckets:
                bucket.finish_reduce(self.group, self.size)
        self._in_flight = []
        for unit in order:
            unit.release()
            unit.launched = unit.in_backward = False

    # -- GradSync -------------------------------------------------------------------------------
    @property
    def params(self) -> list[nn.Parameter]:
        return list(self._where)

    @property
    def buckets(self) -> list[ShardedBucket]:
        return [b for u in self.units for b in u.buckets]

    @property
    def reduced(self) -> bool:
        return True  # shard_grad holds the sum of every backward since reset(): zeros if none

    def reset(self) -> None:
        for bucket in self.buckets:
            bucket.shard_grad.zero_()

    def defer(self) -> None:
        self.deferred = True

    def flush(self) -> None:
        self.deferred = False
        self.finish()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accepted for the loop's sake; every backward still reduce-scatters (module docstring)."""
        yield

    def track(self, model: nn.Module) -> None:
        raise ValueError("the model's parameters changed after DataParallel(zero_stage=3) sharded them: "
                         "apply TensorParallel and PipelineParallel first, DataParallel last")

    def shard(self, param_lists: list[list[nn.Parameter]],
              key: Callable[[nn.Parameter], Hashable]) -> list[ShardedBucket]:
        """DistributedOptimizer takes over: re-cut the buckets by param group and ``key``."""
        group_of = {p: g for g, ps in enumerate(param_lists) for p in ps}
        for unit in self.units:
            unit.install(self.group)
        self._build(lambda p: (group_of.get(p), key(p)))  # cut from the installed values
        self.taken_over = True
        return self.buckets

    @contextmanager
    def whole_parameters(self) -> Iterator[None]:
        """Every unit installed inside (collective over dp); what the parameters hold on exit
        becomes the shards (a load writes them in place)."""
        for unit in self.units:
            unit.start_gather(self.group)
        for unit in self.units:
            unit.install(self.group)
        try:
            yield
        finally:
            for unit in self.units:
                if unit.state == Unit.GATHERED:
                    for bucket in unit.buckets:
                        bucket.write_back()
                unit.release()


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return []


def sync_of(model: nn.Module) -> ShardedParameters | None:
    """The ZeRO-3 sync DataParallel(zero_stage=3) installed on ``model``, if any."""
    sync = module_grad_sync(model)
    return sync if isinstance(sync, ShardedParameters) else None


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """``model``'s parameters whole inside, if DataParallel(zero_stage=3) shards them (collective
    over dp: every rank enters); anything else: nothing to do."""
    sync = sync_of(model)
    with sync.whole_parameters() if sync is not None else nullcontext():
        yield


def parameter_bytes(model: nn.Module) -> int:
    """The bytes this rank holds for ``model``'s parameters now: their storages plus ZeRO-3's
    shards (each storage once)."""
    storages: dict[int, int] = {}
    for p in model.parameters():
        s = p.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    sync = sync_of(model)
    if sync is not None:
        for bucket in sync.buckets:
            s = bucket.param_shard.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    storages.pop(0, None)  # empty tensors
    return sum(storages.values())
