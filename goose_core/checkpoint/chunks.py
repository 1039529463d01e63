"""Where a rank's tensors sit in the full (single-device) tensors: the pieces a checkpoint stores.

A checkpoint stores every tensor under its full name and full shape; each rank writes the pieces
it holds at their global offsets, and reads back whatever overlaps the pieces it holds now, so
a checkpoint saved at one (tp, pp, dp) loads at any other. A tensor-parallel shard is one piece,
or ``blocks`` pieces for a fused parameter (GPT-2's ``c_attn`` is q|k|v, each split separately)::

    full c_attn.weight (dim 1)   [ q0 q1 | k0 k1 | v0 v1 ]      tp=2
    tp rank 0 holds               [ q0 | k0 | v0 ]  ->  3 pieces at offsets 0, 2p, 4p
    tp rank 1 holds               [ q1 | k1 | v1 ]  ->  3 pieces at offsets p, 3p, 5p

An expert-parallel rank's experts (``ExpertParallel``) are one piece of the stacked experts,
at row ``ep_rank x N/E`` of dimension 0, so a checkpoint saved at one E loads at any other.

Ranks holding the same piece (data-parallel replicas, GQA's kv replicas, a tied weight on the
first and the last stage) write it once: DCP keeps one copy of equal (name, offset) pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from goose_core.metadata import ShardSpec

__all__ = ["Pieces", "expert_piece", "pieces_of", "whole"]


@dataclass
class Pieces:
    """A tensor of ``size`` of which this rank holds ``tensors[i]`` at ``offsets[i]``.

    The pieces are views of ``local`` (this rank's tensor, often a parameter): a load copies
    into them in place.
    """

    local: Tensor
    size: torch.Size
    offsets: list[torch.Size]
    tensors: list[Tensor]

    def at(self, offset: torch.Size) -> Tensor:
        """The piece starting at ``offset``."""
        for o, t in zip(self.offsets, self.tensors):
            if o == offset:
                return t
        raise KeyError(f"no piece at offset {tuple(offset)} (pieces at {[tuple(o) for o in self.offsets]})")


def whole(tensor: Tensor) -> Pieces:
    """A tensor every rank holds whole (or holds alone): one piece at the origin."""
    return Pieces(tensor, tensor.shape, [torch.Size([0] * tensor.dim())], [tensor])


def expert_piece(local: Tensor, ep_size: int, ep_rank: int) -> Pieces:
    """``local`` (EP rank ``ep_rank``'s rows of stacked experts) as the piece of all of them."""
    size = torch.Size([local.shape[0] * ep_size, *local.shape[1:]])
    offset = torch.Size([local.shape[0] * ep_rank] + [0] * (local.dim() - 1))
    return Pieces(local, size, [offset], [local])


def pieces_of(local: Tensor, spec: ShardSpec | None, tp_size: int, tp_rank: int) -> Pieces:
    """``local`` (this tp rank's shard, cut as ``spec`` says) as pieces of the full tensor."""
    if spec is None:
        return whole(local)
    distinct = tp_size // spec.replicas        # ranks 2k and 2k+1 share a shard at replicas=2
    shard = tp_rank // spec.replicas
    size = list(local.shape)
    size[spec.dim] *= distinct
    block = size[spec.dim] // spec.blocks      # one fused block of the full tensor
    piece = local.shape[spec.dim] // spec.blocks
    offsets, tensors = [], []
    for b, t in enumerate(local.chunk(spec.blocks, dim=spec.dim)):
        offset = [0] * local.dim()
        offset[spec.dim] = b * block + shard * piece
        offsets.append(torch.Size(offset))
        tensors.append(t)
    return Pieces(local, torch.Size(size), offsets, tensors)
