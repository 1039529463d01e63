"""Sharded checkpoints: a resumed run is the uninterrupted one bit for bit, a checkpoint loads at
another layout and continues as the single-device run, and a crashed save leaves the previous
checkpoint loadable."""

import copy
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from goose_core import (DistributedOptimizer, ParallelContext, RankError, TensorParallel, full_state_dict,
                        load_checkpoint, save_checkpoint)
from goose_core.checkpoint import atomic
from goose_core.checkpoint.chunks import pieces_of
from goose_core.data import shard_batch
from goose_core.metadata import ShardSpec, shard_spec
from goose_core.optim import MasterWeights
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, at_layout,
                                reference_run, run_distributed, snapshot, train_loop)

# Dropout on: a resume is exact only if every random stream (CPU, the tp split stream) comes back.
# GPT-2: fused q|k|v (three pieces per tp shard), the tied embedding on the first and last stage.
RESUME = TrainSpec(family="gpt2", steps=5, dropout=0.1)
# No dropout, so every layout equals the single-device run. AdamW on Llama; SGD on GPT-2, whose
# tied embedding AdamW's division would amplify to last-bit noise beyond PARALLEL (test_composition).
RESHARD = [TrainSpec(family="llama", steps=5), TrainSpec(family="gpt2", steps=5, optimizer="sgd")]

# The single-device reference runs in this process: on one thread (two threads on a busy 2-core
# box spend their time in barriers, ~20x slower here). The ranks are forked and pick their own.
pytestmark = pytest.mark.usefixtures("one_thread")


def _build(ctx: ParallelContext, spec: TrainSpec) -> tuple[Any, Any]:
    """The model and the optimizer at ctx's layout: ZeRO-1 whenever dp > 1."""
    model = at_layout(spec.build_model(), ctx, num_microbatches=2)
    optimizer = spec.build_optimizer(model.parameters())
    return model, DistributedOptimizer(optimizer, ctx) if ctx.dp_size > 1 else optimizer


def _steps(model: Any, optimizer: Any, ctx: ParallelContext | None, spec: TrainSpec, first: int,
           last: int) -> list[float]:
    """Steps ``first`` to ``last - 1``: this dp rank's shard of each batch (the whole one without ctx)."""
    batches = (spec.batch(s) if ctx is None else shard_batch(spec.batch(s), ctx.dp_rank, ctx.dp_size)
               for s in range(first, last))
    return train_loop(model, optimizer, batches)


def _train_save_train(ctx: ParallelContext, spec: TrainSpec, path: str, at: int) -> RunResult:
    """``at`` steps, a checkpoint, the remaining steps: the uninterrupted run (a save changes nothing)."""
    model, optimizer = _build(ctx, spec)
    losses = _steps(model, optimizer, ctx, spec, 0, at)
    save_checkpoint(path, model, optimizer, ctx, step=at)
    losses += _steps(model, optimizer, ctx, spec, at, spec.steps)
    return RunResult(losses, full_state_dict(model, ctx))


def _uninterrupted_then_saved(ctx: ParallelContext, spec: TrainSpec, path: str, at: int) -> list[RunResult]:
    """The run without a checkpoint, then (rebuilt from the same seeds) the run that saves at ``at``."""
    model, optimizer = _build(ctx, spec)
    plain = RunResult(_steps(model, optimizer, ctx, spec, 0, spec.steps), full_state_dict(model, ctx))
    return [plain, _train_save_train(ctx, spec, path, at)]


def _resume(ctx: ParallelContext, spec: TrainSpec, path: str, until: int, save_to: str | None) -> RunResult:
    """A fresh process group: load, train up to step ``until`` (and save there)."""
    model, optimizer = _build(ctx, spec)
    step = load_checkpoint(path, model, optimizer, ctx)["step"]
    losses = _steps(model, optimizer, ctx, spec, step, until)
    if save_to is not None:
        save_checkpoint(save_to, model, optimizer, ctx, step=until)
    return RunResult(losses, full_state_dict(model, ctx))


def _check_ranks(results: list[RunResult], expected: RunResult, tol: Any) -> None:
    for rank, result in enumerate(results):
        try:
            assert_matches_reference(result, expected, tol)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err


def test_resume_at_the_same_layout_is_bit_exact(tmp_path: Path) -> None:
    """tp=2 x pp=2 x dp=2 with ZeRO-1: 3 steps, save, a new process group, load, 2 steps ==
    the 5 steps of the uninterrupted run, every loss and every parameter bit (EXACT)."""
    path = str(tmp_path / "ckpt")
    whole, saved = run_distributed(_uninterrupted_then_saved, 2, 2, 2, RESUME, path, 3, timeout=180)[0]
    assert_matches_reference(saved, whole, EXACT)  # saving changed nothing
    resumed = run_distributed(_resume, 2, 2, 2, RESUME, path, 5, None, timeout=180)
    _check_ranks(resumed, RunResult(whole.losses[3:], whole.params), EXACT)


def _chain(spec: TrainSpec, layouts: list[tuple[int, int, int]], tmp_path: Path) -> None:
    """Save at the first layout after 2 steps, load at each next one, 1 step and save again; the
    last continues to the end. Every step equals the single-device run."""
    reference = reference_run(spec)
    path = str(tmp_path / "l0")
    first = run_distributed(_train_save_train, *layouts[0], spec, path, 2, timeout=180)
    _check_ranks(first, reference, PARALLEL)
    step = 2
    for i, layout in enumerate(layouts[1:], 1):
        until = spec.steps if i == len(layouts) - 1 else step + 1
        nxt = None if until == spec.steps else str(tmp_path / f"l{i}")
        results = run_distributed(_resume, *layout, spec, path, until, nxt, timeout=180)
        for rank, result in enumerate(results):
            got = reference.losses[step:until]
            assert result.losses == pytest.approx(got, rel=PARALLEL.rtol, abs=PARALLEL.atol), (layout, rank)
        path, step = nxt or path, until
    _check_ranks(results, RunResult(results[0].losses, reference.params), PARALLEL)


@pytest.mark.parametrize("spec", RESHARD, ids=lambda s: s.family)
def test_a_checkpoint_reshards_and_continues_as_the_single_device_run(tmp_path: Path, spec: TrainSpec) -> None:
    """tp 2 -> pp 2 -> dp 2 (ZeRO-1): every parameter and its optimizer state move between tp
    shards (GPT-2's fused q|k|v in pieces), pipeline stages (its tied head) and ZeRO flat shards."""
    _chain(spec, [(2, 1, 1), (1, 2, 1), (1, 1, 2)], tmp_path)


@pytest.mark.skipif(not os.environ.get("GOOSE_FULL"), reason="8-rank layouts, ~7 s each: GOOSE_FULL=1 runs them")
@pytest.mark.parametrize("spec", RESHARD, ids=lambda s: s.family)
def test_a_3d_checkpoint_reshards_over_8_ranks(tmp_path: Path, spec: TrainSpec) -> None:
    """The founding layout and back: 2x2x2 -> 1x2x4 -> 4x1x2 (Llama's kv replicas at tp=4)."""
    _chain(spec, [(2, 2, 2), (1, 2, 4), (4, 1, 2)], tmp_path)


def _shards(full: torch.Tensor, spec: ShardSpec, tp: int) -> list[torch.Tensor]:
    """Every tp rank's shard of ``full``, cut as the tensor-parallel layers cut it."""
    distinct = tp // spec.replicas
    return [torch.cat([b.chunk(distinct, spec.dim)[r // spec.replicas] for b in full.chunk(spec.blocks, spec.dim)],
                      spec.dim) for r in range(tp)]


@pytest.mark.parametrize("spec", [ShardSpec(0), ShardSpec(1, blocks=3), ShardSpec(0, replicas=2),
                                  ShardSpec(1, blocks=2, replicas=2)], ids=repr)
@pytest.mark.parametrize("tp", [2, 4])
def test_the_pieces_of_every_rank_tile_the_full_tensor(spec: ShardSpec, tp: int) -> None:
    full = torch.arange(24 * 12.0).reshape(24, 12)
    shards = _shards(full, spec, tp)
    assert torch.equal(spec.gather(shards), full)  # the shards are the layers' own
    cover = torch.zeros_like(full)
    seen = set()
    for rank, shard in enumerate(shards):
        pieces = pieces_of(shard, spec, tp, rank)
        assert pieces.size == full.shape
        for offset, t in zip(pieces.offsets, pieces.tensors):
            box = tuple(slice(o, o + n) for o, n in zip(offset, t.shape))
            assert torch.equal(full[box], t), (rank, offset)
            if offset not in seen:  # replicas write one copy (DCP drops equal offsets)
                seen.add(offset)
                cover[box] += 1
    assert torch.equal(cover, torch.ones_like(full))


# -- a weights-only load under an optimizer that keeps its own copy of the weights ---------------
# ZeRO-1 steps flat shards, MasterWeights fp32 masters: both must start the next step from the
# loaded weights, not from the copy they made before. fp64 ZeRO-1 against one device; bf16 (masters
# wider than the weights) against a twin built on the loaded weights with the same optimizer state.
WEIGHTS = TrainSpec(family="llama", steps=4)
WEIGHTS_BF16 = TrainSpec(family="llama", steps=4, optimizer="sgd", lr=0.1, precision="bf16")


def _keeper(ctx: ParallelContext, spec: TrainSpec, model: Any, zero: bool) -> Any:
    optimizer = spec.build_optimizer(model.parameters())
    return DistributedOptimizer(optimizer, ctx) if zero else MasterWeights(optimizer)


def _twin(ctx: ParallelContext, spec: TrainSpec, path: str, zero: bool, state: dict[str, Any]) -> tuple[Any, Any]:
    """The model loaded from ``path`` before its optimizer exists, which then takes ``state``
    (without masters: they are the loaded weights): the run that starts from the loaded weights."""
    model = at_layout(spec.build_model(), ctx)
    load_checkpoint(path, model, None, ctx)
    optimizer = _keeper(ctx, spec, model, zero)
    optimizer.load_state_dict({k: v for k, v in state.items() if k != "master_weights"})
    return model, optimizer


def _then(model: Any, optimizer: Any, ctx: ParallelContext | None, spec: TrainSpec) -> tuple[dict, RunResult]:
    """A step at lr=0 (batch 1), the weights after it, then a step at the spec's lr (batch 2)."""
    weights = (lambda: snapshot(model)) if ctx is None else (lambda: full_state_dict(model, ctx))
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    losses = _steps(model, optimizer, ctx, spec, 1, 2)
    still = weights()
    for group in optimizer.param_groups:
        group["lr"] = spec.lr
    losses += _steps(model, optimizer, ctx, spec, 2, 3)
    return still, RunResult(losses, weights())


def _load_weights_only(ctx: ParallelContext, spec: TrainSpec, path: str, zero: bool) -> dict[str, Any]:
    """Step 0 and a checkpoint; a fresh run trains steps 2 and 3, loads the checkpoint's weights
    (optimizer=None) and steps on (:func:`_then`); at bf16 its twin does the same."""
    model = at_layout(spec.build_model(), ctx)
    optimizer = _keeper(ctx, spec, model, zero)
    _steps(model, optimizer, ctx, spec, 0, 1)
    save_checkpoint(path, model, None, ctx, step=1)  # weights only (MasterWeights' state is not saved)
    model = at_layout(spec.build_model(), ctx)
    optimizer = _keeper(ctx, spec, model, zero)
    _steps(model, optimizer, ctx, spec, 2, 4)
    state = copy.deepcopy(optimizer.state_dict())  # its tensors are the ones the next steps update
    load_checkpoint(path, model, None, ctx)
    out = {"loaded": full_state_dict(model, ctx)}
    out["still"], out["run"] = _then(model, optimizer, ctx, spec)
    if spec.precision != "full":
        out["twin"] = _then(*_twin(ctx, spec, path, zero, state), ctx, spec)[1]
    return out


def _reference_weights_only(spec: TrainSpec) -> RunResult:
    """One device, a plain optimizer (no copy of its own): the same steps and load."""
    model = spec.build_model()
    train_loop(model, spec.build_optimizer(model.parameters()), [spec.batch(0)])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    train_loop(model, optimizer, (spec.batch(s) for s in range(2, 4)))
    model.load_state_dict(saved)
    return _then(model, optimizer, None, spec)[1]


def _check_still(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        moved = [n for n, t in r["loaded"].items() if not torch.equal(t, r["still"][n])]
        assert not moved, (f"rank {rank}: a step at lr=0 after a weights-only load changed {len(moved)} of "
                           f"{len(r['loaded'])} parameters (first {moved[0]}): the loaded weights were lost")


def test_a_weights_only_load_is_where_zero1_steps_on(tmp_path: Path) -> None:
    """dp=2, ZeRO-1 built before the load: an lr=0 step keeps the loaded weights bit for bit, and
    the next step is the single-device run's from the same weights and optimizer state."""
    results = run_distributed(_load_weights_only, 1, 1, 2, WEIGHTS, str(tmp_path / "ckpt"), True, timeout=180)
    _check_still(results)
    _check_ranks([r["run"] for r in results], _reference_weights_only(WEIGHTS), PARALLEL)


@pytest.mark.parametrize("zero", [True, False], ids=["zero1", "master-weights"])
def test_a_weights_only_load_resets_fp32_masters(tmp_path: Path, zero: bool) -> None:
    """bf16 at dp=2, fp32 masters in ZeRO-1's shards or MasterWeights: the masters become the
    loaded weights exactly, as if the optimizer had been built on them (EXACT against that twin)."""
    results = run_distributed(_load_weights_only, 1, 1, 2, WEIGHTS_BF16, str(tmp_path / "ckpt"), zero, timeout=180)
    _check_still(results)
    for rank, r in enumerate(results):
        try:
            assert_matches_reference(r["run"], r["twin"], EXACT)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err


# -- fp32 master weights of a bf16 model ---------------------------------------------------------
# A bf16 parameter is only its fp32 master's rounding: without the masters a resume starts from
# the rounding and drifts from the uninterrupted run. ZeRO-1 keeps them in its shards, MasterWeights
# in a copy per parameter; both save them cut like the parameter (optim/master_weights/<name>).
MIXED = TrainSpec(family="llama", steps=4, precision="bf16")


def _mixed(ctx: ParallelContext, spec: TrainSpec, zero: bool) -> tuple[Any, Any]:
    model = at_layout(spec.build_model(), ctx, num_microbatches=2)
    optimizer = spec.build_optimizer(model.parameters())
    return model, DistributedOptimizer(optimizer, ctx) if zero else MasterWeights(optimizer)


def _masters(model: Any, optimizer: Any) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 masters by parameter name, whole over dp (this rank's tp shards)."""
    plain = (optimizer.consolidated_state_dict() if isinstance(optimizer, DistributedOptimizer)
             else optimizer.state_dict())
    names = {p: n for n, p in model.named_parameters()}
    params = [p for ps in optimizer.group_params for p in ps]
    return {names[params[i]]: m.detach().cpu().clone() for i, m in plain["master_weights"].items()}


Mixed = tuple[RunResult, dict[str, torch.Tensor]]  # a run's losses and weights, this rank's masters


def _mixed_run(ctx: ParallelContext, spec: TrainSpec, zero: bool, path: str | None, at: int) -> Mixed:
    """Every step of ``spec`` (with a checkpoint after step ``at`` if ``path``)."""
    model, optimizer = _mixed(ctx, spec, zero)
    losses = _steps(model, optimizer, ctx, spec, 0, at)
    if path is not None:
        save_checkpoint(path, model, optimizer, ctx, step=at)
    losses += _steps(model, optimizer, ctx, spec, at, spec.steps)
    return RunResult(losses, full_state_dict(model, ctx)), _masters(model, optimizer)


def _mixed_uninterrupted(ctx: ParallelContext, spec: TrainSpec, zero: bool, path: str, at: int) -> list[Mixed]:
    return [_mixed_run(ctx, spec, zero, None, at), _mixed_run(ctx, spec, zero, path, at)]


def _mixed_resume(ctx: ParallelContext, spec: TrainSpec, zero: bool, path: str) -> Mixed:
    model, optimizer = _mixed(ctx, spec, zero)
    step = load_checkpoint(path, model, optimizer, ctx)["step"]
    losses = _steps(model, optimizer, ctx, spec, step, spec.steps)
    return RunResult(losses, full_state_dict(model, ctx)), _masters(model, optimizer)


def _same_masters(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    differ = [n for n in want if not torch.equal(got[n], want[n])]
    assert not differ, (f"{what}: {len(differ)} of {len(want)} fp32 masters differ (first {differ[0]}, "
                        f"by {(got[differ[0]] - want[differ[0]]).abs().max().item():.3g})")


# GPT-2 at pp=2: its tied embedding on two stages, whose copies must stay one weight (the
# checkpoint keeps one of them; tests/test_composition.py proves they do).
@pytest.mark.parametrize("family,layout,zero", [("llama", (1, 1, 2), True), ("llama", (1, 1, 1), False),
                                                ("llama", (1, 1, 2), False), ("gpt2", (2, 1, 1), False),
                                                ("llama", (2, 2, 1), False), ("gpt2", (1, 2, 1), False)],
                         ids=["zero1-dp2", "master-weights", "master-weights-dp2", "master-weights-gpt2-tp2",
                              "master-weights-tp2-pp2", "master-weights-gpt2-pp2"])
def test_a_bf16_resume_restores_the_fp32_masters_bit_for_bit(tmp_path: Path, family: str,
                                                              layout: tuple[int, int, int], zero: bool) -> None:
    """bf16 with fp32 masters (ZeRO-1's shards; MasterWeights alone, under DataParallel, over
    GPT-2's fused q|k|v tp shards, over tp x pp): 2 steps, save, new processes, load, 2 steps ==
    the uninterrupted run: losses, weights, masters (EXACT)."""
    spec, path = replace(MIXED, family=family), str(tmp_path / "ckpt")
    runs = run_distributed(_mixed_uninterrupted, *layout, spec, zero, path, 2, timeout=180)
    resumed = run_distributed(_mixed_resume, *layout, spec, zero, path, timeout=180)
    for rank, ((whole, masters), (saved, saved_masters), (result, got)) in enumerate(zip(*zip(*runs), resumed)):
        try:
            assert_matches_reference(saved, whole, EXACT)
            _same_masters(saved_masters, masters, "saving changed the run")
            assert_matches_reference(result, RunResult(whole.losses[2:], whole.params), EXACT)
            _same_masters(got, masters, "resumed")
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err


def _saved_masters(ctx: ParallelContext, spec: TrainSpec, path: str) -> dict[str, torch.Tensor]:
    model, optimizer = _mixed(ctx, spec, True)
    _steps(model, optimizer, ctx, spec, 0, 2)
    save_checkpoint(path, model, optimizer, ctx, step=2)
    return _masters(model, optimizer)


def _loaded_masters(ctx: ParallelContext, spec: TrainSpec, path: str,
                    want: dict[str, torch.Tensor]) -> list[str]:
    """Load at this layout with MasterWeights: the names whose master pieces differ from ``want``'s."""
    model, optimizer = _mixed(ctx, spec, False)
    load_checkpoint(path, model, optimizer, ctx)
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for p, master in optimizer.masters.items()
            if not _cut_from(want[names[p]], pieces_of(master.detach(), shard_spec(p), ctx.tp_size, ctx.tp_rank))]


def _cut_from(full: torch.Tensor, pieces: Any) -> bool:
    """Whether every piece is ``full``'s part at its offset."""
    if pieces.size != full.shape:
        return False
    for offset, t in zip(pieces.offsets, pieces.tensors):
        if not torch.equal(full[tuple(slice(o, o + n) for o, n in zip(offset, t.shape))], t):
            return False
    return True


def _fp32_from_masters(ctx: ParallelContext, spec: TrainSpec, path: str) -> dict[str, torch.Tensor]:
    """An fp32 model and a plain optimizer (its parameters are their own masters) load it."""
    model = at_layout(replace(spec, precision="full", dtype=torch.float32).build_model(), ctx)
    load_checkpoint(path, model, spec.build_optimizer(model.parameters()), ctx)
    return full_state_dict(model, ctx)


def test_saved_masters_reshard_and_load_into_an_fp32_model(tmp_path: Path) -> None:
    """bf16 ZeRO-1 at dp=2 saved; loaded at tp=2 and on one device (MasterWeights), each rank's
    masters are its pieces of the saved ones bit for bit; an fp32 model's weights are the masters."""
    path = str(tmp_path / "ckpt")
    want = run_distributed(_saved_masters, 1, 1, 2, MIXED, path, timeout=180)[0]
    for tp in (2, 1):
        for rank, wrong in enumerate(run_distributed(_loaded_masters, tp, 1, 1, MIXED, path, want, timeout=180)):
            assert not wrong, f"tp={tp} rank {rank}: {len(wrong)} masters differ from the saved (first {wrong[0]})"
    weights = run_distributed(_fp32_from_masters, 1, 1, 1, MIXED, path, timeout=180)[0]
    _same_masters({n: weights[n] for n in want}, want, "an fp32 model loaded from the masters")


def _mixed_from_fp32(ctx: ParallelContext, spec: TrainSpec, path: str) -> list[str]:
    """An fp32 run's checkpoint (no masters) into ZeRO-1 and MasterWeights over bf16: the
    masters are the loaded weights. The keepers whose masters are not, by name."""
    fp32 = replace(spec, precision="full", dtype=torch.float32)
    model = fp32.build_model()
    optimizer = fp32.build_optimizer(model.parameters())
    _steps(model, optimizer, None, fp32, 0, 1)
    save_checkpoint(path, model, optimizer, ctx, step=1)
    wrong = []
    for zero in (True, False):
        model, keeper = _mixed(ctx, spec, zero)
        load_checkpoint(path, model, keeper, ctx)
        masters = _masters(model, keeper)
        if any(not torch.equal(masters[n], p.detach().float()) for n, p in model.named_parameters()):
            wrong.append(type(keeper).__name__)
    return wrong


def test_a_checkpoint_without_masters_gives_masters_equal_to_the_weights(tmp_path: Path) -> None:
    wrong = run_distributed(_mixed_from_fp32, 1, 1, 1, MIXED, str(tmp_path / "ckpt"), timeout=120)[0]
    assert not wrong, f"{wrong}: masters loaded from an fp32 checkpoint are not the loaded bf16 weights"


# -- crashes and refusals ----------------------------------------------------------------------
SMALL = TrainSpec(family="gpt2", steps=2)


def _die_mid_save(ctx: ParallelContext, path: str) -> None:
    """Checkpoint after step 1; after step 2 rank 1 dies while the second save writes."""
    model, optimizer = _build(ctx, SMALL)
    _steps(model, optimizer, ctx, SMALL, 0, 1)
    save_checkpoint(path, model, optimizer, ctx, step=1)
    _steps(model, optimizer, ctx, SMALL, 1, 2)
    if ctx.rank == 1:
        write = FileSystemWriter.write_data

        def write_then_die(self: Any, plan: Any, planner: Any) -> Any:
            write(self, plan, planner).wait()  # its files are on disk, the metadata is not
            os._exit(9)
        FileSystemWriter.write_data = write_then_die  # type: ignore[method-assign]
    save_checkpoint(path, model, optimizer, ctx, step=2)


def _load_and_step(ctx: ParallelContext, path: str) -> tuple[int, RunResult]:
    model, optimizer = _build(ctx, SMALL)
    step = load_checkpoint(path, model, optimizer, ctx)["step"]
    losses = _steps(model, optimizer, ctx, SMALL, step, SMALL.steps)
    return step, RunResult(losses, full_state_dict(model, ctx))


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    with pytest.raises(RankError):  # rank 1 died; rank 0 may report its broken connection first
        run_distributed(_die_mid_save, 1, 1, 2, str(path), timeout=60)
    assert (path / atomic.METADATA).is_file()
    assert atomic.staging(path).is_dir() and not (atomic.staging(path) / atomic.METADATA).exists()
    reference = reference_run(SMALL)
    for step, result in run_distributed(_load_and_step, 1, 1, 2, str(path), timeout=60):
        assert step == 1  # the checkpoint of step 1, and training from it gives step 2's numbers
        assert_matches_reference(result, RunResult(reference.losses[1:], reference.params), PARALLEL)


def _refusals(ctx: ParallelContext, path: str) -> dict[str, str]:
    """Each bad call raises on every rank (none hangs); the checkpoint stays as it was."""
    model, optimizer = _build(ctx, SMALL)
    save_checkpoint(path, model, optimizer, ctx, step=0)
    seen: dict[str, str] = {}
    try:
        save_checkpoint(path, model, optimizer, ctx, step=ctx.rank)
    except ValueError as err:
        seen["extra"] = str(err)
    try:
        save_checkpoint(Path(path).parent, model, optimizer, ctx, step=0)  # the folder holding it
    except ValueError as err:
        seen["overwrite"] = str(err)
    try:
        stray = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        save_checkpoint(path, model, stray, ctx, step=0)
    except ValueError as err:
        seen["optimizer"] = str(err)
    write = FileSystemWriter.write_data
    if ctx.rank == 1:
        def fail(self: Any, plan: Any, planner: Any) -> Any:
            raise OSError("No space left on device")
        FileSystemWriter.write_data = fail  # type: ignore[method-assign]
    try:
        save_checkpoint(path, model, optimizer, ctx, step=5)
    except RuntimeError as err:  # on every rank
        seen["write"] = f"{type(err).__name__}: {err}"
    FileSystemWriter.write_data = write  # type: ignore[method-assign]
    seen["step"] = str(load_checkpoint(path, model, optimizer, ctx)["step"])
    other, other_optimizer = _build(ctx, TrainSpec(family="llama"))
    try:
        load_checkpoint(path, other, other_optimizer, ctx)
    except ValueError as err:
        seen["model"] = str(err)
    return seen


def test_bad_calls_raise_on_every_rank_and_leave_the_checkpoint(tmp_path: Path) -> None:
    for seen in run_distributed(_refusals, 1, 1, 2, str(tmp_path / "ckpt"), timeout=90):
        assert "extra=['step'] differs between rank 0 and ranks [1]" in seen["extra"]
        assert "No space left on device" in seen["write"] and "is unchanged" in seen["write"]
        assert seen["step"] == "0"
        assert "exists and is not a goose checkpoint" in seen["overwrite"]
        assert "the optimizer holds 1 parameters that are not the model's" in seen["optimizer"]
        assert "the checkpoint has no parameter 'model.embed_tokens.weight'" in seen["model"]


def test_publish_replaces_a_checkpoint_and_a_crash_between_renames_keeps_one(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    for step in ("1", "2"):
        atomic.staging(path).mkdir()
        (atomic.staging(path) / atomic.METADATA).write_text(step)
        atomic.publish(path)
        assert (path / atomic.METADATA).read_text() == step and not atomic.old(path).exists()
    path.rename(atomic.old(path))  # a save that died after moving the old one aside
    assert atomic.complete(path) == atomic.old(path)
    atomic.old(path).rename(tmp_path / "elsewhere")
    atomic.staging(path).mkdir()  # a staging folder is never a checkpoint
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        atomic.complete(path)


def _sequence_parallel_saved(ctx: ParallelContext, spec: TrainSpec, path: str, at: int) -> RunResult:
    """``at`` steps at tp with sequence parallelism, then a checkpoint."""
    model = TensorParallel(spec.build_model(), ctx, sequence_parallel=True).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    losses = _steps(model, optimizer, ctx, spec, 0, at)
    save_checkpoint(path, model, optimizer, ctx, step=at)
    return RunResult(losses, full_state_dict(model, ctx))


def test_a_sequence_parallel_checkpoint_loads_without_it(tmp_path: Path) -> None:
    """SP changes where activations live, never a parameter's pieces: a checkpoint saved at tp=2
    with SP resumes at tp=2 without it and on one rank, each continuing as the single-device run."""
    spec = RESHARD[0]
    reference = reference_run(spec)
    path = str(tmp_path / "sp")
    for rank, saved in enumerate(run_distributed(_sequence_parallel_saved, 2, 1, 1, spec, path, 2, timeout=180)):
        assert saved.losses == pytest.approx(reference.losses[:2], rel=PARALLEL.rtol, abs=PARALLEL.atol), rank
    for layout in ((2, 1, 1), (1, 1, 1)):
        results = run_distributed(_resume, *layout, spec, path, spec.steps, None, timeout=180)
        _check_ranks(results, RunResult(reference.losses[2:], reference.params), PARALLEL)
