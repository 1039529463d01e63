"""BatchStream: a TextData part served as an endless, seeded, resumable stream of global batches.

The windows of one part are read epoch after epoch, each epoch in its own seeded order; a batch
takes the next ``batch_size`` windows of that endless sequence, across an epoch's end if it
must::

    epoch 0 order   5 2 7 0 | 3 6 1 4          8 windows, batch_size 3
    epoch 1 order   1 6 0 3 | 7 2 4 5
    batches         [5 2 7] [0 3 6] [1 4 | 1] [6 0 3] ...
    position        (epoch, index): windows taken in the current epoch

So a batch depends only on the data, ``seed`` and the position: every rank of every layout
draws the same global batch (tensor-parallel peers and pipeline stages included), and each
data-parallel rank keeps its ``shard_batch`` slice. The position is the whole state: saved
with a checkpoint, it resumes the same stream at any layout, and even at another batch size
(the windows keep coming in the same order). The orders come from Python's ``random`` seeded by a
string, whose output Python keeps stable across versions and platforms.
"""

from __future__ import annotations

import random
from typing import Any

from torch import Tensor

from goose_core.data.packing import SPLITS, TextData

__all__ = ["BatchStream"]

Batch = dict[str, Tensor]

_STATE_KEYS = ("epoch", "index", "seed", "windows", "fingerprint")


class BatchStream:
    """Endless global batches ``{"input_ids", "labels"}`` (int64 ``[batch_size, seq_len]``, equal).

    Args:
        data: the packed windows.
        batch_size: windows per global batch (the sum over data-parallel ranks).
        seed: orders each epoch (independent of the seed that split the data).
        split: ``"train"`` or ``"eval"``.

    Raises:
        ValueError: an unknown split, a batch size below 1, or a part with fewer windows than
            ``batch_size``.
    """

    def __init__(self, data: TextData, batch_size: int, seed: int = 0, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r} must be a positive integer")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed {seed!r} must be an integer")
        self.windows: Tensor = data.split(split)
        if len(self.windows) < batch_size:
            more = "raise eval_fraction, " if split == "eval" else ""
            raise ValueError(f"{data.named_files()}: the {split} part holds {len(self.windows)} windows of {data.seq_len} tokens, fewer "
                             f"than the batch size {batch_size}; {more}give more text, or lower seq_len or the "
                             "batch size")
        self.batch_size, self.seed, self.split = batch_size, seed, split
        # The fingerprint is JSON-exact as an int below 2**52 (13 hex digits).
        self._fingerprint = int(data.fingerprint(split)[:13], 16)
        self.epoch, self.index = 0, 0
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        """The windows of ``epoch`` in the order the stream reads them."""
        if self._order is None or self._order[0] != epoch:
            indices = list(range(len(self.windows)))
            random.Random(f"goose-stream:{self.seed}:{epoch}").shuffle(indices)
            self._order = (epoch, indices)
        return self._order[1]

    def next(self) -> Batch:
        """The next global batch; the position moves on by ``batch_size`` windows."""
        rows: list[int] = []
        while len(rows) < self.batch_size:
            taken = self.order(self.epoch)[self.index : self.index + self.batch_size - len(rows)]
            rows += taken
            self.index += len(taken)
            if self.index == len(self.windows):
                self.epoch, self.index = self.epoch + 1, 0
        ids = self.windows[rows]
        return {"input_ids": ids, "labels": ids.clone()}

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        return self.next()

    def state_dict(self) -> dict[str, int]:
        """The position and what it is valid for: small ints, JSON-serialisable, layout-free."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "windows": len(self.windows),
                "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position.

        Raises:
            ValueError: a malformed state, or one saved for other data (windows, fingerprint) or
                another seed: the continuation would not be the saved stream's.
        """
        missing = [k for k in _STATE_KEYS if not isinstance(state.get(k), int) or isinstance(state.get(k), bool)]
        if missing:
            raise ValueError(f"not a BatchStream state: {missing} missing or not integers in {state!r}")
        if state["windows"] != len(self.windows) or state["fingerprint"] != self._fingerprint:
            raise ValueError(f"the saved stream read {state['windows']} {self.split} windows (fingerprint "
                             f"{state['fingerprint']:x}), this data has {len(self.windows)} ({self._fingerprint:x}): "
                             "the data files, tokenizer, seq_len or eval_fraction differ from the saved run's; "
                             "use the same ones to resume, or start a new run")
        if state["seed"] != self.seed:
            raise ValueError(f"the saved stream has seed {state['seed']}, this one {self.seed}; "
                             f"resume with seed {state['seed']}")
        if state["epoch"] < 0 or not 0 <= state["index"] < len(self.windows):
            raise ValueError(f"position epoch {state['epoch']}, index {state['index']} lies outside "
                             f"{len(self.windows)} windows")
        self.epoch, self.index = state["epoch"], state["index"]
