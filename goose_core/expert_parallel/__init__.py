"""Expert parallelism: a MoE model's experts spread over ranks, tokens routed to them by all-to-all."""

from goose_core.expert_parallel.dispatch import Routes, dispatch
from goose_core.expert_parallel.parallel import (ExpertParallel, expert_load, experts_modules,
                                                 is_expert_parallel)
from goose_core.expert_parallel.router_loss import exact_over_dp, install_router_loss

__all__ = ["ExpertParallel", "Routes", "dispatch", "exact_over_dp", "expert_load", "experts_modules",
           "install_router_loss", "is_expert_parallel"]
