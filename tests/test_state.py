"""Unit tests of full_state_dict: shards and pipeline stages come back as the whole model."""

import torch
from torch import nn

from goose_core import ParallelContext
from goose_core.state import ShardSpec, full_state_dict, mark_sharded
from goose_core.testing import run_distributed


def test_fused_blocks_reassemble() -> None:
    full = torch.arange(24.0).reshape(12, 2)  # three fused blocks of 4 rows: q | k | v
    spec = ShardSpec(dim=0, blocks=3)
    shards = [torch.cat([b.chunk(2)[r] for b in full.chunk(3)]) for r in range(2)]
    assert torch.equal(spec.gather(shards), full)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))


def _split_run(ctx: ParallelContext) -> dict[str, torch.Tensor]:
    # tp splits layer 0's rows (dim 0) and layer 1's columns (dim 1); pp keeps one layer a stage.
    model = _model()
    col, row = model[0], model[1]
    r = ctx.tp_rank
    col.weight = mark_sharded(nn.Parameter(col.weight.chunk(2, 0)[r].clone()), ShardSpec(0))
    col.bias = mark_sharded(nn.Parameter(col.bias.chunk(2, 0)[r].clone()), ShardSpec(0))
    row.weight = mark_sharded(nn.Parameter(row.weight.chunk(2, 1)[r].clone()), ShardSpec(1))
    if ctx.pp_size == 2:
        model[1 - ctx.pp_rank] = nn.Identity()
    return full_state_dict(model, ctx)


def test_tensor_and_pipeline_shards_gather_to_the_whole_model() -> None:
    want = {k: v.detach() for k, v in _model().named_parameters()}
    for got in run_distributed(_split_run, 2, 2, 1, timeout=60):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
