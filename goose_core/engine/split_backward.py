"""A cell's backward in two steps, through autograd alone: B, the input gradient now; W, the weight gradient later.

Zero-bubble schedules send a cell's input gradient upstream as soon as it exists and run the
weight gradients in ticks that would otherwise be idle. No model code is copied: while a cell's
forward runs, a global module hook notes the output of every module that holds parameters of
its own (a Linear, a norm, an embedding). Then::

    B  torch.autograd.grad(roots, [phony, y_1, ..., y_k], retain_graph=True)
       runs only the nodes that lead to the cell's input (through Recv, whose backward sends the
       gradient) and to the noted outputs: each matmul computes its input's gradient, not its
       weight's (autograd asks a node only for the gradients some requested input needs)
    W  for each noted module m:  torch.autograd.backward(y_m, dy_m, inputs=m's own parameters)
       the weight gradient of m's own op, from the gradient B left at its output

Each W reaches its module's parameters through that module's op alone, so no gradient is
counted twice, provided each parameter is used once per graph (a module called twice, or tied
embeddings in one process, would be reached through an earlier input too: refused), and every
parameter the cell uses must sit in some noted module: :func:`check_covered` says which does not.

Recomputed cells split too. A recomputed cell (:mod:`goose_core.engine.recompute`) keeps no
graph in its forward; its replay, just before B, runs under the same hook, and its rebuilt graph
is split like a kept one: B takes the gradient at the rebuilt input and at the noted outputs
(the rebuilt graph is then held until W, instead of from F to B), W the weights. A block
recomputed by torch's checkpoint (``"blocks"``, ``"selective"``) keeps its graph, with its saved
tensors replaced by handles: B's nodes unpack them (torch's checkpoint replays the block), and W
replays each block once more, since torch lets one backward unpack a saved tensor once and B's
matmul nodes unpack their inputs although they compute only the input gradient. All W of a cell
run in one :class:`~torch.utils.checkpoint.GraphExecGroup`, so a block replays once per W, not
once per module.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.checkpoint import GraphExecGroup

__all__ = ["Noted", "noting", "input_gradients", "weight_gradients", "check_covered", "SplitCells"]

#: A module that holds parameters of its own, and where its output enters the graph in this
#: cell's forward (an edge, not the tensor: holding outputs would keep tensors autograd frees).
Noted = tuple[nn.Module, GradientEdge]

@contextmanager
def noting(enabled: bool = True) -> Iterator[list[Noted]]:
    """While open (and ``enabled``), every module call with parameters of its own is noted."""
    noted: list[Noted] = []
    if not enabled:
        yield noted
        return

    def note(module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, Tensor) and output.requires_grad and any(
                p.requires_grad for p in module.parameters(recurse=False)):
            # A module may declare it uses none (the first stage's stand-in for the token
            # table returns the lookup made before the cell).
            if not getattr(module, "uses_no_parameters", False):
                noted.append((module, get_gradient_edge(output)))

    handle = nn.modules.module.register_module_forward_hook(note)
    try:
        yield noted
    finally:
        handle.remove()


def input_gradients(roots: list[Tensor], phony: Tensor, noted: list[Noted]) -> list[Tensor | None]:
    """B: backward from ``roots`` (seed 1) to the cell's input (``phony`` feeds its Recv) and to
    every noted output, weights left out. Returns the gradient at each noted output."""
    inputs = [phony] + [y for _, y in noted]
    grads = torch.autograd.grad(roots, inputs, [torch.ones_like(t) for t in roots], retain_graph=bool(noted),
                                allow_unused=True)
    return list(grads[1:])


def weight_gradients(noted: list[Noted], grads: list[Tensor | None]) -> None:
    """W: each noted module's parameter gradients, accumulated into ``.grad``."""
    for (module, y), dy in zip(noted, grads):
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if dy is not None and params:
            torch.autograd.backward(y, dy, inputs=params)


def check_covered(roots: list[Tensor], noted: list[Noted], cell: tuple[int, int]) -> None:
    """Raise if a parameter the cell's graph reaches is not one of a noted module's own.

    Raises:
        RuntimeError: naming the parameter's shape (its W would never run).
    """
    own = {id(p) for m, _ in noted for p in m.parameters(recurse=False)}
    seen, stack = set(), [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, nn.Parameter) and id(variable) not in own:
            raise RuntimeError(f"cell {cell} uses a parameter of shape {tuple(variable.shape)} outside "
                               f"the forward of a module that holds it, so a split backward cannot "
                               f"defer its gradient: use schedule='1f1b' for this model")
        stack.extend(fn for fn, _ in node.next_functions)


def _refuse_reuse(noted: list[Noted]) -> None:
    """A parameter used by two noted calls in one graph: the W of the later one would reach it
    through the earlier one's input as well, counting that gradient twice.

    Raises:
        RuntimeError: naming the parameter's shape and the fix.
    """
    seen: set[int] = set()
    for module, _ in noted:
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                raise RuntimeError(f"a split backward needs every parameter used once per cell, but one "
                                   f"of shape {tuple(p.shape)} is used twice ({type(module).__name__} "
                                   f"again: a module called twice, or input and output embeddings tied "
                                   f"in one process): use schedule='1f1b'")
            seen.add(id(p))


class SplitCells:
    """The executor's bookkeeping of a split backward: each cell's noted modules from its F (or
    its replay), the gradients at their outputs from its B, consumed by its W. Disabled: every
    call is a no-op. Enabled, it is the :class:`~goose_core.engine.recompute.SplitReplay` of
    the recomputed cells it runs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.noted: dict[tuple[int, int], list[Noted]] = {}
        self.pending: dict[tuple[int, int], list[tuple[Noted, Tensor | None]]] = {}
        self.replayed: dict[tuple[int, int], list[Noted]] = {}  # noted in a replay, until its B
        self.checked: set[int] = set()  # partitions whose coverage was checked
        self.checked_replays: set[int] = set()

    @contextmanager
    def forward(self, i: int, j: int, recomputed: bool) -> Iterator[None]:
        """Around cell (i, j)'s forward: note its modules. A recomputed cell's body runs without
        grad, so only what runs outside it is noted (the first stage's token lookup); the body's
        modules are noted in its replay (:meth:`replaying`)."""
        with noting(self.enabled) as noted:
            yield
        if self.enabled:
            self.noted[(i, j)] = noted

    @contextmanager
    def replaying(self, cell: tuple[int, int]) -> Iterator[None]:
        """Around a recomputed cell's replay, just before its B: note the rebuilt modules."""
        with noting(self.enabled) as noted:
            yield
        self.replayed[cell] = noted

    def backward(self, cell: tuple[int, int], output: Tensor, leaf: Tensor, grad: Tensor) -> Tensor | None:
        """B of a rebuilt cell, inside its outer B: the gradient at the rebuilt input (returned)
        and at the noted outputs (kept for its W, with the rebuilt graph they hold)."""
        noted = self.replayed.pop(cell, [])
        if not output.requires_grad:
            return None
        _refuse_reuse(noted)
        if cell[1] not in self.checked_replays:
            check_covered([output], noted, cell)
            self.checked_replays.add(cell[1])
        first = [leaf] if leaf.requires_grad else []
        grads = torch.autograd.grad([output], first + [y for _, y in noted], [grad], retain_graph=bool(noted),
                                    allow_unused=True)
        self.pending.setdefault(cell, []).extend(zip(noted, grads[len(first):]))
        return grads[0] if first else None

    def input(self, cells: list[tuple[int, int]], roots: list[Tensor], phony: Tensor) -> None:
        """B of ``cells`` (one, or a micro-batch's connected run of them) from ``roots``."""
        noted = [n for c in cells for n in self.noted.get(c, [])]
        _refuse_reuse(noted)
        for c in cells:
            if c[1] not in self.checked and self.noted.get(c):
                check_covered(roots, noted, c)
                self.checked.add(c[1])
        grads = iter(input_gradients(roots, phony, noted))  # replayed cells add to pending here
        for c in cells:
            self.pending.setdefault(c, []).extend((n, next(grads)) for n in self.noted.pop(c, []))

    def weight(self, i: int, j: int, callbacks: Any) -> None:
        """W of cell (i, j): its parameters' gradients, between ``weight`` callbacks."""
        callbacks.fire("weight", "before", i, j)
        done = self.pending.pop((i, j), [])
        with _one_replay():
            weight_gradients([n for n, _ in done], [g for _, g in done])
        callbacks.fire("weight", "after", i, j)


@contextmanager
def _one_replay() -> Iterator[None]:
    """One graph task for torch's checkpoint over the W calls inside (one per module): each
    checkpointed block replays once, not once per module (unless the caller opened one)."""
    if GraphExecGroup._get_current_group() is not None:
        yield
        return
    with GraphExecGroup():
        yield
