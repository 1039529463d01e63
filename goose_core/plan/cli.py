"""``goose plan`` (also ``python -m goose_core.plan``): each rank's predicted figures for a layout,
as a table or ``--json``; with ``--hardware``, step time and MFU; ``--search`` the layouts of
``--world`` ranks that fit the memory, fastest first."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any, Sequence

from goose_core.instruments.accounting import format_table
from goose_core.plan.hardware import PRESETS, Hardware, held_bytes, mfu, step_time
from goose_core.engine.schedule import SCHEDULES
from goose_core.plan.predictor import DTYPES, RECOMPUTE, Layout, model_config, predict

__all__ = ["build_parser", "plan_main", "search"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goose plan", description="Predict each rank's memory, FLOPs and traffic "
                                "for a layout, without running the model (flags as goose train's).")
    p.add_argument("--model", default="llama", help="a family (llama, gpt2, bloom) or a local 🤗 folder")
    for name, default in (("tp", 1), ("pp", 1), ("dp", 1), ("microbatches", 1), ("batch-size", 8), ("seq-len", 64)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--zero", type=int, nargs="?", const=1, default=0, choices=(0, 1, 2, 3),
                   help="ZeRO stage (--zero alone: 1, as goose train's flag)")
    p.add_argument("--schedule", default="gpipe", help=f"pipeline schedule: {', '.join(SCHEDULES)}")
    p.add_argument("--recompute", default="never", help=f"pipeline stages: {', '.join(RECOMPUTE)}")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per rank")
    p.add_argument("--hardware", choices=sorted(PRESETS), help="predict step time and MFU on this GPU")
    p.add_argument("--peak-tflops", type=float, help="override the preset's peak (TFLOP/s)")
    p.add_argument("--memory-gb", type=float, help="override the preset's memory (GB)")
    p.add_argument("--search", action="store_true",
                   help="list the tp x pp x dp layouts of --world ranks that fit the memory, fastest first")
    p.add_argument("--world", type=int, default=0, help="ranks for --search (default tp x pp x dp)")
    return p


def _hardware(args: argparse.Namespace) -> Hardware | None:
    if args.hardware is None:
        return None
    hw = PRESETS[args.hardware]
    return Hardware(peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else hw.peak_flops,
                    memory_bytes=args.memory_gb * 1e9 if args.memory_gb else hw.memory_bytes,
                    tp_link=hw.tp_link, link=hw.link)


def search(config: Any, base: Layout, world: int, hw: Hardware) -> list[dict[str, Any]]:
    """Every tp x pp x dp split of ``world`` and ZeRO stage (0 where dp = 1) whose largest rank
    fits ``hw``'s memory, fastest first (at pp > 1 with one micro-batch asked for, pp of them)."""
    found = []
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    for tp, pp in ((tp, pp) for tp in divisors for pp in divisors if world % (tp * pp) == 0):
        dp = world // (tp * pp)
        micro = base.microbatches if pp == 1 or base.microbatches > 1 else pp
        for zero in ((0, 1, 2, 3) if dp > 1 else (0,)):  # ZeRO shards over dp
            layout = replace(base, tp=tp, pp=pp, dp=dp, zero=zero, microbatches=micro)
            try:
                layout.check()
                ranks = [r.as_json() for r in predict(config, layout)]
            except ValueError:
                continue  # a size that does not split (heads, batch): not a layout
            peak = max(held_bytes(r) for r in ranks)
            step = step_time(ranks, hw, pp, micro)
            if peak <= hw.memory_bytes and step is not None:
                found.append({"tp": tp, "pp": pp, "dp": dp, "zero": zero, "microbatches": micro,
                              "peak_bytes": peak, "step_s": step, "mfu": mfu(ranks, hw, pp, micro)})
    return sorted(found, key=lambda f: f["step_s"])


def plan_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout(tp=args.tp, pp=args.pp, dp=args.dp, microbatches=args.microbatches, batch_size=args.batch_size,
                    seq_len=args.seq_len, dtype=args.dtype, zero=args.zero, schedule=args.schedule,
                    recompute=args.recompute)
    try:
        layout.check()
        config = model_config(args.model, args.seq_len)
    except ValueError as err:
        print(f"goose plan: {err}", file=sys.stderr)
        return 2
    hw = _hardware(args)
    if args.search:
        if hw is None:
            print("goose plan: --search needs --hardware (its memory is the budget)", file=sys.stderr)
            return 2
        found = search(config, layout, args.world or layout.world, hw)
        print(json.dumps(found, indent=1) if args.json else "\n".join(
            f"tp{f['tp']} pp{f['pp']} dp{f['dp']} zero{f['zero']} M{f['microbatches']}: peak "
            f"{f['peak_bytes'] / 2**30:.2f} GiB, step {f['step_s'] * 1e3:.2f} ms, MFU {f['mfu']:.1%}"
            for f in found) or "no layout fits")
        return 0
    ranks = [r.as_json() for r in predict(config, layout)]
    if args.json:
        print(json.dumps(ranks))
        return 0
    print(format_table(ranks))
    if hw is not None:
        step = step_time(ranks, hw, layout.pp, layout.microbatches)
        print(f"peak held {max(held_bytes(r) for r in ranks) / 2**30:.3f} GiB of {hw.memory_bytes / 2**30:.1f}; "
              f"step >= {step * 1e3:.3f} ms (roofline, no overlap), MFU <= "
              f"{mfu(ranks, hw, layout.pp, layout.microbatches):.1%}")
    return 0
