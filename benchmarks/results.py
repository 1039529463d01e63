"""Benchmark records: append to results.json, render a readable table."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["Record", "RESULTS_JSON", "RESULTS_MD", "RESULTS_PNG", "append", "table", "latest", "plot"]

RESULTS_JSON = Path(__file__).with_name("results.json")
RESULTS_MD = Path(__file__).with_name("results.md")
RESULTS_PNG = Path(__file__).with_name("results.png")


@dataclass
class Record:
    """One measurement of goose and its peer. ``ratio`` = goose / peer (lower is better for times)."""

    benchmark: str
    metric: str
    goose: float
    peer: float
    peer_name: str
    unit: str = "s"

    @property
    def ratio(self) -> float:
        return self.goose / self.peer if self.peer else float("nan")


def _environment() -> dict[str, str]:
    return {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def _history() -> list[dict]:
    return json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []


def latest() -> list[Record]:
    """Every record of each benchmark's newest run in results.json (renamed metrics drop out)."""
    rows = _history()
    newest = {row["benchmark"]: row["when"] for row in rows}
    for row in rows:
        newest[row["benchmark"]] = max(newest[row["benchmark"]], row["when"])
    fields = Record.__dataclass_fields__
    return [Record(**{k: v for k, v in row.items() if k in fields}) for row in rows
            if row["when"] == newest[row["benchmark"]]]


def append(records: list[Record]) -> None:
    """Append ``records`` (with the environment they ran in) to results.json."""
    history = _history()
    env = _environment()
    history += [{**asdict(r), "ratio": r.ratio, **env} for r in records]
    RESULTS_JSON.write_text(json.dumps(history, indent=1) + "\n")


def table(records: list[Record]) -> str:
    """A Markdown table of ``records``."""
    rows = ["| benchmark | metric | goose | peer | peer is | goose / peer |", "|---|---|---|---|---|---|"]
    rows += [f"| {r.benchmark} | {r.metric} | {r.goose:.4g} {r.unit} | {r.peer:.4g} {r.unit} | "
             f"{r.peer_name} | {r.ratio:.3f} |" for r in records]
    return "\n".join(rows)


def plot(records: list[Record], path: Path) -> None:
    """A horizontal bar chart of goose / peer ratios (1.0 = parity) saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.benchmark}: {r.metric[:48]}" for r in records]
    ratios = [r.ratio for r in records]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(records) + 1.2))
    ax.barh(labels, ratios, color=["tab:green" if x <= 1 else "tab:red" for x in ratios])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("goose / peer (lower is better for times and bytes)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
