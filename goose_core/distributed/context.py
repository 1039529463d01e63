"""ParallelContext: the process groups, coordinates and neighbours of one rank in the process grid."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from goose_core.distributed import progress
from goose_core.distributed.expert_groups import ExpertGroups, check_expert_parallel_size
from goose_core.distributed.grid import AXES, Axis, ProcessGrid

__all__ = ["ParallelContext", "DEFAULT_TIMEOUT", "choose_backend", "BACKEND_ENV", "DEVICE_ENV"]

#: Every process group times out after this long, so a lost peer is an error, never a hang.
DEFAULT_TIMEOUT = timedelta(seconds=120)

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _alone() -> bool:
    """Whether no launcher started this process: none of torchrun's variables, and no world of
    several initialised by the caller (a plain ``python``, a notebook)."""
    if any(k in os.environ for k in _ENV):
        return False
    return not dist.is_initialized() or dist.get_world_size() == 1


def _world_size_before_init() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    if _alone():
        return 1
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and {', '.join(missing)} is not set: launch "
            f"with `torchrun --nproc_per_node=N script.py`, or goose_core.spawn(fn, N) from Python"
        )
    return int(os.environ["WORLD_SIZE"])


_ALONE = ("tp * pp * dp * cp = {grid.tp} * {grid.pp} * {grid.dp} * {grid.cp} = {n} processes, but this is one process "
          "started without a launcher (no RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): launch "
          "{n} with `torchrun --nproc_per_node={n} script.py`, or goose_core.spawn(fn, {n}) from "
          "Python; ParallelContext() alone is a world of one")

#: Environment defaults for ``backend`` / ``device`` (an argument wins over them). ``spawn`` sets
#: both to gloo / cpu in its forked ranks: a forked child must never touch CUDA.
BACKEND_ENV, DEVICE_ENV = "GOOSE_BACKEND", "GOOSE_DEVICE"

_DEVICE_OF = {"gloo": "cpu", "nccl": "cuda"}


def _local_ranks() -> tuple[int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them; one node when they are missing."""
    world = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
    rank = int(os.environ.get("RANK", dist.get_rank() if dist.is_initialized() else 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return int(os.environ.get("LOCAL_RANK", rank % local_world)), local_world


def _cuda_fits(local_world_size: int) -> bool:
    # is_available first: device_count alone would not tell a CPU build from an empty node.
    return torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size


def choose_backend(backend: str | None = None, device: str | torch.device | None = None, *,
                   local_rank: int = 0, local_world_size: int = 1) -> tuple[str, torch.device]:
    """The (backend, device) pair a rank uses.

    In order: the arguments (one given fixes the other: gloo <-> cpu, nccl <-> cuda); else
    ``GOOSE_BACKEND`` / ``GOOSE_DEVICE`` the same way; else NCCL on ``cuda:local_rank`` when CUDA
    is available with at least one GPU per local rank, else gloo on the CPU (by default several
    ranks never share one GPU). Pure apart from reading the environment and CUDA's device
    count, so every rank decides (and raises) the same before any collective.

    Raises:
        ValueError: an unknown backend or device type, NCCL on the CPU, or a CUDA device that
            this machine does not have.
    """
    if backend is None and device is None:
        backend, device = os.environ.get(BACKEND_ENV) or None, os.environ.get(DEVICE_ENV) or None
    if backend is not None and backend not in _DEVICE_OF:
        raise ValueError(f"backend={backend!r} is not supported: use 'gloo' (CPU) or 'nccl' (CUDA)")
    if backend is None and device is None:
        backend = "nccl" if _cuda_fits(local_world_size) else "gloo"
    if device is None:
        device = _DEVICE_OF[backend]  # type: ignore[index]
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(dev)!r} is not supported: use 'cpu' (with gloo) or 'cuda' (with nccl)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    _check_pair(backend, dev)
    return backend, dev


def _running_backend(asked: str | None) -> str | None:
    running = dist.get_backend()
    if asked is not None and asked != running:
        raise ValueError(f"backend={asked!r} but torch.distributed is already initialised with "
                         f"{running!r}: drop the argument, or initialise with {asked!r}")
    return running if running in _DEVICE_OF else asked


def _check_pair(backend: str, device: torch.device) -> None:
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend='nccl' needs a CUDA device, got device={str(device)!r}: "
                         f"use backend='gloo' for the CPU")
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.index >= count:  # type: ignore[operator]
        fewer = f"run at most {count} ranks per node on CUDA, or " if count else ""
        raise ValueError(f"device={str(device)!r} but this machine has {count} CUDA device(s): "
                         f"{fewer}pass backend='gloo', device='cpu' (or set {DEVICE_ENV}=cpu)")


class ParallelContext:
    """One rank's view of the tp x cp x pp x dp grid.

    Initialises ``torch.distributed`` from torchrun's environment when nobody has yet (a process
    without a launcher's environment is a world of one, over a private store: a checkpoint loads
    and trains in a plain ``python`` or a notebook), validates
    the layout on every rank *before* any collective, then creates one process group per axis
    line (see :mod:`goose_core.distributed.grid` for the rank order), and one per pipeline for
    its first and last stage (:attr:`pipeline_ends_group`). The backend and device
    come from :func:`choose_backend`: NCCL on ``cuda:LOCAL_RANK`` only when there is a GPU for
    every local rank, else gloo on the CPU; ``backend`` / ``device`` override it.

    Args:
        tensor_parallel_size: ranks that split each layer (innermost, fastest-varying).
        pipeline_parallel_size: ranks that split the layer sequence into stages (outermost).
        data_parallel_size: ranks that each see a different shard of the batch.
        context_parallel_size: ranks that split each sequence (between tp and dp in the rank
            order; see :mod:`goose_core.distributed.grid`). Its ranks hold the same weights, so
            gradients are averaged over :attr:`replica_group` (dp x cp); 1 (the default) adds
            nothing.
        seed: the seed every rank starts from, so seeded model init is identical everywhere.
        backend: ``"gloo"`` or ``"nccl"`` (default: see :func:`choose_backend`).
        device: where this rank's model and tensors live, ``"cpu"`` or ``"cuda[:i]"`` (default:
            the backend's; ``cuda`` means ``cuda:LOCAL_RANK``).
        timeout: how long any collective or point-to-point operation may wait for its peers
            (default :data:`DEFAULT_TIMEOUT`, 120 s; keep it above the slowest step). Past it,
            or when a peer's connection closes, goose's operations raise
            :class:`~goose_core.distributed.missing.MissingRankError` on every rank that waited,
            naming the ranks that did not arrive and what they did last (step, activity), from
            the progress records each rank publishes to the store
            (:mod:`goose_core.distributed.progress`; :meth:`destroy` ends this rank's).
        expert_parallel_size: E, the ranks of each data-parallel line that split the experts
            (:mod:`goose_core.distributed.expert_groups`); must divide ``data_parallel_size``.
        check_finite: stop the run, on every rank, before an optimizer step that would read a
            non-finite loss or gradient (:mod:`goose_core.finite`); False trains on regardless.

    Raises:
        ValueError: a size < 1, E not dividing dp, E > 1 with cp > 1, tp * cp * pp * dp != world size
            (without a launcher: > 1), or a
            backend / device that cannot work here (raised on every rank).
    """

    def __init__(
        self,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int = 1,
        *,
        context_parallel_size: int = 1,
        seed: int = 0,
        backend: str | None = None,
        device: str | torch.device | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
        check_finite: bool = True,
        expert_parallel_size: int = 1,
    ) -> None:
        self.grid = ProcessGrid(tensor_parallel_size, pipeline_parallel_size, data_parallel_size,
                                context_parallel_size)
        check_expert_parallel_size(expert_parallel_size, data_parallel_size)
        if expert_parallel_size > 1 and context_parallel_size > 1:
            raise ValueError(f"expert_parallel_size={expert_parallel_size} with context_parallel_size="
                             f"{context_parallel_size} is not supported: the experts' gradients would need "
                             f"averaging over cp too; use one of the two")
        alone = _alone()
        if alone and self.grid.world_size > 1:
            raise ValueError(_ALONE.format(n=self.grid.world_size, grid=self.grid))
        self.grid.check_world_size(_world_size_before_init())
        local_rank, local_world = _local_ranks()
        if dist.is_initialized():  # someone else chose the backend: the device follows it
            backend = _running_backend(backend)
        backend, self.device = choose_backend(backend, device, local_rank=local_rank,
                                              local_world_size=local_world)
        if self.device.type == "cuda":  # the only CUDA call; gloo-on-CPU ranks never make it.
            torch.cuda.set_device(self.device)  # before NCCL starts, so it binds this GPU
        if not dist.is_initialized():
            # Alone (a plain `python`, a notebook): a world of one over a private store, no port.
            alone_world = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if alone else {}
            dist.init_process_group(backend, timeout=timeout, **alone_world)
        self.backend = dist.get_backend()
        self.timeout = timeout
        self.seed = seed
        self.check_finite = check_finite
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.coords = self.grid.coords(self.rank)
        self._groups = {axis: self._new_groups(self.grid.all_groups(axis)) for axis in AXES}
        self._ends_group = self._new_ends_group()
        # dp x cp: the dp group itself when cp = 1 (same ranks; no extra group to create).
        self._replica_group = (self._groups["dp"] if self.grid.cp == 1
                               else self._new_groups(self.grid.all_replica_groups()))
        #: The expert-parallel and expert-data-parallel groups (:mod:`.expert_groups`).
        self.experts = ExpertGroups.create(self.grid, expert_parallel_size, self.rank,
                                           self._groups["dp"], timeout)
        if self.world_size > 1:
            # A gloo group connects its pairs while new_group returns: a rank that finished its
            # part and left at once (a short job, a test) would close sockets a peer is still
            # connecting. After this barrier every rank holds every group it belongs to.
            dist.barrier()
        self.prev_pipeline_rank, self.next_pipeline_rank = self.grid.pipeline_neighbours(self.rank)
        self.progress = self._start_progress()
        torch.manual_seed(seed)

    def _start_progress(self) -> progress.Progress | None:
        if self.world_size == 1 or not dist.is_initialized():  # no peer to tell
            return None
        groups = [g for g in (dist.group.WORLD, *self._groups.values(), self._ends_group) if g is not None]
        shown = [axis for axis in AXES if axis != "cp" or self.grid.cp > 1]  # no cp without context parallelism
        where = ", ".join(f"{axis} {self.coords[axis]}" for axis in shown)
        store = dist.distributed_c10d._get_default_store()
        return progress.start(store, self.rank, where, groups, self.timeout)

    def _new_groups(self, all_ranks: list[list[int]]) -> dist.ProcessGroup | None:
        # new_group is collective over the whole world: every rank creates every group, in the
        # same order, and keeps the one it belongs to (None if it is in none).
        mine = None
        for ranks in all_ranks:
            group = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                mine = group
        return mine

    def _new_ends_group(self) -> dist.ProcessGroup | None:
        pp = self.grid.pp
        if pp <= 2:  # one stage: no pair; two: the pipeline group is the pair
            return self._groups["pp"] if pp == 2 else None
        return self._new_groups([[line[0], line[-1]] for line in self.grid.all_groups("pp")])

    # -- by axis ---------------------------------------------------------------------------
    def group(self, axis: Axis) -> dist.ProcessGroup:
        """The process group along ``axis`` that contains this rank."""
        group = self._groups[axis]
        assert group is not None  # every rank is on one line of every axis
        return group

    def group_ranks(self, axis: Axis) -> list[int]:
        """Global ranks in this rank's group along ``axis``, in group-rank order."""
        return self.grid.group_ranks(axis, self.rank)

    def size(self, axis: Axis) -> int:
        return getattr(self.grid, axis)

    def local_rank(self, axis: Axis) -> int:
        """This rank's index inside its group along ``axis``."""
        return self.coords[axis]

    # -- Megatron-style names, plus short aliases ------------------------------------------
    @property
    def tensor_parallel_rank(self) -> int:
        return self.coords["tp"]

    @property
    def pipeline_parallel_rank(self) -> int:
        return self.coords["pp"]

    @property
    def data_parallel_rank(self) -> int:
        return self.coords["dp"]

    @property
    def tensor_parallel_size(self) -> int:
        return self.grid.tp

    @property
    def pipeline_parallel_size(self) -> int:
        return self.grid.pp

    @property
    def data_parallel_size(self) -> int:
        return self.grid.dp

    @property
    def tensor_parallel_group(self) -> dist.ProcessGroup:
        return self.group("tp")

    @property
    def pipeline_parallel_group(self) -> dist.ProcessGroup:
        return self.group("pp")

    @property
    def data_parallel_group(self) -> dist.ProcessGroup:
        return self.group("dp")

    @property
    def context_parallel_rank(self) -> int:
        return self.coords["cp"]

    @property
    def context_parallel_size(self) -> int:
        return self.grid.cp

    @property
    def context_parallel_group(self) -> dist.ProcessGroup:
        return self.group("cp")

    @property
    def replica_group(self) -> dist.ProcessGroup:
        """The ranks holding this rank's weights: dp x cp (Megatron's data-parallel group with
        cp). Gradients are averaged over it; it is the dp group when cp = 1."""
        assert self._replica_group is not None
        return self._replica_group

    @property
    def replica_size(self) -> int:
        return self.grid.dp * self.grid.cp

    @property
    def replica_rank(self) -> int:
        """This rank's index in :attr:`replica_group` (dp-major: dp_rank * cp + cp_rank)."""
        return self.coords["dp"] * self.grid.cp + self.coords["cp"]

    @property
    def replica_ranks(self) -> list[int]:
        """Global ranks of :attr:`replica_group`, in group-rank order."""
        return self.grid.replica_ranks(self.rank)

    @property
    def pipeline_ends_group(self) -> dist.ProcessGroup | None:
        """The group of this pipeline's first and last stage (first = group rank 0), on those two
        stages; None on a middle stage or with one stage. A weight tied across the pipeline (the
        input embedding and the LM head) syncs its gradient over it. With two stages it is the
        pipeline group; with more, one group per pipeline, created with the others."""
        return self._ends_group

    tp_rank = tensor_parallel_rank
    pp_rank = pipeline_parallel_rank
    dp_rank = data_parallel_rank
    tp_size = tensor_parallel_size
    pp_size = pipeline_parallel_size
    dp_size = data_parallel_size
    tp_group = tensor_parallel_group
    pp_group = pipeline_parallel_group
    dp_group = data_parallel_group
    cp_rank = context_parallel_rank
    cp_size = context_parallel_size
    cp_group = context_parallel_group

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_parallel_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_parallel_rank == self.grid.pp - 1

    def destroy(self) -> None:
        """Tear down torch.distributed (all groups); peers still waiting on this rank are told."""
        if self.progress is not None:
            self.progress.close("destroyed its ParallelContext")
        if dist.is_initialized():
            dist.destroy_process_group()

    def __repr__(self) -> str:
        c = self.coords
        return (
            f"ParallelContext(rank={self.rank}/{self.world_size}, tp={c['tp']}/{self.grid.tp}, "
            f"pp={c['pp']}/{self.grid.pp}, dp={c['dp']}/{self.grid.dp}, "
            + (f"cp={c['cp']}/{self.grid.cp}, " if self.grid.cp > 1 else "") + f"backend={self.backend})"
        )
