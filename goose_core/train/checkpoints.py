"""Checkpoint rotation: ``step_NNNNNNNN`` folders every N steps, the last K kept, the latest
complete one found for ``--resume auto``, and a check that every rank sees the folder.

::

    checkpoint_dir/
      step_00000004/        complete (DCP's .metadata written last, then renamed: atomic.py)
      step_00000006.saving/ a save that died: ignored, cleared by the next save of that step
      step_00000008.old/    a save that died between its renames: still complete, still found
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import torch
import torch.distributed as dist

from goose_core.checkpoint import atomic
from goose_core.distributed.context import ParallelContext

__all__ = ["folder", "complete_checkpoints", "latest", "resume_path", "rotate", "check_shared",
           "NotSharedError"]

_NAME = re.compile(r"^step_(\d{8})(\.old)?$")


class NotSharedError(RuntimeError):
    """Some ranks do not see the checkpoint folder rank 0 writes to."""


def folder(checkpoint_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after ``step`` steps goes."""
    return Path(checkpoint_dir) / f"step_{step:08d}"


def complete_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        step = int(match.group(1))
        try:
            found[step] = atomic.complete(folder(root, step))
        except FileNotFoundError:
            continue  # a save that died before its metadata: not a checkpoint
    return sorted(found.items())


def latest(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(checkpoint_dir)
    return done[-1][1] if done else None


def resume_path(resume: str, checkpoint_dir: str) -> Path | None:
    """What ``--resume`` points at: None (start afresh), the latest complete checkpoint (auto),
    or the given folder (or its complete ``.old`` twin).

    Raises:
        FileNotFoundError: a given folder holds no checkpoint.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return latest(checkpoint_dir) if checkpoint_dir else None
    return atomic.complete(Path(resume))


def rotate(checkpoint_dir: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints (on one rank, after a save);
    returns what it removed."""
    done = complete_checkpoints(checkpoint_dir)
    removed = [path for _, path in done[:-keep]] if keep > 0 else []
    for path in removed:
        atomic.clear(path)
    return removed


def check_shared(checkpoint_dir: str | Path, ctx: ParallelContext) -> None:
    """Refuse, on every rank, a checkpoint folder that some ranks do not see.

    DCP writes each rank's pieces into one folder, and a resume reads them all back: on nodes
    with separate local disks each node would hold a fragment and no checkpoint would ever be
    complete. Rank 0 writes a random token into the folder; every rank reads it back.

    Raises:
        NotSharedError: naming the ranks that do not see the token, and the fix.
    """
    root = Path(checkpoint_dir)
    token = [secrets.token_hex(8) if ctx.rank == 0 else ""]
    probe = root / f".shared-{ctx.world_size}"
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0], encoding="utf-8")
    dist.broadcast_object_list(token, src=0, device=ctx.device)  # after rank 0 wrote: the file is there to read
    try:
        seen = probe.read_text(encoding="utf-8") == token[0]
    except OSError:
        seen = False
    blind = torch.zeros(ctx.world_size, dtype=torch.int64, device=ctx.device)
    blind[ctx.rank] = 0 if seen else 1
    dist.all_reduce(blind)  # every rank learns who is blind
    missing = [r for r, b in enumerate(blind.tolist()) if b]
    if missing:
        raise NotSharedError(f"--checkpoint-dir {str(root)!r} is not shared: ranks {missing} do not see the "
                             f"file rank 0 wrote there ({probe.name}); put checkpoints on a file system every "
                             f"node mounts at the same path (NFS, Lustre, a cloud bucket mount)")
