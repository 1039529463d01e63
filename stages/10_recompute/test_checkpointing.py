"""Stage 10: recompute changes memory, never the gradients or the order of work."""

import torch

from goose_core import ParallelContext, PipelineParallel
from goose_core.pipeline import Callback
from goose_core.engine.recompute import MODES
from goose_core.engine.schedule import GPipe
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run, run_distributed

from course import load_train_script

train_script = load_train_script("10")
M = 4


def _grads_and_events(ctx: ParallelContext, spec: TrainSpec) -> dict:
    """Per mode: this stage's gradients after one step with dropout, and its timeline."""
    out = {}
    for mode in MODES:
        events: list[tuple[str, str, int]] = []
        model = PipelineParallel(spec.build_model(), ctx, num_microbatches=M, recompute=mode,
                                 callbacks=[Callback(lambda e: events.append(
                                     (e.kind, e.phase, e.microbatch_idx)))]).parallelize()
        torch.manual_seed(100 + ctx.rank)  # the dropout masks of this step
        model(**spec.batch(0)).loss.backward()
        out[mode] = ({n: p.grad for n, p in model.named_parameters()}, events)
    return out


def test_dropout_gradients_are_bit_identical_and_order_is_the_schedule() -> None:
    spec = TrainSpec(family="gpt2", dropout=0.1)  # tied embeddings on two stages, dropout everywhere
    per_rank = run_distributed(_grads_and_events, 1, 2, 1, spec, timeout=120)
    schedule = GPipe(M, 2)
    for rank, modes in enumerate(per_rank):
        never, _ = modes["never"]
        for mode, (grads, events) in modes.items():
            assert grads.keys() == never.keys()
            for name, g in never.items():
                assert torch.equal(grads[name], g), f"rank {rank} {mode}: {name} differs from never"
            order = [i for kind, phase, i in events if kind == "backward" and phase == "before"]
            assert order == schedule.backward_order(rank), (rank, mode, events)
            recomputed = [i for kind, phase, i in events if kind == "recompute" and phase == "before"]
            stop = {"always": M, "except_last": M - 1, "never": 0}[mode]
            assert recomputed == [i for i in order if i < stop]
            for i in recomputed:  # just before its own backward, after the previous cell's
                at = events.index(("recompute", "after", i))
                assert events[at + 1] == ("backward", "before", i)
                if i + 1 < M:
                    assert events.index(("backward", "after", i + 1)) < at


def _memory(ctx: ParallelContext, spec: TrainSpec) -> list[list[int]]:
    return train_script.memory_table(ctx, spec, M)


def test_always_saves_at_most_half_of_never_at_four_blocks_per_stage() -> None:
    spec = TrainSpec(family="llama", overrides={"num_hidden_layers": 8})
    always, except_last, never = run_distributed(_memory, 1, 2, 1, spec, timeout=120)[0]
    for stage in range(2):
        assert always[stage] <= 0.5 * never[stage], (always, never)
        assert always[stage] < except_last[stage] < never[stage]


def _train(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    return train_script.train(ctx, spec, M, "always")


def test_train_py_equals_the_single_device_run() -> None:
    spec = TrainSpec(family="llama", steps=2, optimizer="sgd")
    for result in run_distributed(_train, 1, 2, 1, spec, timeout=120):
        assert_matches_reference(result, reference_run(spec), PARALLEL)
