"""Cutting a Hugging Face causal LM into pipeline stages: embeddings, blocks, head.

Each family has an adapter that knows three things about its model:

* which modules embed the tokens (first stage) and which make the logits (last stage);
* the list of decoder blocks (the only thing partitioned);
* what the parent model computes for its blocks and passes to each of them: the causal mask
  (without it eager attention silently attends both ways), Llama's rotary
  ``position_embeddings``, Bloom's ``alibi``. Every stage rebuilds these for itself.

Llama-like families read the names from transformers' ``base_model_pp_plan``; GPT-2 and Bloom,
which declare none, get explicit adapters.
"""

from __future__ import annotations

import inspect

import functools

from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

__all__ = ["Adapter", "adapter_for", "Placeholder", "drop_modules"]

Inputs = dict[str, Any]


def _positions(hidden: Tensor) -> Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


# transformers renamed create_causal_mask's cache argument (past_key_values -> cache; 5.24 warns,
# 5.40 removes the old name): pass no cache under whichever name this version takes.
_NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}


def _mask(config: Any, hidden: Tensor, inputs: Inputs, **extra: Any) -> Tensor | None:
    return create_causal_mask(config=config, inputs_embeds=hidden,
                              attention_mask=inputs.get("attention_mask"), **_NO_CACHE, **extra)


class Adapter:
    """How to run one family's pieces. Subclasses set the module paths and the three calls."""

    embed_paths: tuple[str, ...] = ()   # modules of the first stage
    head_paths: tuple[str, ...] = ()    # modules of the last stage
    blocks_path: str = ""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    def embed(self, inputs: Inputs) -> Tensor:
        raise NotImplementedError

    def context(self, hidden: Tensor, inputs: Inputs) -> dict[str, Any]:
        """What the parent model passes to every block besides the hidden states."""
        raise NotImplementedError

    def block(self, index: int, hidden: Tensor, context: dict[str, Any]) -> Tensor:
        out = self.blocks[index](hidden, **context)
        return out[0] if isinstance(out, tuple) else out

    def block_fn(self, index: int, hidden: Tensor) -> Tensor:
        """Block ``index`` alone, given only hidden states: the context is built from them."""
        return self.block(index, hidden, self.context(hidden, {}))

    def block_fns(self) -> list[Callable[[Tensor], Tensor]]:
        """Every block as ``hidden -> hidden`` (what the time and memory profilers run)."""
        return [functools.partial(self.block_fn, b) for b in range(len(self.blocks))]

    def head(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError


class GPT2Adapter(Adapter):
    embed_paths = ("transformer.wte", "transformer.wpe", "transformer.drop")
    head_paths = ("transformer.ln_f", "lm_head")
    blocks_path = "transformer.h"

    def embed(self, inputs: Inputs) -> Tensor:
        t = self.model.transformer
        ids = inputs["input_ids"]
        return t.drop(t.wte(ids) + t.wpe(_positions(ids)))

    def context(self, hidden: Tensor, inputs: Inputs) -> dict[str, Any]:
        pos = _positions(hidden)
        return {"attention_mask": _mask(self.model.config, hidden, inputs, position_ids=pos),
                "position_ids": pos, "use_cache": False}

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(self.model.transformer.ln_f(hidden))


class BloomAdapter(Adapter):
    embed_paths = ("transformer.word_embeddings", "transformer.word_embeddings_layernorm")
    head_paths = ("transformer.ln_f", "lm_head")
    blocks_path = "transformer.h"

    def embed(self, inputs: Inputs) -> Tensor:
        t = self.model.transformer
        return t.word_embeddings_layernorm(t.word_embeddings(inputs["input_ids"]))

    def context(self, hidden: Tensor, inputs: Inputs) -> dict[str, Any]:
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        heads, (batch, seq) = self.model.config.n_head, hidden.shape[:2]
        mask = inputs.get("attention_mask")
        if mask is None:  # an all-ones mask gives BloomModel's slope x key position, bit for bit
            mask = torch.ones(batch, seq, dtype=torch.long, device=hidden.device)
        alibi = build_alibi_tensor(mask, heads, dtype=hidden.dtype)
        return {"alibi": alibi, "attention_mask": _mask(self.model.config, hidden, inputs),
                "use_cache": False}

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(self.model.transformer.ln_f(hidden))


class PPPlanAdapter(Adapter):
    """Families that declare ``base_model_pp_plan`` (Llama, Mistral, Qwen2, ...): embedding ->
    layers -> norm inside the base model, ``lm_head`` beside it, rotary embeddings if any."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        plan = list(model.config.base_model_pp_plan)
        prefix = model.base_model_prefix
        embed, layers, norm = plan[0], plan[1], plan[-1]
        self.base = model.get_submodule(prefix)
        self.embed_paths = (f"{prefix}.{embed}",)
        self.blocks_path = f"{prefix}.{layers}"
        self.head_paths = (f"{prefix}.{norm}", "lm_head")
        self._names = (embed, norm)

    def embed(self, inputs: Inputs) -> Tensor:
        return getattr(self.base, self._names[0])(inputs["input_ids"])

    def context(self, hidden: Tensor, inputs: Inputs) -> dict[str, Any]:
        pos = _positions(hidden)
        context = {"attention_mask": _mask(self.model.config, hidden, inputs, position_ids=pos),
                   "position_ids": pos, "use_cache": False}
        if hasattr(self.base, "rotary_emb"):
            context["position_embeddings"] = self.base.rotary_emb(hidden, position_ids=pos)
        return context

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(getattr(self.base, self._names[1])(hidden))


_ADAPTERS: dict[str, type[Adapter]] = {"gpt2": GPT2Adapter, "bloom": BloomAdapter}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family.

    Raises:
        ValueError: not a Hugging Face causal LM of a family goose knows how to split.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type](model)
    if getattr(config, "base_model_pp_plan", None) and hasattr(model, "lm_head"):
        return PPPlanAdapter(model)
    raise ValueError(f"cannot split {type(model).__name__} (model_type={model_type!r}) into pipeline "
                     f"stages: it is not a transformers causal LM with a base_model_pp_plan, nor one of "
                     f"{sorted(_ADAPTERS)}; add an Adapter for it in goose_core.pipeline.split")


class Placeholder(nn.Module):
    """Stands where a module held by another stage was, so the module tree (and every parameter
    name this stage does hold) stays the single-device model's."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} lives on another pipeline stage")

    def extra_repr(self) -> str:
        return self.name


def drop_modules(model: nn.Module, paths: list[str]) -> None:
    """Replace each module at ``paths`` (dotted; list items by index) by a :class:`Placeholder`."""
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if name.isdigit():
            parent[int(name)] = Placeholder(path)
        else:
            setattr(parent, name, Placeholder(path))
