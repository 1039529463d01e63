"""The RNG tracker: one random stream shared by the tp group, one of its own per tp rank.

Dropout must follow the data it masks::

    replicated activations (every tp rank holds the same tensor)  -> the same mask everywhere,
        else the "replicas" drift apart and the model is no longer one model;
    split activations (each rank holds its own heads / columns)   -> a different mask per rank,
        else every rank drops the same positions of *different* heads: correlated, not random.

The replicated stream is torch's default generator: every rank seeds it identically (the
ParallelContext and the seeded model build do) and every rank consumes it identically. The split
stream is a private generator state seeded from ``(seed, tp_rank)``. Inside a parallel region
(between a column-parallel layer and its row-parallel partner) the tracker swaps the split state
into the default generator, so unmodified HF code (``F.dropout``, ``nn.Dropout``) draws from it;
leaving the region swaps it back. Megatron calls the same idea ``get_cuda_rng_tracker().fork()``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["RNGTracker", "SPLIT_SEED_OFFSET"]

#: Added to the seed for the split streams, so they never coincide with the replicated one
#: (Megatron uses the same constant).
SPLIT_SEED_OFFSET = 2718


def _get_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _seeded_state(seed: int, device: torch.device) -> Tensor:
    return torch.Generator(device=device).manual_seed(seed).get_state()


class RNGTracker:
    """Swaps the split (per tp rank) stream in and out of the default generator.

    Args:
        seed: the run's seed; the split stream of tp rank r starts from ``seed + 2718 + r``.
        tp_rank: this rank's index in its tensor-parallel group.
        device: whose generator to swap (CPU, or a CUDA device).
    """

    def __init__(self, seed: int, tp_rank: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._split = _seeded_state(seed + SPLIT_SEED_OFFSET + tp_rank, self.device)
        self._replicated: Tensor | None = None

    @property
    def in_split_region(self) -> bool:
        return self._replicated is not None

    def enter(self) -> None:
        """Draw from the split stream from now on (idempotent: q, k and v all enter)."""
        if self._replicated is None:
            self._replicated = _get_state(self.device)
            _set_state(self._split, self.device)

    def leave(self) -> None:
        """Back to the replicated stream; the split stream keeps its position for next time."""
        if self._replicated is not None:
            self._split = _get_state(self.device)
            _set_state(self._replicated, self.device)
            self._replicated = None

    @contextmanager
    def fork(self) -> Iterator[None]:
        """``with tracker.fork():`` runs its body on the split stream (Megatron's name)."""
        outer = self.in_split_region
        self.enter()
        try:
            yield
        finally:
            if not outer:
                self.leave()
