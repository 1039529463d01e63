"""Cutting a Hugging Face causal LM into pipeline stages that each run the family's own forward.

A stage does not rebuild the parent model's forward: it calls it, so whatever a family adds
between the embedding and the blocks, around them, or after them stays the family's code
(embedding scales and multipliers, sliding-window and per-layer-type masks, rotary tables with
partial dimensions or per layer type, ALiBi, final-logit softcapping, logit scaling, the loss).
What the stage changes, for the duration of one cell::

    model.forward(input_ids=ids, labels=..., ...)              (the ...ForCausalLM's own code)
      embedding modules   first stage: real; the table hands back its lookup (SplitModel.embed),
                          so what the parent does to looked-up ids only is done
                          other stages: stand-ins, the table's gives zeros of the right shape
                          and dtype (masks and rotary tables read only shapes, dtypes, positions)
      parent code         masks, rotary, ALiBi, scales: computed on every stage
      block b not owned   a pass-through (the block's plain attributes kept; ``(hidden, None)``
                          where the parts say the parent unpacks pairs)
      first owned block   non-first stages: its hidden-states input replaced by the received
                          activation (a forward pre-hook)
      last owned block    non-last stages: raises _Exit(its output), caught here: that is sent
      head, loss          last stage only (the family's norm, lm_head, softcapping, loss)

Only pass-throughs *before* the first owned block ever run, and that block's input is replaced,
so what they return never matters. A family's pipeline parts (which modules the first and the last
stage hold, where the blocks are) comes from its entry in :mod:`goose_core.models.registry` or
from ``config.base_model_pp_plan``; its ``check`` and the rule that every parameter lies in the
parts refuse what the split cannot reproduce, before any collective. MoE families with
``output_router_logits=True`` carry the router loss's running sums along the pipeline, one
message per micro-batch; the stage adds the aux loss of the whole batch once (:mod:`.router_loss`).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedModel

from goose_core.models.family import PipelineParts
from goose_core.models.registry import PIPELINE
from goose_core.pipeline.generate import GENERATION_INPUTS, lengths_of
from goose_core.pipeline.router_loss import RouterLoss, WholeBatchProbs, router_loss_of
from goose_core.engine.schedule import GPipe, Schedule

__all__ = ["SplitModel", "split_model_for", "pipeline_parts_of", "Placeholder", "drop_modules"]

Inputs = dict[str, Any]


class _Exit(Exception):
    """Raised by the last block a non-last stage owns: carries its output past the parent."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__("pipeline stage exit")
        self.hidden = hidden


class _PassThrough(nn.Module):
    """A block this stage does not run: hands its hidden states on (as ``(hidden, None)`` where
    the parent unpacks a block's output as a pair)."""

    def __init__(self, pair: bool = False, plain: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.__dict__.update(plain or {})  # the block's plain attributes, which the parent may read
        self.pair = pair

    def forward(self, hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states, None) if self.pair else hidden_states


class _Given(nn.Module):
    """The token table on the first stage, during a cell: the lookup :meth:`SplitModel.embed` made.
    The parent is called with the ids, as on one device, so what it does only to looked-up ids
    (Falcon-H1's embedding multiplier) is done."""

    #: Its weight is only read for its device: a split backward notes no weight use here.
    uses_no_parameters = True

    def __init__(self, embeds: Tensor, table: nn.Module) -> None:
        super().__init__()
        self.embeds, self.weight = embeds, table.weight  # a parent may read the table's device

    def forward(self, ids: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.embeds


class _StandIn(nn.Module):
    """A first-stage module the parent calls before the blocks, on a later stage: an output of
    the right shape (zeros; a lookup or a projection) or its input (a norm, a dropout)."""

    def __init__(self, width: int | None, lookup: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.width, self.lookup, self.dtype = width, lookup, dtype
        # an empty table: a parent that reads its weight's device (Llama 4) finds the stage's
        self.register_buffer("weight", torch.empty(0, width or 0, dtype=dtype, device=device), persistent=False)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.width is None:
            return x
        shape = x.shape if self.lookup else x.shape[:-1]
        return torch.zeros(*shape, self.width, dtype=self.dtype, device=x.device)


def _plain(module: nn.Module) -> dict[str, Any]:
    """A module's plain attributes (strings, numbers): what a parent reads of a block without
    running it (NemotronH's ``block_type``, a layer's ``attention_type``)."""
    if isinstance(module, Placeholder):
        return dict(module.plain)
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (str, int, float, bool))}


def _stand_in_shape(module: nn.Module) -> tuple[int | None, bool]:
    """(output width, whether it looks ids up) of a module a stand-in replaces."""
    if isinstance(module, nn.Embedding) or type(module).__name__.endswith("Embedding"):
        return int(module.weight.shape[-1]), True  # a vocab-parallel table: the full width
    if isinstance(module, nn.Linear):
        return module.out_features, False
    return None, False


def _swap(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = parent[int(name)] if name.isdigit() else getattr(parent, name)
    if name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)
    return old


def _exists(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(model.get_submodule(path), nn.Module)
    except AttributeError:
        return False


class SplitModel:
    """One model cut into stages: its pipeline parts, and a cell of a stage run through its own forward.

    Args:
        model: a 🤗 causal LM (``...ForCausalLM``).
        parts: where its first-stage, last-stage and block modules are.

    Attributes:
        embed_paths, head_paths, blocks_path: the parts' module paths (absent optional
            modules, e.g. OPT's ``project_in``, left out).
    """

    def __init__(self, model: PreTrainedModel, parts: PipelineParts) -> None:
        self.model = model
        self.embed_paths = tuple(p for p in parts.embed if _exists(model, p))
        self.head_paths = tuple(p for p in parts.head if _exists(model, p))
        self.blocks_path = parts.blocks
        self._pair = parts.tuple_blocks
        table = model.get_input_embeddings()
        self._table = next(name for name, m in model.named_modules() if m is table)
        self._width, self._dtype = int(table.weight.shape[-1]), table.weight.dtype
        self._stand_ins = {p: _stand_in_shape(model.get_submodule(p)) for p in self.embed_paths}
        self.router: RouterLoss | None = router_loss_of(model)
        # Routers per block, counted on the whole model (a stage drops the blocks it does not
        # run): block b's k-th router is router first[b] + k of the model.
        counts = [len(self.router.routers(model, [b])) for b in self.blocks] if self.router else []
        self._first_router = [sum(counts[:b]) for b in range(len(counts))]
        self._routers_per_block = counts
        self.probs = WholeBatchProbs(sum(counts), self.router.num_experts) if self.router else None
        self._finish_in_cell = True  # M=1: the last cell adds the aux loss (check() decides)
        self.dp_group: dist.ProcessGroup | None = None  # the router loss over dp ranks' shards (check())

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    def check(self, num_microbatches: int, schedule: type[Schedule] = GPipe,
              dp_group: dist.ProcessGroup | None = None) -> None:
        """Raise before any step what this split cannot reproduce with ``num_microbatches``
        under ``schedule``; else set where the router loss is added (the last cell at M=1,
        :meth:`batch_router`'s caller at M > 1 or over a ``dp_group``: the router loss of the
        whole dp batch, each dp rank holding a shard, expert parallelism's)."""
        if self.router is not None and (num_microbatches > 1 or dp_group is not None) and schedule.backward_in_step:
            over = "the data-parallel batch's" if dp_group is not None else "the whole batch's"
            raise ValueError(
                f"{type(self.model).__name__} has output_router_logits=True: its auxiliary router loss "
                f"is a function of {over} routing, which schedule={schedule.__name__} never "
                f"has before a backward (it runs micro-batch i's backward before the forward of i+1); "
                f"use schedule='gpipe'" + ("" if dp_group is not None else
                                           f", or num_microbatches=1 (got {num_microbatches})")
                + ", or set config.output_router_logits=False")
        self.dp_group = dp_group if self.router is not None else None
        self._finish_in_cell = num_microbatches == 1 and self.dp_group is None

    def batch_router(self) -> RouterLoss | None:
        """The router loss when the stage must add it for the batch: the last cell then returns
        ``[loss, sums...]`` per micro-batch (:meth:`RouterLoss.finish`, :attr:`probs`)."""
        return None if self._finish_in_cell else self.router

    def embed(self, inputs: Inputs) -> Tensor:
        """The first stage's input: the token embedding's lookup (the parent does the rest)."""
        return self.model.get_submodule(self._table)(inputs["input_ids"])

    def run(self, blocks: list[int], first: bool, last: bool, x: Tensor, inputs: Inputs) -> Tensor:
        """One cell: ``blocks`` on ``x`` through the family's forward.

        Args:
            x: the first stage's embedding (:meth:`embed`), or the activation received.
        Returns:
            The activation to send; on the last stage the micro-batch's loss (with ``labels``)
            or its logits; with the router loss over M > 1 micro-batches, ``[loss, sums...]``
            (``inputs["microbatch"]``, its index, keys what :attr:`probs` records). The loss is
            the family's ``loss_function`` given ``num_items_in_batch``: the micro-batch's
            token-loss sum over the batch's targets (goose_core.loss), so the micro-batches'
            losses add up to the batch mean and one with no target adds 0.
        """
        return self._run(blocks, first, last, x, inputs, carry=self.router is not None)

    def block_fn(self, index: int, hidden: Tensor) -> Tensor:
        """Block ``index`` alone, ``hidden -> hidden``, with the context its parent builds."""
        return self._run([index], False, False, hidden, {}, carry=False)

    def block_fns(self) -> list[Callable[[Tensor], Tensor]]:
        """Every block as ``hidden -> hidden`` (what the time and memory profilers run)."""
        return [functools.partial(self.block_fn, b) for b in range(len(self.blocks))]

    def _run(self, blocks: list[int], first: bool, last: bool, x: Tensor, inputs: Inputs,
             carry: bool) -> Tensor:
        ids = inputs.get("input_ids")
        shape = (*(ids.shape if ids is not None else x.shape[:-1]), self._width)
        sums = None
        if first:
            hidden = embeds = x
        else:
            hidden, sums = self.router.unpack(x, shape, self._dtype) if carry else (x, None)
            embeds = torch.zeros(shape, dtype=hidden.dtype, device=hidden.device)
        kwargs = {k: inputs[k] for k in ("attention_mask", "labels", "shift_labels", "num_items_in_batch")
                  if k in inputs}
        # A generation step (goose_core.pipeline.generate): this rank's cache, the prompt's positions.
        kwargs.update({"use_cache": False, **{k: inputs[k] for k in GENERATION_INPUTS if k in inputs}})
        if self.router is not None:
            kwargs["output_router_logits"] = False  # goose adds the loss over all stages itself
        # Called with the ids as on one device: the table gives the first stage's lookup, a
        # stand-in's zeros elsewhere (block_fn has no ids: the embedding is given instead).
        kwargs.update({"input_ids": ids} if ids is not None else {"inputs_embeds": embeds})
        cache = inputs.get("cache", inputs.get("past_key_values"))
        with self._only(blocks, first, last, hidden) as logits, lengths_of(cache, blocks):
            try:
                out = type(self.model).forward(self.model, **kwargs)
            except _Exit as done:
                out = done.hidden
        if carry:
            sums = self.router.add(sums if sums is not None else self.router.zeros(x.device),
                                   logits, inputs.get("attention_mask"), self._recorder(blocks, inputs, logits))
        if not last:
            return self.router.pack(out, sums) if carry else out
        if "labels" not in inputs:
            return out.logits
        if not carry:
            return out.loss
        return out.loss + self.router.loss(sums) if self._finish_in_cell else self.router.pack_loss(out.loss, sums)

    def _recorder(self, blocks: list[int], inputs: Inputs,
                  logits: list[Tensor]) -> Callable[[int, Tensor], None] | None:
        """Where this cell's routers' probability rows go (M > 1 only: at M = 1 the sums are
        the whole batch's already)."""
        if self._finish_in_cell or "microbatch" not in inputs or "labels" not in inputs:
            return None
        expected = sum(self._routers_per_block[b] for b in blocks)
        if len(logits) != expected:
            raise RuntimeError(f"blocks {blocks} have {expected} routers but produced {len(logits)} "
                               f"router logits: each router must run once per forward")
        first, i = self._first_router[blocks[0]], inputs["microbatch"]
        return lambda k, rows: self.probs.record(first + k, i, rows)

    @contextmanager
    def _only(self, owned: list[int], first: bool, last: bool, incoming: Tensor) -> Iterator[list[Tensor]]:
        """During one forward: only ``owned`` blocks run, the first fed ``incoming`` (unless this
        is the first stage), the last one exits (unless this is the last stage); yields the
        router logits the owned blocks produce (empty without router loss)."""
        swaps: dict[str, nn.Module] = {f"{self.blocks_path}.{b}": _PassThrough(self._pair, _plain(self.blocks[b]))
                                       for b in range(len(self.blocks)) if b not in owned}
        if not first:
            swaps.update({p: _StandIn(*self._stand_ins[p], incoming.dtype, incoming.device)
                          for p in self.embed_paths})
        else:
            swaps[self._table] = _Given(incoming, self.model.get_submodule(self._table))
        old = {p: _swap(self.model, p, m) for p, m in swaps.items()}
        head, tail = self.blocks[owned[0]], self.blocks[owned[-1]]
        hooks = []
        if not first:
            hooks.append(head.register_forward_pre_hook(_feed(incoming), with_kwargs=True))
        if not last:
            hooks.append(tail.register_forward_hook(_exit))
        routers = self.router.routers(self.model, [self.blocks[b] for b in owned]) if self.router else []
        with ExitStack() as stack:
            logits = stack.enter_context(self.router.collect(routers)) if self.router else []
            try:
                yield logits
            finally:
                for h in hooks:
                    h.remove()
                for p, m in old.items():
                    _swap(self.model, p, m)


def _feed(incoming: Tensor) -> Callable[..., tuple[tuple, dict]]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (incoming, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": incoming}
    return hook


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    raise _Exit(output[0] if isinstance(output, tuple) else output)


_PLAN_EXAMPLE = ('{"embed_tokens": (["input_ids"], ["inputs_embeds"]), '
                 '"layers": (["hidden_states", "attention_mask"], ["hidden_states"]), '
                 '"norm": (["hidden_states"], ["hidden_states"])}')


def pipeline_parts_of(model: nn.Module) -> PipelineParts:
    """Where ``model``'s first-stage, block and last-stage modules are: its family's entry in
    the registry, else its config's ``base_model_pp_plan`` (names relative to the base model:
    the entries before the block list embed, those after it and the output embedding make the
    logits).

    Raises:
        ValueError: neither, or a plan that names no ``nn.ModuleList`` of blocks.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in PIPELINE:
        return PIPELINE[model_type]
    plan = getattr(config, "base_model_pp_plan", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not plan or head is None:
        raise ValueError(
            f"cannot split {type(model).__name__} (model_type={model_type!r}) into pipeline stages: "
            f"it declares no config.base_model_pp_plan and goose_core.models has no pipeline parts for it. "
            f"Declare one before PipelineParallel, names relative to the base model "
            f"(model.{getattr(model, 'base_model_prefix', '')}), "
            f"the embeddings, then the decoder-block list, then what follows it, e.g. "
            f"model.config.base_model_pp_plan = {_PLAN_EXAMPLE}; or register its parts with "
            f"goose_core.models.register_family(Family({model_type!r}, pp=PipelineParts(...)))")
    prefix = model.base_model_prefix
    paths = [f"{prefix}.{name}" for name in plan]
    lists = [k for k, p in enumerate(paths) if isinstance(model.get_submodule(p), nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}'s base_model_pp_plan {list(plan)} names no "
                         f"nn.ModuleList of decoder blocks")
    k = lists[0]
    out = next(name for name, m in model.named_modules() if m is head)
    return PipelineParts(embed=tuple(paths[:k]), blocks=paths[k], head=(*paths[k + 1:], out))


def split_model_for(model: nn.Module) -> SplitModel:
    """``model`` as the pipeline cuts it (see :func:`pipeline_parts_of`).

    Raises:
        ValueError: no pipeline parts for it, a family feature the split cannot reproduce (the
            parts' ``check``), or parameters the parts leave on every stage.
    """
    parts = pipeline_parts_of(model)
    problems = parts.check(model.config)
    if problems:
        raise ValueError(f"cannot split {type(model).__name__} into pipeline stages: " + "; ".join(problems))
    _check_covers(model, parts)
    return SplitModel(model, parts)  # type: ignore[arg-type]


def _check_covers(model: nn.Module, parts: PipelineParts) -> None:
    """Every parameter belongs to the embedding, a block or the head: one outside would stay on
    every stage, each training its own copy on its own share of the gradient."""
    held = (*parts.embed, parts.blocks, *parts.head)
    table = next(name for name, m in model.named_modules() if m is model.get_input_embeddings())
    if table not in parts.embed:
        raise ValueError(f"cannot split {type(model).__name__} into pipeline stages: its token embedding "
                         f"{table!r} is not among the pipeline parts' first-stage modules {list(parts.embed)}")
    loose = [name for name, _ in model.named_parameters()
             if not any(name == p or name.startswith(p + ".") for p in held)]
    if loose:
        raise ValueError(f"cannot split {type(model).__name__} into pipeline stages: parameters "
                         f"{loose[:4]}{' ...' if len(loose) > 4 else ''} lie outside its pipeline parts' embedding "
                         f"{list(parts.embed)}, blocks {parts.blocks!r} and head {list(parts.head)}; every "
                         f"stage would train its own copy. Name their modules in the pipeline parts")


class Placeholder(nn.Module):
    """Stands where a module held by another stage was, so the module tree (and every parameter
    name this stage does hold) stays the single-device model's."""

    def __init__(self, name: str, plain: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name = name
        self.plain = plain or {}  # the plain attributes of the module it replaces

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} lives on another pipeline stage")

    def extra_repr(self) -> str:
        return self.name


def drop_modules(model: nn.Module, paths: list[str]) -> None:
    """Replace each module at ``paths`` (dotted; list items by index) by a :class:`Placeholder`."""
    for path in paths:
        _swap(model, path, Placeholder(path, _plain(model.get_submodule(path))))


# The former names, kept for code written against them.
Adapter = SplitModel
adapter_for = split_model_for
layout_of = pipeline_parts_of
