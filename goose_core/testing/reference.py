"""The reference harness: N training steps on one device, and checks that a parallel run matches."""

from __future__ import annotations

from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from goose_core.data import get_batch, pad_batch, shard_batch
from goose_core.data.loader import Batch
from goose_core.data_parallel import count_items_over, reducer_of
from goose_core.loss import count_items
from goose_core.testing.models import build_model
from goose_core.optim import MasterWeights
from goose_core.testing.split_reductions import split_reductions
from goose_core.testing.tolerances import PARALLEL, Tolerance

__all__ = [
    "PRECISIONS",
    "TrainSpec",
    "RunResult",
    "accumulate",
    "train_loop",
    "snapshot",
    "reference_run",
    "FLOOR_RUNS",
    "noise_floor_runs",
    "assert_matches_reference",
    "largest_errors",
    "format_beside_reference",
]


#: ``TrainSpec.precision`` -> the model's dtype (``None``: ``TrainSpec.dtype``).
PRECISIONS: dict[str, torch.dtype | None] = {"full": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainSpec:
    """Everything that decides a training run's numbers: model, data, optimizer, steps.

    ``dtype`` is float64 by default: a parallel run then differs from the single-device run by
    fp64 rounding (~1e-16 a sum), which no CPU's kernels and no reordering come near the
    tolerances of :mod:`goose_core.testing.tolerances`, while every real bug stays ~1e-8 or
    more. Set ``dtype=torch.float32`` to train as users do.

    ``precision="bf16"`` trains the mixed-precision recipe instead (stage 01): the model cast to
    bf16 (``dtype`` is then unused), fp32 master weights and fp32 gradient accumulation
    (:meth:`recipe_optimizer`: :class:`~goose_core.optim.MasterWeights`; under ZeRO-1 the
    ``DistributedOptimizer`` keeps the masters), fp32 gradient reduction (DataParallel's default).
    Its parity is stated against a noise floor measured in the same run
    (:func:`~goose_core.testing.tolerances.noise_floor_tolerance`), not against ``PARALLEL``.
    """

    family: str = "llama"
    seed: int = 0
    steps: int = 4
    batch_size: int = 8
    seq_len: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_grad_norm: float | None = None
    dropout: float = 0.0
    dtype: torch.dtype = torch.float64
    padding: str | None = None  # rows of uneven real length: see goose_core.data.pad_batch
    overrides: dict[str, Any] = field(default_factory=dict)
    precision: str = "full"  # "full": train in dtype; "bf16": bf16 model, fp32 masters and grads

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {sorted(PRECISIONS)}")

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype of the model's parameters and activations."""
        return PRECISIONS[self.precision] or self.dtype

    def build_model(self) -> PreTrainedModel:
        """The seeded tiny model: identical on every rank that calls this."""
        return build_model(self.family, self.seed, self.dropout, self.model_dtype, **self.overrides)

    def recipe_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """:meth:`build_optimizer`, wrapped in fp32 :class:`~goose_core.optim.MasterWeights` for a
        mixed precision: what a run without ZeRO-1 steps (ZeRO-1 wraps the plain one)."""
        optimizer = self.build_optimizer(params)
        return optimizer if self.precision == "full" else MasterWeights(optimizer)

    def build_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'adamw' or 'sgd'")

    def batch(self, step: int) -> Batch:
        """The global batch of ``step`` (every rank gets the same; shard it for data parallelism)."""
        batch = get_batch(step, self.batch_size, self.seq_len, self.seed)
        return batch if self.padding is None else pad_batch(batch, self.padding, step, self.seed)

    def batches(self, dp_rank: int = 0, dp_size: int = 1) -> Iterator[Batch]:
        """Data-parallel rank ``dp_rank``'s shard of every step's global batch, in step order."""
        for step in range(self.steps):
            yield shard_batch(self.batch(step), dp_rank, dp_size)


@dataclass
class RunResult:
    """Per-step losses and the final parameters under their HF names (full tensors, CPU)."""

    losses: list[float]
    params: dict[str, Tensor]


def accumulate(model: nn.Module, batch: Batch, micro_batches: int,
               no_sync: Callable[[], ContextManager[Any]] | None = None, reverse: bool = False) -> Tensor:
    """Forward and backward ``batch`` in ``micro_batches`` equal pieces, accumulating gradients.

    🤗's convention: every piece gets ``num_items_in_batch``, the targets of the whole step (under
    DataParallel: summed over the dp group, one all-reduce), so each piece's loss is its
    token-loss sum over the step's count and the gradients add up to the one-device mean of the
    whole global batch, however padding and ``-100`` labels fall across the pieces.

    Args:
        no_sync: a context-manager factory wrapped around every backward but the last (data
            parallelism then communicates once, on the last).
        reverse: take the pieces last-first: the order in which a GPipe backward accumulates.

    Returns:
        The batch's loss (the sum of the pieces' losses), detached.
    """
    reducer = reducer_of(model)
    labels = batch["labels"]
    n = count_items(labels) if reducer is None else count_items_over(labels, reducer.group)
    order = range(micro_batches - 1, -1, -1) if reverse else range(micro_batches)
    total: Tensor | None = None
    for k, i in enumerate(order):
        quiet = no_sync is not None and k < micro_batches - 1
        with no_sync() if quiet else nullcontext():  # type: ignore[misc]
            loss = model(**shard_batch(batch, i, micro_batches), num_items_in_batch=n).loss
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    assert total is not None
    return total


def train_loop(model: nn.Module, optimizer: Any, batches: Iterable[Batch],
               clip: Callable[[], Any] | None = None, micro_batches: int = 1,
               no_sync: Callable[[], ContextManager[Any]] | None = None,
               reverse: bool = False) -> list[float]:
    """The training loop every goose run shares: forward, backward, (clip), step, zero_grad.

    With ``micro_batches > 1`` each step's forward and backward go through :func:`accumulate`
    (``no_sync`` and ``reverse`` are passed on).

    Returns:
        The loss of every step as a Python float.
    """
    losses = []
    for batch in batches:
        if micro_batches == 1:
            loss = model(**batch).loss
            loss.backward()
        else:
            loss = accumulate(model, batch, micro_batches, no_sync, reverse)
        if clip is not None:
            clip()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies of ``model``'s parameters by name; a tied weight under each of its
    names, as in ``state_dict`` and :func:`goose_core.full_state_dict`."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters(remove_duplicate=False)}


def reference_run(spec: TrainSpec, micro_batches: int = 1, reverse: bool = False, split: int = 1,
                  build: Callable[[], nn.Module] | None = None) -> RunResult:
    """Train ``spec`` on one device, on the whole global batch of every step (or accumulated over
    ``micro_batches`` pieces, last-first if ``reverse``; with low-precision linear layers' sums
    split into ``split`` rounded pieces, :func:`~goose_core.testing.split_reductions.split_reductions`):
    the same sums in another order or split, the noise floor of a low precision). ``build``
    makes the model instead of ``spec.build_model`` (a family outside the tiny models, in
    ``spec.model_dtype``)."""
    model = (build or spec.build_model)()
    optimizer = spec.recipe_optimizer(model.parameters())
    clip = None
    if spec.max_grad_norm is not None:
        # Mixed precision clips the fp32 master gradients, as the parallel runs do.
        params = optimizer.master_params if isinstance(optimizer, MasterWeights) else model.parameters
        clip = lambda: torch.nn.utils.clip_grad_norm_(params(), spec.max_grad_norm)  # noqa: E731
    with split_reductions(split):
        losses = train_loop(model, optimizer, (spec.batch(s) for s in range(spec.steps)), clip,
                            micro_batches, reverse=reverse)
    return RunResult(losses, snapshot(model))


#: The noise-floor runs of a low-precision recipe, ``(micro_batches, reverse, split)``: every
#: change a layout makes to the single device's sums, sampled on one device. Micro-batches
#: reorder the weight gradients' sums over tokens (data and pipeline parallelism); split
#: reductions round partial matmul sums (tensor parallelism); the last two do both, as a
#: tp x pp x dp run does. Two reordered pieces are not taken reversed: ``a + b == b + a``.
FLOOR_RUNS: tuple[tuple[int, bool, int], ...] = (
    (2, False, 1), (4, True, 1), (8, False, 1), (1, False, 2), (1, False, 4), (2, False, 2), (2, False, 4))


def noise_floor_runs(spec: TrainSpec, build: Callable[[], nn.Module] | None = None) -> list[RunResult]:
    """:data:`FLOOR_RUNS` of ``spec`` (those whose micro-batches divide its batch), for
    :func:`~goose_core.testing.tolerances.noise_floor_tolerances` (``build``: as :func:`reference_run`)."""
    return [reference_run(spec, m, reverse, split, build) for m, reverse, split in FLOOR_RUNS
            if spec.batch_size % m == 0]


def _worst(actual: Tensor, expected: Tensor, tol: Tolerance) -> float:
    """The largest ratio of error to allowance (> 1 means out of tolerance); inf for a NaN or
    an infinity the expected run does not have (``NaN > 1`` is False: it would pass)."""
    if not torch.equal(actual.isfinite(), expected.isfinite()):
        return float("inf")
    err = (actual.double() - expected.double()).abs().nan_to_num(0.0, posinf=0.0)
    allowed = tol.atol + tol.rtol * expected.double().abs()
    if tol.atol == 0 and tol.rtol == 0:
        return float("inf") if err.max() > 0 else 0.0
    return float((err / allowed).max())


def largest_errors(actual: RunResult | Sequence[RunResult], expected: RunResult,
                   tol: Tolerance = PARALLEL) -> tuple[float, float, float]:
    """How far ``actual`` (one run, or every rank's) is from ``expected``, as the chapters' NOTES
    tables print it: (largest |parameter error|, largest |loss error|, the worst error's share of
    ``tol``'s allowance over parameters and losses; above 1 :func:`assert_matches_reference` fails)."""
    runs = [actual] if isinstance(actual, RunResult) else list(actual)
    want_losses = torch.tensor(expected.losses, dtype=torch.float64)
    param = loss = share = 0.0
    for run in runs:
        got_losses = torch.tensor(run.losses, dtype=torch.float64)
        loss = max(loss, float((got_losses - want_losses).abs().max()))
        share = max(share, _worst(got_losses, want_losses, tol))
        for name, want in expected.params.items():
            param = max(param, float((run.params[name].double() - want.double()).abs().max()))
            share = max(share, _worst(run.params[name], want, tol))
    return param, loss, share


def assert_matches_reference(actual: RunResult, expected: RunResult, tol: Tolerance,
                             params_tol: Tolerance | None = None) -> None:
    """Raise AssertionError naming the worst loss or parameter outside ``tol`` (parameters:
    ``params_tol`` when given, as low-precision allowances differ for the two).

    Both runs must hold the same parameter names and shapes: a gathered parallel run has to give
    back exactly what the single-device model has.
    """
    got = torch.tensor(actual.losses, dtype=torch.float64)
    want = torch.tensor(expected.losses, dtype=torch.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{len(actual.losses)} losses, expected {len(expected.losses)}")
    if _worst(got, want, tol) > 1:
        raise AssertionError(f"losses differ beyond rtol={tol.rtol}, atol={tol.atol}:\n"
                             f"  got      {actual.losses}\n  expected {expected.losses}")
    missing = expected.params.keys() - actual.params.keys()
    extra = actual.params.keys() - expected.params.keys()
    if missing or extra:
        raise AssertionError(f"parameter names differ: missing {sorted(missing)}, extra {sorted(extra)}")
    tol = params_tol or tol
    for name, want_p in expected.params.items():
        got_p = actual.params[name]
        if got_p.shape != want_p.shape:
            raise AssertionError(f"{name}: shape {tuple(got_p.shape)}, expected {tuple(want_p.shape)}")
        if (ratio := _worst(got_p, want_p, tol)) > 1:
            diff = float((got_p.double() - want_p.double()).abs().max())
            raise AssertionError(f"{name}: max abs difference {diff:.3e} is {ratio:.1f}x the allowance "
                                 f"(rtol={tol.rtol}, atol={tol.atol})")


def format_beside_reference(losses: list[float], reference: list[float]) -> str:
    """A table of each step's loss beside the single-device reference, for train.py scripts."""
    rows = [f"{'step':>4}  {'goose':>12}  {'reference':>12}  {'|diff|':>9}"]
    for step, (got, want) in enumerate(zip(losses, reference)):
        rows.append(f"{step:>4}  {got:>12.8f}  {want:>12.8f}  {abs(got - want):>9.2e}")
    return "\n".join(rows)
