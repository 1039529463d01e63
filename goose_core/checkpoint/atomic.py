"""Atomic checkpoint folders: write beside the target, then rename; a crash leaves the last one.

::

    save:   path.saving/  <- every rank writes (DCP), the metadata file last
            path -> path.old, path.saving -> path, remove path.old       (rank 0, renames)
    crash while writing:         path is untouched; path.saving is garbage (the next save clears it)
    crash between the renames:   path is gone, path.old is complete: load finds it there

A rename within one folder is atomic on POSIX file systems, so ``path`` is only ever absent or
complete. Every rank must see the same file system (as DCP's FileSystemWriter requires).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["METADATA", "staging", "old", "clear", "publish", "complete"]

#: The file DCP writes last (its metadata): a folder without it is not a checkpoint.
METADATA = ".metadata"


def staging(path: Path) -> Path:
    """Where a save writes before it is published."""
    return path.with_name(path.name + ".saving")


def old(path: Path) -> Path:
    """Where the previous checkpoint waits while the new one takes its name."""
    return path.with_name(path.name + ".old")


def clear(folder: Path) -> None:
    """Remove ``folder`` if it is there (a leftover of a crashed save)."""
    if folder.exists():
        shutil.rmtree(folder)


def publish(path: Path) -> None:
    """Give the staged checkpoint the name ``path`` (on one rank, after every rank wrote)."""
    if path.exists():
        clear(old(path))
        os.replace(path, old(path))
    os.replace(staging(path), path)
    clear(old(path))


def complete(path: Path) -> Path:
    """The complete checkpoint saved at ``path``: itself, or the previous one if a save died
    between its two renames.

    Raises:
        FileNotFoundError: neither holds a checkpoint.
    """
    for candidate in (path, old(path)):
        if (candidate / METADATA).is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint at {path} (no {METADATA} file there or in {old(path)}); "
                            f"give the path that save_checkpoint wrote")
