"""goose: 3D-parallel (tensor x pipeline x data) training of Hugging Face causal LMs."""

from goose_core.amp import GradScaler
from goose_core.checkpoint import export_pretrained, load_checkpoint, save_checkpoint
from goose_core.data_parallel import DataParallel
from goose_core.distributed import ParallelContext, RankError, spawn
from goose_core.finite import NonFiniteError
from goose_core.optim import DistributedOptimizer, MasterWeights, clip_grad_norm_
from goose_core.pipeline import PipelineParallel
from goose_core.state import full_state_dict
from goose_core.tensor_parallel import TensorParallel

__all__ = ["DataParallel", "DistributedOptimizer", "GradScaler", "MasterWeights", "NonFiniteError", "ParallelContext",
           "PipelineParallel", "RankError", "TensorParallel", "clip_grad_norm_", "export_pretrained", "full_state_dict", "load_checkpoint",
           "save_checkpoint", "spawn"]
__version__ = "0.1.0"
