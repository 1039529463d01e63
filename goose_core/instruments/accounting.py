"""Accounting: what one rank holds, saves, computes and sends in one training step, measured.

``Accounting`` counts one step of the caller's (``measure_step``: forward and backward, then the
optimizer's step) and reads every figure from the live objects, never from a formula::

    figure                    read from
    params_bytes              the model's parameter storages (each once), and ZeRO-3's shards
    grads_bytes               after the backward: DataParallel's buckets alive (full buffers and
                              kept shards), every p.grad and master's .grad not inside them
    masters_bytes             the tensors the torch optimizer steps that are not the model's
                              parameters (MasterWeights' fp32 copies, ZeRO's shards)
    optimizer_bytes           the torch optimizer's state tensors (moments, step counters)
    activations_peak_bytes    saved-for-backward bytes alive at once (LiveActivations: hooks, any
                              device; a parameter is not an activation, ZeRO-3's gathered ones
                              included), and the CUDA allocator's peak beside it on a GPU
    flops_per_step            torch.utils.flop_counter.FlopCounterMode over forward and backward
    sent_bytes                count_traffic per group (tp, pp, dp), the whole step

These are the figures ``goose plan`` predicts; ``tests/test_plan.py`` holds one against the other.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from goose_core.distributed.context import ParallelContext
from goose_core.distributed.grid import AXES
from goose_core.distributed.traffic import count_traffic
from goose_core.engine.activations import LiveActivations
from goose_core.metadata import module_grad_sync

__all__ = ["Account", "Accounting", "measure_step", "held_bytes", "format_table", "gathered_table"]


@dataclass
class Account:
    """One rank's figures for one step (bytes, FLOPs); ``sent_bytes`` keyed by group."""

    rank: int
    params_bytes: int
    grads_bytes: int
    masters_bytes: int
    optimizer_bytes: int
    activations_peak_bytes: int
    flops_per_step: int
    sent_bytes: dict[str, Fraction] = field(default_factory=dict)
    cuda_peak_bytes: int | None = None

    def as_json(self) -> dict[str, Any]:
        """Plain JSON values (a fractional byte count of a ring share as a float)."""
        out = asdict(self)
        out["sent_bytes"] = {k: int(v) if v.denominator == 1 else float(v) for k, v in self.sent_bytes.items()}
        return out


def _storages(tensors: Iterable[Tensor]) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under goose's wrappers (MasterWeights, DistributedOptimizer)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _buckets(model: nn.Module) -> list[Any]:
    """DataParallel's buckets (its reducer's, or ZeRO-3's sharded units'), if any."""
    return list(getattr(module_grad_sync(model), "buckets", []))


def _grads(model: nn.Module, optimizer: Any) -> int:
    stepped = [t for g in _inner(optimizer).param_groups for t in g["params"]]  # masters' fp32 grads
    held: list[Tensor] = [t.grad for t in [*model.parameters(), *stepped] if t.grad is not None]
    buckets = _buckets(model)
    held += [b.grad for b in buckets if getattr(b, "allocated", False)] + [b.shard_grad for b in buckets]
    held += [b.full_grad for b in buckets if getattr(b, "full_grad", None) is not None]  # ZeRO-3's unreduced
    return sum(_storages(held).values())


def _params(model: nn.Module) -> list[Tensor]:
    """The parameters, and ZeRO-3's shards (between its uses a parameter is a view of a storage freed to 0 bytes)."""
    shards = [b.param_shard for b in _buckets(model) if hasattr(b, "param_shard")]
    return [*model.parameters(), *shards]


class _Activations(LiveActivations):
    """LiveActivations that also skips the parameters installed at each save: ZeRO-3 frees a
    unit's storage between uses and allocates it again for each, so its address can change and
    the storages known on entry are not all."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model.parameters())
        self.model, self.fixed = model, set(self.skip)
        self.gathered = any(hasattr(b, "param_shard") for b in _buckets(model))

    def _pack(self, t: Tensor) -> Any:
        if self.gathered:
            self.skip = self.fixed | {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        return super()._pack(t)


def held_bytes(model: nn.Module, optimizer: Any) -> dict[str, int]:
    """Parameter, master and optimizer-state bytes held now (gradients: see :func:`measure_step`)."""
    params = _storages(_params(model))
    params.pop(0, None)  # storages freed to 0 bytes (ZeRO-3's released parameters) have no address
    inner = _inner(optimizer)
    stepped = [p for g in inner.param_groups for p in g["params"]]
    masters = {k: v for k, v in _storages(stepped).items() if k not in params}
    state = [t for s in inner.state.values() for t in s.values() if isinstance(t, Tensor)]
    return {"params_bytes": sum(params.values()), "masters_bytes": sum(masters.values()),
            "optimizer_bytes": sum(_storages(state).values())}


class _Global:
    """A module tracker that is always at the top: every FLOP counts as the model's."""

    parents = {"Global"}

    def __enter__(self) -> "_Global":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Flops(FlopCounterMode):
    """FlopCounterMode without its per-module tracker: the tracker's hooks on each module's
    outputs keep a split backward's graphs (ZB-H1's, ZBV's) alive until the whole backward
    ends, which would inflate the activations counted beside it; the total needs no module."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _Global()  # type: ignore[assignment]


class Accounting:
    """Count one step: enter before its forward, call :meth:`after_backward` between the backward
    and the optimizer's step (``goose train``'s hook), read :attr:`account` after the block.

    Measure a step after the first: the first backward makes one-time checks (tensor
    parallelism's replicated-gradient check, an all-reduce) and the optimizer state does not
    exist before the first step.
    """

    def __init__(self, model: nn.Module, optimizer: Any, ctx: ParallelContext) -> None:
        self.model, self.optimizer, self.ctx = model, optimizer, ctx
        self.grads = 0
        self.account: Account | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Accounting":
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)
        self.traffic = self._stack.enter_context(count_traffic(self.ctx))
        self.flops = self._stack.enter_context(_Flops())
        self.live = self._stack.enter_context(_Activations(self.model))
        return self

    def after_backward(self, model: nn.Module | None = None) -> None:
        """Read the gradients held now (the backward is over, the step has not run)."""
        self.grads = _grads(self.model, self.optimizer)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        cuda = self.ctx.device.type == "cuda"
        self.account = Account(
            rank=self.ctx.rank, grads_bytes=self.grads, activations_peak_bytes=self.live.peak,
            flops_per_step=int(self.flops.get_total_flops()),
            sent_bytes={axis: self.traffic[axis] for axis in AXES},
            cuda_peak_bytes=torch.cuda.max_memory_allocated(self.ctx.device) if cuda else None,
            **held_bytes(self.model, self.optimizer))


def measure_step(model: nn.Module, optimizer: Any, ctx: ParallelContext,
                 forward_backward: Callable[[], Any], scaler: Any = None) -> Account:
    """Run ``forward_backward()`` then ``optimizer.step()`` (``scaler.step(optimizer)`` and
    ``scaler.update()`` with a loss scaler, fp16's) and ``zero_grad()``, counted (see
    :class:`Accounting`; the FLOPs are the forward's and backward's, the optimizer's
    elementwise work has none that FlopCounterMode counts)."""
    with Accounting(model, optimizer, ctx) as accounting:
        forward_backward()
        accounting.after_backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
    assert accounting.account is not None
    return accounting.account


COLUMNS = ("rank", "params_bytes", "grads_bytes", "masters_bytes", "optimizer_bytes",
           "activations_peak_bytes", "flops_per_step")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of :meth:`Account.as_json` (or a plan's) as an aligned text table, MiB and GFLOP."""
    # cp's column only where context parallelism sent something: plans and 3D runs keep theirs.
    axes = [a for a in AXES if a != "cp" or any(r["sent_bytes"].get("cp") for r in rows)]
    head = ["rank", "params MiB", "grads MiB", "masters MiB", "optim MiB", "act peak MiB", "GFLOP",
            *(f"sent {a} MiB" for a in axes)]
    lines = [head]
    for r in rows:
        def mib(v: Any) -> str:
            return "-" if v is None else f"{float(v) / 2**20:.3f}"
        act = r["activations_peak_bytes"]
        flops = r["flops_per_step"]
        lines.append([str(r["rank"]), mib(r["params_bytes"]), mib(r["grads_bytes"]), mib(r["masters_bytes"]),
                      mib(r["optimizer_bytes"]), mib(act), "-" if flops is None else f"{flops / 1e9:.3f}",
                      *(mib(r["sent_bytes"].get(a)) for a in axes)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def gathered_table(ctx: ParallelContext, account: Account) -> str | None:
    """Every rank's ``account`` gathered to rank 0 (a collective: every rank calls it) and
    formatted there by :func:`format_table`; ``None`` on the other ranks."""
    rows: list[Any] = [account.as_json()]
    if ctx.world_size > 1:
        rows = [None] * ctx.world_size
        dist.all_gather_object(rows, account.as_json())
    return format_table(rows) if ctx.rank == 0 else None
