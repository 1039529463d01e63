"""goose's context-parallel attention inside 🤗 models: one function under 🤗's attention interface.

A model set to :data:`CP_ATTENTION` calls :func:`cp_attention` in every attention layer with this
rank's slice of queries, keys and values (positions already rotated by their GLOBAL position
ids). No mask function is registered under the name, so 🤗 builds no mask from the local slice
(it would be the wrong one: a slice's local index is not its place in the sequence); the mask is
made from global positions inside the ring (:func:`~goose_core.context_parallel.ring.allowed`):
causal, the layer's sliding window (🤗 passes it as ``sliding_window``), the padding mask.

The ring (and the padding mask of the whole sequence) of the forward in progress is set by
:class:`~goose_core.context_parallel.ContextParallel` around each model call (:func:`begin`, :func:`end`).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface

from goose_core.context_parallel.ring import RingSpec, allowed, expand, scores

__all__ = ["CP_ATTENTION", "cp_attention", "begin", "end", "ulysses_method", "ulysses_available",
           "refuse_unsupported"]

#: The attention implementation name a context-parallel model runs under.
CP_ATTENTION = "goose_context_parallel"

_state: dict[str, Any] = {"spec": None, "method": None, "calls": 0}


def begin(spec: RingSpec, method: Callable[..., Tensor]) -> None:
    """Attention calls from now on run ``method`` over ``spec``'s ring (a model's forward begins)."""
    _state.update(spec=spec, method=method, calls=0)


def end() -> int:
    """The forward is over: forget the ring; return how many attention calls came through the
    interface (0: the family has its own attention and the ring never ran)."""
    calls = _state["calls"]
    _state.update(spec=None, method=None, calls=0)
    return calls


def ulysses_method(query: Tensor, key: Tensor, value: Tensor, spec: RingSpec, scaling: float,
                   window: int | None) -> Tensor:
    """Ulysses: the all-to-all primitive around eager attention over the whole sequence, masked by
    global positions like the ring."""
    from goose_core.context_parallel.ulysses import ulysses_attention  # type: ignore[import-not-found]

    everything = torch.arange(int(sum(len(p) for p in spec.positions)), device=query.device)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        mask = allowed(everything, everything, spec.key_mask, window)
        return torch.matmul(scores(q, expand(k, groups), mask, scaling).softmax(-1), expand(v, groups))

    return ulysses_attention(query, key, value, group=spec.group, positions=spec.positions, attend=attend)


def ulysses_available() -> bool:
    return importlib.util.find_spec("goose_core.context_parallel.ulysses") is not None


def cp_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 sliding_window: int | None = None, **_: Any) -> tuple[Tensor, None]:
    """🤗's attention-interface signature: [b, h, s, d] in, [b, s, h, d] out (no weights)."""
    spec = _state["spec"]
    if spec is None:
        raise RuntimeError(f"{CP_ATTENTION} attention was called outside a ContextParallel model's "
                           f"forward: call the model returned by ContextParallel(...).parallelize()")
    if dropout and module.training:
        raise ValueError(f"attention dropout {dropout} under context parallelism: the ring cannot draw "
                         f"one device's dropout mask; set the config's attention dropout to 0")
    _state["calls"] += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _state["method"](query, key, value, spec, scale, sliding_window)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(CP_ATTENTION, cp_attention)

#: Config attributes whose attention the ring does not reproduce, with why.
_UNSUPPORTED = {
    "attn_logit_softcapping": "softcaps its attention scores",
    "alibi": "adds ALiBi position biases",
    "use_alibi": "adds ALiBi position biases",
    "reorder_and_upcast_attn": "reorders and upcasts its attention in its own eager code",
}


def refuse_unsupported(model: nn.Module) -> None:
    """Raise, naming the family and what it does, for a model whose attention the ring would not
    reproduce; called before the first step."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", type(model).__name__)
    for name, why in _UNSUPPORTED.items():
        if getattr(config, name, None):
            raise ValueError(f"context parallelism does not support {family!r}: it {why} "
                             f"(config.{name}={getattr(config, name)!r}), which goose's ring attention "
                             f"does not reproduce")
    if getattr(config, "output_router_logits", False) and getattr(config, "router_aux_loss_coef", 1.0):
        raise ValueError(f"context parallelism does not support {family!r} with output_router_logits=True: "
                         f"its router loss is a product of means over the whole batch, not a sum over "
                         f"tokens; set config.output_router_logits=False (or router_aux_loss_coef=0)")
    for sub_name, sub in model.named_modules():
        if getattr(sub, "sinks", None) is not None:
            raise ValueError(f"context parallelism does not support {family!r}: {sub_name} has attention "
                             f"sinks, which goose's ring attention does not reproduce")
