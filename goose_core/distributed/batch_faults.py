"""What can be wrong with a batch, read from a few integers per rank that every rank agrees on.

A rank describes its batch as a short int64 *report*: each field's shape and the extremes of its
token ids. The ranks that must agree reduce the reports to their elementwise max and min
(:func:`goose_core.distributed.batch_check.extremes`), and :func:`first_fault` reads the fault,
if any, from those two vectors alone. Every rank holds the same two vectors, so every rank finds
the same fault and raises the same ``ValueError``, even when the bad value sat on one rank only::

    per field (input_ids, attention_mask, labels, position_ids):
        [ndim (-1: not given), numel, d0, d1, d2, d3]          the shape (dims past 4: numel)
    then: [max id, min id, max label, min label]             labels of -100 (ignored) left out
    then: the same-batch checksum (batch_checksum), 4 per field; zeros when not asked

The checksum (``[given, rows, numel, sum(value * (position + 1)) mod 2**62]`` per field) costs a
pass over the batch, so the wrappers include it on the first forward only by default; the rest
is a handful of integers, sent on every forward. The report's length never changes: ranks of
different data-parallel shards, whose forwards the checksum policy may have counted differently
(an evaluation on one replica), still all-reduce vectors of one size. Position weights make the sum differ when the
same tokens come in another order.

The faults, in the order they are looked for (an earlier one makes the later ones meaningless):
a shape that differs between the ranks compared (tensor-parallel peers, pipeline stages),
a checksum that differs between them, ``labels`` / ``attention_mask`` / ``position_ids`` whose shape does not fit ``input_ids``', and
ids or labels outside ``[0, vocab)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from goose_core.loss import IGNORE_INDEX

__all__ = ["FIELDS", "REPORT_SIZE", "batch_checksum", "batch_report", "first_fault"]

#: The forward arguments reported (a fixed list: every rank's report has the same length).
FIELDS = ("input_ids", "attention_mask", "labels", "position_ids")

_DIMS = 4
_PER_FIELD = 2 + _DIMS
_SHAPES = len(FIELDS) * _PER_FIELD
_IDS = 4
_SUMS = _SHAPES + _IDS
_BOUND = 2**62  # ids are clamped to +-this, so negating a report never overflows int64
_SUM_FIELD = 4
#: The length of :func:`batch_report`'s vector.
REPORT_SIZE = _SUMS + len(FIELDS) * _SUM_FIELD
_MASK = 2**62 - 1  # keeps checksums non-negative, so -c never overflows
_FIX_SAME = ("feed every tensor-parallel peer and pipeline stage the same batch: shard the data by "
             "data-parallel rank (goose_core.data.shard_batch(batch, ctx.dp_rank, ctx.dp_size))")


def _shape(value: Any) -> list[int]:
    if not isinstance(value, Tensor):
        return [-1, 0] + [0] * _DIMS
    dims = list(value.shape[:_DIMS])
    return [value.dim(), value.numel()] + dims + [0] * (_DIMS - len(dims))


def _extremes(value: Any, ignore: int | None = None) -> list[Tensor]:
    """``[max, min]`` of an integer tensor (``ignore`` left out); ``[0, 0]`` when there is none."""
    if not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex():
        return [torch.zeros((), dtype=torch.int64)] * 2
    flat = value.detach().reshape(-1).to(torch.int64)
    if ignore is not None:
        flat = flat[flat != ignore]
    if flat.numel() == 0:
        return [torch.zeros((), dtype=torch.int64)] * 2
    both = torch.stack([flat.max(), flat.min()]).clamp(-_BOUND, _BOUND)
    return list(both.cpu())


def _as_int64(value: Tensor) -> Tensor:
    flat = value.detach().reshape(-1)
    if flat.is_floating_point():  # compare the exact bits, not rounded values
        return flat.to(torch.float64).contiguous().view(torch.int64)
    return flat.to(torch.int64)


def batch_checksum(batch: Mapping[str, Any]) -> Tensor:
    """Per field of :data:`FIELDS`: ``[given, rows, numel, position-weighted sum]`` (int64)."""
    parts: list[Tensor] = []
    for name in FIELDS:
        value = batch.get(name)
        if not isinstance(value, Tensor):
            parts.append(torch.zeros(_SUM_FIELD, dtype=torch.int64))
            continue
        ints = _as_int64(value)
        weights = torch.arange(1, ints.numel() + 1, dtype=torch.int64, device=ints.device)
        total = torch.bitwise_and((ints * weights).sum(), _MASK).cpu()  # int64 wraps: still exact
        rows = value.shape[0] if value.dim() else 1
        parts.append(torch.cat([torch.tensor([1, rows, value.numel()]), total.reshape(1)]))
    return torch.cat(parts)


def batch_report(batch: Mapping[str, Any], checksum: bool = False) -> Tensor:
    """This rank's report on ``batch`` (int64, on the CPU, :data:`REPORT_SIZE` long): shapes, id
    extremes, and the checksum, or zeros in its place when not asked."""
    shapes = torch.tensor([n for name in FIELDS for n in _shape(batch.get(name))], dtype=torch.int64)
    ids = _extremes(batch.get("input_ids")) + _extremes(batch.get("labels"), IGNORE_INDEX)
    sums = batch_checksum(batch) if checksum else torch.zeros(len(FIELDS) * _SUM_FIELD, dtype=torch.int64)
    return torch.cat([shapes, torch.stack(ids), sums])


def _field_shape(report: list[int], field: str) -> tuple[int, ...] | None:
    at = FIELDS.index(field) * _PER_FIELD
    ndim, numel, dims = report[at], report[at + 1], report[at + 2 : at + _PER_FIELD]
    if ndim < 0:
        return None
    return tuple(dims[:ndim]) if ndim <= _DIMS else (*dims, f"... ({numel} elements)")  # type: ignore[return-value]


def _shapes_differ(high: list[int], low: list[int], where: str, who: str) -> str | None:
    """Fault: a field's shape (or presence) differs between the ranks compared."""
    for field in FIELDS:
        a, b = _field_shape(high, field), _field_shape(low, field)
        if a != b:
            return (f"the {who}{where} were fed batches of different shapes: {field}'s shape "
                    f"ranges from {b} to {a} over them (elementwise min and max; None: not given). "
                    f"Every step, {_FIX_SAME}, and pass them the same fields")
    return None


def _sums_differ(high: list[int], low: list[int], where: str, who: str) -> str | None:
    """Fault: the ranks compared were fed different batches (the checksum differs)."""
    fields = [name for k, name in enumerate(FIELDS)
              if high[k * _SUM_FIELD : (k + 1) * _SUM_FIELD] != low[k * _SUM_FIELD : (k + 1) * _SUM_FIELD]]
    if not fields:
        return None
    return (f"the {who}{where} were fed different batches ({', '.join(fields)} differ): tensor-parallel "
            f"peers and pipeline stages must all get the same batch, only data-parallel ranks get "
            f"different shards. Shard the data by data-parallel rank, not by global rank: "
            f"goose_core.data.shard_batch(batch, ctx.dp_rank, ctx.dp_size), or "
            f"DistributedSampler(dataset, num_replicas=ctx.dp_size, rank=ctx.dp_rank) (its defaults "
            f"shard over every rank of the world)")


def _misfit(report: list[int], where: str) -> str | None:
    """Fault: ``labels``, ``attention_mask`` or ``position_ids`` does not fit ``input_ids``."""
    ids = _field_shape(report, "input_ids")
    if ids is None:
        return None
    labels, mask, positions = (_field_shape(report, f) for f in ("labels", "attention_mask", "position_ids"))
    if labels is not None and labels != ids:
        return (f"labels{where} have shape {labels} but input_ids {ids}: labels must have input_ids' "
                f"shape, unshifted (the model shifts them by one itself); pad them with -100 "
                f"(ignored) where there is no target")
    if mask is not None and len(mask) == 2 and mask != ids:
        return (f"attention_mask{where} has shape {mask} but input_ids {ids}: a 2-D attention_mask "
                f"must have input_ids' shape (1 for a real token, 0 for padding)")
    if positions is not None and (not positions or positions[-1] != ids[-1]):
        return (f"position_ids{where} have shape {positions} but input_ids {ids}: their last "
                f"dimension must be the sequence length, {ids[-1] if ids else 0}")
    return None


def _out_of_range(high: list[int], low: list[int], vocab: int, where: str) -> str | None:
    """Fault: an id or a label (other than -100) outside ``[0, vocab)``."""
    top, bottom, label_top, label_bottom = high[_SHAPES], low[_SHAPES + 1], high[_SHAPES + 2], low[_SHAPES + 3]
    for field, value in (("input_ids", top), ("input_ids", bottom), ("labels", label_top),
                         ("labels", label_bottom)):
        if not 0 <= value < vocab:
            ignored = " (other than -100, which is ignored)" if field == "labels" else ""
            return (f"{field}{where} hold {value}{ignored}, outside [0, {vocab}): the model's "
                    f"vocabulary has {vocab} tokens, and an id past it would crash one device but "
                    f"train silently on a vocabulary-parallel embedding or loss. Tokenize with the "
                    f"model's own tokenizer, or grow the embedding to the tokenizer "
                    f"(model.resize_token_embeddings(len(tokenizer)), before parallelizing)")
    return None


def first_fault(high: Tensor, low: Tensor, vocab: int | None, dp_ranks: Sequence[int],
                who: str) -> str | None:
    """The first fault in the reduced reports, or ``None``.

    Args:
        high, low: ``(len(dp_ranks), REPORT_SIZE)``: the elementwise max and min of the
            reports of the ranks that share each data-parallel shard.
        vocab: the model's vocabulary size (``None``: ids are not bounded).
        dp_ranks: the data-parallel rank each row describes (named in the message when the
            ranks compared span several of them).
        who: the ranks each row's max and min were taken over, in words (for the message).
    """
    for dp_rank, hi, lo in zip(dp_ranks, high.tolist(), low.tolist()):
        where = f" on data-parallel rank {dp_rank}" if len(dp_ranks) > 1 else ""
        of = f" of data-parallel rank {dp_rank}"
        fault = ((_shapes_differ(hi, lo, of, who) if who else None)
                 or (_sums_differ(hi[_SUMS:], lo[_SUMS:], of, who) if who else None)
                 or _misfit(hi, where)
                 or (_out_of_range(hi, lo, vocab, where) if vocab is not None else None))
        if fault:
            return fault
    return None
