"""The learning rate of every step: linear warmup, then cosine decay to ``min_lr``.

::

    lr |    ____
       |   /    ‾‾--__
       |  /           ‾-_
       | /               ‾-__ min_lr
       +------------------------ step
         warmup          steps

A pure function of the step, so a resumed run needs no scheduler state to continue exactly.
"""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, lr: float, steps: int, warmup: int = 0, min_lr: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based) of a ``steps``-step run."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))
