"""What a wrapping optimizer (ZeRO-1, master weights) shares: the torch.optim surface, delegated."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

__all__ = ["OptimizerWrapper"]

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
