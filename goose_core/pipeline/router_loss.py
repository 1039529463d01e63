"""The MoE load-balancing loss across pipeline stages and micro-batches, as the single device computes it.

🤗's ``load_balancing_loss_func`` (Switch Transformer, eq. 4-6) is a nonlinear function of every
layer's router logits over the whole batch, but it is built from sums over layers and tokens,
accumulated layer by layer (transformers 5.24)::

    tokens_e += #(top-k choices of expert e)      probs_e += sum over tokens of softmax_e
    rows     += #tokens                           loss = E * sum_e (tokens_e/rows) * (probs_e/rows)

So each micro-batch's sums ride behind its hidden states: each stage adds its own layers' terms
to the sums it received and sends them on; the last stage adds the micro-batches' sums (in
micro-batch order) and adds ``coef * loss(sums)`` once to the step's loss, so ``loss.backward()``
sends the aux gradient back through every micro-batch's message::

    mb 0  stage 0: [hidden | sums(l0, l1)] ──► stage 1: [hidden | sums(l0..l3)] ──┐
    mb 1  stage 0: [hidden | sums(l0, l1)] ──► stage 1: [hidden | sums(l0..l3)] ──┴► + ─► coef * aux

Exact, not only close: ``tokens`` and ``rows`` are integer counts (exact in fp32), but ``probs``
is a float32 sum, and 🤗 sums each layer over the whole batch at once: the sum of the
micro-batches' float32 sums rounds differently (~1e-8 relative). Its gradient does not depend
on it (``d aux / d probs`` is a function of ``tokens`` and ``rows`` only), so the graph is the
sums'; its value is made the single device's: every stage keeps each of its routers' rows per
micro-batch (detached), sums each router over the whole batch (the rows concatenated in
micro-batch order: the batch's rows), one all-reduce over the pipeline group gathers the
per-router sums (zeros elsewhere: adding them is exact), and the last stage accumulates them
in layer order as 🤗 does (:class:`WholeBatchProbs`, :meth:`RouterLoss.finish`). Cost, at
M > 1 only: each stage holds its routers' rows x E float32 values until the step's forward
ends (the single device holds every layer's router logits for its loss too), and one all-reduce
of routers x E floats per step.

1F1B runs a micro-batch's backward before the next one's forward, so the batch's sums never
exist before a backward: a pipeline with router loss and 1F1B takes one micro-batch. Families
whose ``...ForCausalLM.forward`` adds nothing to the language-model loss (DeepSeek-V3-style
aux-loss-free routing) have nothing to carry (:func:`router_loss_of` returns None).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedModel

__all__ = ["RouterLoss", "WholeBatchProbs", "router_loss_of", "gather_rows"]

# sha256 of the load_balancing_loss_func sources this module mirrors: transformers 5.24's, and
# 5.17's (the floor), which counts the top-k choices with bincount where 5.24 uses histc: the same
# integer counts. Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE, PhiMoE, gpt-oss, ... share it.
_MIRRORED = {"ba57772e23a0d78b840472cd38c1872abe2fa593f38e644ac2aab1defcd536f7": "5.24",
             "f224b99e93782bfec972662dccd26eb81797c790c6744d309c30a356afd3e735": "5.17"}
_MIRRORED_PARAMETERS = ("gate_logits", "num_experts", "top_k", "attention_mask")
# The call each family's ...ForCausalLM.forward makes, whitespace removed.
_CALL = ("load_balancing_loss_func(outputs.router_logits,self.num_experts,self.num_experts_per_tok,"
         "attention_mask,)")
_ADD = "loss+=self.router_aux_loss_coef*aux_loss.to(loss.device)"

#: ``record(k, rows)``: the k-th router of a cell produced these fp32 probability rows.
Record = Callable[[int, Tensor], None]


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
        return _routers(self.recorder, model, blocks)

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

    def add(self, sums: Tensor, logits: list[Tensor], attention_mask: Tensor | None,
            record: Record | None = None) -> Tensor:
        """``sums`` plus these layers' terms, each added as 🤗's loop adds it; ``record(k, rows)``
        gets layer k's fp32 probability rows (masked), whose sum the loop adds to ``probs``."""
        e = self.num_experts
        tokens, probs, rows = sums[:e], sums[e:2 * e], sums[2 * e:]
        device = sums.device
        histc_dtype = torch.float32 if device.type in ("cpu", "mps") else torch.int32
        if attention_mask is not None:
            flat_mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
        for k, layer_gate in enumerate(logits):
            routing_weights = torch.nn.functional.softmax(layer_gate.to(device), dim=-1)
            _, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
            if attention_mask is None:
                tokens = tokens + torch.histc(selected_experts.reshape(-1).to(histc_dtype),
                                              bins=e, min=0, max=e)
                weights = routing_weights.float()
                rows = rows + routing_weights.shape[0]
            else:
                tokens = tokens + torch.zeros(e, dtype=torch.float32, device=device).scatter_add_(
                    0, selected_experts.reshape(-1), flat_mask.repeat_interleave(self.top_k))
                weights = routing_weights.float() * flat_mask.unsqueeze(-1)
                rows = rows + flat_mask.sum()
            probs = probs + weights.sum(dim=0)
            if record is not None:
                record(k, weights.detach())
        return torch.cat([tokens, probs, rows])

    def loss(self, sums: Tensor) -> Tensor:
        """``coef`` times the load-balancing loss of the finished sums."""
        e = self.num_experts
        rows = sums[2 * e:]
        tokens_per_expert, router_prob_per_expert = sums[:e] / rows, sums[e:2 * e] / rows
        return self.coef * (torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * e)

    def finish(self, outputs: list[Tensor], per_router: Tensor | None,
               dp_group: dist.ProcessGroup | None = None) -> Tensor:
        """The step's loss from the last stage's micro-batch outputs (:meth:`pack_loss`): their
        language-model losses, plus ``coef * aux`` of all their sums, once.

        Args:
            per_router: every router's probability sum over the whole batch, in layer order
                (:meth:`WholeBatchProbs.sums`, all-reduced): the value of ``probs`` is then
                🤗's to the bit; the gradient is the micro-batches' sums' (the same, see the
                module docstring). None: the micro-batches' sums, value too.
            dp_group: each dp rank holds a shard of the batch (``per_router`` then sums every
                rank's rows): the value is the whole dp batch's, the gradient this shard's share
                of it times dp, which data parallelism's average over dp turns into the exact
                gradient (as :func:`goose_core.expert_parallel.exact_over_dp` does without stages).
        """
        losses = [o[0] for o in outputs]
        sums = outputs[0][1:].float()
        for o in outputs[1:]:
            sums = sums + o[1:].float()  # micro-batch order: fixed, every step the same
        aux = self.loss(sums)
        total = sum(losses)
        if per_router is None:
            return total + aux
        e = self.num_experts
        probs = torch.zeros(e, dtype=torch.float32, device=per_router.device)
        for router_sum in per_router:
            probs = probs + router_sum  # 🤗's layer loop: probs = probs + layer.sum(0)
        counts, dp = sums.detach(), 1
        if dp_group is not None:  # the whole dp batch's counts: d aux / d probs depends on them alone
            counts, dp = counts.clone(), dist.get_world_size(dp_group)
            dist.all_reduce(counts, group=dp_group)
            aux = self.loss(torch.cat([counts[:e], sums[e:2 * e], counts[2 * e:]]))
        exact = self.loss(torch.cat([counts[:e], probs.to(sums.device), counts[2 * e:]]))
        return total + exact + dp * (aux - aux.detach())  # the value exact's, the gradient aux's

    def pack(self, hidden: Tensor, sums: Tensor) -> Tensor:
        """One flat tensor to send: the hidden states, then the sums, in a dtype exact for both."""
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        return torch.cat([hidden.reshape(-1).to(dtype), sums.to(dtype)])

    def unpack(self, x: Tensor, shape: torch.Size | tuple[int, ...],
               dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`pack`: hidden states of ``shape`` in ``dtype``, and fp32 sums."""
        cut = x.numel() - self.width
        return x[:cut].view(*shape[:-1], -1).to(dtype), x[cut:].to(torch.float32)

    def pack_loss(self, loss: Tensor, sums: Tensor) -> Tensor:
        """The last stage's output of one micro-batch: ``[loss, sums...]`` (see :meth:`finish`)."""
        dtype = torch.promote_types(loss.dtype, torch.float32)
        return torch.cat([loss.reshape(1).to(dtype), sums.to(dtype)])


class WholeBatchProbs:
    """Per step, the fp32 probability rows each router of this process produced, per micro-batch:
    what 🤗 sums over the whole batch at once (see the module docstring).

    Args:
        num_routers: routers in the whole model (every stage's), in call order.
        num_experts: E.
    """

    def __init__(self, num_routers: int, num_experts: int) -> None:
        self.num_routers, self.num_experts = num_routers, num_experts
        self._rows: dict[int, dict[int, Tensor]] = {}

    def reset(self) -> None:
        self._rows = {}

    def record(self, router: int, microbatch: int, rows: Tensor) -> None:
        # A recomputed cell records the same rows again: same key, same value.
        self._rows.setdefault(router, {})[microbatch] = rows

    def sums(self, num_microbatches: int, device: torch.device,
             dp_group: dist.ProcessGroup | None = None) -> Tensor:
        """``[num_routers, E]``: each router's sum over the batch's rows (zeros for routers
        another process runs); with ``dp_group``, over the rows of every dp rank's shard, in dp
        rank order (the single device's batch order). Clears the record.

        Raises:
            RuntimeError: a router held here missed a micro-batch (nothing to sum it over).
        """
        out = torch.zeros(self.num_routers, self.num_experts, dtype=torch.float32, device=device)
        held = sorted(self._rows)
        for router in held:
            by_mb = self._rows[router]
            if sorted(by_mb) != list(range(num_microbatches)):
                raise RuntimeError(f"router {router} ran on micro-batches {sorted(by_mb)} of "
                                   f"{num_microbatches} in this step: its whole-batch sum is unknown")
        rows = [torch.cat([self._rows[r][i] for i in range(num_microbatches)]).to(device) for r in held]
        self.reset()
        if rows and dp_group is not None:  # the dp ranks of a stage hold the same routers
            rows = list(gather_rows(torch.stack(rows), dp_group))
        for router, batch in zip(held, rows):
            out[router] = batch.sum(dim=0)
        return out


def gather_rows(rows: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``rows`` ``[routers, T_r, E]`` of every rank of ``group`` joined along the tokens, in rank
    order: ``[routers, sum_r T_r, E]``, the rows of the batch the ranks' shards make up (shards
    may differ in length: each is padded to the widest for the all-gather, then cut)."""
    counts = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([rows.shape[1]], device=rows.device), group=group)
    widest = max(int(c) for c in counts)
    padded = torch.zeros(rows.shape[0], widest, rows.shape[2], dtype=rows.dtype, device=rows.device)
    padded[:, :rows.shape[1]] = rows
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:, :int(c)] for piece, c in zip(pieces, counts)], dim=1)


def _routers(spec: Any, model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    owned = {id(m) for b in blocks for m in b.modules()}
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


def router_loss_of(model: nn.Module) -> RouterLoss | None:
    """The router loss of ``model`` when its config turns it on (``output_router_logits``), its
    ``...ForCausalLM.forward`` adds it to the language-model loss, and it has routers.

    Raises:
        ValueError: the forward adds something goose does not mirror, naming what differs.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "output_router_logits", False) or _adds_nothing(model):
        return None
    recorder = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    if hasattr(recorder, "index") and not _routers(recorder, model, [model]):
        return None  # no router anywhere (a dense Doge): no stage records logits, as on one device
    problem = _mismatch(model, recorder)
    if problem:
        raise ValueError(
            f"{type(model).__name__} has output_router_logits=True, and its auxiliary router loss "
            f"cannot be reproduced across pipeline stages: {problem}. Set "
            f"config.output_router_logits=False to train without it, or train it without pipeline "
            f"parallelism")
    return RouterLoss(model.num_experts, model.num_experts_per_tok, model.router_aux_loss_coef, recorder)


def _adds_nothing(model: nn.Module) -> bool:
    """Whether ``type(model).forward`` visibly returns the language-model loss alone: no
    statement sets ``loss`` to anything else (:func:`_loss_terms`), it delegates to no
    ``super()`` forward (whose code this cannot see), and ``loss_function`` is 🤗's own."""
    forward = type(model).forward
    source = inspect.getsource(forward)
    return (not _loss_terms(model) and "super(" not in source
            and getattr(type(model), "loss_function", None) is getattr(PreTrainedModel, "loss_function", None))


def _loss_terms(model: nn.Module) -> list[str]:
    """The statements of ``type(model).forward`` that set ``loss`` to anything but None or the
    family's ``self.loss_function(...)``: empty when the loss is the language model's alone
    (DeepSeek-V3-style aux-loss-free routing records router logits and adds nothing)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(type(model).forward)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AugAssign) and ast.unparse(node.target) == "loss":
            found.append(ast.unparse(node))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            if "loss" not in {ast.unparse(t) for t in targets} or value is None:
                continue
            plain = (isinstance(value, ast.Constant) and value.value is None) or (
                isinstance(value, ast.Call) and ast.unparse(value.func) == "self.loss_function")
            if not plain:
                found.append(ast.unparse(node))
    return found


def _mismatch(model: nn.Module, recorder: Any) -> str | None:
    if recorder is None or not hasattr(recorder, "index"):
        return "its model records no router_logits through an OutputRecorder"
    module = sys.modules[type(model).forward.__module__]  # where the forward that calls it lives
    func = getattr(module, "load_balancing_loss_func", None)
    if func is None:
        terms = "; ".join(_loss_terms(model)) or "it calls super().forward or its own loss_function"
        return (f"its forward may add more than the language-model loss ({terms}), and "
                f"{module.__name__}, where it is defined, has no load_balancing_loss_func")
    parameters = tuple(inspect.signature(func).parameters)
    if parameters != _MIRRORED_PARAMETERS:
        return (f"{module.__name__}.load_balancing_loss_func{parameters} is not the Switch-Transformer "
                f"function goose mirrors (transformers 5.24's Mixtral load_balancing_loss_func"
                f"{_MIRRORED_PARAMETERS})")
    if _digest(inspect.getsource(func)) not in _MIRRORED:
        return (f"{module.__name__}.load_balancing_loss_func has the mirrored parameters but another body "
                f"than transformers 5.24's (or 5.17's) Mixtral one")
    if not all(hasattr(model, a) for a in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")):
        return "it has no num_experts / num_experts_per_tok / router_aux_loss_coef"
    forward = "".join(inspect.getsource(type(model).forward).split())
    if _CALL not in forward or _ADD not in forward:
        return "its forward combines the router logits into the loss differently from Mixtral's"
    return None
