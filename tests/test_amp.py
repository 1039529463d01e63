"""GradScaler on one process: torch.amp.GradScaler's numbers, errors and state dict; MasterWeights'
fp32 masters following bf16 weights written between steps."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from goose_core import GradScaler
from goose_core.optim import MasterWeights

CPU = SimpleNamespace(device=torch.device("cpu"))  # what GradScaler reads of a ParallelContext
INF_STEPS = {1, 2, 6}  # steps whose gradient gets an inf: two backoffs in a row, then growth


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _run(make_scaler, steps: int = 10) -> tuple[list[dict], list[torch.Tensor]]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = make_scaler()
    states = []
    for step in range(steps):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
        scaler.scale(model(x).square().mean()).backward()
        if step in INF_STEPS:
            model[0].weight.grad[0, 0] = float("nan") if step == 2 else float("inf")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        states.append(scaler.state_dict())
    return states, [p.detach().clone() for p in model.parameters()]


def test_same_scales_state_and_parameters_as_torch() -> None:
    kwargs = dict(init_scale=2.0**10, growth_interval=2)
    ours, ours_params = _run(lambda: GradScaler(CPU, **kwargs))
    theirs, theirs_params = _run(lambda: torch.amp.GradScaler("cpu", **kwargs))
    assert ours == theirs
    assert [s["scale"] for s in ours] == [2**10, 2**9, 2**8, 2**8, 2**9, 2**9, 2**8, 2**8, 2**9, 2**9]
    assert all(torch.equal(a, b) for a, b in zip(ours_params, theirs_params))


def test_a_skipped_step_changes_no_parameter_and_no_optimizer_state() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = GradScaler(CPU)
    for inject in (False, True):
        before = ([p.detach().clone() for p in model.parameters()],
                  {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state_dict()["state"].items()})
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        if inject:
            model[2].bias.grad.fill_(float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    params, state = before
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(state[k][n], after[k][n]) for k in state for n in state[k])
    assert scaler.get_scale() == 2.0**15


def _stepped(scaler: GradScaler) -> torch.optim.Optimizer:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    return optimizer


def test_order_errors_as_torch() -> None:
    scaler = GradScaler(CPU)
    optimizer = _stepped(scaler)
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called on this optimizer"):
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) is being called after step\(\)"):
        scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match=r"step\(\) has already been called since the last update"):
        scaler.step(optimizer)
    scaler.update()
    with pytest.raises(RuntimeError, match="No inf checks were recorded prior to update"):
        scaler.update()
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(optimizer, closure=lambda: 0.0)


def test_fp16_gradients_are_refused_with_the_fix() -> None:
    model = _model().half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler(CPU)
    scaler.scale(model(torch.randn(2, 4, dtype=torch.float16)).sum()).backward()
    with pytest.raises(ValueError, match=r"cannot unscale fp16 gradients \(4 on this rank\).*torch.autocast"):
        scaler.unscale_(optimizer)


def test_scaled_half_loss_is_fp32_so_the_scale_cannot_overflow_it() -> None:
    loss = torch.tensor(10.0, dtype=torch.float16)
    scaled = GradScaler(CPU).scale(loss)
    assert scaled.dtype == torch.float32 and scaled.item() == 10.0 * 2**16
    assert GradScaler(CPU).scale([loss, loss])[1].item() == 10.0 * 2**16


def test_state_dict_round_trip_and_torch_format() -> None:
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**7, growth_interval=5)
    ours = GradScaler(CPU)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict() == theirs.state_dict()
    again = GradScaler(CPU)
    again.load_state_dict(ours.state_dict())
    assert again.state_dict() == ours.state_dict()
    with pytest.raises(RuntimeError, match="source state dict is empty"):
        ours.load_state_dict({})


def test_disabled_is_a_pass_through() -> None:
    scaler = GradScaler(CPU, enabled=False)
    optimizer = _stepped(scaler)
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0 and scaler.state_dict() == {}
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()


@pytest.mark.parametrize("kwargs, message", [
    ({"init_scale": 0.0}, "init_scale must be > 0, got 0.0"),
    ({"growth_factor": 1.0}, "growth_factor must be > 1.0, got 1.0"),
    ({"backoff_factor": 1.5}, r"backoff_factor must be in \(0, 1\), got 1.5"),
    ({"growth_interval": 0}, "growth_interval must be an int >= 1, got 0"),
])
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradScaler(CPU, **kwargs)


# -- MasterWeights: weights written between steps -------------------------------------------------
def _bf16_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
    model(x).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _masters(optimizer: MasterWeights) -> list[torch.Tensor]:
    return [m.detach().clone() for m in optimizer.masters.values()]


def test_master_weights_step_from_weights_written_between_steps() -> None:
    """``p.copy_`` and ``.data`` writes: an lr=0 step keeps them bit for bit and the next step
    is that of MasterWeights built on them with the same state (EXACT); an element written with
    the value it had keeps its master's extra bits until ``reload_params()``; ``state_dict()``
    saves the masters of weights written since the last step."""
    model = _model().to(torch.bfloat16)
    optimizer = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    _bf16_step(model, optimizer, 0, 0.1)
    state = {k: v for k, v in copy.deepcopy(optimizer.state_dict()).items() if k != "master_weights"}
    before = _masters(optimizer)
    with torch.no_grad():
        model[0].weight.copy_(model[0].weight)  # the same values: the master keeps its bits
        model[0].bias.copy_(2 * model[0].bias)
        model[2].weight.data.mul_(2)  # .data: autograd's version counter does not move
    written = [p.detach().clone() for p in model.parameters()]
    _bf16_step(model, optimizer, 1, 0.0)
    assert all(torch.equal(w, p) for w, p in zip(written, model.parameters())), "an lr=0 step lost written weights"
    masters = _masters(optimizer)  # in parameter order: weight and bias of model[0], of model[2]
    assert torch.equal(masters[0], before[0]) and not torch.equal(before[0], written[0].float())
    assert torch.equal(masters[1], written[1].float()) and torch.equal(masters[2], written[2].float())
    optimizer.reload_params()
    assert all(torch.equal(m, p.float()) for m, p in zip(_masters(optimizer), model.parameters()))
    twin = _model().to(torch.bfloat16)
    with torch.no_grad():
        for p, w in zip(twin.parameters(), written):
            p.copy_(w)
    twin_optimizer = MasterWeights(torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9))
    twin_optimizer.load_state_dict(state)
    _bf16_step(twin, twin_optimizer, 1, 0.0)
    for m, o in ((model, optimizer), (twin, twin_optimizer)):
        _bf16_step(m, o, 2, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    with torch.no_grad():
        model[2].bias.mul_(2)
    assert torch.equal(optimizer.state_dict()["master_weights"][3], model[2].bias.float()), "a save lost a write"


def test_master_weights_loaded_state_and_weights_the_last_write_wins() -> None:
    """Saved masters loaded over other weights are what an lr=0 step writes (the weights came
    first); weights written after the load are what it keeps."""
    model = _model().to(torch.bfloat16)
    optimizer = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    _bf16_step(model, optimizer, 0, 0.1)
    saved = copy.deepcopy(optimizer.state_dict())
    trained = [p.detach().clone() for p in model.parameters()]
    fresh = _model().to(torch.bfloat16)
    again = MasterWeights(torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    again.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict()["master_weights"].values(),
                                                  saved["master_weights"].values()))
    _bf16_step(fresh, again, 1, 0.0)
    assert all(torch.equal(p, t) for p, t in zip(fresh.parameters(), trained)), "the loaded masters lost"
    again.load_state_dict(saved)
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(2)
    written = [p.detach().clone() for p in fresh.parameters()]
    _bf16_step(fresh, again, 1, 0.0)
    assert all(torch.equal(p, w) for p, w in zip(fresh.parameters(), written)), "the weights written last lost"
