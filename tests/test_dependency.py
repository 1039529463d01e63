"""Fork/Join: phony edges decide the order in which autograd runs two independent branches."""

import torch

from goose_core.engine.dependency import depend, fork, join


class Log(torch.autograd.Function):
    """Identity that appends its name to a timeline when its backward runs."""

    @staticmethod
    def forward(ctx, x, timeline, name):  # type: ignore[override]
        ctx.timeline, ctx.name = timeline, name
        return x.detach()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ctx.timeline.append(ctx.name)
        return grad, None, None


def _backward_from_a_only(with_edge: bool) -> list[str]:
    """b is not in the loss: only a phony edge can bring autograd to b's producer."""
    timeline: list[str] = []
    leaf = torch.ones(2, requires_grad=True)
    b = Log.apply(leaf * 3, timeline, "b")
    a_in = leaf * 2
    if with_edge:
        b, a_in = depend(b, a_in)  # b's producer waits until a_in's consumer is done
    a = Log.apply(a_in, timeline, "a")
    a.sum().backward()
    return timeline


def test_without_an_edge_the_other_branch_is_not_reached() -> None:
    assert _backward_from_a_only(with_edge=False) == ["a"]


def test_depend_runs_the_fork_side_after_the_join_side() -> None:
    assert _backward_from_a_only(with_edge=True) == ["a", "b"]


def test_values_and_gradients_pass_unchanged() -> None:
    x = torch.randn(3, requires_grad=True)
    y, phony = fork(x * 2)
    z = join(torch.ones(3, requires_grad=True) * 1, phony)
    assert phony.numel() == 0 and phony.requires_grad
    assert torch.equal(y, x.detach() * 2)
    (y.sum() + z.sum()).backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_without_grad_nothing_is_added() -> None:
    with torch.no_grad():
        x = torch.randn(3)
        y, phony = fork(x)
        assert y is x and join(x, phony) is x
