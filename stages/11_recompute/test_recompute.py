"""Stage 11: recompute changes memory, never the gradients."""

import torch

from goose_core import ParallelContext, PipelineParallel
from goose_core.pipeline import RECOMPUTE_MODES
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run, run_distributed

from course import load_train_script

train_script = load_train_script("11")
M = 4


def _grads(ctx: ParallelContext, spec: TrainSpec) -> dict[str, dict[str, torch.Tensor]]:
    """Per mode: this stage's gradients after one step with dropout."""
    out = {}
    for mode in RECOMPUTE_MODES:
        model = PipelineParallel(spec.build_model(), ctx, num_microbatches=M, recompute=mode).parallelize()
        torch.manual_seed(100 + ctx.rank)  # the dropout masks of this step
        model(**spec.batch(0)).loss.backward()
        out[mode] = {n: p.grad for n, p in model.named_parameters()}
    return out


def test_dropout_gradients_are_bit_identical_in_every_mode() -> None:
    spec = TrainSpec(family="gpt2", dropout=0.1)  # tied embeddings on two stages, dropout everywhere
    for rank, modes in enumerate(run_distributed(_grads, 1, 2, 1, spec, timeout=120)):
        never = modes["never"]
        for mode, grads in modes.items():
            assert grads.keys() == never.keys()
            for name, g in never.items():
                assert torch.equal(grads[name], g), f"rank {rank} {mode}: {name} differs from never"


def _memory(ctx: ParallelContext, spec: TrainSpec) -> list[list[tuple[int, int]]]:
    return train_script.memory_table(ctx, spec, M)


def test_always_saves_at_most_half_of_never_at_four_blocks_per_stage() -> None:
    spec = TrainSpec(family="llama", overrides={"num_hidden_layers": 8})
    rows = run_distributed(_memory, 1, 2, 1, spec, timeout=120)[0]
    saved = {mode: [bytes_ for bytes_, _ in row] for mode, row in zip(RECOMPUTE_MODES, rows)}
    always, except_last, never = saved["always"], saved["except_last"], saved["never"]
    for stage in range(2):
        assert always[stage] <= 0.5 * never[stage], (always, never)
        assert always[stage] < except_last[stage] < never[stage]
        # the block modes keep each block's inputs (and matmul outputs), and the head's activations
        assert never[stage] > saved["selective"][stage] > saved["blocks"][stage] >= always[stage], saved


def _train(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    return train_script.train(ctx, spec, M, "always")


def test_train_py_equals_the_single_device_run() -> None:
    spec = TrainSpec(family="llama", steps=2, optimizer="sgd")
    for result in run_distributed(_train, 1, 2, 1, spec, timeout=120):
        assert_matches_reference(result, reference_run(spec), PARALLEL)
