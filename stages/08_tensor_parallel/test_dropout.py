"""Stage 08: dropout under tensor parallelism: reproducible, replicated where it must be."""

import torch

from goose_core import ParallelContext
from goose_core.testing import EXACT, RunResult, TrainSpec, assert_matches_reference, run_distributed

from course import load_train_script

train_script = load_train_script("08")
SPEC = TrainSpec(family="gpt2", steps=2, dropout=0.1)


def _run(ctx: ParallelContext) -> RunResult:
    return train_script.train(ctx, SPEC)


def test_same_seed_gives_bit_identical_runs() -> None:
    first, second = (run_distributed(_run, 2, 1, 1, timeout=60) for _ in range(2))
    for a, b in zip(first, second):
        assert_matches_reference(a, b, EXACT)
    assert first[0].losses == first[1].losses  # the loss is replicated too


def _activations(ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Each block's output (replicated) and each attention's dropped-out probabilities (split)."""
    model = train_script.build(ctx, SPEC)
    seen: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.transformer.h):
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"block{i}", out.detach()))
        block.attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"probs{i}", out[1].detach()))
    model(**SPEC.batch(0)).loss.backward()
    return seen


def test_replicated_masks_agree_and_split_masks_differ() -> None:
    rank0, rank1 = run_distributed(_activations, 2, 1, 1, timeout=60)
    for i in range(4):
        # Residual dropout acts on replicated activations: same mask, so bit-identical outputs.
        assert torch.equal(rank0[f"block{i}"], rank1[f"block{i}"])
        # Attention dropout acts on each rank's own heads: the zeroed positions must differ
        # (the same stream would drop the same positions of different heads).
        dropped0, dropped1 = rank0[f"probs{i}"] == 0, rank1[f"probs{i}"] == 0
        assert not torch.equal(dropped0, dropped1)
