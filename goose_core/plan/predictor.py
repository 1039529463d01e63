"""Predict each rank's bytes, FLOPs and traffic for a layout without running the model.

How, per rank (``predict`` does it one rank after another in this process)::

    1. a fake process group (torch's "fake" backend: every collective returns at once) at this
       rank's place in the tp x pp x dp grid, and a ParallelContext on it
    2. the model built on the meta device (shapes, no weights), cut by goose's own
       TensorParallel and, at pp > 1, PipelineParallel: the rank's exact parameters
    3. parameters, gradients, masters, optimizer state, dp traffic: optim.zero_cost over the
       rank's buckets (data_parallel's bucket plan over those parameters; ZeRO-3's units)
    4. one forward and backward of the tp-cut meta model traced by part (plan/trace.py), under
       the block modes' checkpoints: FLOPs (FlopCounterMode counts shapes, the replay included),
       tp traffic (count_traffic: the fake group's calls) and the bytes saved for backward by one
       micro-batch; each chunk the rank holds sums its parts, and the rank's activation peak
       walks its program of the schedule (engine/schedule.py; plan/pipeline_share.py)
    5. pp traffic: each micro-batch's activation sent over each chunk boundary between ranks and
       its gradient back, the headers, the loss broadcast, the tied embedding's sum; dp: the
       target count and the loss's mean

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
from goose_core.data_parallel.zero3 import decoder_blocks
from goose_core.distributed.context import ParallelContext
from goose_core.distributed.grid import ProcessGrid
from goose_core.loss import loss_dtype
from goose_core.metadata import shard_spec
from goose_core.optim.clip import norm_kind
from goose_core.optim.zero_cost import ZeroCost, unit_numels, zero_cost
from goose_core.engine.block_recompute import BLOCK_MODES, recompute_blocks
from goose_core.pipeline import PipelineParallel
from goose_core.plan.layout import DTYPES, RECOMPUTE, Layout
from goose_core.plan.pipeline_share import chunk_parts, hidden, pp_sent, rank_peak, ring2, width
from goose_core.plan.trace import POST, parts_of, trace_parts
from goose_core.tensor_parallel import TensorParallel
from goose_core.testing.models import EAGER_IN_DTYPE, TINY_MODELS, _uses_attention_interface, tiny_config

__all__ = ["Layout", "RankPlan", "model_config", "predict", "predict_rank", "DTYPES", "RECOMPUTE"]

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


def predict_rank(config: PretrainedConfig, layout: Layout, rank: int, attention: str | None = None) -> RankPlan:
    """The figures of one rank (see the module docstring); ``attention`` overrides the attention
    implementation goose train would pick (a benchmark's ``"sdpa"``)."""
    dtype = DTYPES[layout.dtype]
    with _fake_rank(layout, rank) as ctx:
        model = _meta_model(config, dtype, attention)
        if layout.tp > 1:
            model = TensorParallel(model, ctx, check_grads=False).parallelize()
        names = list(parts_of(model))
        if layout.pp > 1 and layout.recompute in BLOCK_MODES:  # the trace runs the checkpoints
            recompute_blocks([m for n, m in parts_of(model).items() if n.rsplit(".", 1)[-1].isdigit()],
                             layout.recompute)
        local = layout.batch_size // layout.dp
        figures = trace_parts(model, ctx, local, layout.microbatches, layout.seq_len, pipelined=layout.pp > 1)
        table = model.get_input_embeddings()
        embedding = next((n for n, m in parts_of(model).items() if m is table), "")
        wrapper = None
        if layout.pp > 1:
            ctx.device = torch.device("meta")  # the stage's move to its device keeps the meta tensors
            wrapper = PipelineParallel(model, ctx, num_microbatches=layout.microbatches, schedule=layout.schedule,
                                       recompute=layout.recompute)
        chunks = chunk_parts(names, wrapper, layout, ctx.pp_rank)
        model = wrapper.parallelize() if wrapper is not None else model
        cells = {c: parts - {embedding} for c, parts in chunks.items()}  # the lookup runs before the cell
        flops = sum(figures.flops(parts) for parts in chunks.values())
        tp_sent = sum((figures.sent(parts) for parts in chunks.values()), Fraction(0))
        if layout.pp == 1:
            act = figures.saved_bytes(chunks[0])
        else:
            lookups = figures.saved_bytes({embedding} & chunks.get(0, set()))
            cell_input = local // layout.microbatches * layout.seq_len * hidden(config) * width(dtype)
            full = {c: figures.saved_bytes(cell) for c, cell in cells.items()}
            early = {c: full[c] - figures.saved_bytes(cell - {POST}) for c, cell in cells.items()}
            act = rank_peak(layout, layout.pipeline_schedule(), ctx.pp_rank, full, early, lookups, cell_input)
        if layout.pp > 1 and layout.recompute in ("except_last", "always"):  # whole cells run again
            redo = layout.microbatches - (layout.recompute == "except_last")
            for cell in cells.values():
                flops += figures.forward(cell) // layout.microbatches * redo
                tp_sent += figures.sent(cell, forward=True) / layout.microbatches * redo  # their collectives
        params = [p for p in model.parameters() if p.requires_grad]
        cost = _zero_cost(model, params, layout, dtype)
        grads = cost.grads + (_replica_slots(params, layout.tp, dtype) if layout.dp == 1 else 0)
        if layout.dp == 1 and not layout.zero and main_dtype(dtype) != dtype:
            # no buckets: MasterWeights' hook moves each p.grad into its master's fp32 .grad
            grads = sum(p.numel() for p in params) * width(main_dtype(dtype))
        sent = {"tp": tp_sent if layout.tp > 1 else Fraction(0),
                "pp": pp_sent(config, layout, ctx.pp_rank, dtype) if layout.pp > 1 else Fraction(0),
                "dp": cost.sent + ring2(layout.dp, 8 + width(loss_dtype(dtype))) if layout.dp > 1 else Fraction(0)}
        return RankPlan(rank=rank, coords=dict(ctx.coords), params_bytes=cost.params, grads_bytes=grads,
                        masters_bytes=cost.masters, optimizer_bytes=cost.optimizer, activations_peak_bytes=act,
                        flops_per_step=flops, sent_bytes=sent)


def _zero_cost(model: nn.Module, params: list[nn.Parameter], layout: Layout, dtype: torch.dtype) -> ZeroCost:
    """optim.zero_cost over the rank's units: DataParallel's buckets (stages 0-2), or ZeRO-3's
    per block and the rest, each cut by norm kind as DistributedOptimizer re-cuts them; a block
    is gathered again for its backward only at pp = 1 (data_parallel/zero3.py)."""
    if layout.zero == 3:
        units, again = [], []
        blocks = [[p for p in block.parameters() if p.requires_grad] for block in decoder_blocks(model)]
        seen = {p for ps in blocks for p in ps}
        for k, ps in enumerate([*blocks, [p for p in params if p not in seen]]):
            kinds: dict[Any, int] = {}
            for p in ps:
                kinds[(p.dtype, norm_kind(p))] = kinds.get((p.dtype, norm_kind(p)), 0) + p.numel()
            units += kinds.values()
            again += [layout.pp == 1 and k < len(blocks)] * len(kinds)
        return zero_cost(units, layout.dp, 3, dtype, regathered=again)
    key = norm_kind if layout.zero else (lambda p: None)
    units = unit_numels(params, 25.0, key=key) if layout.dp > 1 or layout.zero else [p.numel() for p in params]
    return zero_cost(units, layout.dp, layout.zero, dtype, tensors=len(params))


def _replica_slots(params: list[nn.Parameter], tp: int, dtype: torch.dtype) -> int:
    """Without DataParallel's buckets, a kv shard held by several tp ranks keeps the gradient
    buffer its replicas are summed in: a slot per distinct shard (tensor_parallel.layers)."""
    extra = 0
    for p in params:
        spec = shard_spec(p)
        if spec is not None and spec.replicas > 1:
            extra += (tp // spec.replicas - 1) * p.numel() * width(dtype)
    return extra


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
