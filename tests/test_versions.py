"""goose at its declared floors: no torch API newer than 2.11, and the ranges pyproject.toml states.

torch 2.11 (the torch of current CUDA images) has ``reduce_scatter_tensor`` and
``all_gather_into_tensor`` but not their 2.13 names ``reduce_scatter_single`` and
``all_gather_single``. The ranks here delete the new names from ``torch.distributed`` before
building anything, then train DataParallel + ZeRO-1 and consolidate its state: equal to the
single-device run, through the old names only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from goose_core import DataParallel, DistributedOptimizer, ParallelContext
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, run_distributed, snapshot, train_loop

ROOT = Path(__file__).resolve().parents[1]
NEW_NAMES = {"reduce_scatter_single": "reduce_scatter_tensor", "all_gather_single": "all_gather_into_tensor"}

# SGD with momentum: its momentum buffers are optimizer state that ZeRO-1 shards and consolidates,
# and SGD checks the gradients themselves at PARALLEL (AdamW would amplify last-bit reorderings).
SPEC = TrainSpec(family="gpt2", steps=3, optimizer="sgd")


def _as_at_the_floor() -> dict[str, int]:
    """Delete torch 2.13's names; count the calls that reach the 2.11 names instead."""
    calls = dict.fromkeys(NEW_NAMES.values(), 0)
    for new, old in NEW_NAMES.items():
        if hasattr(dist, new):
            delattr(dist, new)
        original = getattr(dist, old)

        def counted(*args: Any, _old: str = old, _original: Any = original, **kwargs: Any) -> Any:
            calls[_old] += 1
            return _original(*args, **kwargs)

        setattr(dist, old, counted)
    return calls


def _zero1_at_the_floor(ctx: ParallelContext, spec: TrainSpec, gather: str) -> dict[str, Any]:
    calls = _as_at_the_floor()
    model = DataParallel(spec.build_model(), ctx, bucket_size_mb=0.05).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx, bucket_size_mb=0.05)
    if gather == "all_gather":
        # gloo gathers parameters with broadcasts; claim another backend so the step takes the
        # all-gather path that NCCL runs take (gloo implements that collective too).
        ctx.backend = "all-gather-path"
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size))
    state = optimizer.consolidated_state_dict()  # all-gathers every shard's momentum
    return {"result": RunResult(losses, snapshot(model)), "state": state, "calls": calls,
            "gone": [name for name in NEW_NAMES if hasattr(dist, name)]}


def _single_device(spec: TrainSpec) -> tuple[RunResult, dict[str, Any]]:
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    losses = train_loop(model, optimizer, (spec.batch(s) for s in range(spec.steps)))
    return RunResult(losses, snapshot(model)), optimizer.state_dict()


@pytest.mark.parametrize("gather", ["broadcast", "all_gather"])
def test_zero1_steps_without_torch_2_13_collectives_equal_the_single_device_run(gather: str) -> None:
    reference, reference_state = _single_device(SPEC)
    for rank, out in enumerate(run_distributed(_zero1_at_the_floor, 1, 1, 2, SPEC, gather, timeout=120)):
        assert out["gone"] == [], f"rank {rank}: {out['gone']} still in torch.distributed"
        assert out["calls"]["reduce_scatter_tensor"] >= SPEC.steps, out["calls"]
        assert out["calls"]["all_gather_into_tensor"] >= (1 if gather == "broadcast" else SPEC.steps)
        assert_matches_reference(out["result"], reference, PARALLEL)
        got, want = out["state"]["state"], reference_state["state"]
        assert got.keys() == want.keys()
        assert_matches_reference(RunResult(out["result"].losses, _momenta(got)),
                                 RunResult(reference.losses, _momenta(want)), PARALLEL)


def _momenta(state: dict[int, dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {f"momentum_buffer of parameter {i}": s["momentum_buffer"] for i, s in state.items()}


# -- the declared ranges ------------------------------------------------------------------------

def _requirement(name: str) -> str:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [d for d in deps if re.match(rf"{name}\b", d)]
    assert len(found) == 1, f"pyproject.toml should list {name} once, got {found}"
    return found[0]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"\d+(\.\d+)*", text).group().split("."))  # type: ignore[union-attr]


def _bounds(requirement: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lower = re.search(r">=\s*([\d.]+)", requirement)
    upper = re.search(r"<\s*([\d.]+)", requirement)
    assert lower and upper, f"{requirement!r} should state a floor (>=) and a ceiling (<)"
    return _version(lower.group(1)), _version(upper.group(1))


@pytest.mark.parametrize("name, module", [("torch", torch), ("transformers", None)])
def test_the_installed_versions_are_in_the_declared_range(name: str, module: Any) -> None:
    if module is None:
        import transformers as module
    floor, ceiling = _bounds(_requirement(name))
    installed = _version(module.__version__)
    assert floor <= installed < ceiling, f"{name} {module.__version__} is outside {_requirement(name)}"


def test_the_torch_floor_admits_the_torch_of_cuda_images() -> None:
    floor, _ = _bounds(_requirement("torch"))
    assert floor <= (2, 11), f"the torch floor {floor} must include 2.11"


def test_the_constraints_file_pins_what_the_makefile_installs() -> None:
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert "goose" not in pins and "torch" in pins and "transformers" in pins
    for name in ("torch", "transformers"):
        floor, ceiling = _bounds(_requirement(name))
        assert floor <= _version(pins[name]) < ceiling, f"constraints.txt pins {name} {pins[name]} outside its range"
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
