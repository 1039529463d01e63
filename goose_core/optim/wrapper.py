"""What a wrapping optimizer (ZeRO-1, master weights) shares: the torch.optim surface, delegated,
and the rule that keeps its own copy of the parameters behind the parameters.

Both step a copy of the model's parameters (ZeRO-1: this rank's flat shard of each bucket;
MasterWeights: fp32 masters of bf16 ones) and write the result back into them. Anything may write
the parameters between two steps: a weights-only ``load_checkpoint``, ``model.load_state_dict``,
``p.copy_()`` under ``no_grad``, a ``.data`` write, ``broadcast_replicas``. The parameters are the
truth: before it steps (and before ``state_dict()``) the copy follows them::

    a copy as wide as the parameters   re-read outright: after the write-back the parameters hold
                                       the copy's bits, so this is exact (1/dp of them copied)
    a wider copy (the fp32 masters     an element whose parameter no longer holds what it held
    of a bf16 model)                   then (the master's rounding, which the write-back left)
                                       was written: the master takes its value; elsewhere it
                                       keeps the bits bf16 lacks. One compare a step and one
                                       host sync find the parameters (ZeRO-1: buckets) written;
                                       only theirs are rewritten
    saved masters loaded               the last write wins: until the next step, goose keeps what
      (``load_state_dict``)            the parameters held at the load (a bf16 copy) and compares
                                       with that instead: a weight loaded after the optimizer
                                       state counts as written, one loaded before does not
    load_checkpoint                    every keeper of the model's parameters re-reads outright
                                       (``reload_params``) after loading the weights, before the
                                       optimizer state: a weights-only load sets the masters exactly

Why by value and not by each parameter's version counter (``p._version``, which the in-place
writes bump, DCP's load into the parameters included): a ``.data`` write and a collective into a
parameter (``dist.broadcast``, ``broadcast_replicas``) leave it unchanged (torch 2.13), and one
rank's counters can disagree with another's (rank 0 loads, then broadcasts: only rank 0's moved),
which would take a collective every step to agree on. The values are what replicas share, so
replicas decide alike, and under ZeRO-1 the one rank that steps a shard decides from its own
parameters, which the all-gather then gives every rank. ``load_checkpoint`` is collective: its
outright re-read happens on every rank.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from goose_core.metadata import link_keeper

__all__ = ["OptimizerWrapper", "differs", "follow", "on_host"]

_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


class OptimizerWrapper(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` around another one, whose param groups it rewrites in place.

    ``param_groups`` and ``state`` are the wrapped optimizer's (LR schedulers work unchanged),
    ``group_params`` keeps the model's parameters per group as they were given. Subclasses keep
    their own fp32 masters (``keeps_masters``), so they refuse to wrap one another.
    """

    #: Keeps its own fp32 masters: neither MasterWeights nor DistributedOptimizer wraps it.
    keeps_masters = True
    #: How the subclass is called, for the error of ``add_param_group``.
    call = "(optimizer)"

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super(): nothing of its own
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        for hooks in _HOOK_DICTS:
            setattr(self, hooks, OrderedDict())
        self.group_params = [list(g["params"]) for g in optimizer.param_groups]

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    # -- the copy follows the parameters (see the module's docstring) ---------------------------
    def _keep_copies_of(self, params: Iterable[Tensor]) -> None:
        """Tell ``load_checkpoint`` that this optimizer steps a copy of ``params``."""
        for p in params:
            link_keeper(p, self)

    def reload_params(self) -> None:
        """Make the copy exactly the parameters' values now: call it on every rank after writing
        the parameters yourself to drop the extra bits of the fp32 masters everywhere (those of
        elements the write left as they were included); ``load_checkpoint`` calls it."""
        raise NotImplementedError

    def _follow_params(self) -> None:
        """Bring the copy up to parameters written since the last step (before stepping it)."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        raise ValueError(f"{name} cannot add param groups after wrapping; give the wrapped optimizer "
                         f"all its groups before {name}{self.call}")

    @staticmethod
    def closure_loss(closure: Callable[[], float] | None) -> float | None:
        """What ``step(closure)`` returns: the closure's loss, computed with grad enabled."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def differs(now: Tensor, then: Tensor) -> Tensor:
    """Where ``now``'s bits differ from ``then``'s: bits, not ``!=``, so a -0.0 written over 0.0
    counts, and an integer compare is the cheaper one."""
    return now.view(_BITS[now.element_size()]).ne(then.view(_BITS[then.element_size()]))


def on_host(flags: list[Tensor]) -> list[bool]:
    """0-d bool tensors as Python bools: one host sync for the lot. The common step finds
    nothing written, after one compare (~12 bytes an element moved, under half of what AdamW's
    step moves) and no rewrite of the masters (the ~20 more bytes of :func:`follow`)."""
    return [bool(f) for f in torch.stack(flags).tolist()] if flags else []


def follow(master: Tensor, now: Tensor, then: Tensor | None = None) -> None:
    """``master`` (wider than ``now``, the parameter's values, same shape) takes ``now``'s value
    wherever it :func:`differs` from ``then``: what the parameter held when the master was last
    written back (its rounding, the default) or loaded."""
    with torch.no_grad():
        then = master.to(now.dtype) if then is None else then
        torch.where(differs(now, then), now, master.detach(), out=master.detach())
