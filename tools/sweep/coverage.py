"""The family sweep's driver: every 🤗 causal-LM family at tp=2, pp=2 and tp=2 x pp=2 against one device.

For each family of :func:`sweep.families.families` the driver builds the tiny
seeded model, trains it on one device (float64, SGD, three steps on one fixed batch, the last
one right-padded with an ``attention_mask``), then runs every mode in one forked process group
that loops over the families::

    driver: reference runs ──┬── spawn tp=2        family 1, family 2, ... (one group per mode)
                             ├── spawn pp=2        ...
                             └── spawn tp=2xpp=2   ...
             a group that dies or hangs: its family is a crash, a new group takes the rest

Each (family, mode) is one of:

    equal     every rank's losses and gathered parameters within PARALLEL of the reference
    refused   goose raised a ValueError/NotImplementedError of its own before the first
              optimizer step, on every rank (the message is kept)
    wrong     the numbers differ (the worst error, as a multiple of PARALLEL's allowance)
    crash     anything else: another exception, a hang, ranks that disagree (a bug)

Results go line by line to a state file (``--resume`` continues an interrupted run), then to
JSON and the Markdown table of the docs site (:mod:`sweep.report`), from the repository root::

    PYTHONPATH=tools python -m sweep                          # every family, every mode (make coverage)
    PYTHONPATH=tools python -m sweep --families llama,gpt2 --modes pp2 --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import signal
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import transformers
from torch import Tensor, nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from goose_core.data import get_batch, pad_batch, shard_batch
from goose_core.data_parallel import DataParallel
from goose_core.expert_parallel import ExpertParallel
from goose_core.data.loader import Batch
from goose_core.distributed import ParallelContext, RankError, spawn
from goose_core.pipeline import PipelineParallel
from goose_core.state import full_state_dict
from goose_core.tensor_parallel import TensorParallel
from goose_core.testing.models import EAGER_IN_DTYPE, seeded_model
from goose_core.testing.reference import RunResult, accumulate, snapshot
from goose_core.testing.tolerances import PARALLEL
from sweep.families import NotBuildable, SweepFamily, expert_families, families, tiny_family_config
from sweep.report import BUILD, STATUSES, Outcome, merge, write_json, write_markdown

__all__ = ["MODES", "EXPERT_MODES", "layout", "STATUSES", "BUILD", "Outcome", "build_family_model", "reference", "run_sweep", "settings", "main"]

#: Mode name -> (tp, pp). dp is left out: it only shards the batch, which every family allows.
MODES: dict[str, tuple[int, int]] = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}
#: Expert-parallel modes: name -> E, the experts spread over dp = E ranks (ExpertParallel, then
#: DataParallel on each rank's shard of the batch). Asked for by name (``--modes ep2``): the
#: default sweep and tests/test_coverage.py run MODES.
EXPERT_MODES: dict[str, int] = {"ep2": 2}
SEED = 0
STEPS = 3  # the last one padded
MICROBATCHES = 2  # GPipe as users run it: a micro-batched split must equal the whole batch too
LR = 1e-2
GRACE = 10.0  # seconds the ranks may finish apart once one has raised
_KEY = "goose_coverage"


# -- one family on one device ---------------------------------------------------------------

def build_family_model(model_type: str) -> nn.Module:
    """``model_type``'s tiny model, float64, seeded: 🤗's attention interface with the softmax in
    float64 where the family uses it, the family's own eager attention where it does not."""
    config = tiny_family_config(model_type)
    interface = getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_attention_backend", False)
    return seeded_model(config, SEED, torch.float64, EAGER_IN_DTYPE if interface else "eager")


def batches() -> list[Batch]:
    """The steps' batches: one fixed batch twice, then the same batch right-padded."""
    fixed = get_batch(0, 8, 32, SEED)
    return [fixed] * (STEPS - 1) + [pad_batch(fixed, "right", 0, SEED)]


def layout(mode: str) -> tuple[int, int, int]:
    """(tp, pp, ep) of a mode; dp = ep."""
    return (1, 1, EXPERT_MODES[mode]) if mode in EXPERT_MODES else (*MODES[mode], 1)


def _train(model: nn.Module, progress: dict[str, bool], micro_batches: int = 1,
           shard: tuple[int, int] = (0, 1)) -> list[float]:
    """SGD over :func:`batches`; ``micro_batches`` > 1 accumulates that many pieces per step in
    a GPipe backward's order (🤗's gradient accumulation, ``num_items_in_batch`` given)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for batch in batches():
        if micro_batches > 1:
            loss = accumulate(model, batch, micro_batches, reverse=True)
        else:
            loss = model(**shard_batch(batch, *shard)).loss  # a dp rank's shard (ep modes)
            loss.backward()
        optimizer.step()
        progress["stepped"] = True
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@dataclass
class Reference:
    """A family's single-device runs: on the whole batch, and accumulating the pipeline's
    micro-batches (what a pipeline computes; the same to PARALLEL for a family that computes in
    float64 throughout, not for one with float32 sums inside or a batch-level auxiliary loss)."""

    whole: RunResult
    accumulated: RunResult
    narrow: list[str]  # modules whose output is narrower than float64


def reference(model_type: str) -> Reference:
    """The single-device runs of ``model_type`` (raises what building or training raises)."""
    model = build_family_model(model_type)
    with _narrow_modules(model) as narrow:
        losses = _train(model, {})
    if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        raise FloatingPointError(f"the single-device losses are not finite: {losses}")
    whole = RunResult(losses, snapshot(model))
    model = build_family_model(model_type)
    accumulated = RunResult(_train(model, {}, MICROBATCHES), snapshot(model))
    return Reference(whole, accumulated, sorted(narrow))


@contextmanager
def _narrow_modules(model: nn.Module) -> Iterator[set[str]]:
    """The names (layer numbers as *) of modules whose output is a float tensor narrower than
    float64: 🤗 code that casts to float32 inside a float64 model (DeepSeek's router does), so
    its sums round in float32 and a reordering moves them by float32 noise, beyond PARALLEL."""
    narrow: set[str] = set()

    def hook(name: str) -> Any:
        def check(module: nn.Module, args: Any, output: Any) -> None:
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(first, Tensor) and first.is_floating_point() and first.dtype != torch.float64:
                narrow.add(".".join("*" if part.isdigit() else part for part in name.split(".")))
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        yield narrow
    finally:
        for h in handles:
            h.remove()


class _Deadline(Exception):
    pass


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _Deadline in this (main) thread after ``seconds``; a collective stuck in C returns
    first through the process groups' own timeout, set to the same."""
    def ring(signum: int, frame: Any) -> None:
        raise _Deadline(f"did not finish within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- comparing and classifying ----------------------------------------------------------------

def _ratio(got: Tensor, want: Tensor) -> float:
    """The worst |got - want| / (atol + rtol |want|); inf where finiteness differs."""
    if not torch.equal(got.isfinite(), want.isfinite()):
        return float("inf")
    err = (got.double() - want.double()).abs().nan_to_num(0.0, posinf=0.0)
    return float((err / (PARALLEL.atol + PARALLEL.rtol * want.double().abs())).max())


def compare(result: RunResult, expected: RunResult) -> tuple[str, str, float | None]:
    """(status, detail, error) of one rank's result against the reference."""
    got = torch.tensor(result.losses, dtype=torch.float64)
    want = torch.tensor(expected.losses, dtype=torch.float64)
    if got.shape != want.shape:
        return "crash", f"{len(result.losses)} losses, expected {len(expected.losses)}", None
    if result.params.keys() != expected.params.keys():
        missing, extra = expected.params.keys() - result.params.keys(), result.params.keys() - expected.params.keys()
        return "crash", f"gathered parameters differ: missing {sorted(missing)[:4]}, extra {sorted(extra)[:4]}", None
    worst, where = _ratio(got, want), "loss"
    for name, p in expected.params.items():
        if result.params[name].shape != p.shape:
            return "crash", f"{name}: gathered shape {tuple(result.params[name].shape)}, expected {tuple(p.shape)}", None
        if (r := _ratio(result.params[name], p)) > worst:
            worst, where = r, name
    rel = float(((got - want).abs() / want.abs()).max())
    detail = f"worst at {where} ({worst:.1e}x the allowance); loss relative error {rel:.1e}"
    return ("equal" if worst <= 1 else "wrong"), detail, worst


def _raised_by_goose(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}goose_core{os.sep}" in frames[-1].filename \
        and f"{os.sep}testing{os.sep}" not in frames[-1].filename


def classify_error(err: BaseException, stepped: bool) -> tuple[str, str]:
    """(status, detail) of an exception: a refusal is goose's own ValueError or
    NotImplementedError with a message, raised before the first optimizer step."""
    message = str(err).strip() or repr(err)
    if isinstance(err, (ValueError, NotImplementedError)) and not stepped and _raised_by_goose(err) \
            and str(err).strip():
        return "refused", message
    where = traceback.extract_tb(err.__traceback__)
    at = f" (at {Path(where[-1].filename).name}:{where[-1].lineno})" if where else ""
    return "crash", f"{type(err).__name__}: {message}{at}"


def combine(family: str, mode: str, ranks: list[dict[str, Any]]) -> Outcome:
    """One Outcome from every rank's (status, detail, error): a crash or a disagreement wins,
    then wrong, then refused on every rank; equal only where every rank is equal."""
    statuses = [r["status"] for r in ranks]
    seconds = max(r["seconds"] for r in ranks)
    for status in ("crash", "wrong"):
        if status in statuses:
            worst = max((r for r in ranks if r["status"] == status), key=lambda r: r["error"] or 0.0)
            rank = ranks.index(worst)
            return Outcome(family, mode, status, f"rank {rank}: {worst['detail']}", worst["error"], seconds)
    if set(statuses) == {"refused"}:
        return Outcome(family, mode, "refused", ranks[0]["detail"], None, seconds)
    if "refused" in statuses:
        which = [i for i, s in enumerate(statuses) if s == "refused"]
        return Outcome(family, mode, "crash", f"refused on ranks {which} only: {ranks[which[0]]['detail']}",
                       None, seconds)
    worst = max(r["error"] for r in ranks)
    return Outcome(family, mode, "equal", ranks[0]["detail"], worst, seconds)


# -- one mode, many families, one process group ------------------------------------------------

def _attempt(ctx: ParallelContext, model_type: str, expected: Reference, timeout: float) -> dict[str, Any]:
    start, progress = time.monotonic(), {"stepped": False}
    try:
        with _deadline(timeout):
            model = build_family_model(model_type)
            if ctx.experts.size > 1:
                model = DataParallel(ExpertParallel(model, ctx).parallelize(), ctx).parallelize()
            if ctx.tensor_parallel_size > 1:
                model = TensorParallel(model, ctx).parallelize()
            if ctx.pipeline_parallel_size > 1:
                model = PipelineParallel(model, ctx, num_microbatches=MICROBATCHES).parallelize()
            result = RunResult(_train(model, progress, shard=(ctx.dp_rank, ctx.dp_size)),
                               full_state_dict(model, ctx))
        status, detail, error = compare(result, expected.whole)
        if status == "wrong" and ctx.pipeline_parallel_size > 1:  # the micro-batched run?
            status2, detail2, error2 = compare(result, expected.accumulated)
            if status2 == "equal":
                status, error = "equal", error2
                detail = (f"equal to the single-device run accumulating {MICROBATCHES} micro-batches; "
                          f"to the whole batch: {detail}")
    except Exception as err:  # every exception is an outcome to record, not a sweep failure
        (status, detail), error = classify_error(err, progress["stepped"]), None
    return {"status": status, "detail": detail, "error": error, "seconds": time.monotonic() - start}


def _rank_sweep(mode: str, names: list[str], expected: dict[str, Reference], timeout: float,
                state: str) -> None:
    """One rank of one mode: every family in turn, each with fresh process groups; the ranks
    agree through the store after each, and rank 0 appends the outcome to ``state``."""
    tp, pp, ep = layout(mode)
    groups_timeout = timedelta(seconds=timeout)
    ctx = ParallelContext(tp, pp, ep, expert_parallel_size=ep, backend="gloo", device="cpu", timeout=groups_timeout)
    # a second client of the launcher's store (the first context started its server)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=2 * timeout))
    for i, name in enumerate(names):
        if i:  # fresh groups: a family that failed half-way leaves its collectives out of step
            ctx = ParallelContext(tp, pp, ep, expert_parallel_size=ep, backend="gloo", device="cpu",
                                  timeout=groups_timeout)
        mine = _attempt(ctx, name, expected[name], timeout)
        ranks = _agree(store, name, ctx.rank, ctx.world_size, mine, timeout)
        if ranks is None:  # ranks stuck in a collective after another raised: end this group
            _give_up(store, Path(state), name, mode, ctx.rank, ctx.world_size)
        if ctx.rank == 0:
            _append(Path(state), combine(name, mode, ranks))


def _agree(store: dist.Store, name: str, rank: int, world: int, mine: dict[str, Any],
           timeout: float) -> list[dict[str, Any]] | None:
    """Every rank's outcome of ``name``, or None when this rank raised and another has not
    reported within GRACE seconds: it waits in a collective the raising rank never joins, and
    would only leave it at the groups' timeout."""
    keys = [f"{_KEY}/{name}/{r}" for r in range(world)]
    store.set(keys[rank], json.dumps(mine))
    start = time.monotonic()
    while not store.check(keys):
        waited = time.monotonic() - start
        if mine["status"] in ("refused", "crash") and waited > GRACE:
            return None
        if waited > 2 * timeout:
            raise TimeoutError(f"{name}: ranks did not report within {2 * timeout:.0f} s")
        time.sleep(0.02)
    return [json.loads(store.get(k)) for k in keys]


def _give_up(store: dist.Store, state: Path, name: str, mode: str, rank: int, world: int) -> None:
    """Record ``name`` as a crash (by the lowest rank that reported) and end this process; the
    driver starts a new group for the families left."""
    keys = [f"{_KEY}/{name}/{r}" for r in range(world)]
    reported = [r for r in range(world) if store.check([keys[r]])]
    if rank == min(reported):
        raised = json.loads(store.get(keys[rank]))
        stuck = {"status": "crash", "error": None, "seconds": GRACE,
                 "detail": f"still running {GRACE:.0f} s after rank {rank} raised (waiting in a collective "
                           f"it never joins): {raised['status']}: {raised['detail']}"}
        ranks = [json.loads(store.get(keys[r])) if r in reported else stuck for r in range(world)]
        _append(state, combine(name, mode, ranks))
        _ended(state).write_text(name)  # the driver must not blame the next family
    os._exit(3)


def _ended(state: Path) -> Path:
    """Where a group that ended itself names the family it ended on."""
    return state.with_suffix(".ended")


def _append(state: Path, outcome: Outcome) -> None:
    with state.open("a") as f:
        f.write(json.dumps(asdict(outcome)) + "\n")


def load_state(state: Path) -> dict[tuple[str, str], Outcome]:
    """The outcomes recorded so far, by (family, mode); a torn last line is ignored."""
    done: dict[tuple[str, str], Outcome] = {}
    if state.exists():
        for line in state.read_text().splitlines():
            try:
                outcome = Outcome(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            done[outcome.family, outcome.mode] = outcome
    return done


def _run_mode(mode: str, names: list[str], expected: dict[str, Reference], timeout: float,
              state: Path) -> None:
    """Every family of ``names`` at ``mode``, respawning after a family that kills its group."""
    tp, pp, ep = layout(mode)
    pending = [n for n in names if (n, mode) not in load_state(state)]
    while pending:
        start = time.monotonic()
        try:
            spawn(_rank_sweep, tp * pp * ep, mode, pending, expected, timeout, str(state),
                  timeout=len(pending) * (3 * timeout) + 60)
        except (RankError, TimeoutError) as err:
            done = load_state(state)
            culprit = next((n for n in pending if (n, mode) not in done), None)
            if _ended(state).exists():  # the group recorded its last family and ended itself
                _ended(state).unlink()
            elif culprit is not None:
                lines = [x for x in str(err).strip().splitlines() if x.strip()]
                _append(state, Outcome(culprit, mode, "crash", "the process group died or hung: "
                                       + " | ".join(lines[-3:])[:600], None, time.monotonic() - start))
        done = load_state(state)
        pending = [n for n in pending if (n, mode) not in done]


def _reference_all(names: list[str], timeout: float, state: Path) -> dict[str, Reference]:
    """The reference of every family that builds; the others are recorded as not buildable.
    A family's BUILD detail names the modules that compute in float32 (empty: none)."""
    expected, done = {}, load_state(state)
    for name in names:
        if (name, BUILD) in done and done[name, BUILD].status != "ok":
            continue
        start = time.monotonic()
        try:
            with _deadline(timeout):
                expected[name] = reference(name)
            status, detail = "ok", ", ".join(expected[name].narrow)
        except NotBuildable as err:
            status, detail = "not buildable", str(err)
        except Exception as err:  # the family does not train on one device in float64 here
            status, detail = "not buildable", f"the single-device float64 run fails: {type(err).__name__}: {err}"
        if (name, BUILD) not in done:
            _append(state, Outcome(name, BUILD, status, detail[:600], None, time.monotonic() - start))
    return expected


def _sweep_part(names: list[str], modes: list[str], timeout: float, state: Path) -> None:
    # one thread, as the ranks run: on a loaded machine the default threads fight over the
    # cores and a 0.3 s reference run takes 10 s
    torch.set_num_threads(1)
    expected = _reference_all(names, timeout, state)
    for mode in modes:
        _run_mode(mode, [n for n in names if n in expected], expected, timeout, state)


def run_sweep(names: list[str], modes: list[str], timeout: float = 120.0, jobs: int = 1,
              state: Path | None = None, fresh: bool = False) -> dict[tuple[str, str], Outcome]:
    """Sweep ``names`` x ``modes`` and return every outcome (including each family's BUILD row).

    Args:
        timeout: seconds one family may take in one mode (its reference run too).
        jobs: sweeps running side by side, each on a share of the families.
        state: the resumable record (default: :func:`default_state`, a file in the temp
            folder of this checkout and selection); ``fresh`` deletes it first.
    """
    state = state or default_state(names, modes)
    parts = [names[i::jobs] for i in range(max(1, jobs))]
    if fresh:
        for f in [state, _ended(state)] + [_part(state, i) for i in range(len(parts))]:
            f.unlink(missing_ok=True)
    state.parent.mkdir(parents=True, exist_ok=True)
    if len(parts) == 1:
        _sweep_part(parts[0], modes, timeout, state)
    else:  # each job its own state file, merged when all are done
        files = [_part(state, i) for i in range(len(parts))]
        procs = [mp.get_context("fork").Process(target=_sweep_part, args=(p, modes, timeout, f))
                 for p, f in zip(parts, files)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        for f in files:
            for outcome in load_state(f).values():
                _append(state, outcome)
            f.unlink(missing_ok=True)
    done = load_state(state)
    return {key: o for key, o in done.items() if key[0] in names and (key[1] in modes or key[1] == BUILD)}


def _part(state: Path, i: int) -> Path:
    return state.with_suffix(f".part{i}.jsonl")


def default_state(names: list[str] | None = None, modes: list[str] | None = None) -> Path:
    """The state file of this checkout's sweep over ``names`` x ``modes`` (resumed by the next
    run with the same arguments). Named after the versions, the checkout and the selection, so
    sweeps of other checkouts or other families, side by side, never share (and truncate) one."""
    tag = f"transformers-{transformers.__version__}-torch-{torch.__version__}".replace("+", "_")
    key = repr((str(Path(__file__).resolve()), sorted(names or []), sorted(modes or [])))
    return Path(tempfile.gettempdir()) / "goose-coverage" / f"{tag}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"


def settings(modes: list[str]) -> dict[str, Any]:
    """How the sweep runs, for the record."""
    return {"dtype": "float64", "tolerance": "PARALLEL", "optimizer": f"SGD(lr={LR}, momentum=0.9)",
            "steps": STEPS, "last_step": "right-padded with an attention_mask", "num_microbatches": MICROBATCHES,
            "modes": {m: {k: v for k, v in zip(("tp", "pp", "ep"), layout(m)) if k != "ep" or v > 1}
                      for m in modes}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--families", help="comma-separated model types, or 'experts' for every family with "
                                           "experts (default: every family that declares plans)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--jobs", type=int, default=1, help="sweeps side by side (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per family and mode")
    parser.add_argument("--json", help="where the JSON goes (default: docs/coverage.json for a full run, "
                                       "none for a subset, which prints its outcomes instead)")
    parser.add_argument("--markdown", help="where the table goes (default: docs/coverage.md for a full run)")
    parser.add_argument("--state", type=Path, help="the resumable record (default: in the temp folder)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the outcomes an interrupted run recorded (default: start afresh, so a "
                             "changed goose is measured anew)")
    parser.add_argument("--merge", type=Path,
                        help="add these modes' outcomes to this record (e.g. docs/coverage.json) and rewrite "
                             "the page beside it (coverage.md), leaving its other modes as measured")
    args = parser.parse_args(argv)
    known = {f.model_type: f for f in families()}
    names = (expert_families() if args.families == "experts" else
             args.families.split(",") if args.families else sorted(known))
    modes = args.modes.split(",")
    full = args.families is None and set(modes) == set(MODES)  # only a full run replaces the docs page
    json_path = args.json or ("docs/coverage.json" if full else None)
    markdown_path = args.markdown or ("docs/coverage.md" if full else None)
    if bad := [n for n in names if n not in known]:
        parser.error(f"unknown or planless families {bad}; see sweep.families.families()")
    if bad := [m for m in modes if m not in MODES and m not in EXPERT_MODES]:
        parser.error(f"unknown modes {bad}; choose from {list(MODES) + list(EXPERT_MODES)}")
    transformers.logging.set_verbosity_error()  # tiny configs trip many warnings meant for real ones
    outcomes = run_sweep(names, modes, args.timeout, args.jobs, args.state, fresh=not args.resume)
    chosen: list[SweepFamily] = [known[n] for n in names]
    record = write_json(Path(json_path) if json_path else None, chosen, modes, outcomes, settings(modes))
    if markdown_path:
        write_markdown(Path(markdown_path), record)
    if args.merge:
        merged = merge(json.loads(args.merge.read_text()), record)
        args.merge.write_text(json.dumps(merged, indent=1, sort_keys=False) + "\n")
        write_markdown(args.merge.with_suffix(".md"), merged)
    if not full:
        for (name, mode), o in sorted(outcomes.items()):
            print(f"{name:24} {mode:8} {o.status:14} {o.detail[:200]}")
    for mode in modes:
        print(mode, record["counts"][mode])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
