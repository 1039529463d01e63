"""Layout: what ``goose plan`` is asked for, by ``goose train``'s flag names, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from goose_core.engine.block_recompute import BLOCK_MODES, RECOMPUTE_MODES
from goose_core.engine.schedule import SCHEDULES, Schedule, schedule_named

__all__ = ["Layout", "DTYPES", "RECOMPUTE"]

#: The recompute modes the plan models: every one a pipeline takes (cell and block modes).
RECOMPUTE = RECOMPUTE_MODES
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Layout:
    """What ``goose train`` is asked for (its flags' names); ``zero`` is the ZeRO stage, 0-3."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    microbatches: int = 1
    batch_size: int = 8
    seq_len: int = 64
    dtype: str = "float32"
    zero: int = 0
    schedule: str = "gpipe"
    recompute: str = "never"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def check(self) -> None:
        """Raise ValueError naming the first bad value and the fix."""
        for name in ("tp", "pp", "dp", "microbatches", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {sorted(DTYPES)}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"--recompute {self.recompute!r}: goose plan models {', '.join(RECOMPUTE)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.pp > 1:
            schedule = self.pipeline_schedule()  # its own conditions on M (its message names the fix)
            if schedule.split_backward and self.recompute in BLOCK_MODES:
                # the engine runs it, but each cell's W replays its blocks a second time: the
                # plan counts one replay (its trace's)
                raise ValueError(f"--recompute {self.recompute} under --schedule {self.schedule} (a split "
                                 f"backward: each cell's W replays its blocks a second time) is not planned: use "
                                 f"--schedule 1f1b or --recompute always / except_last / never")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"--zero {self.zero!r}: 0 (plain data parallelism), 1, 2 or 3")
        if self.zero and self.dp == 1:
            raise ValueError(f"--zero {self.zero} at --dp 1 shards nothing and goose plan does not model it: "
                             f"drop --zero or raise --dp")
        if self.batch_size % (self.dp * self.microbatches):
            raise ValueError(f"--batch-size {self.batch_size} does not split into --dp {self.dp} x "
                             f"--microbatches {self.microbatches}: make it a multiple of {self.dp * self.microbatches}")

    def pipeline_schedule(self) -> Schedule:
        """The schedule over ``pp`` x its chunks per rank (ValueError: M does not suit it)."""
        cls = schedule_named(self.schedule)
        return cls(self.microbatches, self.pp * cls.virtual_stages)
