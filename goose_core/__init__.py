"""goose: 3D-parallel (tensor x pipeline x data) training of Hugging Face causal LMs."""

from goose_core.distributed import ParallelContext, RankError, spawn
from goose_core.state import full_state_dict

__all__ = ["ParallelContext", "RankError", "full_state_dict", "spawn"]
__version__ = "0.1.0"
