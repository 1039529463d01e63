"""Predict each rank's bytes, FLOPs and traffic for a layout without running the model.

How, per rank (``predict`` does it one rank after another in this process)::

    1. a fake process group (torch's "fake" backend: every collective returns at once) at this
       rank's place in the tp x pp x dp grid, and a ParallelContext on it
    2. the model built on the meta device (shapes, no weights), cut by goose's own
       TensorParallel and, at pp > 1, PipelineParallel: the rank's exact parameters
    3. parameters, gradients, masters, optimizer state, dp traffic: optim.zero_cost over the
       rank's buckets (data_parallel's bucket plan over those parameters)
    4. one forward and backward of the tp-cut meta model traced by part (plan/trace.py): FLOPs
       (FlopCounterMode counts shapes), tp traffic (count_traffic: the fake group's calls) and
       the bytes saved for backward by one micro-batch; a stage sums its parts, its activation
       peak is that times the micro-batches it holds at once (engine/schedule.py)
    5. pp traffic: each micro-batch's activation sent forward and its gradient back, the header,
       the loss broadcast, the tied embedding's sum; dp: the target count and the loss's mean

Nothing is computed on data; a 1B model plans in about a second. docs/plan.md lists where the
prediction is off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from goose_core.data_parallel.bucket import main_dtype
from goose_core.distributed.context import ParallelContext
from goose_core.distributed.grid import ProcessGrid
from goose_core.loss import loss_dtype
from goose_core.metadata import shard_spec
from goose_core.optim.clip import norm_kind
from goose_core.optim.zero_cost import unit_numels, zero_cost
from goose_core.pipeline import PipelineParallel
from goose_core.plan.trace import POST, PRE, parts_of, trace_parts
from goose_core.tensor_parallel import TensorParallel
from goose_core.testing.models import EAGER_IN_DTYPE, TINY_MODELS, _uses_attention_interface, tiny_config

__all__ = ["Layout", "RankPlan", "model_config", "predict", "DTYPES"]

#: The recompute modes the plan models (engine/recompute.py's at the time of writing).
RECOMPUTE = ("never", "except_last", "always")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Layout:
    """What ``goose train`` is asked for (its flags' names); ``zero`` is the ZeRO stage, 0-2."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    microbatches: int = 1
    batch_size: int = 8
    seq_len: int = 64
    dtype: str = "float32"
    zero: int = 0
    schedule: str = "gpipe"
    recompute: str = "never"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def check(self) -> None:
        """Raise ValueError naming the first bad value and the fix."""
        for name in ("tp", "pp", "dp", "microbatches", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {sorted(DTYPES)}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"--recompute {self.recompute!r}: goose plan models {', '.join(RECOMPUTE)}")
        if self.schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"--schedule {self.schedule!r}: goose plan models gpipe and 1f1b")
        if self.zero not in (0, 1, 2):
            raise ValueError(f"--zero {self.zero!r}: 0 (plain data parallelism), 1 or 2")
        if self.zero and self.dp == 1:
            raise ValueError(f"--zero {self.zero} at --dp 1 shards nothing and goose plan does not model it: "
                             f"drop --zero or raise --dp")
        if self.batch_size % (self.dp * self.microbatches):
            raise ValueError(f"--batch-size {self.batch_size} does not split into --dp {self.dp} x "
                             f"--microbatches {self.microbatches}: make it a multiple of {self.dp * self.microbatches}")


@dataclass
class RankPlan:
    """One rank's predicted figures (the fields of accounting's ``Account``)."""

    rank: int
    coords: dict[str, int]
    params_bytes: int
    grads_bytes: int
    masters_bytes: int
    optimizer_bytes: int
    activations_peak_bytes: int | None
    flops_per_step: int | None
    sent_bytes: dict[str, Fraction | None] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        def plain(v: Fraction | None) -> float | int | None:
            return None if v is None else int(v) if v.denominator == 1 else float(v)
        return {**{k: getattr(self, k) for k in ("rank", "coords", "params_bytes", "grads_bytes", "masters_bytes",
                                                 "optimizer_bytes", "activations_peak_bytes", "flops_per_step")},
                "sent_bytes": {k: plain(v) for k, v in self.sent_bytes.items()}}


def model_config(model: str, seq_len: int = 64) -> PretrainedConfig:
    """A tiny family's config as ``goose train`` builds it, or a local folder's config.json."""
    if model in TINY_MODELS:
        positions = {"llama": "max_position_embeddings", "gpt2": "n_positions"}.get(model)
        return tiny_config(model, **({positions: max(128, seq_len)} if positions else {}))
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {model!r} is neither a family ({', '.join(sorted(TINY_MODELS))}) nor a "
                         f"local folder with a config.json: {err}") from None


def _meta_model(config: PretrainedConfig, dtype: torch.dtype, attention: str | None = None) -> nn.Module:
    """The model on the meta device with the attention ``goose train`` gives it: the tiny
    families' as testing.models builds them (Llama's softmax in its dtype, the others' eager),
    a folder's through 🤗's interface where the family has one (train/build.py)."""
    if attention is None:
        tiny = next((name for name, make in TINY_MODELS.items() if type(make(0.0)) is type(config)), None)
        interface = EAGER_IN_DTYPE if _uses_attention_interface(config) else "eager"
        attention = interface if tiny is None else EAGER_IN_DTYPE if tiny == "llama" else "eager"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)
    return model.train()


@contextlib.contextmanager
def _fake_rank(layout: Layout, rank: int) -> Iterator[ParallelContext]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("goose plan runs in a process of its own (torch.distributed is already initialised)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world)
    try:
        yield ParallelContext(layout.tp, layout.pp, layout.dp, check_finite=False)
    finally:
        dist.destroy_process_group()


def _stage_parts(parts: list[str], owned: set[str], first: bool, last: bool) -> set[str]:
    """The parts a stage runs: its blocks; before the first block, the first stage's; after the
    last, the last stage's (pipeline/split.py); the parent code before the blocks on every stage."""
    blocks = [i for i, name in enumerate(parts) if name.rsplit(".", 1)[-1].isdigit()]
    mine = {PRE} | {parts[i] for i in blocks if parts[i] in owned}
    if first:
        mine |= set(parts[: blocks[0]])
    if last:
        mine |= set(parts[blocks[-1] + 1:]) | {POST}
    return mine


def _stage_peak(layout: Layout, stage: int, full: int, lookups: int, cell_input: int) -> int:
    """A pipeline stage's saved bytes at their peak, from one micro-batch's: ``full`` (its cells),
    ``lookups`` (the first stage's token lookups, made for every micro-batch before the schedule
    runs, each kept until its backward) and ``cell_input`` (what a recomputed cell keeps)::

        k = micro-batches in flight at once (GPipe M, 1F1B min(p - j, M))
        never         k full
        always        one rebuilt full + (k - 1) kept inputs (a cell is rebuilt after the
                      backward before it has freed its graph: engine/recompute.py)
        except_last   GPipe: as always (the last micro-batch, kept whole, is the first backward);
                      1F1B: the last one kept whole beside one rebuilt + (k - 2) inputs
        all of them   + M lookups on the first stage
    """
    m, k = layout.microbatches, _in_flight(layout, stage)
    keeps_last = layout.recompute == "except_last" and m > 1
    if layout.recompute == "never" or (layout.recompute == "except_last" and m == 1):
        peak = k * full
    elif keeps_last and layout.schedule == "1f1b" and k >= 2:
        peak = 2 * full + (k - 2) * cell_input
    else:
        peak = full + (k - 1) * cell_input
    return peak + m * lookups


def _in_flight(layout: Layout, stage: int) -> int:
    """Micro-batches whose activations a stage holds at once (engine/schedule.py)."""
    return layout.microbatches if layout.schedule == "gpipe" else min(layout.pp - stage, layout.microbatches)


def _hidden(config: PretrainedConfig) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def predict_rank(config: PretrainedConfig, layout: Layout, rank: int, attention: str | None = None) -> RankPlan:
    """The figures of one rank (see the module docstring); ``attention`` overrides the attention
    implementation goose train would pick (a benchmark's ``"sdpa"``)."""
    dtype = DTYPES[layout.dtype]
    with _fake_rank(layout, rank) as ctx:
        model = _meta_model(config, dtype, attention)
        if layout.tp > 1:
            model = TensorParallel(model, ctx, check_grads=False).parallelize()
        local = layout.batch_size // layout.dp
        figures = trace_parts(model, ctx, local, layout.microbatches, layout.seq_len, pipelined=layout.pp > 1)
        names = list(parts_of(model))
        table = model.get_input_embeddings()
        embedding = next((n for n, m in parts_of(model).items() if m is table), "")
        if layout.pp > 1:
            ctx.device = torch.device("meta")  # the stage's move to its device keeps the meta tensors
            model = PipelineParallel(model, ctx, num_microbatches=layout.microbatches, schedule=layout.schedule,
                                     recompute=layout.recompute).parallelize()
        owned = {name for name in names if any(n.startswith(name + ".") for n, _ in model.named_parameters())}
        stage = ctx.pp_rank
        mine = _stage_parts(names, owned, stage == 0, stage == layout.pp - 1)
        flops = figures.flops(mine)
        cell = mine - {embedding}  # the first stage's lookup runs before the cell (pipeline/split.py)
        if layout.pp == 1:
            act = figures.saved_bytes(mine)
        else:
            lookups = figures.saved_bytes({embedding} & mine)
            cell_input = local // layout.microbatches * layout.seq_len * _hidden(config) * _width(dtype)
            act = _stage_peak(layout, stage, figures.saved_bytes(cell), lookups, cell_input)
        if layout.pp > 1 and layout.recompute != "never":
            redo = layout.microbatches - (layout.recompute == "except_last")
            flops += figures.forward(cell) // layout.microbatches * redo
        tp_sent = figures.sent(mine)
        if layout.pp > 1 and layout.recompute != "never":  # the recomputed forwards' collectives again
            tp_sent += figures.sent(cell, forward=True) / layout.microbatches * redo
        params = [p for p in model.parameters() if p.requires_grad]
        key = norm_kind if layout.zero else (lambda p: None)
        units = unit_numels(params, 25.0, key=key) if layout.dp > 1 or layout.zero else [p.numel() for p in params]
        cost = zero_cost(units, layout.dp, layout.zero, dtype, tensors=len(params))
        grads = cost.grads + (_replica_slots(params, layout.tp, dtype) if layout.dp == 1 else 0)
        if layout.dp == 1 and not layout.zero and main_dtype(dtype) != dtype:
            # no buckets: MasterWeights' hook moves each p.grad into its master's fp32 .grad
            grads = sum(p.numel() for p in params) * _width(main_dtype(dtype))
        dp_sent = cost.sent + _ring2(layout.dp, 8 + _width(loss_dtype(dtype))) if layout.dp > 1 else Fraction(0)
        pp_sent = _pp_sent(config, layout, ctx.pp_rank, dtype) if layout.pp > 1 else Fraction(0)
        return RankPlan(rank=rank, coords=dict(ctx.coords), params_bytes=cost.params, grads_bytes=grads,
                        masters_bytes=cost.masters, optimizer_bytes=cost.optimizer, activations_peak_bytes=act,
                        flops_per_step=flops,
                        sent_bytes={"tp": tp_sent if layout.tp > 1 else Fraction(0),
                                    "pp": pp_sent, "dp": dp_sent})


def _width(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _ring2(n: int, size: int) -> Fraction:
    """An all-reduce of ``size`` bytes, as count_traffic counts it."""
    return Fraction(2 * (n - 1) * size, n)


def _replica_slots(params: list[nn.Parameter], tp: int, dtype: torch.dtype) -> int:
    """Without DataParallel's buckets, a kv shard held by several tp ranks keeps the gradient
    buffer its replicas are summed in: a slot per distinct shard (tensor_parallel.layers)."""
    extra = 0
    for p in params:
        spec = shard_spec(p)
        if spec is not None and spec.replicas > 1:
            extra += (tp // spec.replicas - 1) * p.numel() * _width(dtype)
    return extra


def _pp_sent(config: PretrainedConfig, layout: Layout, stage: int, dtype: torch.dtype) -> Fraction:
    """Each micro-batch's hidden state to the next stage and its gradient to the previous one;
    once a step, the activation's header (engine.p2p: 10 int64) forward, and the loss's
    broadcast from the last stage (pipeline.stage, in loss_dtype)."""
    one = layout.batch_size // layout.dp * layout.seq_len * _hidden(config) * _width(dtype)  # all micro-batches
    header = 10 * 8 if stage < layout.pp - 1 else 0
    loss = Fraction((layout.pp - 1) * _width(loss_dtype(dtype)), layout.pp)
    tied = 0
    if getattr(config, "tie_word_embeddings", False) and layout.pp == 2:  # pp > 2: the ends' own group
        rows = config.vocab_size // layout.tp  # the embedding's gradient summed over the two stages
        tied = _ring2(2, rows * _hidden(config) * _width(main_dtype(dtype)))  # summed in the grads' dtype
    return one * ((stage < layout.pp - 1) + (stage > 0)) + header + loss + tied


def predict(config: PretrainedConfig, layout: Layout, attention: str | None = None) -> list[RankPlan]:
    """Every rank's figures, rank order."""
    layout.check()
    grid = ProcessGrid(layout.tp, layout.pp, layout.dp)
    plans: dict[tuple[int, int], RankPlan] = {}
    out = []
    for rank in range(layout.world):
        coords = grid.coords(rank)
        key = (coords["tp"], coords["pp"])
        if key not in plans:  # dp replicas hold and send the same (ZeRO's shards are equal)
            plans[key] = predict_rank(config, layout, rank, attention)
        out.append(replace(plans[key], rank=rank, coords=dict(coords)))
    return out
