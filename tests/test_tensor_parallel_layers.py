"""Unit tests of the tensor-parallel layers: each equals its dense layer, forward and backward."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from goose_core import ParallelContext
from goose_core.state import ShardSpec
from goose_core.tensor_parallel import (
    ColumnParallelLinear,
    ParallelRegion,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_tensor,
)
from goose_core.testing import run_distributed


def test_fused_blocks_shard_block_by_block() -> None:
    full = torch.arange(12.0).view(12, 1)  # q | k | v, 4 rows each
    assert shard_tensor(full, 0, 1, 2, blocks=3).view(-1).tolist() == [2, 3, 6, 7, 10, 11]


def test_replicated_shards_gather_once() -> None:
    full = torch.arange(8.0).view(4, 2)  # two kv-heads on four ranks: ranks 0,1 hold head 0
    shards = [shard_tensor(full, 0, rank // 2, 2) for rank in range(4)]
    assert torch.equal(ShardSpec(0, replicas=2).gather(shards), full)


def _dense() -> tuple[nn.Linear, nn.Linear, nn.Embedding, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(6, 8), nn.Linear(8, 6), nn.Embedding(16, 6), torch.randn(3, 6), torch.randint(0, 16, (3,))


def _mlp_grads(ctx: ParallelContext, transposed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    up, down, _, x, _ = _dense()
    if transposed:  # the same maths in GPT-2's Conv1D layout
        up_c, down_c = Conv1D(8, 6), Conv1D(6, 8)
        up_c.weight.data, up_c.bias.data = up.weight.detach().t().clone(), up.bias.detach().clone()
        down_c.weight.data, down_c.bias.data = down.weight.detach().t().clone(), down.bias.detach().clone()
        up, down = up_c, down_c
    region = ParallelRegion(ctx.tp_group)
    col = ColumnParallelLinear.from_module(up, ctx.tp_group, region=region)
    row = RowParallelLinear.from_module(down, ctx.tp_group, region=region)
    x.requires_grad_()
    hidden = col(x)
    y = row(torch.relu(hidden))
    y.square().sum().backward()
    # nn.Linear's attributes name the widths this rank's forward takes and returns
    assert (col.in_features, col.out_features) == (x.shape[-1], hidden.shape[-1]) == (6, 4)
    assert (row.in_features, row.out_features) == (hidden.shape[-1], y.shape[-1]) == (4, 6)
    col.gather_output, row.input_is_parallel = True, False
    assert (col.out_features, col(x).shape[-1], row.in_features) == (8, 8, 8)
    return y.detach(), {"x": x.grad, "col": col.weight.grad, "row": row.weight.grad, "bias": row.bias.grad}


@pytest.mark.parametrize("transposed", [False, True])
def test_column_then_row_equals_the_dense_mlp(transposed: bool) -> None:
    up, down, _, x, _ = _dense()
    x.requires_grad_()
    want = down(torch.relu(up(x)))
    want.square().sum().backward()
    results = run_distributed(_mlp_grads, 2, 1, 1, transposed, timeout=60)
    cut = 1 if transposed else 0
    col = torch.cat([g["col"] for _, g in results], dim=cut)
    row = torch.cat([g["row"] for _, g in results], dim=1 - cut)
    for y, grads in results:
        torch.testing.assert_close(y, want.detach())
        torch.testing.assert_close(grads["x"], x.grad)
        torch.testing.assert_close(grads["bias"], down.bias.grad)
    torch.testing.assert_close(col, up.weight.grad.t() if transposed else up.weight.grad)
    torch.testing.assert_close(row, down.weight.grad.t() if transposed else down.weight.grad)


def _embedding(ctx: ParallelContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, _, table, _, ids = _dense()
    layer = VocabParallelEmbedding.from_module(table, ctx.tp_group)
    out = layer(ids)
    out.square().sum().backward()
    return out.detach(), layer.weight.grad, layer(torch.tensor([15])).detach()


def test_vocab_parallel_embedding_equals_the_table() -> None:
    _, _, table, _, ids = _dense()
    want = table(ids)
    want.square().sum().backward()
    results = run_distributed(_embedding, 4, timeout=60)
    for out, _, last in results:
        torch.testing.assert_close(out, want.detach())
        torch.testing.assert_close(last, table.weight[15:].detach())
    torch.testing.assert_close(torch.cat([g for _, g, _ in results]), table.weight.grad)


def _replicated_kv(ctx: ParallelContext) -> torch.Tensor:
    # 4 ranks, 2 "kv-heads" of 2 rows: ranks 2k and 2k+1 hold head k and use it for their own
    # query; the gradient of head k is the sum of both ranks' contributions.
    torch.manual_seed(0)
    kv, x = nn.Linear(3, 4, bias=False), torch.randn(5, 3)
    layer = ColumnParallelLinear.from_module(kv, ctx.tp_group, replicas=2)
    query_weight = torch.arange(1.0, 5.0)[ctx.tp_rank]
    (layer(x).sum() * query_weight).backward()
    return layer.weight.grad


def test_replicated_kv_heads_sum_their_gradients() -> None:
    torch.manual_seed(0)
    kv, x = nn.Linear(3, 4, bias=False), torch.randn(5, 3)
    grads = run_distributed(_replicated_kv, 4, timeout=60)
    per_rank = [torch.autograd.grad(kv(x)[:, 2 * (r // 2):2 * (r // 2) + 2].sum() * (r + 1), kv.weight)[0]
                for r in range(4)]
    full = sum(per_rank)
    for rank, grad in enumerate(grads):
        torch.testing.assert_close(grad, full[2 * (rank // 2):2 * (rank // 2) + 2])


def _scatter_output(ctx: ParallelContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # Doge's dt_proj: every head's values in (split), this rank's kv-heads out.
    _, down, _, _, _ = _dense()
    torch.manual_seed(1)
    x = torch.randn(3, 8).chunk(2, dim=-1)[ctx.tp_rank].clone().requires_grad_()
    layer = RowParallelLinear.from_module(down, ctx.tp_group, scatter_output=True)
    y = layer(x)
    assert (layer.in_features, layer.out_features, y.shape[-1]) == (4, 3, 3)
    (y * torch.arange(1.0, 4.0)).sum().backward()  # a different weight per output column
    return y.detach(), {"x": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}


def test_row_parallel_scatter_output_keeps_each_ranks_slice() -> None:
    _, down, _, _, _ = _dense()
    torch.manual_seed(1)
    x = torch.randn(3, 8).requires_grad_()
    want = down(x)
    (want * torch.arange(1.0, 4.0).repeat(2)).sum().backward()  # rank r's columns weighted alike
    results = run_distributed(_scatter_output, 2, timeout=60)
    torch.testing.assert_close(torch.cat([y for y, _ in results], dim=-1), want.detach())
    torch.testing.assert_close(torch.cat([g["x"] for _, g in results], dim=-1), x.grad)
    torch.testing.assert_close(torch.cat([g["weight"] for _, g in results], dim=1), down.weight.grad)
    for _, grads in results:  # the bias is whole on every rank, with the whole gradient
        torch.testing.assert_close(grads["bias"], down.bias.grad)
