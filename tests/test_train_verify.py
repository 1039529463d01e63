"""--verify K: the job's layout beside one device on a float64 copy; it agrees with a margin, and a
planted disagreement (a weight 0.1 % too large) stops the run on every rank with the report."""

from __future__ import annotations

from datetime import timedelta

import torch

from goose_core.distributed import ParallelContext
from goose_core.distributed.launch import spawn
from goose_core.train.config import merge, validate
from goose_core.train.build import prepare
from goose_core.train.verify import VerifyError, verify


def _too_large(model: torch.nn.Module) -> None:
    """A planted bug: every rank's first parameter 0.1 % too large before each optimizer step
    (the gradients sit in DataParallel's and ZeRO-1's buckets here, the weights in the model)."""
    with torch.no_grad():
        next(model.parameters()).mul_(1.001)


def _verify() -> tuple[float, str]:
    config = validate(merge({"tp": 2, "pp": 2, "zero": True, "microbatches": 2, "seq_len": 32, "verify": 2,
                             "steps": 10, "warmup": 1}), 8)
    inputs = prepare(config)
    ctx = ParallelContext(2, 2, 2, timeout=timedelta(seconds=60))
    try:
        share = verify(config, ctx, inputs)
        try:
            verify(config, ctx, inputs, after_backward=_too_large)
            caught = ""
        except VerifyError as err:
            caught = str(err)
        return share, caught
    finally:
        ctx.destroy()


def test_verify_agrees_and_a_planted_disagreement_stops_every_rank() -> None:
    results = spawn(_verify, 8, timeout=180)
    for share, caught in results:
        assert 0 <= share < 1, "the layout agrees with one device within PARALLEL"
        assert "does NOT train as one device does" in caught, "every rank stops on the planted bug"
        assert "of PARALLEL's allowance" in caught
    assert len({share for share, _ in results}) == 1, "every rank reports rank 0's verdict"
