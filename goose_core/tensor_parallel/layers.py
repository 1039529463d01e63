"""Megatron's tensor-parallel layers: column- and row-parallel linear, split embeddings.

A column-parallel layer splits its *output* features across the tp group, the row-parallel
layer after it splits its *input* features, so the activation between them stays split and
nothing is gathered::

              X (replicated)
              |
              f          identity forward, all-reduce of dX backward  (once per region)
        +-----+-----+
     X A_0       X A_1   column-parallel: A = [A_0 | A_1]     (each rank: its heads / columns)
        |           |
   act, attention, dropout on the split stream (RNGTracker)
        |           |
    Y_0 B_0     Y_1 B_1  row-parallel: B = [B_0 ; B_1]
        +-----+-----+
              g          all-reduce forward, identity backward
              |
          Z + bias (replicated; the bias is added once, after the sum)

Weights are cut from the full, seeded single-device tensors, and every cut parameter is marked
with a :class:`~goose_core.metadata.ShardSpec` so ``full_state_dict`` can put it back together.

An embedding table is split by vocabulary rows (each rank looks up the ids it owns, zeros for
the rest, then g) or by hidden columns (each rank looks up its columns, then an all-gather). A
family's own embedding subclass (Gemma multiplies by ``embed_scale``) is kept: only the lookup
its forward inherits from ``nn.Embedding`` is swapped for the split one::

    Gemma2TextScaledWordEmbedding.forward  ->  super().forward(ids) * embed_scale
                                                   |
                                  VocabRowsLookup.forward (split lookup + g), then nn.Embedding
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from goose_core.distributed.collectives import (
    copy_to_region,
    gather_from_region,
    reduce_from_region,
    scatter_to_region,
)
from goose_core.metadata import ShardSpec, mark_sharded
from goose_core.distributed.missing import naming_missing
from goose_core.tensor_parallel.random import RNGTracker
from goose_core.tensor_parallel.sequence import gather_sequence, reduce_scatter_sequence

__all__ = [
    "shard_tensor",
    "ParallelRegion",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ColumnParallelEmbedding",
    "split_embedding",
    "split_parameter",
]


def shard_tensor(full: Tensor, dim: int, index: int, parts: int, blocks: int = 1) -> Tensor:
    """Piece ``index`` of ``parts`` along ``dim``; a fused tensor of ``blocks`` equal blocks is
    cut block by block (rank r keeps block_0[r] | block_1[r] | ...)."""
    if full.shape[dim] % (blocks * parts):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into "
                         f"{blocks} block(s) x {parts} equal parts")
    pieces = [block.chunk(parts, dim)[index] for block in full.detach().chunk(blocks, dim)]
    return torch.cat(pieces, dim).clone()


def _sharded_param(full: Tensor, dim: int, group: dist.ProcessGroup, blocks: int = 1,
                   replicas: int = 1) -> nn.Parameter:
    parts = dist.get_world_size(group) // replicas
    index = dist.get_rank(group) // replicas
    param = nn.Parameter(shard_tensor(full, dim, index, parts, blocks))
    return mark_sharded(param, ShardSpec(dim, blocks, replicas))


class _SumOverReplicas(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the tp ranks that hold the same shard.

    Each replica of a kv-head only sees the gradient from its own query heads; the true gradient
    is their sum. One all-reduce of a buffer with a slot per distinct shard does it without
    extra process groups (the slots of the other shards are zeros)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, group: dist.ProcessGroup, replicas: int) -> Tensor:
        ctx.group, ctx.replicas = group, replicas
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        slots = dist.get_world_size(ctx.group) // ctx.replicas
        slot = dist.get_rank(ctx.group) // ctx.replicas
        buffer = grad.new_zeros((slots, *grad.shape))
        buffer[slot] = grad
        with naming_missing(ctx.group):
            dist.all_reduce(buffer, group=ctx.group)
        return buffer[slot], None, None


class ParallelRegion:
    """One column -> row region of a block (an attention or an MLP).

    All column-parallel layers that read the *same* input tensor share one ``f`` (Llama's q, k
    and v: one all-reduce backward, not three), and random ops between the columns and the row
    draw from the split stream of the :class:`RNGTracker`.

    With ``sequence_parallel`` the region's module gathers its tokens once (:meth:`gather`, a
    pre-hook on the attention or MLP module) and the column layers read that tensor with no
    ``f`` (the gather's backward reduce-scatters, summing their partial gradients); the row
    layer reduce-scatters its output over the sequence instead of all-reducing it.
    """

    def __init__(self, group: dist.ProcessGroup, tracker: RNGTracker | None = None,
                 sequence_parallel: bool = False) -> None:
        self.group = group
        self.tracker = tracker
        self.sequence_parallel = sequence_parallel
        self._input: Tensor | None = None
        self._entered: Tensor | None = None

    def gather(self, x: Tensor) -> Tensor:
        """Sequence parallelism: this rank's tokens -> every token, the input of the columns."""
        self._input = self._entered = gather_sequence(x, self.group)
        return self._entered

    def enter(self, x: Tensor) -> Tensor:
        if x is not self._input:
            if self.sequence_parallel:
                raise ValueError("sequence parallelism: a column-parallel layer read a tensor other than its "
                                 "module's gathered hidden states, so its input gradient would not be summed "
                                 "over tp; this family's module cannot run sequence-parallel (use "
                                 "sequence_parallel=False)")
            self._input, self._entered = x, copy_to_region(x, self.group)
        if self.tracker is not None:
            self.tracker.enter()
        assert self._entered is not None
        return self._entered

    def leave(self) -> None:
        self._input = self._entered = None
        if self.tracker is not None:
            self.tracker.leave()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    # GPT-2's Conv1D stores (in, out) and computes x @ W + b with addmm: keep its exact op.
    rows = x.reshape(-1, x.shape[-1])
    out = rows @ weight if bias is None else torch.addmm(bias, rows, weight)
    return out.view(*x.shape[:-1], weight.shape[-1])


class ColumnParallelLinear(nn.Module):
    """``Y = X A + b`` with A split by output features: rank r computes ``X A_r + b_r``.

    Args:
        weight: the full weight, ``(out, in)`` (``(in, out)`` when ``transposed``, as Conv1D).
        bias: the full bias or None.
        group: the tensor-parallel group.
        gather_output: all-gather the output (replicated result) instead of leaving it split.
        blocks: the output is ``blocks`` fused blocks (q|k|v = 3) each split separately.
        replicas: tp ranks sharing one shard (kv-heads when tp > kv-heads).
        transposed: weight stored ``(in, out)`` (GPT-2 ``Conv1D``).
        region: the :class:`ParallelRegion` this layer opens; None gives the layer its own ``f``.
        shared_weight: an already sharded parameter to use as weight (tied LM head).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, group: dist.ProcessGroup, *,
                 gather_output: bool = False, blocks: int = 1, replicas: int = 1,
                 transposed: bool = False, region: ParallelRegion | None = None,
                 shared_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        if gather_output and (blocks > 1 or replicas > 1):
            raise ValueError("gather_output=True needs a plain split (blocks=1, replicas=1)")
        out_dim = 1 if transposed else 0
        self.group, self.gather_output, self.replicas = group, gather_output, replicas
        self.transposed, self.region = transposed, region
        # True for the LM head under sequence parallelism: its input comes from an all-gather of
        # the sequence, whose backward (a reduce-scatter) sums the vocabulary-partial gradients.
        self.input_gathered = False
        self.weight = shared_weight if shared_weight is not None else \
            _sharded_param(weight, out_dim, group, blocks, replicas)
        self.bias = None if bias is None else _sharded_param(bias, 0, group, blocks, replicas)

    @classmethod
    def from_module(cls, module: nn.Module, group: dist.ProcessGroup, **kwargs: Any) -> "ColumnParallelLinear":
        """Shard an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
        kwargs.setdefault("transposed", isinstance(module, Conv1D))
        return cls(module.weight, module.bias, group, **kwargs)

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        if self.replicas == 1:
            return self.weight, self.bias
        bias = None if self.bias is None else _SumOverReplicas.apply(self.bias, self.group, self.replicas)
        return _SumOverReplicas.apply(self.weight, self.group, self.replicas), bias

    @property
    def in_features(self) -> int:
        """The width of the input this layer takes (whole: it is replicated), as ``nn.Linear``'s."""
        return int(self.weight.shape[0 if self.transposed else 1])

    @property
    def out_features(self) -> int:
        """The width of the output this rank returns now, as ``nn.Linear``'s: its shard's columns,
        all of them while ``gather_output`` is on. Family code reshapes by it (🤗's loss views
        the logits as ``(-1, lm_head.out_features)``), so it names what the forward returns."""
        local = int(self.weight.shape[1 if self.transposed else 0])
        return local * dist.get_world_size(self.group) if self.gather_output else local

    def forward(self, x: Tensor) -> Tensor:
        if self.region is not None:
            x = self.region.enter(x)
        elif not self.input_gathered:
            x = copy_to_region(x, self.group)
        y = _linear(x, *self._weights(), self.transposed)
        return gather_from_region(y, self.group, dim=-1) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, gather_output={self.gather_output}, replicas={self.replicas}"


class RowParallelLinear(nn.Module):
    """``Y = X B + b`` with B split by input features: rank r computes ``X_r B_r``, then one
    all-reduce (``g``) sums the partial products and the bias is added once.

    Args:
        weight: as :class:`ColumnParallelLinear`.
        bias: as :class:`ColumnParallelLinear`.
        group: as :class:`ColumnParallelLinear`.
        transposed: as :class:`ColumnParallelLinear`.
        input_is_parallel: X arrives split (after a column-parallel layer); otherwise this
            layer takes its own slice of a replicated X.
        region: the :class:`ParallelRegion` this layer closes.
        scatter_output: keep this rank's slice of the (summed) output features; backward
            all-gathers the gradient (Doge's ``dt_proj``: every head's values in, this rank's
            kv-heads out).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, group: dist.ProcessGroup, *,
                 input_is_parallel: bool = True, transposed: bool = False,
                 region: ParallelRegion | None = None, scatter_output: bool = False) -> None:
        super().__init__()
        self.group, self.input_is_parallel, self.scatter_output = group, input_is_parallel, scatter_output
        self.transposed, self.region = transposed, region
        self.weight = _sharded_param(weight, 0 if transposed else 1, group)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_module(cls, module: nn.Module, group: dist.ProcessGroup, **kwargs: Any) -> "RowParallelLinear":
        kwargs.setdefault("transposed", isinstance(module, Conv1D))
        return cls(module.weight, module.bias, group, **kwargs)

    @property
    def in_features(self) -> int:
        """The width of the input this layer takes, as ``nn.Linear``'s: this rank's slice when the
        input arrives split, the whole width when it takes its own slice of a replicated input."""
        local = int(self.weight.shape[0 if self.transposed else 1])
        return local if self.input_is_parallel else local * dist.get_world_size(self.group)

    @property
    def out_features(self) -> int:
        """The width of the output, as ``nn.Linear``'s: whole (the partial products are summed),
        this rank's slice with ``scatter_output``."""
        whole = int(self.weight.shape[1 if self.transposed else 0])
        return whole // dist.get_world_size(self.group) if self.scatter_output else whole

    def forward(self, x: Tensor) -> Tensor:
        if self.region is not None:
            self.region.leave()
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group, dim=-1)
        partial = _linear(x, self.weight, None, self.transposed)
        if self.region is not None and self.region.sequence_parallel:
            y = reduce_scatter_sequence(partial, self.group)
        else:
            y = reduce_from_region(partial, self.group)
        y = y if self.bias is None else y + self.bias
        return scatter_to_region(y, self.group, dim=-1) if self.scatter_output else y

    def extra_repr(self) -> str:
        return (f"weight={tuple(self.weight.shape)}, input_is_parallel={self.input_is_parallel}, "
                f"scatter_output={self.scatter_output}")


def _vocab_lookup(ids: Tensor, weight: Tensor, start: int, padding_idx: int | None,
                  group: dist.ProcessGroup) -> Tensor:
    outside = (ids < start) | (ids >= start + weight.shape[0])
    local = (ids - start).masked_fill(outside, 0)
    rows = F.embedding(local, weight, padding_idx)
    return reduce_from_region(rows.masked_fill(outside.unsqueeze(-1), 0.0), group)


def _column_lookup(ids: Tensor, weight: Tensor, padding_idx: int | None, group: dist.ProcessGroup) -> Tensor:
    # Downstream is replicated: the all-gather's backward keeps this rank's columns of the gradient.
    return gather_from_region(F.embedding(ids, weight, padding_idx), group, dim=-1)


def _local_padding(padding_idx: int | None, start: int, rows: int) -> int | None:
    local = None if padding_idx is None else padding_idx - start
    return local if local is not None and 0 <= local < rows else None


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by vocabulary rows: rank r owns ids ``[r V/tp, (r+1) V/tp)``.

    Each rank looks up the ids it owns, writes zeros for the others, and one all-reduce (``g``)
    assembles every row. The weight has the LM head's layout, so a tied head shares it.
    """

    def __init__(self, weight: Tensor, group: dist.ProcessGroup, padding_idx: int | None = None) -> None:
        super().__init__()
        self.group = group
        self.weight = _sharded_param(weight, 0, group)
        rows = self.weight.shape[0]
        self.vocab_start = dist.get_rank(group) * rows
        self.vocab_end = self.vocab_start + rows
        self.padding_idx = _local_padding(padding_idx, self.vocab_start, rows)

    @classmethod
    def from_module(cls, module: nn.Embedding, group: dist.ProcessGroup) -> "VocabParallelEmbedding":
        _check_plain_lookup(module)
        return cls(module.weight, group, module.padding_idx)

    def forward(self, ids: Tensor) -> Tensor:
        return _vocab_lookup(ids, self.weight, self.vocab_start, self.padding_idx, self.group)

    def extra_repr(self) -> str:
        return f"rows=[{self.vocab_start}, {self.vocab_end}), dim={self.weight.shape[1]}"


class ColumnParallelEmbedding(nn.Module):
    """The embedding table split by hidden columns (transformers' ``embedding_colwise``): every
    rank looks up every id in its ``dim/tp`` columns, one all-gather assembles the vectors."""

    def __init__(self, weight: Tensor, group: dist.ProcessGroup, padding_idx: int | None = None) -> None:
        super().__init__()
        self.group, self.padding_idx = group, padding_idx
        self.weight = _sharded_param(weight, 1, group)

    @classmethod
    def from_module(cls, module: nn.Embedding, group: dist.ProcessGroup) -> "ColumnParallelEmbedding":
        _check_plain_lookup(module)
        return cls(module.weight, group, module.padding_idx)

    def forward(self, ids: Tensor) -> Tensor:
        return _column_lookup(ids, self.weight, self.padding_idx, self.group)

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]}, columns={self.weight.shape[1]} (of {self.weight.shape[1]} x tp)"


def _check_plain_lookup(module: nn.Embedding) -> None:
    if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
        raise ValueError(f"{type(module).__name__}: a split embedding supports neither max_norm, "
                         f"sparse=True nor scale_grad_by_freq")


class _SplitLookup(nn.Embedding):
    """Sits between a family's embedding subclass and ``nn.Embedding`` in the MRO: the family's
    forward runs unchanged and its ``super().forward(ids)`` lands here."""

    group: dist.ProcessGroup

    def forward(self, ids: Tensor) -> Tensor:
        raise NotImplementedError


class _VocabRowsLookup(_SplitLookup):
    vocab_start: int

    def forward(self, ids: Tensor) -> Tensor:
        return _vocab_lookup(ids, self.weight, self.vocab_start, self.padding_idx, self.group)


class _ColumnsLookup(_SplitLookup):
    def forward(self, ids: Tensor) -> Tensor:
        return _column_lookup(ids, self.weight, self.padding_idx, self.group)


class _ProbeLookup(_SplitLookup):
    """The whole table's lookup, noting that the family's forward reached it."""

    goose_looked_up: bool

    def forward(self, ids: Tensor) -> Tensor:
        self.goose_looked_up = True
        return nn.Embedding.forward(self, ids)


_CARRIED: dict[tuple[type, type], type] = {}


def _carried_class(family: type, lookup: type) -> type:
    if (family, lookup) not in _CARRIED:
        prefix = {_VocabRowsLookup: "VocabParallel", _ColumnsLookup: "ColumnParallel"}.get(lookup, "Probed")
        _CARRIED[family, lookup] = type(prefix + family.__name__, (family, lookup), {"__module__": __name__})
    return _CARRIED[family, lookup]


def _reaches_lookup(module: nn.Embedding) -> bool:
    """Whether ``module``'s forward calls ``nn.Embedding.forward`` (one no-grad call on id 0)."""
    family = type(module)
    module.__class__ = _carried_class(family, _ProbeLookup)
    module.goose_looked_up = False
    try:
        with torch.no_grad():
            module(torch.zeros(1, 1, dtype=torch.long, device=module.weight.device))
        return module.goose_looked_up
    finally:
        module.__class__ = family
        del module.goose_looked_up


def split_embedding(module: nn.Embedding, group: dist.ProcessGroup, style: str) -> nn.Module:
    """The embedding split as ``style`` (``embedding_rowwise``: vocabulary rows; ``embedding_colwise``:
    hidden columns).

    A plain ``nn.Embedding`` becomes a :class:`VocabParallelEmbedding` or :class:`ColumnParallelEmbedding`.
    A subclass with its own forward is kept, in place, with its split table: its forward still
    runs (a scale, a multiplier), with the inherited lookup swapped for the split one.

    Raises:
        ValueError: the subclass's forward never calls ``nn.Embedding.forward`` (found by one
            call on the whole table, before anything is split), so no lookup could be swapped.
    """
    rows = style == "embedding_rowwise"
    if type(module).forward is nn.Embedding.forward:
        return (VocabParallelEmbedding if rows else ColumnParallelEmbedding).from_module(module, group)
    _check_plain_lookup(module)
    if not _reaches_lookup(module):
        raise ValueError(f"{type(module).__name__}.forward never calls nn.Embedding.forward, so goose cannot "
                         f"swap in the split lookup ({style}) and keep the rest of its forward; drop that "
                         f"plan entry or register an Adapter that splits it")
    weight, rank = module.weight, dist.get_rank(group)
    module.__class__ = _carried_class(type(module), _VocabRowsLookup if rows else _ColumnsLookup)
    module.weight = _sharded_param(weight, 0 if rows else 1, group)
    module.group = group
    if rows:
        module.vocab_start = rank * module.weight.shape[0]
        module.padding_idx = _local_padding(module.padding_idx, module.vocab_start, module.weight.shape[0])
    return module


def split_parameter(param: nn.Parameter, dim: int, group: dist.ProcessGroup, blocks: int = 1) -> nn.Parameter:
    """This rank's piece of a parameter named by a plan entry (an experts' ``gate_up_proj``),
    marked for ``full_state_dict``."""
    return _sharded_param(param, dim, group, blocks)
