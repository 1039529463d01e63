"""Sequence parallelism (Megatron SP): between tensor-parallel regions, tokens split over tp.

Tensor parallelism leaves the residual stream whole on every tp rank: each rank holds the same
norms, residual adds and dropouts of all S tokens. Sequence parallelism splits that stream along
the sequence (dim 1), so those activations shrink by tp, and swaps each all-reduce of a region
for the two halves of it, an all-gather in and a reduce-scatter out (Megatron's g and ḡ)::

    tokens [S/tp] ── norm ──┬─ all-gather S ──> q|k|v, gate|up (column)  ...  (row) ── reduce-scatter ─┐
                            │  (bwd: reduce-scatter)                       (bwd: all-gather)         │
                            └─ residual ──────────────────────────── + <─────────────────── [S/tp] ─┘
         TP:                   f (bwd: all-reduce)                          g: all-reduce (fwd)

An all-reduce of S bytes is a reduce-scatter plus an all-gather, so a block sends exactly TP's
bytes. The gather sits at the attention / MLP module's input (a forward pre-hook), once per
region: 🤗's q, k and v (gate and up) read the gathered tensor and share it, as TP's ``f``.

Where the stream is split (🤗's parent model reads the sequence length off the embedding to
build position ids and the causal mask, so it must see whole tokens)::

    embedding (all-reduce, as TP) ── parent: + positions, dropout ── block 0 pre-hook: keep my
    slice (bwd: all-gather) ── blocks on S/tp ── last block: all-gather (bwd: reduce-scatter)
    ── final norm, vocab-parallel head (no f: the reduce-scatter sums its partial gradients)

Parameters left whole that now see a shard of the tokens (every norm, a row layer's bias, the
final norm, which sees the head's vocabulary-partial gradient) get one rank's share of their
gradient; a hook sums it over tp. Dropout between regions draws the one-device mask: the whole
``(B, S, ...)`` mask from the replicated stream, of which each rank keeps its slice (tp times
the random numbers of its shard, drawn and freed at once; the slice kept is the shard's size).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from goose_core.distributed.collectives import all_gather, reduce_scatter, scatter_to_region
from goose_core.distributed.missing import naming_missing
from goose_core.metadata import shard_spec
from goose_core.pipeline.split import _exists, pipeline_parts_of
from goose_core.tensor_parallel.random import RNGTracker

__all__ = ["SEQUENCE_DIM", "SEQUENCE_STYLES", "SequenceDropout", "gather_sequence", "scatter_sequence",
           "reduce_scatter_sequence", "check_sequence_length", "sum_grads_over", "sequence_problems",
           "blocks_path", "block_problems", "decoder_blocks", "sequence_parallelize", "block_hooks", "map_hidden",
           "map_output"]

#: The sequence dimension of 🤗's hidden states ``(batch, sequence, hidden)``.
SEQUENCE_DIM = 1

#: The plan styles sequence parallelism composes with: column -> row regions, the vocabulary-row
#: embedding, whole norms on split heads, and 🤗's ``sequence_parallel`` entries themselves.
SEQUENCE_STYLES = ("colwise", "packed_colwise", "fused_qkv_colwise", "rowwise", "embedding_rowwise",
                   "replicated_with_grad_allreduce", "replicate", "sequence_parallel")


def gather_sequence(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """g: all-gather the tokens; backward reduce-scatters (the region's partial gradients summed)."""
    return all_gather(x, group, dim=SEQUENCE_DIM)


def reduce_scatter_sequence(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """ḡ: sum the row layer's partial products, keep this rank's tokens; backward all-gathers."""
    return reduce_scatter(x, group, dim=SEQUENCE_DIM)


def scatter_sequence(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Keep this rank's tokens of a replicated tensor; backward all-gathers the gradient."""
    return scatter_to_region(x, group, dim=SEQUENCE_DIM)


def check_sequence_length(length: int, tp: int) -> None:
    """Raise unless ``length`` tokens split into ``tp`` equal shards (pure: every rank raises)."""
    if length % tp:
        raise ValueError(f"sequence_parallel=True splits the sequence over tp={tp} ranks, but this batch "
                         f"has {length} tokens per row: pad the batch to a multiple of {tp} (e.g. "
                         f"tokenizer(..., pad_to_multiple_of={tp})), or build the model without "
                         f"sequence_parallel (generation feeds one token at a time: use plain TP there)")


def sum_grads_over(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Each backward's gradient of ``params`` summed over ``group`` before it accumulates (a leaf
    hook fires once per use, so accumulation and micro-batches each sum only their own)."""
    def summed(grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        with naming_missing(group):
            dist.all_reduce(grad, group=group)
        return grad

    if dist.get_world_size(group) > 1:
        for param in params:
            param.register_hook(summed)


class SequenceDropout(TorchFunctionMode):
    """Inside a decoder block, ``F.dropout`` on a token shard draws the one-device mask.

    Active while a block runs (its pre- and post-hooks); inside a tensor-parallel region (the
    tracker's split stream) the activations are whole tokens of split heads and dropout is
    TP's, left alone. Elsewhere the input is this rank's ``S/tp`` tokens: the mask is drawn
    at ``(B, S, ...)`` from the replicated stream, as one device draws it, and sliced.
    """

    def __init__(self, group: dist.ProcessGroup, tracker: RNGTracker) -> None:
        super().__init__()
        self.group, self.tracker = group, tracker

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in (F.dropout, torch.dropout) or self.tracker.in_split_region:
            return func(*args, **kwargs)
        if func is torch.dropout:  # torch.dropout(input, p, train)
            kwargs = {"training" if k == "train" else k: v for k, v in kwargs.items()}
        return self._dropout(*args, **kwargs)

    def _dropout(self, x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
        if not training or p == 0.0:
            return x
        tp, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        shape = list(x.shape)
        shape[SEQUENCE_DIM] *= tp
        # dropout(ones) is the one-device noise (0 or 1/(1-p)), drawn with its shape and dtype.
        noise = F.dropout(torch.ones(shape, dtype=x.dtype, device=x.device), p, True)
        mine = noise.chunk(tp, SEQUENCE_DIM)[rank].clone()  # frees the whole mask
        return x * mine


def block_hooks(block: nn.Module, mode: SequenceDropout) -> None:
    """Run ``block`` under the sequence-parallel dropout (left even when its forward raises)."""
    def enter(module: nn.Module, args: tuple) -> None:
        mode.__enter__()

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        mode.__exit__(None, None, None)

    block.register_forward_pre_hook(enter)
    block.register_forward_hook(leave, always_call=True)


def map_hidden(fn: Callable[[Tensor], Tensor]) -> Callable[..., tuple[tuple, dict]]:
    """A forward pre-hook applying ``fn`` to a module's hidden states (its first argument, or
    the ``hidden_states`` keyword)."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


def map_output(fn: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    """A forward hook applying ``fn`` to a block's output (or the first item of its tuple)."""
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)
    return hook


def sequence_problems(layers: dict[str, str], params: dict[str, str], blocks: str = "") -> list[str]:
    """What in a resolved plan sequence parallelism cannot run (pure: every rank finds the same).

    ``blocks``: the path of the decoder-block list; a region whose layers sit in a block itself
    (OPT's fc1 / fc2) has no module to gather its tokens at.
    """
    problems = [f"{name}: style {style!r} (sequence parallelism supports {list(SEQUENCE_STYLES)})"
                for name, style in layers.items() if style not in SEQUENCE_STYLES]
    problems += [f"{name}: parameter style {style!r} (its module's output would be a partial sum over "
                 f"whole tokens)" for name, style in params.items() if style != "replicate"]
    rows = {name.rpartition(".")[0] for name, style in layers.items() if style == "rowwise"}
    problems += [f"{name}: a {style} layer with no rowwise layer beside it, so no region gathers its tokens"
                 for name, style in layers.items()
                 if style.endswith("colwise") and name.rpartition(".")[0] not in rows]
    problems += [f"{parent}: its column and row layers sit in the decoder block itself, not in an attention "
                 f"or MLP module the tokens could be gathered at" for parent in sorted(rows)
                 if blocks and parent.rpartition(".")[0] == blocks]
    return problems


def blocks_path(model: nn.Module) -> str:
    """Where ``model``'s decoder blocks are (its pipeline parts).

    Raises:
        ValueError: goose does not know (no pipeline parts, or parts the split refuses).
    """
    try:
        parts = pipeline_parts_of(model)
        problems = parts.check(model.config)
    except ValueError as error:
        problems = [str(error)]
    if problems or not isinstance(model.get_submodule(parts.blocks), nn.ModuleList):
        raise ValueError(f"sequence_parallel=True needs to know where {type(model).__name__}'s decoder "
                         f"blocks are (its pipeline parts): {'; '.join(problems) or 'they name no block list'}")
    return parts.blocks


def block_problems(model: nn.Module, blocks: str, layers: dict[str, str]) -> list[str]:
    """A block's children that would run on this rank's tokens but are no token-wise module.

    Between the regions only token-wise work is exact on ``S/tp`` tokens. goose cannot tell a
    sequence mixer (attention the plan leaves whole, Mamba, a convolution) from an MLP by its
    code, so a child holding parameters must be a region's module (or hold one) or a norm.
    """
    regions = {name.rpartition(".")[0] for name, style in layers.items() if style == "rowwise"}
    problems = []
    for index, block in enumerate(model.get_submodule(blocks)):
        for child_name, child in block.named_children():
            name = f"{blocks}.{index}.{child_name}"
            held = any(r == name or r.startswith(name + ".") for r in regions)
            if not held and "norm" not in type(child).__name__.lower() and any(True for _ in child.parameters()):
                problems.append(f"{name} ({type(child).__name__}) holds no tensor-parallel region, so it would run "
                                f"on this rank's S/tp tokens; only norms may (a sequence mixer there would see a "
                                f"slice of the sequence)")
    return problems


def decoder_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The decoder blocks, and the modules after them but the LM head (the final norm)."""
    parts = pipeline_parts_of(model)
    # The head is replaced by the vocab-parallel one; a part may be absent (OPT's project_out).
    head = model.get_output_embeddings()
    return (list(model.get_submodule(parts.blocks)),
            [m for m in (model.get_submodule(p) for p in parts.head if _exists(model, p)) if m is not head])


def _length_check(tp: int) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        if isinstance(tokens, Tensor) and tokens.dim() >= 2:
            check_sequence_length(tokens.shape[SEQUENCE_DIM], tp)
    return hook


def sequence_parallelize(model: nn.Module, group: dist.ProcessGroup, tracker: RNGTracker, head: nn.Module,
                         summed: set[int], parts: tuple[list[nn.Module], list[nn.Module]]) -> None:
    """Split ``model``'s residual stream along the sequence between its blocks' regions (the
    regions themselves gather and reduce-scatter: :class:`~.layers.ParallelRegion`).

    ``head`` is the vocab-parallel LM head; ``summed`` the ids of whole parameters whose gradient
    a style already sums over tp; ``parts``: :func:`decoder_blocks`, read before the model was cut.
    """
    blocks, after = parts
    mode = SequenceDropout(group, tracker)
    blocks[0].register_forward_pre_hook(map_hidden(lambda x: scatter_sequence(x, group)), with_kwargs=True)
    for block in blocks:
        block_hooks(block, mode)
    blocks[-1].register_forward_hook(map_output(lambda x: gather_sequence(x, group)))
    head.input_gathered = True  # type: ignore[assignment]
    shares = {id(p): p for m in (*blocks, *after) for p in m.parameters()
              if p.requires_grad and shard_spec(p) is None and id(p) not in summed}
    sum_grads_over(list(shares.values()), group)
    model.register_forward_pre_hook(_length_check(dist.get_world_size(group)), with_kwargs=True, prepend=True)
