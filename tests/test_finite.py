"""Non-finite loss or gradients stop the run on every rank before the optimizer step (goose_core.finite)."""

from dataclasses import replace
from typing import Any

import math

import pytest
import torch
from torch import nn

from goose_core import DistributedOptimizer, GradScaler, NonFiniteError, ParallelContext, clip_grad_norm_
from goose_core.data import shard_batch
from goose_core.finite import FiniteGuard, flat_names, guard_of, watch, watch_like
from goose_core.testing import TrainSpec, run_distributed
from goose_core.testing.layout import at_layout

# float32, as users train: AdamW at lr=1e30 overflows there (float64 would only grow huge).
SPEC = TrainSpec(family="llama", steps=3, dtype=torch.float32)
LAYOUTS = {"dp2": (1, 1, 2), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "tp2xpp2": (2, 2, 1)}


def _plant_inf(model: nn.Module, at_step: list[int], step: int) -> None:
    """An inf in the input embeddings of ``step`` (the stage holding the embedding)."""
    embedding = model.get_input_embeddings()
    if embedding is None or isinstance(embedding, nn.Identity):
        return

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if at_step[0] == step and torch.is_grad_enabled():
            out = out.clone()
            out.view(-1)[0] = math.inf
        return out
    embedding.register_forward_hook(hook)


def _local_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(ctx: ParallelContext, plant: str, check: bool = True, zero: bool = False,
           clip: bool = False, scaler: bool = False, steps: int = 3, precision: str = "full") -> dict[str, Any]:
    """Train ``steps`` steps with ``plant`` ("inf": inf in the inputs at step 1; "lr": AdamW at
    lr=1e30; "": nothing), catching NonFiniteError. Returns losses, the error and the weights."""
    ctx.check_finite = check
    spec = replace(SPEC, lr=1e30 if plant == "lr" else SPEC.lr, steps=steps, precision=precision)
    model = at_layout(spec.build_model(), ctx)
    at_step = [0]
    if plant == "inf":
        _plant_inf(model, at_step, 1)
    if zero:
        optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    else:
        optimizer = spec.recipe_optimizer(model.parameters())  # MasterWeights under bf16
    grad_scaler = GradScaler(ctx, init_scale=2.0**4) if scaler else None
    out: dict[str, Any] = {"losses": [], "error": None, "scales": []}
    for step, batch in enumerate(spec.batches(ctx.dp_rank, ctx.dp_size)):
        at_step[0] = step
        before = _local_params(model)
        loss = model(**batch).loss
        (grad_scaler.scale(loss) if grad_scaler else loss).backward()
        try:
            if grad_scaler:
                grad_scaler.unscale_(optimizer)
            if clip:
                clip_grad_norm_(model.parameters(), 1.0, ctx)
            if grad_scaler:
                grad_scaler.step(optimizer)
                grad_scaler.update()
                out["scales"].append(grad_scaler.get_scale())
            else:
                optimizer.step()
        except NonFiniteError as e:
            out["error"] = {"message": str(e), "step": e.step, "rank": e.rank, "stage": e.stage, "name": e.name}
            out["before"], out["after"] = before, _local_params(model)
            return out
        optimizer.zero_grad()
        out["losses"].append(float(loss.detach()))
    out["after"] = _local_params(model)
    return out


def _assert_stopped(results: list[dict[str, Any]], step: int) -> None:
    """Every rank raised the same error at ``step``, naming it, with its weights untouched."""
    errors = [r["error"] for r in results]
    assert all(e is not None for e in errors), errors
    assert len({e["message"] for e in errors}) == 1, "every rank must raise the same error"
    error = errors[0]
    assert error["step"] == step and f"optimizer step {step}" in error["message"]
    assert f"rank {error['rank']} (pipeline stage {error['stage']}" in error["message"]
    assert error["name"] and repr(error["name"]) in error["message"]
    for r in results:
        for name, before in r["before"].items():
            assert torch.isfinite(before).all(), name
            assert torch.equal(before, r["after"][name]), f"{name} was written"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inf_in_the_inputs_stops_every_rank_before_the_step(layout: str) -> None:
    results = run_distributed(_train, *LAYOUTS[layout], "inf", timeout=120)
    _assert_stopped(results, step=2)
    assert "the loss was nan" in results[0]["error"]["message"] or "the loss was inf" in results[0]["error"]["message"]
    assert all(len(r["losses"]) == 1 for r in results)  # step 1 trained


@pytest.mark.parametrize("layout", ["dp2", "tp2xpp2"])
def test_a_huge_learning_rate_stops_before_nan_weights(layout: str) -> None:
    results = run_distributed(_train, *LAYOUTS[layout], "lr", timeout=120)
    _assert_stopped(results, step=2)


def test_zero1_with_clipping_names_the_parameter_through_its_shard() -> None:
    results = run_distributed(_train, 2, 2, 2, "inf", zero=True, clip=True, timeout=180)
    _assert_stopped(results, step=2)
    assert results[0]["error"]["stage"] == 1  # the last stage's gradients go bad first in the backward


def test_master_weights_name_the_model_parameter_of_a_master() -> None:
    results = run_distributed(_train, 2, 1, 1, "inf", precision="bf16", timeout=120)
    _assert_stopped(results, step=2)


def test_off_trains_on_as_before() -> None:
    results = run_distributed(_train, 1, 2, 1, "inf", check=False, timeout=120)
    for r in results:
        assert r["error"] is None
        assert len(r["losses"]) == 3 and not all(math.isfinite(l) for l in r["losses"])
        assert not all(torch.isfinite(p).all() for p in r["after"].values())  # nan weights, as before


def test_grad_scaler_still_skips_and_backs_off() -> None:
    results = run_distributed(_train, 1, 2, 1, "inf", scaler=True, timeout=120)
    for r in results:
        assert r["error"] is None
        assert r["scales"] == [16.0, 8.0, 8.0]  # the step with inf skipped, the scale halved
        assert all(torch.isfinite(p).all() for p in r["after"].values())


@pytest.mark.parametrize("options", [{}, {"zero": True, "clip": True}])
def test_a_normal_run_is_bit_identical_with_the_check_on_and_off(options: dict[str, bool]) -> None:
    on = run_distributed(_train, 2, 2, 2, "", **options, timeout=180)
    off = run_distributed(_train, 2, 2, 2, "", check=False, **options, timeout=180)
    for a, b in zip(on, off):
        assert a["error"] is None and a["losses"] == b["losses"]
        assert all(torch.equal(a["after"][n], b["after"][n]) for n in a["after"])


def _reductions_in_the_step(ctx: ParallelContext, clip: bool) -> int:
    """All-reduces during ``optimizer.step()`` of a dp=2 model, after clipping or not."""
    model = at_layout(SPEC.build_model(), ctx)
    optimizer = SPEC.build_optimizer(model.parameters())
    model(**shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size)).loss.backward()
    if clip:
        clip_grad_norm_(model.parameters(), 1.0, ctx)
    calls, real = [], torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        optimizer.step()
    finally:
        torch.distributed.all_reduce = real
    return len(calls)


def test_clipping_agrees_on_the_flag_so_the_step_reduces_nothing() -> None:
    assert run_distributed(_reductions_in_the_step, 1, 1, 2, False, timeout=60) == [1, 1]
    assert run_distributed(_reductions_in_the_step, 1, 1, 2, True, timeout=60) == [0, 0]


def _clipped_once(ctx: ParallelContext) -> str:
    """Clip (finite: agreed) and step, then a step with a nan gradient and no clipping."""
    model = at_layout(SPEC.build_model(), ctx)
    optimizer = SPEC.build_optimizer(model.parameters())
    for step in range(2):
        model(**shard_batch(SPEC.batch(step), ctx.dp_rank, ctx.dp_size)).loss.backward()
        if step == 0:
            clip_grad_norm_(model.parameters(), 1.0, ctx)
        elif ctx.dp_rank == 1:
            next(model.parameters()).grad.view(-1)[0] = math.nan
        try:
            optimizer.step()
        except NonFiniteError as e:
            return f"{e.step} {e.name}"
        optimizer.zero_grad()
    return ""


def test_an_agreement_lasts_one_step() -> None:
    assert run_distributed(_clipped_once, 1, 1, 2, timeout=60) == ["2 model.embed_tokens.weight"] * 2


# -- units ---------------------------------------------------------------------------------------
def _one_rank(fn: Any) -> Any:
    return run_distributed(fn, 1, 1, 1, timeout=60)[0]


def _plain_step(ctx: ParallelContext) -> str:
    model = nn.Linear(2, 2)
    watch(model, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.weight.grad = torch.zeros(2, 2)
    model.bias.grad = torch.tensor([0.0, math.nan])
    try:
        optimizer.step()
    except NonFiniteError as e:
        assert torch.isfinite(model.bias).all()
        return str(e)
    return ""


def test_a_plain_torch_optimizer_over_a_watched_model_is_checked() -> None:
    assert "'bias'" in _one_rank(_plain_step)


def _unwatched(ctx: ParallelContext) -> bool:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.weight.grad = torch.full((2, 2), math.nan)
    model.bias.grad = torch.zeros(2)
    optimizer.step()  # no goose wrapper: left alone
    return bool(torch.isnan(model.weight).all())


def test_an_optimizer_goose_does_not_watch_is_left_alone() -> None:
    assert _one_rank(_unwatched)


def test_flat_names_find_the_parameter_a_shard_element_belongs_to() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    guard = FiniteGuard.__new__(FiniteGuard)
    watch_like(a, guard, lambda _: ["a"])
    watch_like(b, guard, lambda _: ["b"])
    names = flat_names([a, b], [0, 3], start=2)  # the shard holds a[2], b[0:3]
    assert names(torch.tensor([0.0, 0.0, math.inf, 0.0])) == ["b"]
    assert names(torch.tensor([math.nan, 0.0, 0.0, 0.0])) == ["a"]
    assert names(torch.zeros(4)) == []


def _clip_one_nan(ctx: ParallelContext, check: bool) -> list[bool]:
    """Which gradients are still finite after clipping, one nan planted on dp rank 0 (the one
    whose replica the norm counts)."""
    ctx.check_finite = check
    model = at_layout(SPEC.build_model(), ctx)
    model(**shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size)).loss.backward()
    if ctx.dp_rank == 0:
        next(model.parameters()).grad.view(-1)[0] = math.nan
    clip_grad_norm_(model.parameters(), 1e-3, ctx)
    return [bool(torch.isfinite(p.grad).all()) for p in model.parameters()]


def test_clipping_leaves_non_finite_gradients_for_the_step_to_name() -> None:
    on = run_distributed(_clip_one_nan, 1, 1, 2, True, timeout=60)
    off = run_distributed(_clip_one_nan, 1, 1, 2, False, timeout=60)
    assert on[1] == [True] * len(on[1]) and on[0][0] is False and all(on[0][1:])  # as they were
    assert not any(off[0]) and not any(off[1])  # torch's way: every gradient times nan


def _deep_copy(ctx: ParallelContext) -> bool:
    import copy
    model = nn.Linear(2, 2)
    guard = watch(model, ctx)
    copied = copy.deepcopy(model)  # the model's loss hook belongs to the guard, which holds ctx
    return next(iter(copied._forward_hooks.values())).__self__ is guard


def test_a_watched_model_can_be_deep_copied() -> None:
    assert _one_rank(_deep_copy)
