"""One forward and backward of a model on the meta device, its FLOPs, saved bytes and tp traffic
told apart by the part of the model that caused them.

A part is a child module that holds parameters (the embedding, each block, the final norm, the
head; a ModuleList counts as its elements) or, for what runs outside them, a phase: ``pre``
(parent code before the first block: masks, rotary and ALiBi tables, which every pipeline stage
recomputes, see pipeline/split.py) and ``post`` (after the last block: the loss, the last
stage's). A stage's figures are the sums over the parts it runs::

    forward:   embed ─ pre ─ block 0 ─ block 1 ─ ... ─ norm ─ head ─ post (loss)
               (torch's ModuleTracker says which part runs)
    backward:  each autograd node's part, tagged on it when the forward recorded it

Saved tensors are counted once per storage; a storage saved by parts of two stages counts on both.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker
from transformers import masking_utils

from goose_core.distributed.context import ParallelContext
from goose_core.distributed.traffic import count_traffic
from goose_core.metadata import batch_check_of

__all__ = ["PartFigures", "parts_of", "trace_parts"]

PRE, POST = "pre", "post"


@dataclass
class PartFigures:
    """Per part: forward and backward FLOPs, tp bytes sent; saved storages of one micro-batch."""

    step_flops: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    forward_flops: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tp_sent: dict[str, Fraction] = field(default_factory=lambda: defaultdict(Fraction))
    forward_tp_sent: dict[str, Fraction] = field(default_factory=lambda: defaultdict(Fraction))
    saved: dict[int, tuple[int, set[str]]] = field(default_factory=dict)  # storage -> (bytes, parts)

    def flops(self, parts: set[str]) -> int:
        """Forward and backward FLOPs of the whole local batch."""
        return sum(v for k, v in self.step_flops.items() if k in parts)

    def forward(self, parts: set[str]) -> int:
        """Forward FLOPs of the whole local batch (what a recompute runs again)."""
        return sum(v for k, v in self.forward_flops.items() if k in parts)

    def saved_bytes(self, parts: set[str]) -> int:
        """Bytes one micro-batch saves for backward in ``parts``."""
        return sum(size for size, owners in self.saved.values() if owners & parts)

    def sent(self, parts: set[str], forward: bool = False) -> Fraction:
        """tp bytes sent in the step (or in its forwards) by ``parts``."""
        sent = self.forward_tp_sent if forward else self.tp_sent
        return sum((v for k, v in sent.items() if k in parts), Fraction(0))


def parts_of(model: nn.Module) -> dict[str, nn.Module]:
    """The parts (module docstring), by name, in registration order."""
    out: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.ModuleList):
                out.update({f"{full}.{i}": c for i, c in enumerate(child)})
            elif any(isinstance(c, nn.ModuleList) for c in child.children()):
                visit(f"{full}.", child)
            elif next(child.parameters(), None) is not None:
                out[full] = child
    visit("", model)
    return out


KEY = "goose_plan_part"  # the part an autograd node was recorded in (its metadata)


class _Where:
    """The part running now. In the forward: the innermost tracked module that is a part, else
    the phase. In the backward: the part the running autograd node was recorded in (tagged by
    :class:`_Tag`), else ``post`` (the loss's and the optimizer's side)."""

    def __init__(self, model: nn.Module, parts: dict[str, nn.Module], tracker: ModuleTracker) -> None:
        root = type(model).__name__
        self.names = {f"{root}.{name}": name for name in parts}
        self.tracker, self.phase = tracker, PRE
        blocks = [m for n, m in parts.items() if n.rsplit(".", 1)[-1].isdigit()]
        if blocks:  # after the first block begins, code outside the parts is the head's side
            blocks[0].register_forward_pre_hook(lambda *_: setattr(self, "phase", POST))

    def now(self) -> str:
        if torch._C._current_graph_task_id() != -1:  # inside a backward
            node = torch._C._current_autograd_node()
            return (node.metadata.get(KEY) if node is not None else None) or POST
        inside = [self.names[p] for p in self.tracker.parents if p in self.names]
        return max(inside, key=len) if inside else self.phase


class _Tag(TorchFunctionMode):
    """Tags the autograd nodes of every op's inputs and outputs with the part running it (a
    collective's custom node, made inside Function.apply, is tagged by the op that reads it)."""

    def __init__(self, where: _Where) -> None:
        super().__init__()
        self.where = where

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if torch._C._current_graph_task_id() == -1:
            part = self.where.now()
            for t in (*tree_leaves(args), *tree_leaves(kwargs or {}), *tree_leaves(out)):
                if isinstance(t, Tensor) and t.grad_fn is not None:
                    _tag(t.grad_fn, part)
        return out


def _tag(node: Any, part: str) -> None:
    """Tag ``node`` and the untagged nodes behind it (an op's internal ones: linear's mm behind
    its view); everything recorded earlier is tagged already, so the walk stops there."""
    stack = [node]
    while stack:
        node = stack.pop()
        if node is None or KEY in node.metadata:
            continue
        node.metadata[KEY] = part
        stack.extend(next_node for next_node, _ in node.next_functions)


class _PartFlops(FlopCounterMode):
    """FlopCounterMode that also adds each op's FLOPs (x ``times``) to the part running it."""

    def __init__(self, where: _Where, into: dict[str, int], times: int = 1) -> None:
        super().__init__(display=False)
        self.where, self.into, self.times = where, into, times

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.into[self.where.now()] += flops * self.times
        return super()._count_flops(func_packet, out, args, kwargs)


def trace_parts(model: nn.Module, ctx: ParallelContext, batch: int, micro: int, seq: int,
                pipelined: bool = False) -> PartFigures:
    """FLOPs and tp traffic of the whole local batch, saved bytes of one micro-batch, by part.

    ``pipelined``: forward as a pipeline stage does, with no KV cache (pipeline/split.py); a
    plain model builds one when its config says ``use_cache``, and attention then saves the
    cache's copies of the keys and values instead of views of the projection.
    """
    cache = {"use_cache": False} if pipelined else {}
    check = batch_check_of(model)  # it reads values; the trace has none
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is check:
            del model._forward_pre_hooks[key]
    parts = parts_of(model)
    out = PartFigures()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    # 🤗 looks for packed sequences in the position ids, a test of values: a trace has none, and
    # goose's batches are whole windows (no packing), so the answer is 🤗's for those: none.
    unpacked = mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with unpacked, ModuleTracker() as tracker:
        where = _Where(model, parts, tracker)
        with count_traffic(ctx) as traffic, _PartFlops(where, out.step_flops):
            traffic.calls = _Attributed(traffic.calls, where, out.tp_sent)
            with _Tag(where):
                loss = model(input_ids=ids, labels=ids, **cache).loss
            loss.backward()
        where.phase = PRE
        skip = {p.untyped_storage()._cdata for p in model.parameters()}

        def pack(t: Tensor) -> Tensor:
            s = t.untyped_storage()
            if s._cdata not in skip:
                size, owners = out.saved.setdefault(s._cdata, (s.nbytes(), set()))
                owners.add(where.now())
            return t
        one = ids[: batch // micro]  # forward figures are linear in the micro-batches
        with count_traffic(ctx) as traffic, _PartFlops(where, out.forward_flops, times=micro):
            traffic.calls = _Attributed(traffic.calls, where, out.forward_tp_sent, times=micro)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=one, labels=one, **cache).loss
        del loss
    return out


class _Attributed(list):
    """count_traffic's call list, adding each tp call's bytes (x ``times``) to the part running it."""

    def __init__(self, calls: list, where: _Where, into: dict[str, Fraction], times: int = 1) -> None:
        super().__init__(calls)
        self.where, self.into, self.times = where, into, times

    def append(self, call: Any) -> None:
        super().append(call)
        if call.group == "tp":
            self.into[self.where.now()] += call.sent * self.times
