"""Outside a launcher: ``ParallelContext()`` in a plain ``python`` is a world of one, and a goose
checkpoint saved at a multi-rank layout loads (``load_checkpoint(..., ctx=None)`` or with that
context) into a plain model there and trains on as the saved layout does
(goose_core.distributed.context, goose_core.checkpoint.io)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from goose_core import ParallelContext, full_state_dict, save_checkpoint
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, at_layout,
                                run_distributed, train_loop)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
SPEC = TrainSpec(family="llama", steps=3, optimizer="adamw")
SAVED_AT = 2  # steps trained before the save; the plain process trains step SAVED_AT

CONTEXT = """
import json, torch, torch.distributed as dist
from goose_core import ParallelContext
ctx = ParallelContext()
x = torch.ones(2)
dist.all_reduce(x, group=ctx.data_parallel_group)  # a world of one: its collectives run
first = [ctx.world_size, ctx.rank, ctx.tp_size, ctx.pp_size, ctx.dp_size, x.tolist()]
ctx.destroy()
down = dist.is_initialized()
again = ParallelContext()
try:
    ParallelContext(tensor_parallel_size=2)
    refused = ""
except ValueError as err:
    refused = str(err)
print(json.dumps({"first": first, "down": down, "again": again.world_size, "refused": refused}))
"""

LOAD = """
import sys, torch, torch.distributed as dist
from goose_core import ParallelContext, load_checkpoint
from goose_core.testing import TrainSpec, snapshot, train_loop
path, out, how = sys.argv[1:]
spec = TrainSpec(family="llama", steps=3, optimizer="adamw")
model = spec.build_model()
optimizer = spec.build_optimizer(model.parameters())
ctx = ParallelContext() if how == "context" else None
extra = load_checkpoint(path, model, None if how == "no-optimizer" else optimizer, ctx)
loaded = snapshot(model)
losses = train_loop(model, optimizer, [spec.batch(extra["step"])])
torch.save({"world": dist.get_world_size(), "extra": extra, "loaded": loaded,
            "continued": (losses, snapshot(model))}, out)
"""


def _plain_python(code: str, *args: str) -> str:
    """``code`` in a fresh ``python`` with no launcher variables, on a deadline; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_plain_process_is_a_world_of_one() -> None:
    found = json.loads(_plain_python(CONTEXT).strip().splitlines()[-1])
    assert found["first"] == [1, 0, 1, 1, 1, [1.0, 1.0]]
    assert found["down"] is False and found["again"] == 1  # destroyed, then created again
    assert "this is one process started without a launcher" in found["refused"]
    assert "torchrun --nproc_per_node=2" in found["refused"]


def test_a_launched_world_is_still_told_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in LAUNCHER:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher's environment, half set: not "alone"
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT is not set"):
        ParallelContext()


def _save_then_continue(ctx: ParallelContext, path: str) -> tuple[dict[str, torch.Tensor], RunResult]:
    """Train SAVED_AT steps at ctx's layout, save, train one more: (the saved weights, the step after)."""
    model = at_layout(SPEC.build_model(), ctx)
    optimizer = SPEC.build_optimizer(model.parameters())
    train_loop(model, optimizer, (SPEC.batch(s) for s in range(SAVED_AT)))
    save_checkpoint(path, model, optimizer, ctx, step=SAVED_AT)
    saved = full_state_dict(model, ctx)
    losses = train_loop(model, optimizer, [SPEC.batch(SAVED_AT)])
    return saved, RunResult(losses, full_state_dict(model, ctx))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], RunResult]:
    """A checkpoint saved at tp=2 (Llama's GQA heads cut), its weights, and the step after it."""
    path = tmp_path_factory.mktemp("tp2") / "checkpoint"
    per_rank = run_distributed(_save_then_continue, 2, 1, 1, str(path), timeout=120)
    for weights, step in per_rank[1:]:  # every rank holds the same consolidated state
        torch.testing.assert_close(weights, per_rank[0][0], rtol=0, atol=0)
        assert_matches_reference(step, per_rank[0][1], EXACT)
    return path, *per_rank[0]


def _load_in_plain_python(path: Path, tmp_path: Path, how: str) -> dict[str, Any]:
    out = tmp_path / f"{how}.pt"
    _plain_python(LOAD, str(path), str(out), how)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("how", ["no-context", "context"])
def test_a_multi_rank_checkpoint_loads_and_trains_on_in_a_plain_process(saved: tuple, tmp_path: Path,
                                                                        how: str) -> None:
    path, weights, after = saved
    found = _load_in_plain_python(path, tmp_path, how)
    assert found["world"] == 1 and found["extra"] == {"step": SAVED_AT}
    torch.testing.assert_close(found["loaded"], weights, rtol=0, atol=0)  # the consolidated, bit for bit
    assert_matches_reference(RunResult(*found["continued"]), after, PARALLEL)  # tp=2 -> one device: sums reorder


def test_a_load_that_drops_the_optimizer_state_fails_the_continuation(saved: tuple, tmp_path: Path) -> None:
    path, weights, after = saved
    found = _load_in_plain_python(path, tmp_path, "no-optimizer")  # a planted bug: AdamW starts afresh
    torch.testing.assert_close(found["loaded"], weights, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="allowance"):
        assert_matches_reference(RunResult(*found["continued"]), after, PARALLEL)
