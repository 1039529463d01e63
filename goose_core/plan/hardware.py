"""Step time and MFU from a plan and a hardware description, and the search over layouts.

The model is a roofline with no overlap (an upper bound on the step time)::

    busy = max over ranks ( FLOPs / peak  +  sent_tp / tp_link  +  (sent_pp + sent_dp) / link )
    step = busy x (M + p - 1) / M          the pipeline's bubble (GPipe and 1F1B alike)
    MFU  = sum over ranks of FLOPs / (world x peak x step)

Presets: dense bf16 tensor-core peaks and NVLink / InfiniBand per-GPU bandwidths (one direction)
from the vendors' data sheets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Hardware", "PRESETS", "step_time", "mfu", "held_bytes"]


@dataclass(frozen=True)
class Hardware:
    """Peak FLOP/s, memory bytes, and link bandwidths in bytes/s (tp inside a node, the rest across)."""

    peak_flops: float
    memory_bytes: float
    tp_link: float
    link: float


PRESETS = {
    "h100": Hardware(peak_flops=989e12, memory_bytes=80e9, tp_link=450e9, link=50e9),
    "h200": Hardware(peak_flops=989e12, memory_bytes=141e9, tp_link=450e9, link=50e9),
}


def held_bytes(rank: dict[str, Any]) -> int:
    """A planned rank's bytes at its peak: state plus saved activations (0 where not predicted)."""
    return sum(rank[k] or 0 for k in ("params_bytes", "grads_bytes", "masters_bytes", "optimizer_bytes",
                                      "activations_peak_bytes"))


def step_time(ranks: list[dict[str, Any]], hw: Hardware, pp: int = 1, microbatches: int = 1) -> float | None:
    """Seconds per step (None where a rank's FLOPs are not predicted)."""
    if any(r["flops_per_step"] is None for r in ranks):
        return None
    def one(r: dict[str, Any]) -> float:
        s = r["sent_bytes"]
        return (r["flops_per_step"] / hw.peak_flops + (s.get("tp") or 0) / hw.tp_link
                + ((s.get("pp") or 0) + (s.get("dp") or 0)) / hw.link)
    return max(one(r) for r in ranks) * (microbatches + pp - 1) / microbatches


def mfu(ranks: list[dict[str, Any]], hw: Hardware, pp: int = 1, microbatches: int = 1) -> float | None:
    """Model FLOPs utilisation of :func:`step_time` (the counted FLOPs: recompute included)."""
    step = step_time(ranks, hw, pp, microbatches)
    if not step:
        return None
    return sum(r["flops_per_step"] for r in ranks) / (len(ranks) * hw.peak_flops * step)
