"""🤗's ``model.generate()`` on pipelined models draws the tokens one device draws.

Greedy and seeded sampling (temperature, top-k, top-p), the KV cache on, a batch of two prompts
of different lengths, left-padded, 8 new tokens (7 steps reading the cache), and generate
continuing from the cache a first call returned; float64. Tokens are compared with ``==`` on
every rank, the logits generate returns ``EXACT`` under pipeline stages alone (the same
operations in the same order, cut between ranks) and ``PARALLEL`` with tensor parallelism (its
matmuls split along their reduction dimension reorder fp64 sums). Families: Llama (GQA, rotary),
GPT-2 (tied embedding, learned positions), Mistral with a 4-token sliding window (its cache keeps
4 tokens per layer and reports its own mask sizes).

Cost: three spawns of 4 ranks (pp2 x dp2, where each dp rank generates its own prompts and every
refusal is raised; tp2 x pp2; pp4), two of 2 ranks for planted bugs, the rest in this process.
Tags are forced to 0 in every spawn (NCCL's matching, conftest.py).
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Iterator

import pytest
import torch
from transformers import AutoConfig, StaticCache

from goose_core import DataParallel, ParallelContext, PipelineParallel, TensorParallel
from goose_core.distributed import RankError
from goose_core.pipeline import local_pipeline
from goose_core.pipeline import generate as pipeline_generate
from goose_core.pipeline import split
from goose_core.testing import EXACT, PARALLEL, Tolerance, run_distributed, seeded_model
from goose_core.testing.models import EAGER_IN_DTYPE, tiny_config

FAMILIES = ("llama", "gpt2", "mistral")
PAD = 0
SEED = 1234
#: name -> generate's decoding arguments (the sampling ones seeded with SEED on every rank).
MODES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "top_k": dict(do_sample=True, top_k=20, temperature=0.7),
    "top_p": dict(do_sample=True, top_p=0.9, temperature=1.3),
}
#: Modes a pipelined model refuses, by name, on every rank.
REFUSED: dict[str, dict[str, Any]] = {
    "beam_search": dict(num_beams=2),
    "beam_sample": dict(num_beams=2, do_sample=True),
    "assisted_generation": dict(prompt_lookup_num_tokens=2),
    "static": dict(cache_implementation="static"),
}


def build(family: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    if family == "mistral":
        config = AutoConfig.for_model("mistral", vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, sliding_window=4)
    else:
        config = tiny_config(family)
    attention = "eager" if family == "gpt2" else EAGER_IN_DTYPE
    return seeded_model(config, 0, dtype, attention).eval()


def prompts(dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, 3 and 6 tokens, left-padded to 6; each dp rank its own."""
    g = torch.Generator().manual_seed(100 + dp_rank)
    ids = torch.randint(1, 256, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    ids[0, :3], mask[0, :3] = PAD, 0
    return ids, mask


def generate(model: torch.nn.Module, dp_rank: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens and the logits of each step, generate seeded with SEED."""
    ids, mask = prompts(dp_rank)
    torch.manual_seed(SEED)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=PAD,
                         return_dict_in_generate=True, output_logits=True, **MODES[mode])
    return out.sequences, torch.stack(out.logits, 1)


def resumed(model: torch.nn.Module, dp_rank: int, mode: str = "greedy") -> tuple[torch.Tensor, torch.Tensor]:
    """4 greedy tokens, then 4 more continuing from the cache the first call returned (generate
    cuts the prompt by the cache's length, read between forwards, on every rank)."""
    ids, mask = prompts(dp_rank)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, pad_token_id=PAD,
                           return_dict_in_generate=True)
    mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    out = model.generate(first.sequences, attention_mask=mask, cache=first.cache, max_new_tokens=4,
                         min_new_tokens=4, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


@functools.cache
def reference(family: str, dp_rank: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (resumed if mode == "resumed" else generate)(build(family), dp_rank, mode)


def _refusals(model: torch.nn.Module) -> dict[str, str]:
    ids, mask = prompts(0)
    errors = {}
    given = dict(cache=StaticCache(model.config, max_cache_len=16))
    for name, kwargs in {**REFUSED, "static cache given": given}.items():
        try:
            model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD, **kwargs)
        except ValueError as err:
            errors[name] = str(err)
    return errors


def _unseeded(model: torch.nn.Module, rank: int) -> str:
    """Sampling with each rank's generator seeded differently: the ranks would draw different tokens."""
    ids, mask = prompts(0)
    torch.manual_seed(SEED + rank)
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, **MODES["top_k"])
    except ValueError as err:
        return str(err)
    return "no error"


def _runs(ctx: ParallelContext, families: tuple[str, ...], wrap: str, refusals: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {"dp_rank": ctx.dp_rank}
    for family in families:
        model = build(family)
        if wrap == "tp":
            model = TensorParallel(model, ctx).parallelize()
        model = PipelineParallel(model, ctx).parallelize()
        if wrap == "dp":
            model = DataParallel(model, ctx).parallelize()
        for mode in MODES:
            results[family, mode] = generate(model, ctx.dp_rank, mode)
        results[family, "resumed"] = resumed(model, ctx.dp_rank)
        if refusals:
            results[family, "refused"] = _refusals(model)
            results[family, "unseeded"] = _unseeded(model, ctx.rank)
    return results


def _check(results: list[dict[str, Any]], families: tuple[str, ...], tolerance: Tolerance = EXACT) -> None:
    for rank, result in enumerate(results):
        for family in families:
            for mode in [m for m in (*MODES, "resumed") if (family, m) in result]:
                tokens, logits = result[family, mode]
                want_tokens, want_logits = reference(family, result["dp_rank"], mode)
                where = f"{family} {mode}, rank {rank}"
                assert torch.equal(tokens, want_tokens), f"{where}: {tokens.tolist()} != {want_tokens.tolist()}"
                torch.testing.assert_close(logits, want_logits, rtol=tolerance.rtol, atol=tolerance.atol, msg=where)


def test_pp2_with_data_parallel_generates_one_devices_tokens_and_refuses_other_modes() -> None:
    results = run_distributed(_runs, 1, 2, 2, FAMILIES, "dp", True, timeout=240)
    _check(results, FAMILIES)
    assert {r["dp_rank"] for r in results} == {0, 1}  # two replicas, two prompt sets
    for rank, result in enumerate(results):
        for family in FAMILIES:
            errors = result[family, "refused"]
            assert set(errors) == {*REFUSED, "static cache given"}, f"rank {rank}: refused only {sorted(errors)}"
            for name, message in errors.items():
                assert "pipeline parallelism" in message and "greedy search and sampling" in message, message
            for name in ("beam_search", "beam_sample", "assisted_generation"):
                assert name in errors[name], errors[name]
            assert "cache_implementation='static'" in errors["static"]
            assert "StaticCache" in errors["static cache given"]
            assert "fed different tokens" in result[family, "unseeded"], result[family, "unseeded"]
            assert "torch.manual_seed" in result[family, "unseeded"]


def test_tp2_pp2_generates_one_devices_tokens() -> None:
    _check(run_distributed(_runs, 2, 2, 1, FAMILIES, "tp", timeout=240), FAMILIES, PARALLEL)


def test_pp4_generates_one_devices_tokens() -> None:
    _check(run_distributed(_runs, 1, 4, 1, ("llama",), "pp", timeout=240), ("llama",))


def test_local_pipeline_generates_one_devices_tokens() -> None:
    """Every partition in one process (one cache for all): each cell reads the lengths of its
    own first block's slot, not layer 0's, which the partition before it filled this step."""
    model = local_pipeline(build("llama"), 2)
    result = {("llama", mode): generate(model, 0, mode) for mode in MODES}
    _check([{"dp_rank": 0, ("llama", "resumed"): resumed(model, 0), **result}], ("llama",))


def _local(family: str) -> list[dict[str, Any]]:
    model = local_pipeline(build(family), 2)
    return [{"dp_rank": 0, (family, "greedy"): generate(model, 0, "greedy")}]


def test_planted_positions_from_the_cache_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: the pipelined forward does not take position_ids, so generate passes none and the
    family counts positions from its cache; the left-padded prompt's tokens then sit at other
    positions than one device's (which counts them from the attention mask). GPT-2: learned
    absolute positions (a rotary model sees only their differences, which the shift keeps)."""
    monkeypatch.setattr(pipeline_generate, "GENERATION_INPUTS",
                        tuple(k for k in pipeline_generate.GENERATION_INPUTS if k != "position_ids"))
    with pytest.raises(AssertionError, match="gpt2 greedy"):
        _check(_local("gpt2"), ("gpt2",))


def test_planted_lengths_from_layer_zero_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: a later partition builds its mask from layer 0's cache slot, which is not its own
    (filled earlier in this step in one process; empty on a later stage's rank)."""

    @contextlib.contextmanager
    def layer_zero(cache: Any, blocks: list[int]) -> Iterator[None]:
        yield

    monkeypatch.setattr(split, "lengths_of", layer_zero)
    with pytest.raises(RuntimeError, match="must match the size"):  # its mask is 6 keys short
        _check(_local("llama"), ("llama",))


def _greedy_llama(ctx: ParallelContext) -> dict[str, Any]:
    model = PipelineParallel(build("llama"), ctx).parallelize()
    return {"dp_rank": 0, ("llama", "greedy"): generate(model, 0, "greedy")}


def test_planted_logits_kept_on_the_last_stage_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: the last stage's logits are not broadcast: the first stage picks its first token
    from the zeros it allocated, the last stage another; the next step's token agreement stops
    both ranks (instead of each returning its own sequence)."""
    monkeypatch.setattr(pipeline_generate, "dist", types.SimpleNamespace(broadcast=lambda *args, **kwargs: None))
    with pytest.raises(RankError, match="fed different tokens"):
        run_distributed(_greedy_llama, 1, 2, 1, timeout=120)  # forked: the ranks inherit the patch


def _resumed_llama(ctx: ParallelContext) -> dict[str, Any]:
    model = PipelineParallel(build("llama"), ctx).parallelize()
    return {"dp_rank": 0, ("llama", "resumed"): resumed(model, 0)}


def test_planted_cache_length_of_an_empty_slot_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: between forwards, the later stage's cache reports layer 0's slot, which it never
    fills: continuing from that cache, generate there reads a length of 0 and feeds the whole
    sequence again, while the first stage feeds the new tokens only: the stages' batch check
    stops both ranks at that forward."""
    monkeypatch.setattr(pipeline_generate, "elsewhere", lambda cache, held: None)
    with pytest.raises(RankError, match="were fed batches of different shapes: input_ids"):
        run_distributed(_resumed_llama, 1, 2, 1, timeout=120)
