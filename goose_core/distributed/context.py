"""ParallelContext: the process groups, coordinates and neighbours of one rank in the 3D grid."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from goose_core.distributed.grid import AXES, Axis, ProcessGrid

__all__ = ["ParallelContext", "DEFAULT_TIMEOUT"]

#: Every process group times out after this long, so a lost peer is an error, never a hang.
DEFAULT_TIMEOUT = timedelta(seconds=120)

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _world_size_before_init() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and {', '.join(missing)} is not set: launch "
            f"with `torchrun --nproc_per_node=N script.py`, or goose_core.spawn(fn, N) from Python"
        )
    return int(os.environ["WORLD_SIZE"])


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


class ParallelContext:
    """One rank's view of the tp x pp x dp grid.

    Initialises ``torch.distributed`` from torchrun's environment when nobody has yet (NCCL when
    CUDA is available, else gloo), validates the layout on every rank *before* any collective,
    then creates one process group per axis line (see :mod:`goose_core.distributed.grid` for
    the rank order).

    Args:
        tensor_parallel_size: ranks that split each layer (innermost, fastest-varying).
        pipeline_parallel_size: ranks that split the layer sequence into stages (outermost).
        data_parallel_size: ranks that each see a different shard of the batch.
        seed: the seed every rank starts from, so seeded model init is identical everywhere.
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available.
        timeout: how long any collective may wait before failing.

    Raises:
        ValueError: a size < 1, or tp * pp * dp != world size (raised on every rank).
    """

    def __init__(
        self,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int = 1,
        *,
        seed: int = 0,
        backend: str | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        self.grid = ProcessGrid(tensor_parallel_size, pipeline_parallel_size, data_parallel_size)
        self.grid.check_world_size(_world_size_before_init())
        if not dist.is_initialized():
            dist.init_process_group(backend or _default_backend(), timeout=timeout)
        self.backend = dist.get_backend()
        self.timeout = timeout
        self.seed = seed
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.coords = self.grid.coords(self.rank)
        self._groups = {axis: self._new_groups(axis) for axis in AXES}
        self.prev_pipeline_rank, self.next_pipeline_rank = self.grid.pipeline_neighbours(self.rank)
        self.device = self._device()
        torch.manual_seed(seed)

    def _new_groups(self, axis: Axis) -> dist.ProcessGroup:
        # new_group is collective over the whole world: every rank creates every group, in the
        # same order, and keeps the one it belongs to.
        mine = None
        for ranks in self.grid.all_groups(axis):
            group = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                mine = group
        assert mine is not None
        return mine

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count()))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    # -- by axis ---------------------------------------------------------------------------
    def group(self, axis: Axis) -> dist.ProcessGroup:
        """The process group along ``axis`` that contains this rank."""
        return self._groups[axis]

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
        return self._groups["tp"]

    @property
    def pipeline_parallel_group(self) -> dist.ProcessGroup:
        return self._groups["pp"]

    @property
    def data_parallel_group(self) -> dist.ProcessGroup:
        return self._groups["dp"]

    tp_rank = tensor_parallel_rank
    pp_rank = pipeline_parallel_rank
    dp_rank = data_parallel_rank
    tp_size = tensor_parallel_size
    pp_size = pipeline_parallel_size
    dp_size = data_parallel_size
    tp_group = tensor_parallel_group
    pp_group = pipeline_parallel_group
    dp_group = data_parallel_group

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_parallel_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_parallel_rank == self.grid.pp - 1

    def destroy(self) -> None:
        """Tear down torch.distributed (all groups)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def __repr__(self) -> str:
        c = self.coords
        return (
            f"ParallelContext(rank={self.rank}/{self.world_size}, tp={c['tp']}/{self.grid.tp}, "
            f"pp={c['pp']}/{self.grid.pp}, dp={c['dp']}/{self.grid.dp}, backend={self.backend})"
        )
