"""goose: 3D-parallel (tensor x pipeline x data) training of Hugging Face causal LMs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from goose_core.amp import GradScaler
    from goose_core.checkpoint import export_pretrained, load_checkpoint, save_checkpoint
    from goose_core.compile import compile_blocks
    from goose_core.context_parallel import ContextParallel
    from goose_core.data_parallel import DataParallel
    from goose_core.distributed import ParallelContext, RankError, spawn
    from goose_core.finite import NonFiniteError
    from goose_core.optim import DistributedOptimizer, MasterWeights, clip_grad_norm_
    from goose_core.pipeline import PipelineParallel
    from goose_core.state import full_state_dict
    from goose_core.tensor_parallel import TensorParallel

#: Each public name -> the package that defines it. A name loads its package on first use, so
#: importing one part of goose (the pipeline engine, say) loads neither the others nor 🤗 transformers.
_HOMES = {
    "ContextParallel": "goose_core.context_parallel",
    "DataParallel": "goose_core.data_parallel",
    "DistributedOptimizer": "goose_core.optim",
    "GradScaler": "goose_core.amp",
    "MasterWeights": "goose_core.optim",
    "NonFiniteError": "goose_core.finite",
    "ParallelContext": "goose_core.distributed",
    "PipelineParallel": "goose_core.pipeline",
    "RankError": "goose_core.distributed",
    "TensorParallel": "goose_core.tensor_parallel",
    "clip_grad_norm_": "goose_core.optim",
    "compile_blocks": "goose_core.compile",
    "export_pretrained": "goose_core.checkpoint",
    "full_state_dict": "goose_core.state",
    "load_checkpoint": "goose_core.checkpoint",
    "save_checkpoint": "goose_core.checkpoint",
    "spawn": "goose_core.distributed",
}

__all__ = sorted(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
