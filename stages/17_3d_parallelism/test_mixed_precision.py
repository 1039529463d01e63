"""bf16 with fp32 master weights across the grid: equal to the single-device bf16 recipe within
its measured noise floor at tp=2, pp=2, dp=2 and 3D with ZeRO-1; ZeRO-1's masters stay fp32 and
travel in state dicts; bytes per parameter on the fullest rank equal 2 + 4 + 12/dp; micro-batches
under no_sync sum and reduce in fp32. (Stage 01 proves the recipe on one device.)"""

from dataclasses import replace

import pytest
import torch
from torch import nn

from goose_core import DataParallel, ParallelContext, clip_grad_norm_, full_state_dict
from goose_core.data import shard_batch
from goose_core.data_parallel import no_sync, reducer_of
from goose_core.optim import DistributedOptimizer, MasterWeights
from goose_core.testing import (RunResult, Tolerance, TrainSpec, assert_matches_reference, at_layout,
                                noise_floor_runs, noise_floor_tolerances, reference_run, run_distributed)

# SGD with momentum: AdamW turns a near-zero gradient's rounding noise into an lr-sized step
# (see goose_core/testing/tolerances.py); lr 0.1 so that 4 steps move bf16 weights by many ulps.
SPEC = TrainSpec(family="llama", steps=4, optimizer="sgd", lr=0.1, precision="bf16")


def train(ctx: ParallelContext, spec: TrainSpec, zero: bool = False,
          num_microbatches: int = 2) -> tuple[RunResult, nn.Module, torch.optim.Optimizer]:
    """Train ``spec`` (a bf16 model) at ``ctx``'s layout with fp32 masters: ZeRO-1's shards if
    ``zero``, else :class:`MasterWeights`. Returns the run (gathered bf16 parameters), the model
    and the optimizer."""
    model = at_layout(spec.build_model(), ctx, num_microbatches=num_microbatches)
    plain = spec.build_optimizer(model.parameters())
    optimizer = DistributedOptimizer(plain, ctx) if zero else MasterWeights(plain)
    losses = []
    for batch in spec.batches(ctx.data_parallel_rank, ctx.data_parallel_size):
        loss = model(**batch).loss  # bf16 activations; the loss itself in fp32
        loss.backward()  # bf16 gradients, added into fp32 (masters' grads or DataParallel's buckets)
        if spec.max_grad_norm is not None:
            clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)  # the fp32 gradients' norm
        optimizer.step()  # fp32 masters step; the bf16 parameters follow (all-gathered under ZeRO-1)
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, full_state_dict(model, ctx)), model, optimizer


def bytes_per_parameter(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """What this rank holds per parameter of its model piece, by kind: the bf16 weights, the
    gradient buffers (DataParallel's buckets), and the optimizer's masters and state. Each
    storage is counted once."""
    params = list({id(p): p for p in model.parameters()}.values())
    n = sum(p.numel() for p in params)
    seen: set[int] = set()

    def size(tensors: list[torch.Tensor]) -> int:
        fresh = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                 if t.untyped_storage().data_ptr() not in seen}
        seen.update(fresh)
        return sum(fresh.values())

    reducer = reducer_of(model)
    assert reducer is not None, "the formula counts DataParallel's fp32 buckets"
    weights = size(params)
    grads = size([b.grad for b in reducer.buckets])
    masters = [m for g in optimizer.param_groups for m in g["params"]]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"weights": weights / n, "grads": grads / n, "masters": size(masters) / n,
            "moments": size(state) / n, "params": float(n)}


@pytest.fixture(scope="module")
def floor() -> tuple[RunResult, Tolerance, Tolerance]:
    """The bf16 reference, and the allowances its noise floor gives (measured here, every run)."""
    reference = reference_run(SPEC)
    return reference, *noise_floor_tolerances(reference, noise_floor_runs(SPEC))


def _train(ctx: ParallelContext, spec: TrainSpec, zero: bool) -> RunResult:
    return train(ctx, spec, zero)[0]


@pytest.mark.parametrize("tp, pp, dp, zero", [(2, 1, 1, False), (1, 2, 1, False), (1, 1, 2, False),
                                              (1, 1, 2, True), (2, 2, 2, True)],
                         ids=["tp2", "pp2", "dp2", "dp2-zero1", "3d-zero1"])
def test_equals_the_single_device_bf16_recipe(floor: tuple[RunResult, Tolerance, Tolerance],
                                              tp: int, pp: int, dp: int, zero: bool) -> None:
    reference, losses, params = floor
    for rank, result in enumerate(run_distributed(_train, tp, pp, dp, SPEC, zero, timeout=180)):
        try:
            assert_matches_reference(result, reference, losses, params)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}\n({losses.why}; {params.why})") from err


def test_a_one_percent_gradient_error_lands_outside(floor: tuple[RunResult, Tolerance, Tolerance]) -> None:
    # SGD's step is lr x momentum buffer, linear in the gradient: lr x 1.01 is every gradient 1 % too large.
    reference, losses, params = floor
    with pytest.raises(AssertionError, match="losses differ"):
        assert_matches_reference(reference_run(replace(SPEC, lr=SPEC.lr * 1.01)), reference, losses, params)


def _state(ctx: ParallelContext, spec: TrainSpec) -> dict:
    _, model, optimizer = train(ctx, spec, zero=True)
    consolidated = optimizer.consolidated_state_dict()
    again = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    again.load_state_dict(optimizer.state_dict())  # its shard, masters included
    back = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    back.load_state_dict(consolidated)  # the single-device format: each rank cuts its shard
    return {"shards": {s.dtype for s in optimizer.shards}, "params": {p.dtype for p in model.parameters()},
            "buckets": {b.grad.dtype for b in optimizer.buckets},  # DataParallel's default for bf16
            "moments": {v.dtype for s in optimizer.state.values() for v in s.values() if v.dim() > 0},
            "masters": [s.detach().clone() for s in optimizer.shards],
            "again": [s.detach().clone() for s in again.shards], "back": [s.detach().clone() for s in back.shards],
            "consolidated": consolidated}


def test_master_weights_stay_fp32_and_travel_in_state_dicts() -> None:
    spec = replace(SPEC, optimizer="adamw", lr=1e-3, steps=2)
    results = run_distributed(_state, 1, 1, 2, spec, timeout=120)
    for r in results:
        assert r["shards"] == r["moments"] == r["buckets"] == {torch.float32} and r["params"] == {torch.bfloat16}
        assert all(torch.equal(a, b) for a, b in zip(r["masters"], r["again"]))
        assert all(torch.equal(a, b) for a, b in zip(r["masters"], r["back"]))
    # The consolidated dict is MasterWeights' single-device format: a plain optimizer loads it.
    model = spec.build_model()
    single = MasterWeights(spec.build_optimizer(model.parameters()))
    single.load_state_dict(results[0]["consolidated"])
    saved = single.state_dict()
    assert saved["master_weights"].keys() == results[0]["consolidated"]["master_weights"].keys()
    for i, master in saved["master_weights"].items():
        assert master.dtype == torch.float32 and torch.equal(master, results[0]["consolidated"]["master_weights"][i])
        assert torch.equal(saved["state"][i]["exp_avg"], results[0]["consolidated"]["state"][i]["exp_avg"])


def _bytes(ctx: ParallelContext, spec: TrainSpec) -> dict:
    _, model, optimizer = train(ctx, spec, zero=True)
    held = bytes_per_parameter(model, optimizer)
    n = held["params"]
    padding = sum(b.padded_numel - b.numel for b in optimizer.buckets)
    return {**held, "formula": 2 + 4 + 12 / ctx.data_parallel_size, "padding": padding / n,
            "shard_padding": sum(b.shard_numel for b in optimizer.buckets) / n - 1 / ctx.data_parallel_size}


@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 2), (2, 2, 2)])
def test_bytes_per_parameter_on_the_fullest_rank_equal_the_formula(tp: int, pp: int, dp: int) -> None:
    spec = replace(SPEC, optimizer="adamw", lr=1e-3, steps=1)
    results = run_distributed(_bytes, tp, pp, dp, spec, timeout=120)
    fullest = max(results, key=lambda r: r["weights"] + r["grads"] + r["masters"] + r["moments"])
    # 2 bf16 weight bytes; 4 fp32 gradient bytes (+ the buckets' padding); 4 master + 8 moment
    # bytes for 1/dp of the elements (+ this rank's share of the padding).
    assert fullest["weights"] == 2
    assert fullest["grads"] == pytest.approx(4 * (1 + fullest["padding"]))
    assert fullest["masters"] == pytest.approx(4 * (1 / dp + fullest["shard_padding"]))
    assert fullest["moments"] == pytest.approx(8 * (1 / dp + fullest["shard_padding"]))
    total = fullest["weights"] + fullest["grads"] + fullest["masters"] + fullest["moments"]
    assert fullest["formula"] <= total <= fullest["formula"] + 16 * fullest["padding"]


def _accumulate_under_no_sync(ctx: ParallelContext, zero: bool) -> list[bool]:
    model = SPEC.build_model()
    batch = shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size)
    pieces = [shard_batch(batch, i, 2) for i in range(2)]
    local = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
    for piece in pieces:  # this rank's two bf16 micro-batch gradients, summed in fp32 by hand
        for acc, g in zip(local, torch.autograd.grad(model(**piece).loss / 2, list(model.parameters()))):
            acc.add_(g.float())
    expected = []
    for acc in local:  # halve (exact), then the sum of two ranks (exact in either order)
        acc.div_(2)
        torch.distributed.all_reduce(acc, group=ctx.dp_group)
        expected.append(acc)
    model = DataParallel(model, ctx).parallelize()
    optimizer = DistributedOptimizer(SPEC.build_optimizer(model.parameters()), ctx) if zero else None
    with no_sync(model):
        (model(**pieces[0]).loss / 2).backward()  # added into the fp32 bucket, nothing sent
    (model(**pieces[1]).loss / 2).backward()
    reducer = reducer_of(model)
    assert reducer is not None
    if optimizer is None:
        return [torch.equal(reducer.main_grad(p), e) for p, e in zip(model.parameters(), expected)]
    want = dict(zip(model.parameters(), expected))
    equal = []
    for bucket in optimizer.buckets:  # ZeRO-1: this rank's reduce-scattered fp32 shard of each bucket
        flat = torch.zeros_like(bucket.grad)
        for o, p in zip(bucket.offsets, bucket.params):
            flat[o : o + p.numel()] = want[p].reshape(-1)
        lo, hi = bucket.shard_range(ctx.dp_rank)
        equal.append(bucket.shard_grad.dtype == torch.float32 and torch.equal(bucket.shard_grad, flat[lo:hi]))
    return equal


@pytest.mark.parametrize("zero", [False, True], ids=["all-reduce", "zero1"])
def test_accumulation_under_no_sync_sums_in_fp32_and_reduces_in_fp32(zero: bool) -> None:
    for equal in run_distributed(_accumulate_under_no_sync, 1, 1, 2, zero, timeout=120):
        assert all(equal)
