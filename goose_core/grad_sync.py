"""The gradient-synchronisation protocol: what the other wrappers may ask of data parallelism.

``DataParallel`` installs one :class:`GradSync` per model (its ``GradReducer``); nothing else
implements it. The other wrappers drive it through this interface only, and find it through
:mod:`goose_core.metadata` (``grad_syncs(params)``, ``module_grad_sync(model)``)::

    caller                    when                                  calls
    TensorParallel,           the end of parallelize(): parameters  parameters_changed(model)
      PipelineParallel          replaced or dropped                   -> track(model)
    the pipeline's stage      its backward starts / ends            defer() / flush()
    DistributedOptimizer      built (ZeRO-1 takes the sync over)    shard(groups, key)
                              step: reduced? else it reduce-        reduced, reset()
                              scatters itself; then reset()
    the training loop         all micro-steps but the last          no_sync()

One backward pass as the protocol sees it (``defer``/``flush`` only under a pipeline, whose
recomputed cells accumulate a parameter's gradient in one nested backward per micro-batch)::

    loss.backward()
      ├─ plain:     per-parameter hooks fill buckets -> async reduce per bucket -> wait at the end
      └─ pipeline:  defer() ... every cell's backward accumulates .grad ... flush(): reduce all, wait
    optimizer.step()  (ZeRO-1 reads each bucket's shard of the mean gradient) -> reset()

The wrapper order rule lives here: a wrapper whose ``parallelize()`` changes which ``Parameter``
objects a model holds calls ``goose_core.metadata.parameters_changed(model)`` at its end, and
the sync re-buckets over the model's trainable parameters (:meth:`GradSync.track`); once ZeRO-1
has taken it over (:meth:`GradSync.shard`) that is refused, so the optimizer comes last.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Callable, Hashable

import torch
from torch import nn

__all__ = ["GradSync"]


class GradSync(ABC):
    """Averages the gradients of some parameters over the data-parallel group.

    Attributes:
        reduce_dtype: the dtype of the reduction buffers (what gradients are summed in over the
            group, and ZeRO-1's shards live in); ``None``: each parameter's own dtype.
    """

    reduce_dtype: torch.dtype | None = None

    @property
    @abstractmethod
    def params(self) -> list[nn.Parameter]:
        """Every parameter whose gradient this averages."""

    @property
    @abstractmethod
    def reduced(self) -> bool:
        """Whether a backward pass has reduced every gradient since the last :meth:`reset`."""

    @abstractmethod
    def defer(self) -> None:
        """Hold every reduction until :meth:`flush`: the caller's backward accumulates a
        parameter's gradient several times (a hook would fire before it is complete)."""

    @abstractmethod
    def flush(self) -> None:
        """Reduce every gradient the deferred backward produced, and wait for it."""

    @abstractmethod
    def reset(self) -> None:
        """The optimizer consumed the reduced gradients: the next backward starts afresh."""

    @abstractmethod
    def no_sync(self) -> AbstractContextManager[None]:
        """Inside, gradients accumulate locally and nothing is communicated."""

    @abstractmethod
    def track(self, model: nn.Module) -> None:
        """Average ``model``'s trainable parameters from now on (a later wrapper replaced or
        dropped some). Local: every dp rank holds the same parameters, so all build the same
        buckets.

        Raises:
            ValueError: ZeRO-1 already took this over (build the optimizer after the last wrapper).
        """

    @abstractmethod
    def shard(self, param_lists: list[list[nn.Parameter]],
              key: Callable[[nn.Parameter], Hashable]) -> list[Any]:
        """ZeRO-1 takes over: one run of buckets per list (kept apart by ``key`` too), and every
        backward reduce-scatters, each rank keeping its shard of each bucket's mean gradient.

        Returns:
            the buckets (``goose_core.data_parallel.Bucket``: typed loosely here, so that this
            interface imports nothing of goose), whose ``shard_grad`` holds this rank's shard
            after a backward.
        """
