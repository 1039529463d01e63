"""MasterWeights: fp32 master copies of a bf16 model's parameters for any plain torch optimizer.

The single-device recipe of mixed precision (and the one for TP, PP and plain DP, where every
rank holds whole parameters or tp shards; ZeRO-1's ``DistributedOptimizer`` keeps masters for its
shard itself)::

    backward      p.grad (bf16) --hook--> master.grad (fp32) += p.grad ; p.grad = None
                  (under DataParallel the fp32 bucket sums instead: GradReducer.main_grad)
    step          optimizer.step() on the fp32 masters   (Adam moments fp32 too)
                  p.copy_(master)                         (one rounding to bf16 per step)

Before stepping, the masters follow the parameters written since the last step (a weights-only
load, ``p.copy_()``, ``.data``): :mod:`goose_core.optim.wrapper` says how and why.

Why: a bf16 weight keeps 8 significant bits, so an update smaller than 2**-9 of the weight
(lr 1e-3 x a normalised Adam step, on a weight of 1) rounds away entirely; the fp32 master keeps
every update and the bf16 copy follows it. Gradients summed over micro-batches in fp32 for the
same reason: a sum of many bf16 pieces rounds at every addition.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from goose_core.data_parallel.bucket import main_dtype
from goose_core.finite import copy_watch
from goose_core.metadata import (grad_sync_of, is_duplicate, mark_duplicate, mark_sharded, set_grad_shards,
                                 set_wide_grad, shard_spec)
from goose_core.optim.wrapper import OptimizerWrapper, differs, follow, on_host

__all__ = ["MasterWeights"]


class MasterWeights(OptimizerWrapper):
    """Any ``torch.optim`` optimizer stepping fp32 master copies of low-precision parameters.

    Parameters in bf16 or fp16 get an fp32 master (:func:`~goose_core.data_parallel.main_dtype`);
    wider ones are stepped as they are. The wrapped optimizer's param groups hold the masters,
    so LR schedulers, :func:`~goose_core.optim.clip_grad_norm_` (which finds the masters' fp32
    gradients through the model's parameters) and :class:`~goose_core.GradScaler` work unchanged.
    ``state_dict()`` is the wrapped optimizer's plus ``"master_weights"`` (parameter number ->
    fp32 tensor), the format ``DistributedOptimizer.consolidated_state_dict()`` writes.

    Build it after every wrapper, from ``model.parameters()``; call ``zero_grad()`` every step.
    The parameters stay the truth between steps: a master whose parameter was written since the
    last step (a weights-only ``load_checkpoint``, ``model.load_state_dict``, ``p.copy_()``,
    ``.data``, a broadcast) takes its value wherever it no longer rounds to it, and keeps its
    extra bits elsewhere; ``load_checkpoint`` (and ``reload_params()``, on every rank) makes every
    master exactly its parameter. After ``load_state_dict`` with saved masters the last write wins
    (weights loaded after it are what the next step starts from, weights loaded before are not).

    Args:
        optimizer: a fresh optimizer (no state yet) over the model's parameters.

    Raises:
        ValueError: not a plain optimizer, or one with state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        _check(optimizer)
        super().__init__(optimizer)
        self.masters: dict[nn.Parameter, nn.Parameter] = {}
        for group in optimizer.param_groups:
            group["params"] = [self._master(p) for p in group["params"]]
        for p in self.masters:
            if p.requires_grad and grad_sync_of(p) is None:
                p.register_post_accumulate_grad_hook(self._take)
                if self.masters.get(p, p) is not p:  # summed in the fp32 master.grad, not p.grad
                    set_wide_grad(p, self.masters[p].dtype, lambda p=p: self._master_grad(p))
            set_grad_shards(p, self.master_params)  # clipping and the scaler read the masters
        self._keep_copies_of(self.masters)
        #: What the parameters held when saved masters were loaded, until the next write-back: a
        #: parameter that differs from it was written after (optim.wrapper's rule).
        self._loaded_over: dict[nn.Parameter, torch.Tensor] | None = None

    def _master(self, p: nn.Parameter) -> nn.Parameter:
        dtype = main_dtype(p.dtype)
        if dtype == p.dtype or p in self.masters:
            return self.masters.get(p, p)
        master = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        if (spec := shard_spec(p)) is not None:
            mark_sharded(master, spec)  # clip_grad_norm_ counts a tp shard by its replicas
        if is_duplicate(p):
            mark_duplicate(master)
        copy_watch(p, master)  # the inner optimizer steps the masters: checked and named as p
        self.masters[p] = master
        return master

    # -- gradients into the masters -------------------------------------------------------
    def _take(self, p: nn.Parameter) -> None:
        """Add ``p.grad`` into its master's fp32 gradient and free it (main_grad)."""
        if p.grad is None:
            return
        master = self.masters[p]
        if master.grad is None:
            master.grad = p.grad.to(master.dtype)
        else:
            master.grad.add_(p.grad)
        p.grad = None

    def _master_grad(self, p: nn.Parameter) -> torch.Tensor:
        """``p``'s master gradient, the fp32 sum a late gradient (the tied embedding's) adds into."""
        master = self.masters[p]
        if master.grad is None:
            master.grad = torch.zeros_like(master)
        return master.grad

    def master_params(self) -> list[nn.Parameter]:
        """The parameters the wrapped optimizer steps, their gradients collected in fp32 (from the
        hooks, from DataParallel's fp32 buckets, or from a gradient added after the hooks ran,
        such as the pipeline's tied embedding). Idempotent until the next backward."""
        for p, master in self.masters.items():
            if p.grad is None:
                continue
            sync = grad_sync_of(p)
            main = getattr(sync, "main_grad", lambda _: None)(p) if sync is not None else None
            if main is not None:
                master.grad, p.grad = main, None  # the reduced fp32 sum, not its bf16 copy
            else:
                self._take(p)
        return [m for g in self.optimizer.param_groups for m in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the masters, then round them into the model's parameters."""
        loss = self.closure_loss(closure)
        self.master_params()
        self._follow_params()  # weights written since the last step are where this one starts
        self.optimizer.step()
        for p, master in self.masters.items():
            p.copy_(master)
        self._loaded_over = None  # the parameters are the masters' rounding again
        return loss

    def reload_params(self) -> None:
        """Every master becomes exactly its parameter's value."""
        with torch.no_grad():
            for p, master in self.masters.items():
                master.copy_(p)
        self._loaded_over = None

    def _follow_params(self) -> None:
        """Masters take the value of parameters written since the last step (optim.wrapper's
        rule), element by element in the parameters where one was (one host sync finds them)."""
        with torch.no_grad():
            pairs = list(self.masters.items())
            found = on_host([differs(p.detach(), self._then(p)).any() for p, _ in pairs])
            for (p, master), written in zip(pairs, found):
                if written:
                    follow(master, p.detach(), self._then(p))
                    if self._loaded_over is not None:
                        self._loaded_over[p] = p.detach().clone()

    def _then(self, p: nn.Parameter) -> torch.Tensor:
        """What ``p`` held at the last write-back (its master's rounding) or load of the masters."""
        return self.masters[p].detach().to(p.dtype) if self._loaded_over is None else self._loaded_over[p]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the masters' gradients and the model's (as ``Optimizer.zero_grad``)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.masters:
            if p.grad is not None and not set_to_none:
                p.grad.zero_()
            elif p.grad is not None:
                p.grad = None

    # -- checkpoints ---------------------------------------------------------------------------
    def _numbered(self) -> dict[int, nn.Parameter]:
        params = [p for ps in self.group_params for p in ps]
        return {i: p for i, p in enumerate(params) if p in self.masters}

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict with ``"master_weights"``: number -> fp32 master."""
        self._follow_params()  # masters saved are those of the weights a save beside them writes
        return {**self.optimizer.state_dict(),
                "master_weights": {i: self.masters[p].detach().cpu().clone() for i, p in self._numbered().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load ``state_dict()`` (or a plain one: the masters are then the model's parameters)."""
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "master_weights"})
        saved = {int(k): v for k, v in state_dict.get("master_weights", {}).items()}
        with torch.no_grad():
            for i, p in self._numbered().items():
                self.masters[p].copy_(saved[i] if i in saved else p.detach())
        self._loaded_over = {p: p.detach().clone() for p in self.masters} if saved else None


def _check(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"MasterWeights wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, "keeps_masters", False):  # MasterWeights, DistributedOptimizer
        raise ValueError(f"MasterWeights wraps a plain optimizer, got a {type(optimizer).__name__} "
                         f"(DistributedOptimizer keeps fp32 master shards itself)")
    if optimizer.state:
        raise ValueError("wrap a fresh optimizer (no state yet); to resume, wrap first and then call "
                         "load_state_dict()")
