"""What a person watches, on rank 0: the progress bar, the JSONL log, TensorBoard, the loss PNG."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = ["Progress", "JsonlLog", "Board", "memory_mb", "read_jsonl", "draw_losses"]


def memory_mb(device: torch.device) -> float:
    """Peak memory: the CUDA allocator's on a GPU, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class Progress:
    """Steps, loss, tokens/s and ETA: a tqdm bar on a terminal, a plain line per step elsewhere
    (a pipe or a log file keeps every line readable)."""

    def __init__(self, first: int, total: int, stream: TextIO = sys.stdout) -> None:
        self.first, self.total, self.stream = first, total, stream
        self.start = time.perf_counter()
        self.bar: Any = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=first, file=stream, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, note: str = "") -> None:
        """After step ``step`` (1-based) of ``total``."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s{note}", refresh=False)
            self.bar.update(1)
            return
        per_step = (time.perf_counter() - self.start) / max(1, step - self.first)
        width = len(str(self.total))
        self.stream.write(f"step {step:>{width}}/{self.total}  loss {loss:.6f}  {tokens_per_s:,.0f} tok/s  "
                          f"ETA {per_step * (self.total - step):.0f}s{note}\n")
        self.stream.flush()

    def write(self, text: str) -> None:
        """A line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every object of a JSONL log (an unfinished last line, from a killed run, is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class JsonlLog:
    """One JSON object per step appended to ``path``. A resumed run first drops the records past
    the step it resumes at (the killed run's steps that the checkpoint does not hold), so the log
    reads as one run: each step once, in order."""

    def __init__(self, path: str | Path, resumed_at: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resumed_at] if self.path.exists() else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")  # floats as repr: they read back bit for bit
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Board:
    """TensorBoard scalars under ``train/`` and ``eval/``; a resumed run purges the steps after
    its checkpoint so the curves do not fold back."""

    def __init__(self, log_dir: str | Path, resumed_at: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(f"--tensorboard needs the tensorboard package ({err}); install it with "
                              f"pip install 'goose[tensorboard]' or leave --tensorboard out") from None

        self.writer = SummaryWriter(str(log_dir), purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def draw_losses(train: list[tuple[int, float]], evals: list[tuple[int, float]], path: str | Path,
                title: str, resumed_at: list[int] = ()) -> Path:  # type: ignore[assignment]
    """The loss curve (and the eval losses) as a PNG; a dotted line where a run resumed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), "-", label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o--", label="eval loss")
    for step in resumed_at:
        ax.axvline(step + 0.5, color="grey", linestyle=":", label=f"resumed after step {step}")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
