"""ZB-H1 and ZBV: each backward split into B (input gradient, sent at once) and W (weight
gradient, deferred into the bubble); ZBV with two chunks per rank in a V. Their timetables, their
messages under NCCL's matching, and parity with one device, the split done by autograd on the 🤗
modules as they are."""

import contextlib
import itertools

import pytest
import torch

from goose_core import ParallelContext, full_state_dict
from goose_core.engine.messages import blocked_receives, messages
from goose_core.engine.schedule import Action, ZeroBubbleH1, ZeroBubbleV, timetable, timetable_bubble
from goose_core.engine import split_backward
from goose_core.engine.block_recompute import RECOMPUTE_MODES
from goose_core.engine.recompute import is_recomputing
from goose_core.pipeline import Callback, local_pipeline
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, at_layout, reference_run,
                                run_distributed, snapshot, train_loop)

SHAPES = [(p, m) for p in (2, 3, 4) for m in (1, 2, p, 2 * p, 8)]


@pytest.mark.parametrize("p, m", SHAPES)
def test_every_f_b_w_runs_once_after_its_inputs(p: int, m: int) -> None:
    ran: dict[tuple[str, int, int], int] = {}
    for tick, work in enumerate(timetable(ZeroBubbleH1(m, p))):
        for a in work.values():
            assert (a.kind, a.microbatch, a.partition) not in ran
            ran[(a.kind, a.microbatch, a.partition)] = tick
    assert set(ran) == {(k, i, j) for k in "FBW" for i in range(m) for j in range(p)}
    for i, j in itertools.product(range(m), range(p)):
        assert j == 0 or ran[("F", i, j - 1)] < ran[("F", i, j)]
        assert ran[("F", i, j)] < ran[("B", i, j)] < ran[("W", i, j)]
        assert j == p - 1 or ran[("B", i, j + 1)] < ran[("B", i, j)]


@pytest.mark.parametrize("p, m", [(p, m) for p, m in SHAPES if m >= p])
def test_the_bubble_is_a_third_of_1f1bs_ramp(p: int, m: int) -> None:
    """One tick per F, B and W: 1F1B's backward is B + W, two ticks, so its ramp costs three."""
    assert timetable_bubble(ZeroBubbleH1(m, p)) == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)


@pytest.mark.parametrize("p, m", SHAPES)
def test_no_rank_holds_more_micro_batches_than_1f1bs_first(p: int, m: int) -> None:
    """Activations live from F to W: rank r holds at most min(p, m), 1F1B's peak (rank 0's)."""
    for r in range(p):
        now = peak = 0
        for a in ZeroBubbleH1(m, p).actions(r):
            now += {"F": 1, "B": 0, "W": -1}[a.kind]
            peak = max(peak, now)
        assert peak <= min(p, m) == max(min(p - j, m) for j in range(p))


@pytest.mark.parametrize("p, m", SHAPES)
def test_messages_agree_and_each_rank_can_issue_them(p: int, m: int) -> None:
    schedule = ZeroBubbleH1(m, p)
    plans = [messages(schedule, r) for r in range(p)]
    for r in range(p - 1):
        assert plans[r][r + 1] == plans[r + 1][r]
        assert len(plans[r][r + 1]) == 1 + 2 * m  # a header, each activation and gradient once
    assert blocked_receives(schedule) == []


def test_the_b_gradient_leaves_before_the_w() -> None:
    """Each gradient message is produced by B: a W produces none, so it never delays one."""
    schedule, ticks = ZeroBubbleH1(4, 2), timetable(ZeroBubbleH1(4, 2))
    b_tick = {a.microbatch: t for t, work in enumerate(ticks) for a in work.values() if a.kind == "B" and a.partition == 1}
    plan = messages(schedule, 1)[0]
    order = [msg.microbatch for msg in plan if msg.kind == "gradient"]
    assert order == sorted(b_tick, key=b_tick.get)


ZBV_SHAPES = [(p, m) for p in (2, 3, 4) for m in (2 * p - 1, 2 * p, 8, 16)]


@pytest.mark.parametrize("p, m", ZBV_SHAPES)
def test_zbv_places_chunks_in_a_v_and_runs_each_f_b_w_once(p: int, m: int) -> None:
    schedule, n = ZeroBubbleV(m, 2 * p), 2 * p
    assert [schedule.rank_of(j) for j in range(n)] == list(range(p)) + list(reversed(range(p)))
    ran: dict[tuple[str, int, int], int] = {}
    for tick, work in enumerate(timetable(schedule)):
        for rank, a in work.items():
            assert schedule.rank_of(a.partition) == rank and (a.kind, a.microbatch, a.partition) not in ran
            ran[(a.kind, a.microbatch, a.partition)] = tick
    assert set(ran) == {(k, i, j) for k in "FBW" for i in range(m) for j in range(n)}
    for i, j in itertools.product(range(m), range(n)):
        assert j == 0 or ran[("F", i, j - 1)] < ran[("F", i, j)]
        assert ran[("F", i, j)] < ran[("B", i, j)] < ran[("W", i, j)]
        assert j == n - 1 or ran[("B", i, j + 1)] < ran[("B", i, j)]


@pytest.mark.parametrize("p, m", ZBV_SHAPES)
def test_zbv_halves_zb_h1s_bubble_at_1f1bs_peak_memory(p: int, m: int) -> None:
    """Ticks of a chunk (half a stage): (p-1)/(6m+p-1); 2p half-stage chunks in flight per rank,
    p stages' worth, 1F1B's rank-0 peak."""
    schedule = ZeroBubbleV(m, 2 * p)
    assert timetable_bubble(schedule) == pytest.approx((p - 1) / (6 * m + p - 1), abs=1e-12)
    for r in range(p):
        now = peak = 0
        for a in schedule.rank_actions(r):
            now += {"F": 1, "B": 0, "W": -1}[a.kind]
            peak = max(peak, now)
        assert peak == 2 * p


@pytest.mark.parametrize("p, m", ZBV_SHAPES)
def test_zbv_messages_agree_and_each_rank_can_issue_them(p: int, m: int) -> None:
    schedule = ZeroBubbleV(m, 2 * p)
    plans = [messages(schedule, r) for r in range(p)]
    for r in range(p):
        for peer, plan in plans[r].items():
            assert plan == plans[peer][r]
    # Rank p-1 hands chunk p-1's output to chunk p in memory: no message crosses that boundary.
    assert all(msg.boundary != p - 1 for plan in plans[p - 1].values() for msg in plan)
    assert blocked_receives(schedule) == []


class _UpChunkBackwardFirst(ZeroBubbleV):
    """A planted bug: the last rank runs the backward of its first chunk (p-1) before the one of
    its second (p), whose gradient it needs."""

    def rank_actions(self, rank: int) -> list[Action]:
        out = super().rank_actions(rank)
        if rank == self.num_ranks - 1:
            down = [k for k, a in enumerate(out) if a.kind == "B" and a.partition == rank]
            up = [k for k, a in enumerate(out) if a.kind == "B" and a.partition == rank + 1]
            k, q = down[0], up[0]
            out[k], out[q] = out[q], out[k]
        return out


def test_planted_a_b_before_its_gradient_arrived_deadlocks_the_timetable() -> None:
    with pytest.raises(ValueError, match="deadlocks"):
        timetable(_UpChunkBackwardFirst(8, 8))


def test_zbv_refuses_too_few_micro_batches_by_name() -> None:
    with pytest.raises(ValueError, match=r"at least 2p - 1 = 7 micro-batches .* got num_microbatches=4"):
        ZeroBubbleV(4, 8)


# -- parity ----------------------------------------------------------------------------------------

def _spec(family: str, layers: int = 4, optimizer: str = "sgd") -> TrainSpec:
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return TrainSpec(family=family, steps=2, optimizer=optimizer, overrides={key: layers})


@pytest.mark.parametrize("schedule", ["zb-h1", "zbv"])
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_local_split_backward_trains_like_one_device(schedule: str, recompute: str) -> None:
    spec = _spec("llama")
    assert_matches_reference(_train_local(spec, schedule, recompute), reference_run(spec), PARALLEL)


def _train_local(spec: TrainSpec, schedule: str, recompute: str) -> RunResult:
    model = local_pipeline(spec.build_model(), 2, 4, schedule=schedule, recompute=recompute)
    return RunResult(train_loop(model, spec.build_optimizer(model.parameters()), spec.batches()), snapshot(model))


def test_planted_a_replays_w_forgotten_fails_parity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted bug: a recomputed cell's B keeps nothing for its W, so the body's weights get
    no gradient from it."""
    backward = split_backward.SplitCells.backward

    def forgetting(self, cell, output, leaf, grad):  # type: ignore[no-untyped-def]
        out = backward(self, cell, output, leaf, grad)
        self.pending.pop(cell, None)
        return out

    monkeypatch.setattr(split_backward.SplitCells, "backward", forgetting)
    spec = _spec("llama")
    with pytest.raises(AssertionError, match="differ"):
        assert_matches_reference(_train_local(spec, "zb-h1", "always"), reference_run(spec), PARALLEL)


def test_an_unwatched_replay_is_caught_by_the_coverage_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted bug: the replay runs without the module hook; B would note no module and no W
    would reach the body's weights: the coverage check names the first such weight."""

    @contextlib.contextmanager
    def unwatched(self, cell):  # type: ignore[no-untyped-def]
        yield
        self.replayed[cell] = []

    monkeypatch.setattr(split_backward.SplitCells, "replaying", unwatched)
    with pytest.raises(RuntimeError, match=r"cell \(0, 1\) uses a parameter of shape .* outside the forward"):
        _train_local(_spec("llama"), "zb-h1", "always")


@pytest.mark.parametrize("schedule", ["zb-h1", "zbv"])
def test_tied_embeddings_in_one_process_are_refused_by_name(schedule: str) -> None:
    spec = _spec("gpt2")
    with pytest.raises(ValueError, match=rf"schedule='{schedule}' splits .* GPT2LMHeadModel ties .* counting "
                                         r"the embedding's gradient twice\. Use schedule='1f1b'"):
        local_pipeline(spec.build_model(), 2, 4, schedule=schedule, recompute="never")


# (schedule, family, blocks, M, recompute): GPT-2 ties its embeddings across ranks 0 and p-1
# (under ZBV both ends are on rank 0).
CASES = {
    2: [("zb-h1", "gpt2", 4, 4, "never"), ("zb-h1", "llama", 4, 8, "except_last"),
        ("zb-h1", "llama", 4, 4, "always"), ("zb-h1", "gpt2", 4, 4, "blocks"), ("zb-h1", "llama", 4, 4, "selective"),
        ("zbv", "gpt2", 4, 8, "never"), ("zbv", "llama", 4, 4, "always"), ("zbv", "gpt2", 4, 4, "except_last"),
        ("zbv", "llama", 4, 4, "blocks"), ("zbv", "gpt2", 4, 4, "selective")],
    4: [("zb-h1", "llama", 8, 8, "never"), ("zb-h1", "gpt2", 8, 4, "except_last"),
        ("zbv", "llama", 8, 8, "except_last"), ("zbv", "gpt2", 8, 8, "never")],
}


def _train(ctx: ParallelContext, spec: TrainSpec, m: int, recompute: str, schedule: str = "zb-h1") -> RunResult:
    model = at_layout(spec.build_model(), ctx, num_microbatches=m, recompute=recompute, schedule=schedule)
    optimizer = spec.build_optimizer(model.parameters())
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size))
    return RunResult(losses, full_state_dict(model, ctx))


def _train_many(ctx: ParallelContext, cases: list[tuple[str, str, int, int, str]]) -> list[RunResult]:
    return [_train(ctx, _spec(f, layers), m, recompute, name) for name, f, layers, m, recompute in cases]


def _assert_every_rank(results: list[RunResult], spec: TrainSpec, what: str) -> None:
    reference = reference_run(spec)
    for rank, result in enumerate(results):
        try:
            assert_matches_reference(result, reference, PARALLEL)
        except AssertionError as err:
            raise AssertionError(f"{what} rank {rank}: {err}") from err


@pytest.mark.parametrize("pp", [2, 4])
def test_every_rank_matches_the_single_device_run(pp: int) -> None:
    per_rank = run_distributed(_train_many, 1, pp, 1, CASES[pp], timeout=240)
    for k, (name, family, layers, m, recompute) in enumerate(CASES[pp]):
        _assert_every_rank([r[k] for r in per_rank], _spec(family, layers), f"{name} pp={pp} {family} M={m} {recompute}")


def _composed(ctx: ParallelContext, spec: TrainSpec) -> list[RunResult]:
    return [_train(ctx, spec, 4, "never", name) for name in ("zb-h1", "zbv")]


@pytest.mark.parametrize("tp, dp", [(2, 1), (1, 2)])
def test_composes_with_tensor_and_data_parallelism(tp: int, dp: int) -> None:
    spec = _spec("llama")
    per_rank = run_distributed(_composed, tp, 2, dp, spec, timeout=240)
    for k, name in enumerate(("zb-h1", "zbv")):
        _assert_every_rank([r[k] for r in per_rank], spec, f"{name} tp={tp} dp={dp}")


def _skipped_w(ctx: ParallelContext) -> RunResult:
    """A planted bug: the W of micro-batch 1 never runs on the last stage."""
    weight = split_backward.SplitCells.weight

    def skipping(self, i, j, callbacks):  # type: ignore[no-untyped-def]
        if (i, j) == (1, ctx.pipeline_parallel_size - 1):
            self.pending.pop((i, j), None)
            return
        weight(self, i, j, callbacks)

    split_backward.SplitCells.weight = skipping  # type: ignore[method-assign]
    return _train(ctx, _spec("llama"), 4, "never")


def test_planted_a_skipped_w_fails_parity() -> None:
    with pytest.raises(AssertionError, match="differ"):
        _assert_every_rank(run_distributed(_skipped_w, 1, 2, 1, timeout=120), _spec("llama"), "W skipped")


@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_b_leaves_the_weight_gradients_to_w(recompute: str) -> None:
    """Llama, two partitions in one process: after B of a cell its blocks' weights have no
    gradient yet, after its W they all do (the split is real, not a full backward in B), also
    when the cell or its blocks are recomputed."""
    spec = _spec("llama")
    model = local_pipeline(spec.build_model(), 2, 2, schedule="zb-h1", recompute=recompute)
    weights = [p for n, p in model.named_parameters() if n.startswith("model.layers.3.")]
    seen: dict[str, list[bool]] = {}

    def look(event) -> None:  # type: ignore[no-untyped-def]
        if event.phase == "after" and (event.microbatch_idx, event.partition_idx) == (0, 1):
            seen[event.kind] = [p.grad is not None for p in weights]

    model.callbacks.add(Callback(look, kinds=["backward", "weight"]))
    model(**spec.batch(0)).loss.backward()
    assert seen == {"backward": [False] * len(weights), "weight": [True] * len(weights)}


@pytest.mark.parametrize("schedule, replays", [("1f1b", 1), ("zb-h1", 2)])
def test_a_checkpointed_block_replays_once_in_b_and_once_in_w(schedule: str, replays: int) -> None:
    """Under "blocks", B replays each block (torch's checkpoint) and W once more, one replay
    for all of a cell's modules (not one per module: 9 in a Llama block)."""
    spec = _spec("llama")
    model = local_pipeline(spec.build_model(), 2, 2, schedule=schedule, recompute="blocks")
    count = [0]
    for block in model.model.layers:
        block.input_layernorm.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + is_recomputing()))
    model(**spec.batch(0)).loss.backward()
    assert count[0] == replays * 2 * len(model.model.layers), count  # M=2 micro-batches


@pytest.mark.parametrize("precision", [{"dtype": torch.float32}, {"precision": "bf16"}])
def test_zb_h1_is_bit_identical_to_1f1b(precision: dict) -> None:
    """W computes each weight gradient with the kernel the full backward would, and adds the
    micro-batches in 1F1B's order: float32, and bf16 with fp32 master weights, bit for bit."""
    spec = TrainSpec(family="llama", steps=2, **precision)
    runs = []
    for schedule in ("1f1b", "zb-h1"):
        model = local_pipeline(spec.build_model(), 2, 4, schedule=schedule, recompute="never")
        params = model.parameters()
        optimizer = spec.recipe_optimizer(params) if "precision" in precision else spec.build_optimizer(params)
        runs.append(RunResult(train_loop(model, optimizer, spec.batches()), snapshot(model)))
    assert_matches_reference(runs[1], runs[0], EXACT)
