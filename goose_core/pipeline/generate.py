"""Generation under pipeline parallelism: 🤗's generate on every rank, each stage its own KV cache.

``model.generate(...)`` runs unchanged on every rank of the pipeline group. Each call of the
model's forward it makes is one pipelined inference step::

    every rank       generate: prepare inputs (ids, mask, positions from the mask, its cache)
    stage 0          embedding + its blocks (their KV entries into its own cache) ──hidden──►
    stage j          its blocks on the received hidden states (its own cache)      ──hidden──►
    last stage       its blocks, norm, head: the kept logits (the last position)
    every rank       agree: the logits' shape, and that every rank fed the same tokens
    every rank       ◄── broadcast of the logits from the last stage over the pipeline group
    every rank       generate: logits processors, the next token (argmax or a draw), stop?

Every rank's cache is a 🤗 ``DynamicCache`` holding only its own blocks' keys and values. The
family's forward reads lengths from layer 0 (positions, ``get_mask_sizes`` for the causal mask),
and so does generate between forwards (continuing from a cache), which a later stage never
fills: the slot of each block another rank runs becomes an :class:`ElsewhereLayer` reporting a
slot this rank fills (:func:`elsewhere`), so every stage builds the masks and positions of the
whole sequence, as one device does. During a cell the slots it does not run report its own first
block's, read before the cell adds to it (:func:`lengths_of`: partitions sharing one process,
``local_pipeline``, share one cache).

Sampling draws on every rank from the same logits, so every rank must seed the same generator
state (``torch.manual_seed(seed)`` on every rank before ``generate``): 🤗's loop stays unchanged
(logits processors, stopping criteria, streamers run as on one device), at the cost of one
agreement per step: every rank's token checksum is compared in the all-reduce that carries the
logits' shape, and ranks that drew differently raise on every rank instead of diverging.

Supported: greedy search and sampling (temperature, top-k, top-p, ...), the dynamic KV cache or
none, left-padded batches. The batch runs as one micro-batch (so not under a schedule that needs
more: interleaved 1F1B or ZBV at p > 1). Refused by name before any message, on every rank:
those schedules, beam searches, assisted / speculative / DoLa / contrastive decoding,
compiled (static) caches, custom decoding loops.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from goose_core.distributed.batch_check import extremes
from goose_core.distributed.context import ParallelContext
from goose_core.distributed.missing import naming_missing
from goose_core.engine.pipeline import Pipeline

__all__ = ["ElsewhereLayer", "GENERATION_INPUTS", "Generation", "SUPPORTED_MODES", "advertise", "elsewhere",
           "lengths_of", "refuse_unsupported_generate"]

#: What a generation step passes a cell's family forward besides the batch (the ones it takes):
#: this rank's KV cache (``past_key_values`` is its former name), the positions generate
#: computes from the attention mask, and how many positions' logits to keep.
GENERATION_INPUTS = ("cache", "past_key_values", "position_ids", "use_cache", "logits_to_keep")

#: The decoding methods of 🤗's generate a pipelined model runs.
SUPPORTED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
_SUPPORTED = "greedy search and sampling (do_sample=True with temperature, top_k, top_p, ...) with the dynamic cache"
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_NDIM = 3  # logits: batch x kept positions x vocabulary
_HASH = 2**31 - 1  # token checksums modulo a prime: exact in int64, and they negate exactly


class ElsewhereLayer(CacheLayerMixin):
    """The cache slot of a block another stage runs: it stores nothing and reports the lengths
    of ``runs``, a layer this rank runs (so layer 0's length is the prompt's on every stage)."""

    def __init__(self, runs: CacheLayerMixin) -> None:  # no super().__init__: no tensors here
        self.runs = runs
        self.keys = self.values = None

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self.runs.is_initialized

    @property
    def is_sliding(self) -> bool:
        return getattr(self.runs, "is_sliding", False)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise RuntimeError("this layer's block runs on another pipeline stage: its KV entries live there")

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise RuntimeError("this layer's block runs on another pipeline stage: its KV entries live there")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.runs.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.runs.get_seq_length()

    def get_max_length(self) -> int:
        return self.runs.get_max_length()

    def reset(self) -> None:
        """Nothing stored here (the layer it reports is reset with its own slot)."""

    def offload(self) -> None:
        """Nothing stored here."""

    def prefetch(self) -> None:
        """Nothing stored here."""


def elsewhere(cache: Any, held: list[int]) -> None:
    """Make, in place, the cache slots of the blocks no partition of this process runs
    :class:`ElsewhereLayer`s reporting a held block's slot (of the same kind, sliding or not, when
    one is), for good: generate reads ``cache.get_seq_length()`` (layer 0) between forwards too,
    e.g. to cut the prompt when it continues from a cache. Slots created later (a cache without a
    config grows on update) are covered at the next call."""
    layers = cache.layers
    runs = [b for b in held if b < len(layers) and not isinstance(layers[b], ElsewhereLayer)]
    if not runs:  # no slot of ours yet: every length is 0 (a prompt), as one device's
        return
    for i, layer in enumerate(layers):
        if i not in held and not isinstance(layer, ElsewhereLayer):
            layers[i] = ElsewhereLayer(_same_kind(layers, runs, layer))


def _same_kind(layers: list[Any], runs: list[int], layer: Any) -> Any:
    """The slot of the first block in ``runs`` of ``layer``'s kind (sliding or not), else of the first."""
    kind = getattr(layer, "is_sliding", False)
    same = [b for b in runs if getattr(layers[b], "is_sliding", False) == kind] or runs
    return layers[same[0]]


@contextmanager
def lengths_of(cache: Any, blocks: list[int]) -> Iterator[None]:
    """During one cell: the cache slots of the blocks it does not run are :class:`ElsewhereLayer`s
    reporting its first block's slot (see :func:`elsewhere`), read before this cell adds to it.
    Restored after: with several partitions in one process (``local_pipeline``) the other slots
    are real, and the partitions before this one already added this step's tokens to them."""
    if cache is None:
        yield
        return
    layers = cache.layers
    runs = [b for b in blocks if b < len(layers)]
    fresh = DynamicLayer()  # no slot of ours yet (a cache without a config grows on update): length 0
    saved = {i: layer for i, layer in enumerate(layers) if i not in blocks}
    for i, layer in saved.items():
        layers[i] = ElsewhereLayer(_same_kind(layers, runs, layer) if runs else fresh)
    try:
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


def advertise(forward: Callable[..., Any], model: nn.Module) -> Callable[..., Any]:
    """``forward`` with a signature that adds the generation inputs ``type(model).forward`` takes.

    🤗's generate reads the forward's signature to decide what it passes: positions from the
    attention mask (left padding) only to a forward that takes ``position_ids``, ``logits_to_keep``
    only to one that takes it. Advertising exactly the family's keeps the inputs one device gets.
    """
    own = inspect.signature(forward)
    family = inspect.signature(type(model).forward).parameters
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in params}
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
               for n in GENERATION_INPUTS if n in family and n not in names]
    params += [p for p in own.parameters.values() if p.kind is p.VAR_KEYWORD]
    advertised = functools.partial(forward)
    advertised.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    return advertised


def refuse_unsupported_generate(model: nn.Module) -> None:
    """Make ``model.generate`` (🤗's, unchanged) first refuse what a pipelined model cannot run:
    a ValueError naming pipeline parallelism and the supported modes, raised on every rank before
    any message (every rank calls generate with the same arguments)."""
    model.generate = types.MethodType(_checked_generate, model)  # type: ignore[method-assign]


def _checked_generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """🤗's ``generate`` of ``model``'s class, after :func:`_unsupported` found nothing to refuse."""
    generate = type(model).generate
    bound = inspect.signature(generate).bind(model, *args, **kwargs).arguments
    options = {**bound.pop("kwargs", {}), **bound}  # generate's named arguments and its **kwargs
    problem = _unsupported(model, options)
    if problem:
        raise ValueError(f"model.generate under pipeline parallelism (PipelineParallel) cannot run "
                         f"{problem}; it supports {_SUPPORTED}")
    return generate(model, *args, **kwargs)


def _unsupported(model: nn.Module, options: dict[str, Any]) -> str | None:
    """What in ``generate``'s arguments a pipelined model cannot run, in words (None: nothing)."""
    if options.get("custom_generate") is not None:
        return f"custom_generate={options['custom_generate']!r} (a decoding loop of its own)"
    config = copy.deepcopy(options.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in options.items() if hasattr(config, k)})
    mode = config.get_generation_mode(options.get("assistant_model"))
    if mode not in SUPPORTED_MODES:
        return f"{mode.value} (its decoding mode)"
    if config.cache_implementation not in (None, "dynamic"):
        return (f"cache_implementation={config.cache_implementation!r} (each stage holds a dynamic cache "
                f"of its own layers)")
    cache = options.get("cache", options.get("past_key_values"))
    if cache is not None and type(cache) is not DynamicCache:
        return f"a given {type(cache).__name__} (each stage holds a DynamicCache of its own layers)"
    return None


class Generation:
    """The pipelined forward of one generation step on this rank (``Stage.forward`` hands it over).

    Args:
        model: the trimmed 🤗 model (its config builds a cache when none is given).
        pipeline: the stage's executor (one micro-batch per step: the cache holds the batch).
        held: the blocks the partitions in this process run.
        is_last: whether the last partition is here (it computes the logits).
        ctx: this rank's context (None: every partition in this process, nothing to share).
    """

    def __init__(self, model: nn.Module, pipeline: Pipeline, held: list[int], is_last: bool,
                 ctx: ParallelContext | None) -> None:
        self.model, self.pipeline, self.held, self.is_last, self.ctx = model, pipeline, held, is_last, ctx
        family = inspect.signature(type(model).forward).parameters
        self.cache_name = "cache" if "cache" in family else "past_key_values"  # 🤗 renamed it in 5.x

    @staticmethod
    def wanted(kwargs: dict[str, Any]) -> bool:
        """Whether a forward's keywords ask for a generation step (a cache, positions, kept logits)."""
        return bool(kwargs.get("use_cache")) or any(kwargs.get(k) is not None for k in GENERATION_INPUTS
                                                    if k != "use_cache")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> CausalLMOutputWithPast:
        """One step: the logits of the kept positions on every rank, and this rank's cache."""
        self._refuse(kwargs)
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if kwargs.get("use_cache") and cache is None:
            cache = DynamicCache(config=self.model.config)
        inputs: dict[str, Any] = {"input_ids": input_ids, "microbatch": 0,
                                  **{k: v for k, v in kwargs.items() if k in GENERATION_INPUTS and v is not None}}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if cache is not None:
            elsewhere(cache, self.held)
            inputs[self.cache_name] = cache
        step = self.pipeline.run([inputs])
        if cache is not None:
            elsewhere(cache, self.held)  # the slots a cache without a config created in this step
        logits = self._share(step.outputs.get(0) if self.is_last else None, input_ids)
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def _refuse(self, kwargs: dict[str, Any]) -> None:
        """Every rank, before any message: what a generation step cannot do."""
        schedule = self.pipeline.schedule_cls
        try:
            schedule(1, self.pipeline.num_partitions)
        except ValueError:
            depth = self.pipeline.num_partitions // schedule.virtual_stages
            raise ValueError(f"model.generate runs the batch as one micro-batch, which schedule="
                             f"{schedule.name!r} cannot run at pipeline depth {depth}: generate with the model pipelined under schedule='1f1b' (a "
                             f"checkpoint saved under one schedule loads under any other)") from None
        if torch.is_grad_enabled():
            raise ValueError("a pipelined generation step (use_cache, cache, position_ids or logits_to_keep given) "
                             "runs without gradients: call it under torch.no_grad() (model.generate does)")
        extra = sorted(k for k, v in kwargs.items()
                       if k not in (*GENERATION_INPUTS, "return_dict") and v is not None and v is not False)
        if extra:
            raise ValueError(f"a pipelined generation step takes input_ids, attention_mask and "
                             f"{', '.join(GENERATION_INPUTS)}; got also {extra} (no stage holds every "
                             f"layer's attentions or hidden states)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and type(cache) is not DynamicCache:
            raise ValueError(f"a pipelined generation step keeps each stage's layers in a DynamicCache of its own; "
                             f"got a {type(cache).__name__}")

    def _share(self, logits: Tensor | None, input_ids: Tensor) -> Tensor:
        """The last stage's logits on every rank of the pipeline group; raises on every rank
        when the ranks of the model (tensor and pipeline peers) were fed different tokens."""
        ctx = self.ctx
        if ctx is None:
            assert logits is not None
            return logits
        groups = [ctx.group(a) for a in ("tp", "pp") if ctx.size(a) > 1]
        header = torch.zeros(2 + _NDIM, dtype=torch.int64)
        if logits is not None:
            header[0], header[1] = _DTYPES.index(logits.dtype), logits.dim()
            header[2:2 + logits.dim()] = torch.tensor(logits.shape)
        report = torch.cat([header, _checksum(input_ids).view(1)]).to(ctx.device)
        high, low = extremes(report, groups)
        if high[-1] != low[-1]:
            raise ValueError("the ranks of one model were fed different tokens in a generation step (token "
                             f"checksums {int(low[-1])} to {int(high[-1])}): every rank must call generate with "
                             "the same prompts, and sampling draws on every rank, so seed every rank's "
                             "generator the same (torch.manual_seed(seed) on every rank) before generate")
        if logits is not None:
            logits = logits.contiguous()
        else:
            shape = [int(s) for s in high[2:2 + int(high[1])]]
            logits = torch.zeros(shape, dtype=_DTYPES[int(high[0])], device=ctx.device)
        last = ctx.group_ranks("pp")[-1]
        if ctx.size("pp") > 1:
            with naming_missing(ctx.pipeline_parallel_group):
                dist.broadcast(logits, last, group=ctx.pipeline_parallel_group)
        return logits


def _checksum(ids: Tensor) -> Tensor:
    """A checksum of ``ids`` that tells a different token or order apart (position-weighted)."""
    flat = ids.reshape(-1).to(torch.int64).cpu()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64)
    return ((flat % _HASH) * weights % _HASH).sum() % _HASH
