"""The executor, in one process (local transport): order of work, recompute, errors."""

import pytest
import torch
from torch import nn

from goose_core.pipeline import Callback, local_pipeline
from goose_core.engine.schedule import GPipe
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, build_model, reference_run, snapshot, train_loop

SPEC = TrainSpec(family="llama", batch_size=8, seq_len=16)


def _timeline(n: int, m: int, recompute: str) -> list[tuple[str, str, int, int]]:
    events: list[tuple[str, str, int, int]] = []
    record = Callback(lambda e: events.append((e.kind, e.phase, e.microbatch_idx, e.partition_idx)))
    model = local_pipeline(SPEC.build_model(), n, m, recompute, callbacks=[record])
    model(**SPEC.batch(0)).loss.backward()
    return events


@pytest.mark.parametrize("recompute", ["never", "always"])
def test_work_follows_the_schedule(recompute: str) -> None:
    n, m = 3, 4
    events = _timeline(n, m, recompute)
    schedule = GPipe(m, n)
    forward = [(i, j) for kind, phase, i, j in events if kind == "forward" and phase == "before"]
    assert forward == schedule.forward_cells()
    for j in range(n):
        mine = [(kind, phase, i) for kind, phase, i, p in events if p == j and kind != "forward"]
        backward = [i for kind, phase, i in mine if kind == "backward" and phase == "before"]
        assert backward == schedule.backward_order(j)
        for kind, phase, i in mine:  # every cell's work is bracketed: before ... after
            assert mine.index((kind, "after", i)) > mine.index((kind, "before", i))
        if recompute == "always":  # each recompute right before its cell's backward
            for i in backward:
                assert mine.index(("recompute", "after", i)) + 1 == mine.index(("backward", "before", i))


def test_dropout_gradients_are_bit_identical_in_every_mode() -> None:
    spec = TrainSpec(family="llama", dropout=0.2, batch_size=8, seq_len=16)
    grads = {}
    for mode in ["never", "except_last", "always"]:
        model = local_pipeline(spec.build_model(), 2, 4, mode)
        torch.manual_seed(7)
        model(**spec.batch(0)).loss.backward()
        grads[mode] = {name: p.grad for name, p in model.named_parameters()}
    for mode in ["except_last", "always"]:
        assert all(torch.equal(grads[mode][k], g) for k, g in grads["never"].items()), mode


def _saved_bytes(recompute: str) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    spec = TrainSpec(family="llama", seq_len=16, overrides={"num_hidden_layers": 8})
    model = local_pipeline(spec.build_model(), 2, 4, recompute)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**spec.batch(0)).loss
    loss.backward()
    return total


def test_always_saves_far_fewer_activations_than_never() -> None:
    never, except_last, always = (_saved_bytes(m) for m in ["never", "except_last", "always"])
    assert always < 0.1 * never
    assert always < except_last < never


def test_eval_returns_the_single_device_logits() -> None:
    reference = build_model("gpt2", dtype=torch.float64).eval()
    model = local_pipeline(build_model("gpt2", dtype=torch.float64).eval(), 2, 4)
    ids = SPEC.batch(0)["input_ids"]
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=PARALLEL.rtol, atol=PARALLEL.atol)


def test_a_raising_callback_stops_the_step() -> None:
    def boom(event) -> None:
        raise KeyError("callback says no")

    model = local_pipeline(SPEC.build_model(), 2, 2, callbacks=[Callback(boom, 1, 1, ["backward"])])
    loss = model(**SPEC.batch(0)).loss
    with pytest.raises(KeyError, match="callback says no"):
        loss.backward()


@pytest.mark.parametrize("kwargs, match", [
    ({"num_partitions": 5}, "4 blocks cannot fill 5 pipeline stages"),
    ({"num_microbatches": 0}, "num_microbatches must be >= 1"),
    ({"recompute": "sometimes"}, "unknown recompute mode"),
])
def test_bad_configurations_name_the_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        local_pipeline(SPEC.build_model(), **{"num_partitions": 2, **kwargs})


def test_batch_not_divisible_is_refused() -> None:
    model = local_pipeline(SPEC.build_model(), 2, 3)
    with pytest.raises(ValueError, match="a batch of 8 does not split into 3"):
        model(**SPEC.batch(0))


def test_a_model_without_blocks_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="cannot split Sequential"):
        local_pipeline(nn.Sequential(nn.Linear(2, 2)), 2)


@pytest.mark.parametrize("partitioner", ["time", "memory"])
def test_local_pipeline_takes_the_profiled_partitioners(partitioner: str) -> None:
    # SGD: a wrong gradient scale stays visible (AdamW's normalisation would hide it).
    spec = TrainSpec(family="llama", steps=2, optimizer="sgd")
    model = local_pipeline(spec.build_model(), 2, 2, partitioner=partitioner)
    optimizer = spec.build_optimizer(model.parameters())
    result = RunResult(train_loop(model, optimizer, spec.batches()), snapshot(model))
    assert_matches_reference(result, reference_run(spec), PARALLEL)
