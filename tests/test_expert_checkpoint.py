"""A checkpoint of an expert-parallel run saved at E=2 loads at E=1 and E=4: experts are pieces of the stacked experts.

Each EP rank writes its rows of every experts parameter (and of their momentum buffers) at their
offset in the full tensor (goose_core/checkpoint/chunks.py, ``expert_piece``); a load at another
E reads the rows it holds now. Loaded parameters equal the saved ones to the bit; the next step's
loss agrees at every E (PARALLEL: the sums reorder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from goose_core import DataParallel, full_state_dict
from goose_core.checkpoint import load_checkpoint, save_checkpoint
from goose_core.distributed import ParallelContext
from goose_core.expert_parallel import ExpertParallel
from goose_core.testing import PARALLEL, run_distributed, train_loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages" / "16_expert_parallel"))
from test_expert_parallel import SPEC, build  # noqa: E402  (the tiny configs)


def _save(ctx: ParallelContext, path: str) -> dict[str, torch.Tensor]:
    """One SGD-with-momentum step of Mixtral at this layout, saved; the full parameters."""
    model = DataParallel(ExpertParallel(build("mixtral"), ctx).parallelize(), ctx).parallelize()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_loop(model, optimizer, SPEC.batches(ctx.dp_rank, ctx.dp_size))
    save_checkpoint(path, model, optimizer, ctx)
    return full_state_dict(model, ctx)


def _load(ctx: ParallelContext, path: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """A fresh model at this layout, loaded; its full parameters, and one more step's loss
    (the momentum buffers, experts' included, must have come back resharded too)."""
    model = DataParallel(ExpertParallel(build("mixtral"), ctx).parallelize(), ctx).parallelize()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    load_checkpoint(path, model, optimizer, ctx)
    params = full_state_dict(model, ctx)
    return params, train_loop(model, optimizer, SPEC.batches(ctx.dp_rank, ctx.dp_size))


def test_a_checkpoint_saved_at_ep2_loads_at_ep1_and_ep4(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    saved = run_distributed(_save, 1, 1, 2, path, ep=2, timeout=120)[0]
    losses = []
    for dp, ep in ((2, 1), (4, 4)):
        for params, after in run_distributed(_load, 1, 1, dp, path, ep=ep, timeout=120):
            assert params.keys() == saved.keys()
            for name, tensor in saved.items():
                torch.testing.assert_close(params[name], tensor, rtol=0, atol=0, msg=f"ep={ep}: {name}")
            losses.append(after)
    for other in losses[1:]:  # the resumed step: the same at every E (float64, reordered sums)
        torch.testing.assert_close(torch.tensor(other), torch.tensor(losses[0]), rtol=PARALLEL.rtol, atol=PARALLEL.atol)
