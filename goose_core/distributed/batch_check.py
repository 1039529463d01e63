"""The batch every forward gets: the same on tp peers and stages, well formed, agreed on every rank.

Only data-parallel ranks train on different shards. The ranks of a tensor-parallel group
compute slices of the same layers, and the stages of a pipeline take the same batch from the
training loop (the first stage uses its ``input_ids``, the last its ``labels``), so they must all
be fed the same one. A sampler over the whole world (``DistributedSampler(dataset)`` with its
defaults) gives every rank a shard of its own, and training runs on, wrong and silent. A bad
batch is worse under parallelism than on one device: an id past the vocabulary trains silently
on a vocabulary-parallel embedding (every shard masks it), and an error on one rank leaves its
peers waiting in their next collective. So every forward, before any other collective::

    every rank    r = batch_report(batch)                 shapes, id extremes (+ checksum, first
                                                          forward by default): 44 integers
                  row dp_rank of a (slots, 2n) table = [r, -r], every other row the lowest int64
    one group     all-reduce MAX                          each row: max and min over its shard's ranks
    every rank    first_fault(max, min)  ->  the same ValueError on every rank, naming the value

Which ranks join (the one all-reduce's group): the tp peers and pipeline stages always (they run
the forward together). The data-parallel ranks join when the model is under ``DataParallel``
and the forward trains (grad enabled) or carries labels: then the dp ranks already meet in this
forward (the target count) or its backward (the gradient all-reduce), so waiting for them costs
nothing new, and a bad id on one shard is refused on every rank instead of leaving the other
shards waiting for a gradient that never comes. That group is the whole world, and the table
has one row per data-parallel rank, so each shard's ranks are still compared only among
themselves. A forward that does not train (evaluation on some replicas only, no labels) keeps
the dp ranks out: it is compared over the tp group, then the pp group (one row), and never waits
on a rank that would not otherwise take part.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.batch_faults import FIELDS, batch_checksum, batch_report, first_fault
from goose_core.distributed.context import ParallelContext
from goose_core.distributed.grid import Axis
from goose_core.distributed.missing import naming_missing
from goose_core.metadata import batch_check_of, module_grad_sync, set_batch_check

__all__ = ["BatchCheck", "FIELDS", "POLICIES", "batch_checksum", "check_policy", "extremes",
           "extremes_by_row", "install_batch_check", "model_vocab"]

#: When the same-batch checksum runs: on the first forward, on every forward, or not at all.
POLICIES = ("first", "always", "never")

_LOWEST = torch.iinfo(torch.int64).min  # the rows a rank does not fill: MAX ignores them
_WHO = {"tp": "tensor-parallel peers", "cp": "context-parallel peers", "pp": "pipeline stages"}


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`POLICIES`.

    Raises:
        ValueError: any other value.
    """
    if policy not in POLICIES:
        raise ValueError(f"check_batch must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    return policy


def extremes_by_row(values: Tensor, row: int, rows: int, groups: Sequence[dist.ProcessGroup]
                    ) -> tuple[Tensor, Tensor]:
    """Per row of a ``(rows, n)`` table: the elementwise max and min of ``values`` over the ranks
    of ``groups`` (one after the other: over their product) that put theirs in that row, in one
    all-reduce per group. Collective: every rank of each group calls it, every row is filled by
    some rank. Values must negate exactly (integers above the lowest int64)."""
    flat = values.reshape(-1)
    table = torch.full((rows, 2 * flat.numel()), _LOWEST, dtype=flat.dtype, device=flat.device)
    table[row] = torch.cat([flat, -flat])
    for group in groups:
        with naming_missing(group):
            dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
    n = flat.numel()
    return table[:, :n], -table[:, n:]


def extremes(values: Tensor, groups: Sequence[dist.ProcessGroup]) -> tuple[Tensor, Tensor]:
    """The elementwise max and min of ``values`` over the ranks of ``groups`` (one after the
    other: over their product), in one all-reduce per group: MAX of ``[values, -values]``.
    Collective: every rank of each group calls it. Values must negate exactly (integers)."""
    high, low = extremes_by_row(values, 0, 1, groups)
    return high[0].view_as(values), low[0].view_as(values)


def model_vocab(model: nn.Module) -> int | None:
    """The vocabulary ``model``'s ids index: its input embedding's rows (the whole table: call it
    before tensor parallelism cuts it), else ``config.vocab_size``; ``None`` if it has neither."""
    get = getattr(model, "get_input_embeddings", None)
    rows = getattr(get(), "num_embeddings", None) if callable(get) else None
    return rows if isinstance(rows, int) else getattr(getattr(model, "config", None), "vocab_size", None)


class BatchCheck:
    """A forward pre-hook: agree on the batch over the ranks that run the forward together, and
    raise the same ``ValueError`` on every one of them if it is bad (see the module docstring).

    Positional calls are read as ``model(input_ids, ...)``; everything else by keyword.
    """

    def __init__(self, ctx: ParallelContext, vocab: int | None) -> None:
        self.ctx = ctx
        self.vocab = vocab
        self.policies: dict[Axis, str] = {}
        self.checked: set[Axis] = set()

    def add(self, axis: Axis, policy: str) -> None:
        """Compare the batches of the ranks along ``axis``; their checksum per ``policy``."""
        self.policies[axis] = check_policy(policy)

    def due(self) -> list[Axis]:
        """The axes whose policy asks for the checksum on the next forward (the same on every
        rank). It is compared over all the axes added, like the shapes."""
        return [axis for axis, policy in self.policies.items()
                if policy == "always" or (policy == "first" and axis not in self.checked)]

    def _dp_joins(self, module: nn.Module, batch: dict[str, Any]) -> bool:
        """Whether this forward's dp ranks meet anyway (see the module docstring)."""
        return (self.ctx.dp_size > 1 and module_grad_sync(module) is not None
                and (torch.is_grad_enabled() or batch.get("labels") is not None))

    def _layout(self, module: nn.Module, batch: dict[str, Any]
                ) -> tuple[list[dist.ProcessGroup], list[int]]:
        """The groups the report is reduced over, and the dp rank of each row of the table."""
        ctx = self.ctx
        if ctx.dp_size == 1 or self._dp_joins(module, batch):  # one all-reduce, over the world
            return ([dist.group.WORLD] if ctx.world_size > 1 else []), list(range(ctx.dp_size))
        return [ctx.group(a) for a in ("tp", "pp") if ctx.size(a) > 1], [ctx.dp_rank]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        batch = dict(kwargs)
        if args:
            batch.setdefault("input_ids", args[0])
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        if _cached(batch) and isinstance(mask, Tensor) and mask.dim() == 2 and isinstance(ids, Tensor):
            # With a KV cache the mask covers the cached tokens too (🤗's convention): the columns
            # of this forward's tokens are the ones that must fit input_ids.
            batch["attention_mask"] = mask[:, -ids.shape[-1]:]
        due = [axis for axis in self.due() if self.ctx.size(axis) > 1]
        self.checked.update(due)  # checked once, even when it raised: the run is over anyway
        groups, dp_ranks = self._layout(module, batch)
        report = batch_report(batch, checksum=bool(due)).to(self.ctx.device)
        row = dp_ranks.index(self.ctx.dp_rank)
        high, low = extremes_by_row(report, row, len(dp_ranks), groups)
        who = " and ".join(_WHO[a] for a in self.policies if self.ctx.size(a) > 1)
        fault = first_fault(high, low, self.vocab, dp_ranks, who)
        if fault:
            raise ValueError(fault)


def _cached(batch: dict[str, Any]) -> bool:
    """Whether a forward reads a KV cache (a generation step: ``model.generate``)."""
    return batch.get("cache") is not None or batch.get("past_key_values") is not None


def install_batch_check(model: nn.Module, ctx: ParallelContext, axis: Axis | None = None,
                        policy: str = "first") -> BatchCheck:
    """Check every forward's batch on ``model`` (the hook is installed once), and, with ``axis``,
    that the ranks along it get the same batch (the checksum per ``policy``).

    One hook per model: each wrapper (TensorParallel, PipelineParallel, DataParallel) adds its
    axis to the same check, so all are agreed on in one pass. Call it before cutting the model:
    the first call reads the vocabulary from the whole embedding.
    """
    check = batch_check_of(model)
    if not isinstance(check, BatchCheck):
        check = BatchCheck(ctx, model_vocab(model))
        model.register_forward_pre_hook(check, with_kwargs=True)
        set_batch_check(model, check)
    if axis is not None:
        check.add(axis, policy)
    return check
