"""Discard/Recompute: same values and gradients as keeping the activations, fewer saved tensors."""

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from goose_core.engine.callbacks import Callback, CallbackList
from goose_core.engine.dependency import fork, get_phony, join
from goose_core.engine.recompute import Recomputation, is_recomputing, recompute_stop, will_recompute


def _recomputed(function, x: torch.Tensor, callbacks: CallbackList | None = None) -> torch.Tensor:
    """What the executor builds for the first cell of the backward order."""
    record = Recomputation(function, x, (0, 0), callbacks or CallbackList())
    y = record.run(get_phony(x.device, requires_grad=True))
    y, phony = fork(y)
    return join(y, record.recompute(phony))


def _layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 8))


def _grads(recomputed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer = _layer()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(2)  # dropout masks come from here
    y = _recomputed(layer, x) if recomputed else layer(x)
    torch.randn(100)  # RNG moves on between forward and backward, as in training
    (y ** 2).sum().backward()
    return x.grad, [p.grad for p in layer.parameters()]


def test_dropout_gradients_are_bit_identical() -> None:
    (gx, gp), (cx, cp) = _grads(False), _grads(True)
    assert torch.equal(gx, cx)
    assert all(torch.equal(a, b) for a, b in zip(gp, cp))


def test_a_recomputed_cell_saves_only_its_input() -> None:
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _recomputed(_layer(), x)
    assert sizes == [x.numel()]


def test_flags_and_recompute_callbacks() -> None:
    seen: list[tuple[str, bool, bool]] = []
    events: list[str] = []

    def probe(t: torch.Tensor) -> torch.Tensor:
        seen.append(("call", will_recompute(), is_recomputing()))
        return t * 2

    callbacks = CallbackList([Callback(lambda e: events.append(f"{e.kind} {e.phase}"))])
    y = _recomputed(probe, torch.ones(3, requires_grad=True), callbacks)
    y.sum().backward()
    assert seen == [("call", True, False), ("call", False, True)]
    assert events == ["recompute before", "recompute after"]
    assert not will_recompute() and not is_recomputing()


def test_backward_without_recompute_explains_itself() -> None:
    x = torch.ones(3, requires_grad=True)
    record = Recomputation(lambda t: t * 2, x, (3, 1), CallbackList())
    y = record.run(get_phony(x.device, requires_grad=True))
    with pytest.raises(RuntimeError, match=r"cell \(3, 1\) reached its backward before its recompute"):
        y.sum().backward()


@pytest.mark.parametrize("mode, stop", [("always", 4), ("except_last", 3), ("never", 0)])
def test_recompute_stop(mode: str, stop: int) -> None:
    assert recompute_stop(mode, 4) == stop


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown recompute mode 'sometimes'"):
        recompute_stop("sometimes", 4)


def _autocast_grads(recomputed: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    layer = _layer()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=dtype):
        y = _recomputed(layer, x) if recomputed else layer(x)
    y.float().square().sum().backward()  # outside the autocast block, as training loops do
    return [x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_recompute_runs_under_the_forwards_autocast_state(dtype: torch.dtype) -> None:
    plain, recomputed = _autocast_grads(False, dtype), _autocast_grads(True, dtype)
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))


def test_recompute_keeps_autocast_off_when_the_forward_had_it_off() -> None:
    seen: list[torch.dtype] = []

    def probe(t: torch.Tensor) -> torch.Tensor:
        out = t @ torch.ones(3, 3)
        seen.append(out.dtype)
        return out

    y = _recomputed(probe, torch.ones(2, 3, requires_grad=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward inside someone's autocast
        y.sum().backward()
    assert seen == [torch.float32, torch.float32]


class _GeluIsTanh(TorchFunctionMode):
    """A torch function mode that changes what the layer computes (GELU becomes tanh)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.nn.functional.gelu:
            func, kwargs = torch.tanh, {}
        return func(*args, **(kwargs or {}))


def _moded_grads(recomputed: bool, mode: TorchFunctionMode) -> list[torch.Tensor]:
    layer = _layer()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(2)
    with mode:
        y = _recomputed(layer, x) if recomputed else layer(x)
    (y ** 2).sum().backward()  # outside the mode, as a harness's loop may be
    return [x.grad, *(p.grad for p in layer.parameters())]


def test_recompute_runs_under_the_forwards_torch_function_modes() -> None:
    # The recompute replays the forward as it ran: under the function modes of the forward
    # (the float64 harness's widening of float32 casts, `with torch.device(...)`). Replayed
    # outside, a recomputed Beam at pp=2 differed from one device by 140x PARALLEL.
    mode = _GeluIsTanh()
    plain, recomputed = _moded_grads(False, mode), _moded_grads(True, mode)
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
    assert not torch.equal(plain[0], _grads(False)[0])  # the mode changed the function


def test_a_backward_inside_the_mode_applies_it_once_to_the_recompute() -> None:
    # The engine runs a backward without the caller's modes, even inside the `with` block (a
    # 1F1B backward inside the forward's call): the recompute enters the mode, once.
    calls: list[object] = []

    class Counting(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.nn.functional.gelu:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with Counting():
        y = _recomputed(_layer(), torch.randn(4, 8, requires_grad=True))
        y.sum().backward()
    assert len(calls) == 2  # the forward's and the recompute's
