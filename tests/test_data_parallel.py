"""Unit tests of goose_core.data_parallel: buckets, overlap, the global loss, replica checks."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from goose_core import DataParallel, ParallelContext
from goose_core.data_parallel import build_buckets, no_sync, reducer_of
from goose_core.testing import run_distributed


def _params(*sizes: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(n)) for n in sizes]


def test_buckets_close_at_the_size_and_pad_to_equal_shards() -> None:
    params = _params(3, 5, 4, 2)
    buckets = build_buckets(params, bucket_bytes=8 * 4, pad_to=4)  # close at 8 floats
    assert [[p.numel() for p in b.params] for b in buckets] == [[3, 5], [4, 2]]
    assert [(b.numel, b.padded_numel, b.shard_numel) for b in buckets] == [(8, 8, 2), (6, 8, 2)]
    assert buckets[1].offsets == [0, 4] and buckets[1].shard_range(3) == (6, 8)


def test_buckets_never_mix_keys_or_dtypes() -> None:
    params = _params(2, 2, 2) + [nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    kinds = {id(params[0]): 0, id(params[1]): 0, id(params[2]): 1, id(params[3]): 1}
    buckets = build_buckets(params, bucket_bytes=2**20, pad_to=1, key=lambda p: kinds[id(p)])
    assert [len(b.params) for b in buckets] == [2, 1, 1]


def test_bad_bucket_size_and_unwrapped_no_sync_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="bucket_size_mb must be > 0"):
        DataParallel(nn.Linear(2, 2), ctx=None, bucket_size_mb=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a model returned by DataParallel"):
        with no_sync(nn.Linear(2, 2)):
            pass


class _Net(nn.Module):
    """Four layers (one bucket each at a tiny bucket size) and a branch forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
        self.unused = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.layers(x).square().mean()}


class _Out(dict):
    __getattr__ = dict.get

    def __setattr__(self, name: str, value: object) -> None:
        self[name] = value


def _overlap_and_loss(ctx: ParallelContext) -> dict:
    model = _Net()
    model.register_forward_hook(lambda m, a, out: _Out(out))  # HF-style attribute access to .loss
    model = DataParallel(model, ctx, bucket_size_mb=16 * 17 * 4 / 2**20).parallelize()
    reducer = reducer_of(model)
    assert reducer is not None
    fired_at_launch: list[int] = []
    launch = reducer._launch
    reducer._launch = lambda b: (fired_at_launch.append(sum(len(x.ready) for x in reducer.buckets)), launch(b))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(ctx.dp_rank))
    loss = model(x).loss
    local = model.layers(x).square().mean()
    model.zero_grad()
    local.backward()
    local_grads = [p.grad.clone() for p in model.layers.parameters()]
    model.zero_grad()
    loss.backward()
    return {"loss": loss.item(), "local": local.item(), "fired_at_launch": fired_at_launch,
            "buckets": len(reducer.buckets), "params": len(reducer.params),
            "grads": [p.grad.clone() for p in model.layers.parameters()], "local_grads": local_grads,
            "unused_grad": model.unused.weight.grad}


def test_buckets_start_during_the_backward_and_the_loss_is_the_global_mean() -> None:
    results = run_distributed(_overlap_and_loss, 1, 1, 2, timeout=60)
    mean = sum(r["local"] for r in results) / 2
    for r in results:
        assert r["loss"] == pytest.approx(mean, rel=1e-6)
        # the first bucket (the last layer) starts while the other layers still compute
        assert r["buckets"] == 5 and r["fired_at_launch"][0] < r["params"]
        for got, *locals_ in zip(r["grads"], *(q["local_grads"] for q in results)):
            torch.testing.assert_close(got, sum(locals_) / 2, rtol=1e-6, atol=0)
        # used by no rank: counts as zero, and nothing hangs waiting for it
        assert r["unused_grad"] is not None and not r["unused_grad"].any()


def _replicas(ctx: ParallelContext, broadcast: bool) -> str:
    model = nn.Linear(4, 4)
    torch.manual_seed(ctx.dp_rank)  # a different init on every rank
    model.weight.data.normal_()
    try:
        DataParallel(model, ctx, broadcast=broadcast).parallelize()
    except ValueError as err:
        return str(err)
    gathered = [torch.empty_like(model.weight) for _ in range(ctx.dp_size)]
    torch.distributed.all_gather(gathered, model.weight.detach())
    return "equal" if all(torch.equal(g, gathered[0]) for g in gathered) else "differ"


def test_different_replicas_fail_on_every_rank_and_broadcast_fixes_them() -> None:
    for message in run_distributed(_replicas, 1, 1, 2, False, timeout=60):
        assert "'weight' differs between data-parallel replicas" in message and "broadcast=True" in message
    assert run_distributed(_replicas, 1, 1, 2, True, timeout=60) == ["equal", "equal"]


def _no_sync(ctx: ParallelContext) -> dict:
    model = DataParallel(_Net(), ctx, bucket_size_mb=0.001).parallelize()
    reducer = reducer_of(model)
    launches: list[int] = []
    launch = reducer._launch
    reducer._launch = lambda b: (launches.append(1), launch(b))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(ctx.dp_rank))
    with no_sync(model):
        model(x)["loss"].backward()
    inside = len(launches)
    local = [p.grad.clone() for p in model.layers.parameters()]
    model(x)["loss"].backward()
    return {"inside": inside, "after": len(launches), "buckets": len(reducer.buckets), "local": local,
            "grads": [p.grad.clone() for p in model.layers.parameters()]}


def test_no_sync_skips_communication_until_the_last_micro_batch() -> None:
    results = run_distributed(_no_sync, 1, 1, 2, timeout=60)
    for r in results:
        assert r["inside"] == 0 and r["after"] == r["buckets"]
        # two micro-batches of the same data: the mean of both ranks' doubled local gradients
        for got, *locals_ in zip(r["grads"], *(q["local"] for q in results)):
            torch.testing.assert_close(got, sum(2 * g for g in locals_) / 2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("on, coef", [(True, 0.02), (True, 0.0), (False, 0.02)])
def test_a_router_loss_is_refused_at_dp_above_one(on: bool, coef: float) -> None:
    # The MoE load-balancing loss is a product of batch means: per-shard losses averaged over dp
    # are another loss. Refused in the constructor, before any collective (no group needed here).
    model = nn.Linear(2, 2)
    model.config = SimpleNamespace(output_router_logits=on, router_aux_loss_coef=coef)
    ctx = SimpleNamespace(data_parallel_size=2)
    if on and coef:
        with pytest.raises(ValueError, match="output_router_logits=True: its auxiliary router loss"):
            DataParallel(model, ctx)
    else:
        DataParallel(model, ctx)  # nothing to refuse: the constructor touches no group
    DataParallel(nn.Linear(2, 2), SimpleNamespace(data_parallel_size=1))
