"""Dispatch and combine: a MoE layer's tokens go to the ranks that hold their experts and come back weighted.

After the family's own router chose each token's top-k experts and weights (on every rank, for
its own tokens), one MoE layer under expert parallelism (E ranks, N experts, N/E per rank)::

    router ─► (token, k) pairs sorted by expert = by destination rank      permute
          ─► counts per (rank, local expert) exchanged                      all_to_all (E x N/E ints)
          ─► rows sent, uneven splits                                       all_to_all (k x T x H)
          ─► the rank's experts: 🤗's own forward on its N/E experts        compute
          ─► rows sent back along the same pairs                            all_to_all (k x T x H)
          ─► each row times its routing weight, added to its token          combine (index_add)

No row is dropped or padded: every rank sends exactly the rows its router chose, k per token.
The combine adds a token's k rows in expert order, as 🤗's loop over experts does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.distributed.all_to_all import all_to_all

__all__ = ["Routes", "destinations", "dispatch"]

#: 🤗's experts forward on this rank's experts: (rows, local expert of each row [R, 1], weights [R, 1]).
LocalExperts = Callable[[Tensor, Tensor, Tensor], Tensor]


def destinations(top_k_index: Tensor) -> Tensor:
    """The expert of each (token, k) pair, flat: the key the rows are sorted by (expert ``e``
    lives on rank ``e // (N/E)``, so sorting by expert sorts by destination rank too)."""
    return top_k_index.reshape(-1)


@dataclass
class Routes:
    """Where this rank's rows go and where the rows it computes come from, for one layer."""

    order: Tensor         # [T*k] positions of the flat (token, k) pairs, sorted by expert
    token_of: Tensor      # [T*k] the token of each sorted row
    send_counts: list[int]  # rows to each EP rank
    recv_counts: list[int]  # rows from each EP rank
    local_expert: Tensor  # [R] this rank's expert (0 .. N/E - 1) of each row received
    received: Tensor      # [E, N/E] rows from each EP rank for each local expert: the load

    @classmethod
    def plan(cls, top_k_index: Tensor, num_experts: int, group: dist.ProcessGroup) -> Routes:
        """Sort the pairs by expert and exchange the counts per (rank, local expert)."""
        size = dist.get_world_size(group)
        local = num_experts // size
        experts = destinations(top_k_index)
        order = torch.argsort(experts, stable=True)
        per_expert = torch.bincount(experts, minlength=num_experts).to(torch.int64)
        received = torch.empty_like(per_expert)
        dist.all_to_all_single(received, per_expert, group=group)  # [source rank x local expert]
        received = received.view(size, local)
        local_expert = torch.arange(local, device=received.device).repeat(size)
        return cls(order, order // top_k_index.shape[-1], per_expert.view(size, local).sum(1).tolist(),
                   received.sum(1).tolist(), local_expert.repeat_interleave(received.reshape(-1)), received)


def dispatch(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, num_experts: int,
             experts: LocalExperts, group: dist.ProcessGroup,
             on_routes: Callable[[Routes], None] | None = None) -> Tensor:
    """What 🤗's experts forward returns on one device (``[T, H]``: each token's sum of its k
    experts' outputs times their weights), with the experts spread over ``group``; ``on_routes``
    sees the layer's :class:`Routes` (the load per expert)."""
    routes = Routes.plan(top_k_index, num_experts, group)
    if on_routes is not None:
        on_routes(routes)
    rows = all_to_all(hidden[routes.token_of], group, (0, routes.send_counts), (0, routes.recv_counts))
    ones = torch.ones(rows.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    computed = experts(rows, routes.local_expert.unsqueeze(1), ones)  # weighted on return, below
    back = all_to_all(computed, group, (0, routes.recv_counts), (0, routes.send_counts), anchor=rows)
    weights = top_k_weights.reshape(-1)[routes.order].unsqueeze(1)
    weighted = (back * weights).to(hidden.dtype)
    return torch.zeros_like(hidden).index_add(0, routes.token_of, weighted)
