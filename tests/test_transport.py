"""The distributed transport: activations forward, gradients backward, shapes exchanged once."""

import torch

from goose_core import ParallelContext
from goose_core.engine.p2p import DistributedTransport
from goose_core.testing import run_distributed

M = 3


def _boundary(ctx: ParallelContext, dtype: torch.dtype) -> list[torch.Tensor]:
    transport = DistributedTransport(ctx.pp_group, ctx.prev_pipeline_rank, ctx.next_pipeline_rank,
                                     ctx.device)
    transport.begin(M, requires_grad=True)
    if ctx.is_first_stage:
        xs = [torch.full((2, 5), float(i + 1), dtype=dtype, requires_grad=True) for i in range(M)]
        phonies = [transport.send(x * 1, i, 0) for i, x in enumerate(xs)]
        transport.end_forward()
        torch.autograd.backward([p for p in phonies], [torch.empty(0) for _ in phonies])
        return [x.grad for x in xs]
    received = [transport.recv(i, 1) for i in range(M)]
    transport.end_forward()
    sum((i + 1) * 10 * x.sum() for i, x in enumerate(reversed(received))).backward()
    transport.end_backward()
    return [x.detach() for x in received]


def test_activations_forward_and_gradients_back() -> None:
    grads, received = run_distributed(_boundary, 1, 2, 1, torch.float64, timeout=60)
    for i in range(M):
        assert received[i].dtype == torch.float64 and received[i].shape == (2, 5)
        assert torch.equal(received[i], torch.full((2, 5), float(i + 1), dtype=torch.float64))
        # received[i] was weighted by (M - i) * 10 on the second rank
        assert torch.equal(grads[i], torch.full((2, 5), (M - i) * 10.0, dtype=torch.float64))


def _abandoned_step(ctx: ParallelContext) -> torch.Tensor:
    """A step whose backward never runs (an eval loss computed with grad on), then a real one."""
    transport = DistributedTransport(ctx.pp_group, ctx.prev_pipeline_rank, ctx.next_pipeline_rank,
                                     ctx.device)
    for step in range(2):
        transport.begin(1, requires_grad=True)
        if ctx.is_first_stage:
            x = torch.full((3,), float(step + 1), requires_grad=True)
            phony = transport.send(x * 1, 0, 0)
            transport.end_forward()
            if step == 1:
                phony.backward(torch.empty(0))
                return x.grad
        else:
            y = transport.recv(0, 1)
            transport.end_forward()
            if step == 1:
                (y * 5).sum().backward()
                transport.end_backward()
                return y.detach()
    raise AssertionError("unreachable")


def test_an_abandoned_backward_does_not_swallow_the_next_steps_messages() -> None:
    grad, received = run_distributed(_abandoned_step, 1, 2, 1, timeout=60)
    assert torch.equal(received, torch.full((3,), 2.0))
    assert torch.equal(grad, torch.full((3,), 5.0))
