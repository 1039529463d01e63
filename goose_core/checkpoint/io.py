"""save_checkpoint and load_checkpoint: a run's whole state, sharded, by full names, resharding.

A checkpoint folder (DCP's files plus ``goose.json``) holds::

    model/<name>                  every parameter, full shape, written in the pieces ranks hold
    optim/state/<name>/<key>      the optimizer's state (see optim_state), optim/param_groups
    optim/master_weights/<name>   the fp32 master of a bf16 (fp16) parameter, cut like it
    rng/<rank>/{cpu,cuda,tp}      each rank's random streams (see rng)
    goose/extra                   what the caller passed (step, data position, ...)
    goose.json                    the layout it was saved at (tp, pp, dp, each rank's coordinates)

Loading at the saved layout restores every bit (parameters, fp32 masters, ZeRO shards, random
streams), so a resumed run continues exactly as the uninterrupted one; at another layout each
rank reads the parts of the full tensors it holds now.
"""

from __future__ import annotations

import json
import pickle
import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from goose_core.checkpoint import atomic, rng
from goose_core.checkpoint.chunks import Pieces, expert_piece, pieces_of, whole
from goose_core.checkpoint.optim_state import (load_masters, load_state, optimizer_problems, state_destinations,
                                               state_entries)
from goose_core.checkpoint.planner import PiecesLoadPlanner, PiecesSavePlanner
from goose_core.data_parallel.zero3 import gathered
from goose_core.distributed.context import ParallelContext
from goose_core.metadata import expert_group_of, keepers_of, shard_spec

__all__ = ["save_checkpoint", "load_checkpoint"]

MODEL, EXTRA, LAYOUT_FILE = "model/", "goose/extra", "goose.json"


def _names(model: nn.Module) -> dict[nn.Parameter, str]:
    """Each parameter this rank holds under its single-device name (a tied one once)."""
    return {p: name for name, p in model.named_parameters()}


def _cutter(ctx: ParallelContext) -> Any:
    def cut(param: nn.Parameter, tensor: Tensor) -> Pieces:
        if expert_group_of(param) is not None and ctx.experts.size > 1:  # experts are not tp-split
            return expert_piece(tensor, ctx.experts.size, ctx.experts.rank)
        return pieces_of(tensor, shard_spec(param), ctx.tensor_parallel_size, ctx.tensor_parallel_rank)
    return cut


def _agree(errors: list[str], ctx: ParallelContext, what: str) -> None:
    """Raise on every rank if any rank found a problem (one all-gather of the messages)."""
    found: list[list[str] | None] = [None] * ctx.world_size
    dist.all_gather_object(found, errors)
    problems = [f"rank {r}: {e}" for r, es in enumerate(found) for e in (es or [])]
    if problems:
        raise ValueError(f"{what}:\n  " + "\n  ".join(problems[:8]))


def _digest(extra: dict[str, Any], errors: list[str]) -> str:
    try:
        return hashlib.sha256(pickle.dumps(sorted(extra.items()))).hexdigest()
    except Exception as err:  # reported on every rank, not raised here before the collective
        errors.append(f"extra={sorted(extra)} cannot be pickled ({err}); pass plain values")
        return ""


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    ctx: ParallelContext, **extra: Any) -> None:
    """Save the model, the optimizer, every rank's random streams and ``extra`` to ``path``.

    Collective: call it on every rank, between steps (after ``optimizer.step()``), with the same
    ``path`` on a file system every rank sees and the same ``extra`` (the step, the data position:
    anything picklable). The folder appears complete or not at all; a previous checkpoint at
    ``path`` stays loadable until the new one has replaced it.

    The optimizer (a torch one, ``MasterWeights`` or ``DistributedOptimizer``) is saved in the
    plain single-device format by parameter name; under mixed precision its fp32 master weights
    too (``optim/master_weights/<name>``, cut like the parameter), which a bf16 parameter only
    rounds: without them a resumed run would not be bit-exact.

    Raises:
        ValueError: on every rank, before writing: ``extra`` that differs between ranks or does
            not pickle, an optimizer over parameters that are not the model's, a ``path`` that
            exists and is not a goose checkpoint, a save inside a forward pass.
        RuntimeError: on every rank, when a rank failed to write (the previous checkpoint stays).
    """
    with gathered(model):  # ZeRO-3: whole parameters, saved as at any other stage
        _save(Path(path), model, optimizer, ctx, extra)


def _save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: ParallelContext,
          extra: dict[str, Any]) -> None:
    states, found = _preflight(path, model, optimizer, ctx, extra)
    entries = _model_entries(model, ctx)
    if optimizer is not None:
        entries.update(state_entries(optimizer, _names(model), _cutter(ctx)))
    entries.update({f"rng/{ctx.rank}/{key}": whole(state) for key, state in states.items()})
    entries[EXTRA] = extra
    if ctx.rank == 0:
        layout = {"format": 1, "tp": ctx.tensor_parallel_size, "pp": ctx.pipeline_parallel_size,
                  "dp": ctx.data_parallel_size, "coords": [f[2] for f in found], "rng_keys": found[0][3]}
        (atomic.staging(path) / LAYOUT_FILE).write_text(json.dumps(layout))
    try:
        dcp.save(entries, storage_writer=FileSystemWriter(atomic.staging(path)), planner=PiecesSavePlanner())
    except CheckpointException as err:  # a BaseException: `except Exception` would not see it
        raise RuntimeError(f"saving the checkpoint failed on ranks {sorted(err.failures)}; the checkpoint "
                           f"at {path} (if any) is unchanged:\n{err}") from None
    if ctx.rank == 0:
        atomic.publish(path)
    dist.barrier()  # every rank returns once the checkpoint is in place


def _preflight(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: ParallelContext,
               extra: dict[str, Any]) -> tuple[dict[str, Tensor], list[Any]]:
    """This rank's random states, and every rank's (problems, extra digest, coordinates, rng
    keys): one all-gather, the save's first collective, so every rank raises the same problems."""
    errors: list[str] = []
    try:
        states = rng.capture(model, ctx)
    except ValueError as err:
        states, errors = {}, [str(err)]
    if optimizer is not None:
        errors += optimizer_problems(optimizer, _names(model))
    if ctx.rank == 0:
        errors += _prepare(path)
    digest = _digest(extra, errors)
    coords = [ctx.tensor_parallel_rank, ctx.pipeline_parallel_rank, ctx.data_parallel_rank]
    found: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(found, (errors, digest, coords, sorted(states)))
    _check_save(found, extra)
    return states, found


def _prepare(path: Path) -> list[str]:
    """Rank 0 clears a crashed save's leftovers and makes the staging folder."""
    if path.exists() and not (path / LAYOUT_FILE).is_file():
        return [f"{path} exists and is not a goose checkpoint (no {LAYOUT_FILE}); a save would replace it: "
                f"choose a new path, or remove it first"]
    try:
        atomic.clear(atomic.staging(path))
        atomic.staging(path).mkdir(parents=True)
    except OSError as err:
        return [f"cannot write the checkpoint beside {path}: {err}"]
    return []


def _check_save(found: list[Any], extra: dict[str, Any]) -> None:
    problems = [f"rank {r}: {e}" for r, f in enumerate(found) for e in f[0]]
    if len({f[1] for f in found}) > 1:
        differ = [r for r, f in enumerate(found) if f[1] != found[0][1]]
        problems.append(f"extra={sorted(extra)} differs between rank 0 and ranks {differ}; pass the same "
                        f"values on every rank (the global step and data position)")
    if problems:
        raise ValueError("save_checkpoint refused:\n  " + "\n  ".join(problems))


def _model_entries(model: nn.Module, ctx: ParallelContext) -> dict[str, Any]:
    cut = _cutter(ctx)
    return {MODEL + name: cut(p, p.detach()) for p, name in _names(model).items()}


def _model_destinations(model: nn.Module, ctx: ParallelContext, metadata: Metadata,
                        errors: list[str]) -> dict[str, Any]:
    dests: dict[str, Any] = {}
    cut = _cutter(ctx)
    for p, name in _names(model).items():
        pieces = cut(p, p.detach())  # views of the parameter: the load writes it in place
        md = metadata.state_dict_metadata.get(MODEL + name)
        if not isinstance(md, TensorStorageMetadata):
            errors.append(f"the checkpoint has no parameter {name!r}: was it saved from another model?")
        elif md.size != pieces.size:
            errors.append(f"{name} is {tuple(md.size)} in the checkpoint, {tuple(pieces.size)} in this model")
        else:
            dests[MODEL + name] = pieces
    return dests


def _rng_destinations(layout: dict[str, Any], ctx: ParallelContext, metadata: Metadata) -> dict[str, Any]:
    dests: dict[str, Any] = {}
    for key, rank in rng.wanted(layout, ctx).items():
        md = metadata.state_dict_metadata[f"rng/{rank}/{key}"]
        assert isinstance(md, TensorStorageMetadata)
        dests[f"rng/{rank}/{key}"] = whole(torch.empty(md.size, dtype=md.properties.dtype))
    return dests


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    ctx: ParallelContext | None = None) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into ``model`` and ``optimizer``; return ``extra``.

    Collective: call it on every rank, after building the model, the wrappers and the optimizer
    as for training, at the saved layout (bit-exact resume) or any other (resharded). Without
    ``ctx`` it is a load into one process (``ParallelContext()``: a plain model, in a plain
    ``python`` or a notebook). A
    ``DistributedOptimizer`` gets its ZeRO-1 shards of this layout. ``extra`` and the optimizer's
    options are unpickled (as ``torch.load(weights_only=False)``): load checkpoints you trust.

    The parameters are written in place. Every optimizer that steps its own copy of them
    (``DistributedOptimizer``'s ZeRO-1 shards, ``MasterWeights``' fp32 masters), passed or not,
    then re-reads that copy from the loaded weights on every rank, so with ``optimizer=None`` (a
    weights-only load) the next step starts from exactly the loaded weights, the optimizer's
    state (moments, step count, learning rate) as it was. An optimizer passed takes the
    checkpoint's state after that, its saved fp32 masters included: they win over the re-read.
    Saved masters go where this optimizer keeps each parameter's master: its fp32 copy, or the
    parameter itself where the parameter holds it exactly (an fp32 model with a plain optimizer
    continues from the masters of a bf16 run); a pure-bf16 parameter is their rounding already.
    A checkpoint without masters (an fp32 run) gives a mixed-precision optimizer masters equal
    to the loaded parameters.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: on every rank, when the model or the optimizer does not fit the checkpoint.
        RuntimeError: on every rank, when a rank failed to read.
    """
    folder = atomic.complete(Path(path))
    ctx = ctx if ctx is not None else ParallelContext()
    metadata = FileSystemReader(folder).read_metadata()
    layout = json.loads((folder / LAYOUT_FILE).read_text())
    errors: list[str] = []
    with gathered(model):  # ZeRO-3: loaded into whole parameters, their shards cut on exit
        dests = _model_destinations(model, ctx, metadata, errors)
        if optimizer is not None:
            dests.update(state_destinations(optimizer, _names(model), _cutter(ctx), metadata, errors))
        dests.update(_rng_destinations(layout, ctx, metadata))
        dests[EXTRA] = None
        _agree(errors, ctx, f"the checkpoint at {folder} does not fit this model")
        planner = PiecesLoadPlanner()
        try:
            dcp.load(dests, storage_reader=FileSystemReader(folder), planner=planner)
        except CheckpointException as err:
            raise RuntimeError(f"loading {folder} failed on ranks {sorted(err.failures)}:\n{err}") from None
        dests.update(planner.loaded)
        if optimizer is not None:
            load_masters(optimizer, _names(model), dests)  # parameters that are their own master
    for keeper in keepers_of(_names(model)):  # every rank: its step would write its old copy back
        keeper.reload_params()
    if optimizer is not None:
        load_state(optimizer, _names(model), dests)
    rng.restore(model, ctx, {fqn.rsplit("/", 1)[1]: d.local for fqn, d in dests.items() if fqn.startswith("rng/")})
    return dests[EXTRA]
