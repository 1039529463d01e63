"""Sharded training checkpoints (DCP) that resume bit-exactly and reshard, and export to 🤗.

Not to be confused with :mod:`goose_core.engine.recompute`, which is *activation*
checkpointing (recomputing a stage's forward during backward to save memory). This package saves
and loads a run's state on disk: :func:`save_checkpoint`, :func:`load_checkpoint`, and
:func:`export_pretrained` for a plain ``save_pretrained`` folder.
"""

from goose_core.checkpoint.export import export_pretrained, is_split
from goose_core.checkpoint.io import load_checkpoint, save_checkpoint

__all__ = ["export_pretrained", "is_split", "load_checkpoint", "save_checkpoint"]
