"""Ulysses attention equals one process's full attention: outputs and q/k/v gradients, bytes, refusals."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from typing import Any, Iterator
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

import goose_core.context_parallel.ulysses as ulysses
from goose_core.context_parallel.ulysses import kv_repeats, ulysses_attention
from goose_core.distributed import ParallelContext, count_traffic
from goose_core.testing import run_distributed
from goose_core.testing.tolerances import PARALLEL

B, H, S, D = 2, 8, 16, 4  # S = 16: 2C chunks of 2 at C = 4


@dataclass(frozen=True)
class Case:
    """One layout: cp size, kv heads, and how the sequence is laid out over the cp ranks."""

    cp: int
    kv_heads: int
    layout: str  # "contiguous", "balanced" (chunks i and 2C-1-i), "uneven" (shuffled, unequal counts)
    attend: str = "eager"  # or "sdpa": torch's kernel, its own GQA grouping (enable_gqa)

    @property
    def name(self) -> str:
        return f"cp{self.cp}-kv{self.kv_heads}-{self.layout}" + ("-sdpa" if self.attend == "sdpa" else "")


CASES = [Case(cp, kv, layout) for cp in (2, 4) for kv, layout in
         [(H, "contiguous"), (H, "balanced"), (H, "uneven"), (1, "balanced"), (2, "balanced"), (4, "uneven")]] + [
    Case(4, 2, "balanced", "sdpa")]


#: The byte counts' layouts: equal slices (where count_traffic's count is exact too) and uneven.
BYTES = [Case(2, 2, "contiguous"), Case(4, 2, "contiguous"), Case(4, 4, "uneven")]


def positions(case: Case) -> list[Tensor]:
    """The global positions each cp rank holds, in its slice's order."""
    c = case.cp
    if case.layout == "contiguous":
        return list(torch.arange(S).chunk(c))
    if case.layout == "balanced":  # rank i: chunk i then chunk 2C-1-i (torchtitan's head-tail)
        chunks = torch.arange(S).chunk(2 * c)
        return [torch.cat([chunks[i], chunks[2 * c - 1 - i]]) for i in range(c)]
    counts = {2: [5, 11], 4: [1, 6, 4, 5]}[c]
    return list(torch.randperm(S, generator=torch.Generator().manual_seed(c)).split(counts))


def inputs(kv_heads: int) -> dict[str, Tensor]:
    """Seeded full-sequence q, k, v and the output's upstream gradient, float64."""
    g = torch.Generator().manual_seed(kv_heads)
    shapes = {"q": (B, H, S, D), "k": (B, kv_heads, S, D), "v": (B, kv_heads, S, D), "grad": (B, H, S, D)}
    return {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}


def causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Eager causal GQA attention, 🤗's rule: query head j reads kv head j // (heads / kv_heads)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    future = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """torch's causal attention, grouping query heads over kv heads itself."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def single_process(kv_heads: int) -> dict[str, Tensor]:
    """The reference: full attention in one process, its output and q/k/v gradients."""
    t = inputs(kv_heads)
    q, k, v = (t[n].clone().requires_grad_() for n in "qkv")
    out = causal(q, k, v)
    (out * t["grad"]).sum().backward()
    return {"out": out.detach(), "q": q.grad, "k": k.grad, "v": v.grad}


def _slice(case: Case, group: dist.ProcessGroup) -> dict[str, Tensor]:
    """This cp rank's output and q/k/v gradients through ulysses_attention."""
    mine = positions(case)[dist.get_rank(group)]
    t = {n: x.index_select(2, mine) for n, x in inputs(case.kv_heads).items()}
    q, k, v = (t[n].clone().requires_grad_() for n in "qkv")
    attend = causal if case.attend == "eager" else sdpa
    out = ulysses_attention(q, k, v, group=group, positions=positions(case), attend=attend)
    (out * t["grad"]).sum().backward()
    return {"out": out.detach(), "q": q.grad, "k": k.grad, "v": v.grad}


def _tiled(x: Tensor, repeats: int) -> Tensor:  # planted: copies kv heads as [0 1 0 1], not [0 0 1 1]
    return x.repeat(1, repeats, 1, 1)


def _unsorted(flat: Tensor) -> tuple[Tensor, Tensor]:  # planted: keeps the by-rank order
    order = torch.arange(flat.numel())
    return order, order


PLANTED = {"tiled_kv": ("_repeat_kv", _tiled), "local_order": ("_orders", _unsorted)}  # bug: (function, stand-in)
#: Each bug on a layout it must break: kv heads repeated at cp 4; chunks out of order (balanced).
PLANTED_CASES = [("tiled_kv", Case(4, 2, "balanced")), ("local_order", Case(2, H, "balanced"))]


@contextmanager
def _planted(bug: str) -> Iterator[None]:
    with mock.patch.object(ulysses, *PLANTED[bug]):
        yield


@contextmanager
def _off_rank_bytes(sent: list[int]) -> Iterator[None]:
    """Record each all_to_all_single's bytes to the other ranks, read off its split sizes."""
    original = dist.all_to_all_single

    def recording(output: Tensor, input: Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
                  group: dist.ProcessGroup) -> Any:
        me = dist.get_rank(group)
        sent.append(sum(n for r, n in enumerate(input_split_sizes) if r != me) * input.element_size())
        return original(output, input, output_split_sizes=output_split_sizes,
                        input_split_sizes=input_split_sizes, group=group)

    with mock.patch.object(dist, "all_to_all_single", recording):
        yield


def _bytes(case: Case, group: dist.ProcessGroup, ctx: ParallelContext) -> dict[str, Any]:
    """The bytes of each all-to-all this rank issues, forward and backward: as count_traffic
    counts them, and exactly (the parts sent to other ranks)."""
    mine = positions(case)[dist.get_rank(group)]
    t = {n: x.index_select(2, mine).requires_grad_() for n, x in inputs(case.kv_heads).items()}
    found: dict[str, Any] = {}
    with count_traffic(ctx) as traffic, _off_rank_bytes(exact := []):
        out = ulysses_attention(t["q"], t["k"], t["v"], group=group, positions=positions(case), attend=causal)
    found["forward"] = (sorted(c.sent for c in traffic.calls), sorted(exact))
    with count_traffic(ctx) as traffic, _off_rank_bytes(exact := []):
        (out * t["grad"]).sum().backward()
    found["backward"] = (sorted(c.sent for c in traffic.calls), sorted(exact))
    return found


REFUSALS: dict[str, tuple[tuple[int, int, int], Any]] = {
    # name: ((heads, kv_heads, s_local), positions for cp 4 (None: contiguous))
    "heads": ((6, 6, 4), None),
    "gqa": ((8, 3, 4), None),
    "count": ((8, 8, 4), [torch.arange(8), torch.arange(8, 16)]),
    "repeat": ((8, 8, 4), [torch.arange(4)] * 4),
    "float": ((8, 8, 4), [torch.arange(4.0)] * 4),
    "length": ((8, 8, 3), None),
}


def _refusals(group: dist.ProcessGroup) -> dict[str, tuple[str, int]]:
    """Each bad input's message, and how many collectives ran before it (must be none)."""
    found = {}
    for name, ((heads, kv, s), given) in REFUSALS.items():
        q, kv_t = torch.zeros(B, heads, s, D), torch.zeros(B, kv, s, D)
        with count_traffic() as traffic:
            try:
                ulysses_attention(q, kv_t, kv_t, group=group, attend=causal,
                                  positions=given if given is not None else list(torch.arange(S).chunk(4)))
            except ValueError as err:
                found[name] = (str(err), len(traffic.calls))
    return found


def _all_cases(ctx: ParallelContext) -> dict[str, Any]:
    """Every case on 4 ranks: cp 4 on the whole world, cp 2 on the pairs {0, 1} and {2, 3}."""
    pairs = [dist.new_group(r, timeout=timedelta(seconds=60)) for r in ([0, 1], [2, 3])]
    groups = {4: ctx.group("dp"), 2: pairs[dist.get_rank() // 2]}
    results: dict[str, Any] = {case.name: _slice(case, groups[case.cp]) for case in CASES}
    for bug, case in PLANTED_CASES:
        with _planted(bug):
            results[f"{bug}:{case.name}"] = _slice(case, groups[case.cp])
    results["bytes"] = {case.name: _bytes(case, groups[case.cp], ctx) for case in BYTES}
    results["refusals"] = _refusals(groups[4])
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_distributed(_all_cases, dp=4, timeout=120)


def _compare(case: Case, got: list[dict[str, Tensor]]) -> None:
    want = single_process(case.kv_heads)
    for r, (held, part) in enumerate(zip(positions(case), got)):
        for name, tensor in part.items():
            torch.testing.assert_close(tensor, want[name].index_select(2, held), rtol=PARALLEL.rtol,
                                       atol=PARALLEL.atol, msg=lambda m: f"{case.name} cp rank {r} {name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_output_and_gradients_equal_one_process(ranks: list[dict[str, Any]], case: Case) -> None:
    for first in range(0, len(ranks), case.cp):  # every cp group of the world, every rank of each
        _compare(case, [ranks[r][case.name] for r in range(first, first + case.cp)])


def test_kv_repeats_keep_each_query_head_with_its_kv_head() -> None:
    for heads, kv, cp, want in [(8, 8, 4, 1), (8, 4, 4, 1), (8, 2, 4, 2), (8, 1, 4, 4), (8, 4, 8, 2), (12, 6, 4, 2)]:
        r = kv_repeats(kv, cp)
        assert r == want and (kv * r) % cp == 0 and heads % (kv * r) == 0, (heads, kv, cp)
        # rank c holds query heads c*h/C.. and repeated kv heads c*h_kv'/C..; local group g' = h/(h_kv r)
        for j in range(heads):
            local, g_local = j % (heads // cp), heads // (kv * r)
            repeated = (j // (heads // cp)) * (kv * r // cp) + local // g_local
            assert repeated // r == j // (heads // kv), (heads, kv, cp, j)


@pytest.mark.parametrize("bug, case", PLANTED_CASES, ids=[bug for bug, _ in PLANTED_CASES])
def test_planted_bug_breaks_parity(ranks: list[dict[str, Any]], bug: str, case: Case) -> None:
    with pytest.raises(AssertionError, match="not close"):
        _compare(case, [ranks[r][f"{bug}:{case.name}"] for r in range(case.cp)])


@pytest.mark.parametrize("case", BYTES, ids=lambda c: c.name)
def test_all_to_all_bytes(ranks: list[dict[str, Any]], case: Case) -> None:
    # Per rank r and tensor, float64: a head-splitting all-to-all (q, k, v forward; the output's
    # gradient backward) sends (C-1)/C of its [b, heads, s_r, d]; a sequence-splitting one (the
    # output forward; q, k, v's gradients backward) (S - s_r)/S of its [b, heads/C, S, d]. q and
    # the output have h heads, k and v h_kv * kv_repeats. Equal slices: both are (C-1)/C b heads
    # s_r d, as count_traffic counts an all-to-all.
    cp, kv = case.cp, case.kv_heads * kv_repeats(case.kv_heads, case.cp)
    for r, held in enumerate(positions(case)):
        s_r = held.numel()
        head_split = lambda heads: Fraction((cp - 1) * B * heads * s_r * D * 8, cp)  # noqa: E731
        seq_split = lambda heads: B * heads // cp * (S - s_r) * D * 8  # noqa: E731
        forward = sorted([head_split(H), head_split(kv), head_split(kv), seq_split(H)])
        backward = sorted([head_split(H), seq_split(H), seq_split(kv), seq_split(kv)])
        for rank in (r, r + cp) if cp == 2 else (r,):  # every cp group
            counted, exact = zip(*[ranks[rank]["bytes"][case.name][phase] for phase in ("forward", "backward")])
            assert list(exact) == [forward, backward], (case.name, r)
            if case.layout != "uneven":
                assert list(counted) == [forward, backward], (case.name, r)


def test_refusals_name_the_bad_value_before_any_collective(ranks: list[dict[str, Any]]) -> None:
    want = {"heads": "num_attention_heads=6 not divisible by context_parallel_size=4: use method='ring'",
            "gqa": "multiple of the key/value heads (key 3, value 3)", "count": "positions has 2 entries, the cp group 4 ranks",
            "repeat": "repeat a global position", "float": "1-D integer tensors",
            "length": "holds 4 positions (positions["}
    for rank in ranks:
        assert set(rank["refusals"]) == set(want)
        for name, (message, calls) in rank["refusals"].items():
            assert want[name] in message and calls == 0, (name, message, calls)
