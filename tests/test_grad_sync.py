"""The gradient-sync protocol: how the pipeline and ZeRO-1 meet data parallelism, and nothing else.

The pipeline is driven here with a GradSync that only records (no DataParallel at all), which
shows that the stage depends on the interface, not on data parallelism's reducer.
"""

from contextlib import nullcontext
from typing import Any, Callable, Hashable

import pytest
import torch
from torch import nn

from goose_core import DataParallel, DistributedOptimizer, ParallelContext, metadata
from goose_core.data_parallel import reducer_of
from goose_core.grad_sync import GradSync
from goose_core.pipeline import local_pipeline
from goose_core.testing import TrainSpec, run_distributed

SPEC = TrainSpec(family="llama", batch_size=8, seq_len=16)


class _Recorder(GradSync):
    """A GradSync that records what it is asked, and the gradients it would reduce at flush."""

    def __init__(self, params: list[nn.Parameter] = ()) -> None:  # type: ignore[assignment]
        self._params = list(params)
        self.calls: list[str] = []
        self.flushed: list[list[torch.Tensor | None]] = []
        for p in self._params:
            metadata.link_grad_sync(p, self)

    @property
    def params(self) -> list[nn.Parameter]:
        return self._params

    @property
    def reduced(self) -> bool:
        return False

    def defer(self) -> None:
        self.calls.append("defer")

    def flush(self) -> None:
        self.calls.append("flush")
        self.flushed.append([None if p.grad is None else p.grad.clone() for p in self._params])

    def reset(self) -> None:
        self.calls.append("reset")

    def no_sync(self) -> Any:
        return nullcontext()

    def track(self, model: nn.Module) -> None:
        self.calls.append(f"track {len(list(model.parameters()))}")

    def shard(self, param_lists: list[list[nn.Parameter]], key: Callable[[nn.Parameter], Hashable]) -> list[Any]:
        return []


def test_grad_sync_links() -> None:
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    first, second = _Recorder(), _Recorder()
    metadata.link_grad_sync(a, second)
    metadata.link_grad_sync(b, first)
    metadata.link_grad_sync(c, second)
    assert metadata.grad_syncs([a, b, c]) == [second, first]  # distinct, in parameter order
    metadata.unlink_grad_sync(a, first)  # another sync's link stays
    assert metadata.grad_sync_of(a) is second
    metadata.unlink_grad_sync(a, second)
    assert metadata.grad_sync_of(a) is None and metadata.grad_syncs([a]) == []


def test_parameters_changed_asks_the_models_sync_to_track_it() -> None:
    model = nn.Linear(2, 2)
    metadata.parameters_changed(model)  # no DataParallel: nothing to do
    sync = _Recorder()
    metadata.set_module_grad_sync(model, sync)
    assert metadata.module_grad_sync(model) is sync
    assert all(metadata.grad_sync_of(p) is None for p in model.parameters())  # a model fact only
    metadata.parameters_changed(model)
    assert sync.calls == ["track 2"]


@pytest.mark.parametrize("recompute, schedule", [("always", "gpipe"), ("never", "gpipe"), ("always", "1f1b")])
def test_the_pipeline_defers_then_flushes_complete_gradients_once_per_backward(recompute: str,
                                                                               schedule: str) -> None:
    # Checkpointed cells accumulate every gradient over one nested backward per micro-batch: a
    # sync flushed before the last of them would reduce a partial gradient. 1F1B defers in the
    # forward call (its backward runs there) and flushes in loss.backward().
    model = local_pipeline(SPEC.build_model(), 2, 4, recompute, schedule=schedule)
    sync = _Recorder([p for p in model.parameters() if p.requires_grad])
    for step in range(2):
        model(**SPEC.batch(step)).loss.backward()
        assert sync.calls == ["defer", "flush"] * (step + 1)
        final = [p.grad for p in sync.params]
        assert all(g is not None and torch.equal(g, f) for g, f in zip(sync.flushed[-1], final))


def _reduce_in(ctx: ParallelContext, reduce_dtype: torch.dtype | None, zero: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(8, 8)  # float32
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1 + ctx.dp_rank))
    local = torch.autograd.grad(model(x).square().mean(), model.weight)[0]
    model = DataParallel(model, ctx, reduce_dtype=reduce_dtype).parallelize()
    optimizer = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx) if zero else None
    model(x).square().mean().backward()
    buffers = {b.grad.dtype for b in reducer_of(model).buckets}
    if optimizer is not None:
        return {"buffers": buffers, "shards": {s.dtype for s in optimizer.shards}}
    return {"buffers": buffers, "local": local, "grad": model.weight.grad}


@pytest.mark.parametrize("reduce_dtype", [None, torch.float64])
def test_reduce_dtype_sets_the_buffers_and_the_gradient_keeps_the_parameters_dtype(
        reduce_dtype: torch.dtype | None) -> None:
    results = run_distributed(_reduce_in, 1, 1, 2, reduce_dtype, False, timeout=60)
    mean = results[0]["local"] / 2 + results[1]["local"] / 2  # (two summands: fp64 rounds alike)
    for r in results:
        assert r["buffers"] == {reduce_dtype or torch.float32}
        assert r["grad"].dtype == torch.float32 and torch.equal(r["grad"], mean)
    for r in run_distributed(_reduce_in, 1, 1, 2, reduce_dtype, True, timeout=60):
        assert r["buffers"] == r["shards"] == {reduce_dtype or torch.float32}  # ZeRO-1's shards too


def test_reduce_dtype_must_be_floating() -> None:
    with pytest.raises(ValueError, match="reduce_dtype must be a floating-point dtype, got torch.int64"):
        DataParallel(nn.Linear(2, 2), ctx=None, reduce_dtype=torch.int64)  # type: ignore[arg-type]
