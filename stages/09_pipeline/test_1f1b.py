"""Stage 09, 1F1B: the second schedule, in one process (local transport).

What 1F1B changes is *when* each backward runs: inside the forward call, one micro-batch at a
time. The training loop does not change: ``loss.backward()`` hands the parked gradients to
``.grad``, times its seed. Parity over ranks, composed with dp, is in ``test_gpipe.py``
(parametrized by schedule); the micro-batches in flight, counted by callbacks, in
``stages/13_callbacks/test_callbacks_pipeline.py``.
"""

import pytest
import torch
from torch import nn

from goose_core import PipelineParallel
from goose_core.pipeline import local_pipeline
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                snapshot, train_loop)

SPEC = TrainSpec(family="llama", batch_size=8, seq_len=16)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_local_1f1b_trains_like_the_single_device_run() -> None:
    # Tied weights; SGD keeps a wrong scale visible.
    spec = TrainSpec(family="gpt2", steps=2, optimizer="sgd")
    model = local_pipeline(spec.build_model(), 2, 4, schedule="1f1b")
    optimizer = spec.build_optimizer(model.parameters())
    result = RunResult(train_loop(model, optimizer, spec.batches()), snapshot(model))
    assert_matches_reference(result, reference_run(spec), PARALLEL)


def test_grad_changes_only_in_loss_backward_by_its_seed_once() -> None:
    model = local_pipeline(SPEC.build_model(), 2, 2, schedule="1f1b")
    loss = model(**SPEC.batch(0)).loss
    assert all(p.grad is None for p in model.parameters())  # the backward ran, its result is parked
    loss.backward()
    first = _grads(model)
    loss = model(**SPEC.batch(0)).loss  # a loss that is not (yet) backward changes no .grad
    assert all(torch.equal(p.grad, first[name]) for name, p in model.named_parameters())
    (loss * 4).backward()  # the seed counts: (loss / k).backward(), GradScaler.scale(loss)...
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, first[name] + 4 * first[name])  # a power of two: bit for bit
    with pytest.raises(RuntimeError, match="call loss.backward\\(\\) once per forward"):
        loss.backward()


def test_a_scaled_float16_loss_is_refused_with_the_fix() -> None:
    model = local_pipeline(SPEC.build_model(), 2, 2, schedule="1f1b")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(**SPEC.batch(0)).loss
    with pytest.raises(ValueError, match="use schedule='gpipe' with the scaler, or bfloat16"):
        (loss * 1024).backward()


@pytest.mark.parametrize("make", [
    lambda model: local_pipeline(model, 2, 2, schedule="zero-bubble"),
    lambda model: PipelineParallel(model, None, 2, schedule="interleaved"),  # type: ignore[arg-type]
])
def test_an_unknown_schedule_is_refused_with_the_choices(make) -> None:
    with pytest.raises(ValueError, match=r"unknown pipeline schedule .*; choose one of \['gpipe', '1f1b', "):
        make(SPEC.build_model())
