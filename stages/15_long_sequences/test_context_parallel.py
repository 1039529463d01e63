"""Stage 15: context parallelism (ring attention, load-balanced; Ulysses) equals the single-device run.

Llama (GQA), Qwen2 (sliding window on its upper layers), Mistral (sliding window) and GPT-2
(learned positions), with right and left padding, at cp = 2 and 4: losses and parameters after
two float64 AdamW steps equal one device's at ``PARALLEL`` on every rank. A ring step skipped, or
the causal mask taken from local positions, lands far outside it. The bytes a rank holds for the
backward (saved-tensor hooks) are the README's formula: per token held, so they fall by cp. All the cases of one layout run
in one group of processes. With tensor parallelism and data parallelism around it (tp2 x cp2 x
dp2, ZeRO-1, clipping) the run is still one device's.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import MistralConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

from goose_core import (ContextParallel, DataParallel, DistributedOptimizer, ParallelContext, TensorParallel,
                        clip_grad_norm_, full_state_dict, spawn)
from goose_core.context_parallel import ring
from goose_core.context_parallel.attention import ulysses_available
from goose_core.testing import (PARALLEL, RunResult, TINY_MODELS, TrainSpec, assert_matches_reference, noise_floor_runs,
                                noise_floor_tolerances, reference_run, train_loop)
from goose_core.testing.models import seeded_model

from course import load_train_script

train_script = load_train_script("15")
_MEMORY_SCRIPT = importlib.util.spec_from_file_location("goose_stage_15_memory", Path(__file__).with_name("memory.py"))
assert _MEMORY_SCRIPT is not None and _MEMORY_SCRIPT.loader is not None
memory = importlib.util.module_from_spec(_MEMORY_SCRIPT)
_MEMORY_SCRIPT.loader.exec_module(memory)  # NOTES.md's measurement: the same held_bytes

pytestmark = pytest.mark.usefixtures("one_thread")  # the reference runs in this process

_SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# Windows of 6 positions over sequences of 16: every window crosses a chunk boundary at cp = 2, 4.
_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "qwen2": lambda: Qwen2Config(**_SIZES, use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "mistral": lambda: MistralConfig(**_SIZES, sliding_window=6),
}
FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
METHODS = ("ring", "ulysses") if ulysses_available() else ("ring",)


@dataclass(frozen=True)
class FamilySpec(TrainSpec):
    """A TrainSpec for the tiny families and for Qwen2 / Mistral configs of the same size."""

    def build_model(self) -> PreTrainedModel:
        if self.family in TINY_MODELS:
            return super().build_model()
        return seeded_model(_CONFIGS[self.family](), self.seed, self.model_dtype)


def _spec(family: str, padding: str) -> FamilySpec:
    return FamilySpec(family=family, steps=2, batch_size=2, seq_len=16, padding=padding)


CASES = [(f, p) for f in FAMILIES for p in ("right", "left")]

#: Bugs planted in the ring, each a monkeypatch applied inside the ranks.
BUGS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    # the last block never arrives: each rank misses one rank's keys
    "a ring step skipped": lambda mp: mp.setattr(ring, "_ring_steps", lambda size: size - 1),
    # the mask from local indices: a late chunk's queries see the wrong keys
    "the causal mask from local positions": lambda mp: mp.setattr(
        ring, "allowed", lambda q, k, mask, window, _a=ring.allowed: _a(torch.arange(len(q)), torch.arange(len(k)),
                                                                         mask, window)),
}


def _held_bytes(ctx: ParallelContext) -> int:
    """Bytes saved for backward after one forward of the tiny Llama (batch 2, S = 32)."""
    return memory.held_bytes(train_script.build(ctx, MEMORY), MEMORY.batch(0))


def _cases(cp: int, cases: list[tuple[str, str, str]], bugs: list[str]) -> tuple[list[RunResult], int, str]:
    """Every case on this rank: train.py's run of each (family, padding, method), then the bugs';
    the activation bytes one forward holds; Bloom's refusal."""
    ctx = ParallelContext(context_parallel_size=cp, backend="gloo", device="cpu")
    results = [train_script.train(ctx, _spec(f, p), m) for f, p, m in cases]
    for bug in bugs:
        with pytest.MonkeyPatch.context() as mp:
            BUGS[bug](mp)
            results.append(train_script.train(ctx, _spec("llama", "right")))
    return results, _held_bytes(ctx), _refusal(ctx)


def _refusal(ctx: ParallelContext) -> str:
    """What the first forward of Bloom (ALiBi in its own attention code, no interface) raises."""
    model = train_script.build(ctx, TrainSpec(family="bloom"))
    try:
        model(**_spec("llama", "right").batch(0))
    except ValueError as err:
        return str(err)
    return "nothing raised"


def _check(results: list[list[RunResult]], cases: list[tuple[str, str, str]], bugs: list[str]) -> None:
    references = {(f, p): reference_run(_spec(f, p)) for f, p, _ in cases}
    for rank, mine in enumerate(results):
        for (family, padding, method), got in zip(cases, mine):
            try:
                assert_matches_reference(got, references[family, padding], PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"rank {rank}, {family}, {padding} padding, {method}: {err}") from err
        for bug, got in zip(bugs, mine[len(cases):]):
            with pytest.raises(AssertionError):
                assert_matches_reference(got, references["llama", "right"], PARALLEL)


#: The memory measurement's run: the tiny float64 Llama, 2 rows of 32 tokens.
MEMORY = TrainSpec(family="llama", steps=1, batch_size=2, seq_len=32)
#: Bytes per token a rank holds for backward, tiny float64 Llama (4 layers, width 64, 4 heads of
#: 16, 2 kv heads, MLP 128, vocab 256), counted from the saved tensors (README, "Memory").
PER_TOKEN = 41_048
#: The one saved tensor that is not per token: the loss's float64 scalar.
SCALAR = 8


def _check_memory(held: list[int], cp: int) -> None:
    """Every rank holds the formula's bytes for its b * S / cp tokens: activations fall by cp."""
    tokens = MEMORY.batch_size * MEMORY.seq_len // cp
    assert held == [PER_TOKEN * tokens + SCALAR] * cp, f"cp={cp}: held {held}, formula {PER_TOKEN * tokens + SCALAR}"


def test_ring_at_cp2_equals_one_device_holds_half_the_activations_refuses_bloom_and_the_planted_bugs_fail() -> None:
    cases = [(f, p, m) for f, p in CASES for m in METHODS]
    out = spawn(_cases, 2, 2, cases, list(BUGS), timeout=240)
    _check([results for results, _, _ in out], cases, list(BUGS))
    _check_memory([held for _, held, _ in out], 2)
    for *_, refused in out:  # a family with its own attention code: refused at its first forward
        assert "does not support 'bloom': its attention does not go through" in refused, refused


def test_ring_at_cp4_equals_one_device_and_holds_a_quarter_of_the_activations() -> None:
    cases = [(f, p, m) for f, p in CASES for m in METHODS]
    out = spawn(_cases, 4, 4, cases, [], timeout=240)
    _check([results for results, _, _ in out], cases, [])
    _check_memory([held for _, held, _ in out], 4)


def _tp_cp_dp(ctx: ParallelContext, spec: TrainSpec, sequence_parallel: bool = False) -> RunResult:
    model = TensorParallel(spec.build_model(), ctx, sequence_parallel=sequence_parallel).parallelize()
    model = ContextParallel(model, ctx).parallelize()
    model = DataParallel(model, ctx).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    clip = lambda: clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)  # noqa: E731
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size), clip)
    return RunResult(losses, full_state_dict(model, ctx))


def _on_grid(fn: Callable[..., Any], tp: int, dp: int, cp: int, *args: Any) -> Any:
    return fn(ParallelContext(tp, 1, dp, context_parallel_size=cp, backend="gloo", device="cpu"), *args)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_tp2_cp2_dp2_with_zero1_and_clipping_equals_one_device(sequence_parallel: bool) -> None:
    # Left padding, so the dp shards and the cp slices hold different numbers of targets; a clip
    # of 0.5 acts on the first steps. ZeRO-1 shards the optimizer over dp x cp (4 replicas). With
    # sequence parallelism each tp rank holds half of its cp slice between the regions.
    spec = TrainSpec(family="llama", steps=2, batch_size=4, seq_len=16, padding="left", max_grad_norm=0.5)
    reference = reference_run(spec)
    for rank, result in enumerate(spawn(_on_grid, 8, _tp_cp_dp, 2, 2, 2, spec, sequence_parallel, timeout=240)):
        try:
            assert_matches_reference(result, reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err



# bf16 with fp32 masters (stage 01's recipe), SGD as stage 07's bf16 tests (AdamW turns rounding
# noise of near-zero gradients into lr-sized steps). The ring merges per-block softmax partials
# and the ranks' losses add up: sums in another order, which the noise floor samples (the
# reference with its sums reordered and split, on one device).
BF16 = TrainSpec(family="llama", steps=3, optimizer="sgd", lr=0.1, padding="left", batch_size=8, seq_len=16,
                 precision="bf16")


def _bf16(ctx: ParallelContext) -> list[RunResult]:
    runs = []
    for method in METHODS:
        model = DataParallel(ContextParallel(BF16.build_model(), ctx, method=method).parallelize(), ctx).parallelize()
        losses = train_loop(model, BF16.recipe_optimizer(model.parameters()), BF16.batches(ctx.dp_rank, ctx.dp_size))
        runs.append(RunResult(losses, full_state_dict(model, ctx)))
    return runs


def test_bf16_with_fp32_masters_is_within_the_one_device_recipe_s_noise_floor() -> None:
    reference = reference_run(BF16)
    losses, params = noise_floor_tolerances(reference, noise_floor_runs(BF16))
    for rank, runs in enumerate(spawn(_on_grid, 4, _bf16, 1, 2, 2, timeout=240)):
        for method, result in zip(METHODS, runs):
            try:
                assert_matches_reference(result, reference, losses, params)
            except AssertionError as err:
                raise AssertionError(f"rank {rank}, {method}: {err}\n({losses.why}; {params.why})") from err
