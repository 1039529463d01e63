"""TensorParallel: turn an HF causal LM into a Megatron-style tensor-parallel model, in place.

What changes, per rank of the tp group (parameter names stay the HF names)::

    embed_tokens / wte        nn.Embedding      -> VocabParallelEmbedding  (rows of its vocab; a
                                                   family subclass keeps its forward, e.g. a scale)
    other embedding_* entries nn.Embedding      -> split by rows or columns, per the plan
    each block, per the plan  colwise  Linear   -> ColumnParallelLinear    (opens a region: f)
                              rowwise  Linear   -> RowParallelLinear       (closes it: g)
                              *_gather_output / *_split_input: the same, replicated on the outside
                              experts, norms, MLA: the family module kept, collectives hooked on
    attention modules         head counts       -> per-rank head counts (plan's localize)
    lm_head                   nn.Linear         -> ColumnParallelLinear, vocab-split, tied if it was
    loss_function             ForCausalLMLoss   -> VocabParallelCausalLMLoss (never gathers logits)

Everything else (norms, position embeddings, the parent's masks, rotary tables and ALiBi) stays
replicated and unchanged, so each decoder layer works when called alone by a pipeline stage.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from goose_core.distributed.batch_check import check_policy, install_batch_check
from goose_core.distributed.context import ParallelContext
from goose_core.distributed.progress import count_forwards
from goose_core.finite import watch
from goose_core.metadata import module_grad_sync, parameters_changed
from goose_core.pipeline.parallel import is_pipelined
from goose_core.tensor_parallel.cross_entropy import VocabParallelCausalLMLoss
from goose_core.tensor_parallel import styles
from goose_core.tensor_parallel.layers import ColumnParallelLinear, ParallelRegion, RowParallelLinear, split_embedding
from goose_core.tensor_parallel.grad_check import ReplicaGradCheck
from goose_core.tensor_parallel.heads import HEAD_ATTRS, KV_ATTRS, module_heads, module_value
from goose_core.tensor_parallel.plan import (
    EMBEDDING_STYLES,
    GATHERED_STYLES,
    KV_PROJECTIONS,
    PARTIAL_SUM_STYLES,
    ROW_STYLES,
    STYLE_BLOCKS,
    TPPlan,
    check_sizes,
    resolve_plan,
)
from goose_core.tensor_parallel.random import RNGTracker
from goose_core.tensor_parallel.sequence import (block_problems, blocks_path, decoder_blocks, map_hidden,
                                                 sequence_parallelize, sequence_problems)

__all__ = ["TensorParallel", "apply_styles", "localize_heads", "rng_tracker"]



def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def localize_heads(model: nn.Module, plan: TPPlan, tp: int) -> None:
    """The generic localize for declared plans: every module that owns column-parallel layers
    and has head-count attributes gets this rank's counts, from its own counts (a layer may have
    other counts than the config's: :mod:`.heads`; GQA: kv-heads replicated when tp > kv-heads,
    so each rank keeps one)."""
    parents = {name.rpartition(".")[0] for name, style in plan.layers.items()
               if style in STYLE_BLOCKS and style not in ROW_STYLES and style not in GATHERED_STYLES}
    for parent in parents:
        module = model.get_submodule(parent)
        heads, kv_heads = module_heads(module, model.config)
        local_heads, local_kv = heads // tp, max(1, kv_heads // tp)
        for attr in HEAD_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, local_heads)
        for attr in KV_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, local_kv)
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            module.num_key_value_groups = local_heads // local_kv


def rng_tracker(model: nn.Module) -> RNGTracker:
    """The RNG tracker a tensor-parallel model draws its dropout masks from."""
    return model.goose_rng_tracker


def apply_styles(root: nn.Module, plan: TPPlan, ctx: ParallelContext, tracker: RNGTracker | None = None,
                 skip: nn.Module | None = None, sequence_parallel: bool = False) -> None:
    """Apply every style of ``plan`` to the modules and parameters of ``root`` (in place).

    ``skip`` (the input embedding) is left to ``TensorParallel``, which always splits it by
    vocabulary rows (what ``embedding_rowwise`` asks for) and ties the LM head to the shard.
    ``root.config`` gives the kv-heads (and MLA's ``qk_rope_head_dim``). With
    ``sequence_parallel`` each region's module gathers its tokens (a forward pre-hook) and its
    row layer reduce-scatters them (:mod:`.sequence`).
    """
    group = ctx.tensor_parallel_group
    _split_parameters(root, plan, group)
    rows = {name.rpartition(".")[0] for name, style in plan.layers.items() if style == "rowwise"}
    regions = {parent: ParallelRegion(group, tracker, sequence_parallel) for parent in rows}
    for parent, region in regions.items() if sequence_parallel else ():
        root.get_submodule(parent).register_forward_pre_hook(map_hidden(region.gather), with_kwargs=True)
    for name, style in plan.layers.items():
        module = root.get_submodule(name)
        if style in EMBEDDING_STYLES:
            if module is not skip:
                _replace(root, name, split_embedding(module, group, style))
        elif style in STYLE_BLOCKS:
            region = regions.get(name.rpartition(".")[0])
            _replace(root, name, _linear(root, name, module, style, ctx, region))
        else:
            _keep(root, name, module, style, ctx)


def _linear(root: nn.Module, name: str, module: nn.Module, style: str, ctx: ParallelContext,
            region: ParallelRegion | None) -> nn.Module:
    group, tp = ctx.tensor_parallel_group, ctx.tensor_parallel_size
    if style == "rowwise":
        return RowParallelLinear.from_module(module, group, region=region)
    if style == "rowwise_split_input":
        return RowParallelLinear.from_module(module, group, input_is_parallel=False)
    if style == "rowwise_scatter_output":  # inside a region: not the row layer that closes it
        return RowParallelLinear.from_module(module, group, scatter_output=True)
    if style == "colwise_gather_output":
        return ColumnParallelLinear.from_module(module, group, gather_output=True)
    kv_heads = module_heads(root.get_submodule(name.rpartition(".")[0]), root.config)[1]
    replicas = tp // kv_heads if name.endswith(KV_PROJECTIONS) and tp > kv_heads else 1
    return ColumnParallelLinear.from_module(module, group, blocks=STYLE_BLOCKS[style], replicas=replicas,
                                            region=region)


def _split_parameters(root: nn.Module, plan: TPPlan, group: dist.ProcessGroup) -> None:
    by_owner: dict[str, dict[str, str]] = {}
    for name, style in plan.params.items():
        owner, _, local = name.rpartition(".")
        by_owner.setdefault(owner, {})[local] = style
    for owner, entries in by_owner.items():
        styles.split_parameters(root.get_submodule(owner), entries, group)


def _keep(root: nn.Module, name: str, module: nn.Module, style: str, ctx: ParallelContext) -> None:
    """The styles that keep the family's module (experts, norms, MLA's kv_a)."""
    group, tp = ctx.tensor_parallel_group, ctx.tensor_parallel_size
    if style in PARTIAL_SUM_STYLES:
        styles.partial_sum(module, group)
    elif style == "moe_identity_expert":
        styles.identity_expert(module, tp)
    elif style == "replicated_with_grad_allreduce":
        styles.all_reduce_grads(module, group)
    elif style == "mla_kv_a_proj":
        attention = root.get_submodule(name.rpartition(".")[0])
        styles.mla_kv_a_proj(module, module_value(attention, root.config, "qk_rope_head_dim"), group)
    # local_params, replicate: goose's parameters are plain local tensors already.


class TensorParallel:
    """Shard ``model`` over ``ctx``'s tensor-parallel group.

    ``parallelize()`` modifies the model in place and returns it. Build the model identically
    on every rank first (same seed), so every shard is cut from the same full weights and the
    tp model equals the single-device one from step 0.

    With labels, ``model(...).logits`` are this rank's vocabulary shard (the loss never gathers
    them); without labels the LM head all-gathers and the logits are whole.

    Order: apply it before ``PipelineParallel`` (it cuts the embedding, the head and every
    block, which a pipeline stage no longer holds all of); ``DataParallel`` may come before or
    after it (its reducer is rebuilt over the sharded parameters). Every rank of the tp group
    must be fed the same batch: every forward agrees on its shapes and on ids within the whole
    vocabulary (the split embedding would mask one past it), and by default the first forward
    also compares a checksum of the inputs; a bad or different batch raises on every rank (see
    :mod:`goose_core.distributed.batch_check`).

    Args:
        model: an HF causal LM (``PreTrainedModel`` with input and output embeddings).
        ctx: the parallel context; only its tp group is used.
        seed: seeds the split RNG streams (default ``ctx.seed``).
        check_batch: when to compare a checksum of the tp group's batch: ``"first"`` forward,
            ``"always"`` or ``"never"`` (shapes and ids are agreed on every forward regardless,
            in the same small all-reduce).
        check_grads: compare, in the first backward, the gradients of the parameters left whole
            over the tp group, and raise if they differ (see
            :mod:`goose_core.tensor_parallel.grad_check`): one tiny all-reduce, once.
        sequence_parallel: split the residual stream between the regions along the sequence
            (Megatron's sequence parallelism, :mod:`goose_core.tensor_parallel.sequence`); also
            on when the plan declares 🤗's ``sequence_parallel`` style. Every batch's sequence
            length must divide by tp (refused on every rank before any collective).

    Raises:
        ValueError: an unknown ``check_batch``; from ``parallelize()``, on every rank before any
            collective: the model is already a pipeline stage (apply TensorParallel first), no
            plan for the family, a size (heads, kv-heads, vocab, intermediate) that does not
            split, or (sequence parallelism) a style it cannot run.
    """

    def __init__(self, model: nn.Module, ctx: ParallelContext, seed: int | None = None,
                 check_batch: str = "first", check_grads: bool = True, sequence_parallel: bool = False) -> None:
        self.check_batch = check_policy(check_batch)
        self.sequence_parallel = sequence_parallel
        self.check_grads = check_grads
        self.model, self.ctx = model, ctx
        self.seed = ctx.seed if seed is None else seed

    def parallelize(self) -> nn.Module:
        """Shard the model in place and return it (parameters replaced: a DataParallel already
        on the model re-buckets over the new ones)."""
        model, ctx, tp = self.model, self.ctx, self.ctx.tensor_parallel_size
        if getattr(model, "goose_rng_tracker", None) is not None:
            raise ValueError("this model is already tensor-parallel: call parallelize() once")
        if is_pipelined(model):
            raise ValueError("this model is already split into pipeline stages, so no rank holds all "
                             "of the embedding, the head and the blocks that TensorParallel cuts: "
                             "apply TensorParallel before PipelineParallel (supported orders: TP, PP, "
                             "DP; TP, DP, PP; DP, TP, PP)")
        if getattr(module_grad_sync(model), "zero_stage", 1) == 3:
            raise ValueError("DataParallel(zero_stage=3) already sharded this model's parameters over dp: "
                             "apply TensorParallel (and PipelineParallel) first, DataParallel last")
        plan = resolve_plan(model)
        check_sizes(model, plan, tp)
        sequence = self.sequence_parallel or plan.sequence_parallel
        problems = []
        if sequence:
            blocks = blocks_path(model)
            problems = sequence_problems(plan.layers, plan.params, blocks) or block_problems(model, blocks, plan.layers)
        if problems:
            raise ValueError(f"cannot run {type(model).__name__} sequence-parallel over tp={tp}:\n  "
                             + "\n  ".join(problems)
                             + "\n(use sequence_parallel=False and drop the plan's sequence_parallel entries)")
        parts = decoder_blocks(model) if sequence else None  # read before the model is cut
        install_batch_check(model, ctx, "tp", self.check_batch)  # reads the whole vocabulary
        embedding, head = _vocab_modules(model)
        tracker = RNGTracker(self.seed, ctx.tensor_parallel_rank, ctx.device)
        summed = {id(p) for name, style in plan.layers.items() if style == "replicated_with_grad_allreduce"
                  for p in model.get_submodule(name).parameters()}
        apply_styles(model, plan, ctx, tracker, skip=embedding, sequence_parallel=sequence)
        if plan.localize is not None:
            plan.localize(model, tp, ctx.tensor_parallel_rank)
        else:
            localize_heads(model, plan, tp)
        head = self._shard_vocab(embedding, head)
        if sequence:
            assert parts is not None
            sequence_parallelize(model, ctx.tensor_parallel_group, tracker, head, summed, parts)
        model.loss_function = VocabParallelCausalLMLoss(ctx.tensor_parallel_group, model.config.vocab_size)
        model.goose_rng_tracker = tracker
        before, after = _forward_hooks(head, tracker)
        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, always_call=True)
        count_forwards(model)  # the step in this rank's progress record
        if self.check_grads and tp > 1:  # before DataParallel's hooks, which may move .grad away
            ReplicaGradCheck(model, ctx.tensor_parallel_group, ctx.device)
        parameters_changed(model)
        watch(model, ctx)  # non-finite gradients stop the step (the new shards marked)
        return model

    def _shard_vocab(self, embedding: nn.Embedding, head: nn.Linear) -> ColumnParallelLinear:
        """Split the input embedding by vocabulary rows (its family subclass kept) and the LM head
        by vocabulary columns, sharing the table's shard when they were tied."""
        model, group = self.model, self.ctx.tensor_parallel_group
        tied = head.weight is embedding.weight
        names = {id(m): n for n, m in model.named_modules()}
        vocab = split_embedding(embedding, group, "embedding_rowwise")
        _replace(model, names[id(embedding)], vocab)
        new_head = ColumnParallelLinear.from_module(head, group, shared_weight=vocab.weight if tied else None)
        _replace(model, names[id(head)], new_head)
        return new_head


def _vocab_modules(model: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding) or not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}: expected an nn.Embedding input and an nn.Linear "
                         f"LM head, got {type(embedding).__name__} and {type(head).__name__}")
    if embedding.max_norm is not None or embedding.sparse or embedding.scale_grad_by_freq:
        raise ValueError("a vocab-parallel embedding supports neither max_norm, sparse=True nor scale_grad_by_freq")
    vocab = getattr(model.config, "vocab_size", None)
    if head.out_features != vocab:
        raise ValueError(f"{type(model).__name__}: its LM head has {head.out_features} output rows but "
                         f"config.vocab_size is {vocab}; goose's vocab-parallel head and loss split "
                         f"config.vocab_size rows (a head narrower than the padded table, as Inkling 2's "
                         f"unpadded_vocab_size, is not supported: make them equal)")
    if type(head).forward is not nn.Linear.forward:
        raise ValueError(f"{type(model).__name__}: its LM head {type(head).__name__} overrides nn.Linear.forward; "
                         f"goose's vocab-parallel head computes x W^T + b only and would lose what it adds")
    return embedding, head


def _forward_hooks(head: ColumnParallelLinear, tracker: RNGTracker) -> tuple[Any, Any]:
    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A forward that died inside a region must not leave the split stream installed.
        tracker.leave()
        # Only a caller of the whole model without labels wants whole logits; the loss (and a
        # pipeline stage calling lm_head itself) works on the shards.
        head.gather_output = kwargs.get("labels") is None and dist.get_world_size(head.group) > 1

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        head.gather_output = False

    return before, after
