"""The MoE load-balancing loss across pipeline stages: its running sums ride with the activation.

🤗's ``load_balancing_loss_func`` (Switch Transformer, eq. 4-6) is a nonlinear function of every
layer's router logits, but it is built from sums over layers and tokens, accumulated layer by
layer (transformers 5.24)::

    tokens_e += #(top-k choices of expert e)      probs_e += sum over tokens of softmax_e
    rows     += #tokens                           loss = E * sum_e (tokens_e/rows) * (probs_e/rows)

So each stage adds its own layers' terms to the sums it received and sends them on, packed
behind the hidden states; the last stage finishes the loss. The additions run in the single
device's order and in its dtype (fp32), so the sums are the single-device sums bit for bit, and
the gradient of ``probs`` flows back through the same message as the hidden states'::

    stage 0: [hidden | sums(l0, l1)] ──► stage 1: [hidden | sums(l0..l3)] ──► loss + coef * aux

Only micro-batches of the whole batch would change the value (the loss of a batch is not the sum
of its pieces' losses), so a pipeline with router loss takes one micro-batch.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = ["RouterLoss", "router_loss_of"]

# sha256 of transformers 5.24's load_balancing_loss_func source, the one this module mirrors.
# Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE, PhiMoE, gpt-oss, ... share it verbatim.
_MIRRORED = "ba57772e23a0d78b840472cd38c1872abe2fa593f38e644ac2aab1defcd536f7"
# The call each family's ...ForCausalLM.forward makes, whitespace removed.
_CALL = ("load_balancing_loss_func(outputs.router_logits,self.num_experts,self.num_experts_per_tok,"
         "attention_mask,)")
_ADD = "loss+=self.router_aux_loss_coef*aux_loss.to(loss.device)"


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


@dataclass
class RouterLoss:
    """One family's auxiliary router loss, as running sums (see the module docstring).

    Args:
        num_experts, top_k, coef: the ``...ForCausalLM``'s ``num_experts``,
            ``num_experts_per_tok`` and ``router_aux_loss_coef``.
        recorder: the family's ``_can_record_outputs["router_logits"]`` (which modules' output,
            at which index, are the router logits).
    """

    num_experts: int
    top_k: int
    coef: float
    recorder: Any

    @property
    def width(self) -> int:
        """Packed length of the sums: tokens (E), probs (E), rows (1)."""
        return 2 * self.num_experts + 1

    def zeros(self, device: torch.device) -> Tensor:
        return torch.zeros(self.width, dtype=torch.float32, device=device)

    def routers(self, model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
        """The router modules inside ``blocks``, matched as transformers' output recorder does."""
        spec, owned = self.recorder, {id(m) for b in blocks for m in b.modules()}
        found = []
        for name, module in model.named_modules():
            if id(module) not in owned:
                continue
            by_class = spec.target_class is not None and isinstance(module, spec.target_class)
            by_name = spec.class_name is not None and name.endswith(spec.class_name)
            if (by_class or by_name) and (spec.layer_name is None
                                          or f".{spec.layer_name.strip('.')}." in f".{name}."):
                found.append(module)
        return found

    @contextmanager
    def collect(self, modules: list[nn.Module]) -> Iterator[list[Tensor]]:
        """The router logits ``modules`` produce while the block runs, in call order."""
        logits: list[Tensor] = []
        index = self.recorder.index

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            logits.append(output[index] if isinstance(output, (tuple, list)) else output)

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            yield logits
        finally:
            for h in handles:
                h.remove()

    def add(self, sums: Tensor, logits: list[Tensor], attention_mask: Tensor | None) -> Tensor:
        """``sums`` plus these layers' terms, each added as 🤗's loop adds it."""
        e = self.num_experts
        tokens, probs, rows = sums[:e], sums[e:2 * e], sums[2 * e:]
        device = sums.device
        histc_dtype = torch.float32 if device.type in ("cpu", "mps") else torch.int32
        if attention_mask is not None:
            flat_mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
        for layer_gate in logits:
            routing_weights = torch.nn.functional.softmax(layer_gate.to(device), dim=-1)
            _, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
            if attention_mask is None:
                tokens = tokens + torch.histc(selected_experts.reshape(-1).to(histc_dtype),
                                              bins=e, min=0, max=e)
                probs = probs + routing_weights.float().sum(dim=0)
                rows = rows + routing_weights.shape[0]
            else:
                tokens = tokens + torch.zeros(e, dtype=torch.float32, device=device).scatter_add_(
                    0, selected_experts.reshape(-1), flat_mask.repeat_interleave(self.top_k))
                probs = probs + (routing_weights.float() * flat_mask.unsqueeze(-1)).sum(dim=0)
                rows = rows + flat_mask.sum()
        return torch.cat([tokens, probs, rows])

    def loss(self, sums: Tensor) -> Tensor:
        """``coef`` times the load-balancing loss of the finished sums."""
        e = self.num_experts
        rows = sums[2 * e:]
        tokens_per_expert, router_prob_per_expert = sums[:e] / rows, sums[e:2 * e] / rows
        return self.coef * (torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * e)

    def pack(self, hidden: Tensor, sums: Tensor) -> Tensor:
        """One flat tensor to send: the hidden states, then the sums, in a dtype exact for both."""
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        return torch.cat([hidden.reshape(-1).to(dtype), sums.to(dtype)])

    def unpack(self, x: Tensor, shape: torch.Size | tuple[int, ...],
               dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`pack`: hidden states of ``shape`` in ``dtype``, and fp32 sums."""
        cut = x.numel() - self.width
        return x[:cut].view(*shape[:-1], -1).to(dtype), x[cut:].to(torch.float32)


def router_loss_of(model: nn.Module) -> RouterLoss | None:
    """The router loss of ``model`` when its config turns it on (``output_router_logits``).

    Raises:
        ValueError: the router loss is on but the family computes it in a way goose does not mirror.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "output_router_logits", False):
        return None
    recorder = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    problem = _mismatch(model, recorder)
    if problem:
        raise ValueError(
            f"{type(model).__name__} has output_router_logits=True, and its auxiliary router loss "
            f"cannot be reproduced across pipeline stages: {problem}. Set "
            f"config.output_router_logits=False to train without it, or train it without pipeline "
            f"parallelism")
    return RouterLoss(model.num_experts, model.num_experts_per_tok, model.router_aux_loss_coef, recorder)


def _mismatch(model: nn.Module, recorder: Any) -> str | None:
    if recorder is None or not hasattr(recorder, "index"):
        return "its model records no router_logits through an OutputRecorder"
    if not all(hasattr(model, a) for a in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")):
        return "it has no num_experts / num_experts_per_tok / router_aux_loss_coef"
    module = sys.modules[type(model).forward.__module__]  # where the forward that calls it lives
    func = getattr(module, "load_balancing_loss_func", None)
    if func is None or _digest(inspect.getsource(func)) != _MIRRORED:
        return (f"its load_balancing_loss_func is not the one goose mirrors (transformers 5.24's "
                f"Mixtral function)")
    forward = "".join(inspect.getsource(type(model).forward).split())
    if _CALL not in forward or _ADD not in forward:
        return "its forward combines the router logits into the loss differently from Mixtral's"
    return None
