"""Stage 00's measurements: the memory of one training step, and how far each planted bug lands.

NOTES.md's tables come from here:

    python stages/00_reference/measure.py memory     # bytes of one step, by kind, every tiny model
    python stages/00_reference/measure.py bugs       # tests/test_harness_catches_bugs.py's plants
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from goose_core.testing import TINY_MODELS, TrainSpec, largest_errors, reference_run, run_distributed

__all__ = ["step_memory", "bug_distances"]

ROOT = Path(__file__).resolve().parents[2]


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_memory(spec: TrainSpec) -> dict[str, int]:
    """Bytes of one training step of ``spec``'s model, by kind: parameters, gradients, the
    optimizer's state after its first step, and the activations the forward saves for the backward
    (each storage once, parameters not counted again)."""
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: Tensor) -> Tensor:  # autograd calls this for every tensor it saves for the backward
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(**spec.batch(0)).loss
    loss.backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"parameters": _bytes(model.parameters()), "gradients": _bytes(p.grad for p in model.parameters()),
            "optimizer state": _bytes(state), "activations": sum(saved.values()),
            "count": sum(p.numel() for p in model.parameters())}


def _plants() -> Any:
    path = ROOT / "tests" / "test_harness_catches_bugs.py"
    spec = importlib.util.spec_from_file_location("harness_catches_bugs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PLANTS


def bug_distances() -> list[tuple[str, tuple[int, int, int], bool, tuple[float, float, float]]]:
    """Every planted bug's layout, without and with the bug: its distance from one device (worst rank)."""
    rows = []
    for name, (body, layout, spec) in sorted(_plants().items()):
        reference = reference_run(spec)
        for plant in (False, True):
            found = largest_errors(run_distributed(body, *layout, plant, timeout=120), reference)
            rows.append((name, layout, plant, found))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["memory", "bugs"])
    args = parser.parse_args()
    if args.what == "memory":
        print("| model | dtype | parameters | weights | gradients | AdamW state | activations (8 x 32 tokens) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for dtype in (torch.float32, torch.float64):
            for family in sorted(TINY_MODELS):
                m = step_memory(TrainSpec(family=family, dtype=dtype))
                print(f"| {family} | {str(dtype).replace('torch.', '')} | {m['count']:,} | {m['parameters']:,} B | "
                      f"{m['gradients']:,} B | {m['optimizer state']:,} B | {m['activations']:,} B |")
        return
    print("| planted bug | tp x pp x dp | planted | max param error | max loss error | worst / allowance |")
    print("|---|---|---|---:|---:|---:|")
    for name, (tp, pp, dp), plant, (param, loss, ratio) in bug_distances():
        print(f"| {name} | {tp} x {pp} x {dp} | {'yes' if plant else 'no'} | {param:.1e} | {loss:.1e} | {ratio:.1e} |")


if __name__ == "__main__":
    main()
