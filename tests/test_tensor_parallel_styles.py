"""Every tensor-parallel style on a small block equals the unsplit block, forward and gradient.

Each case builds a seeded float64 block, applies its plan with ``apply_styles`` (the code
``TensorParallel`` runs) at tp=2, and compares the output, the input's gradient and every
parameter's gradient (gathered from its shards) with the block on one device. All cases run in
one spawn; the families that declare these styles train in test_tensor_parallel_families.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from goose_core import ParallelContext
from goose_core.metadata import shard_spec
from goose_core.tensor_parallel import TPPlan, apply_styles, check_sizes
from goose_core.testing import PARALLEL, run_distributed

H, E, I, HEADS, HD, ROPE = 8, 4, 6, 4, 4, 4  # hidden, experts, expert width, heads, head dim, MLA rope dim
CONFIG = SimpleNamespace(num_attention_heads=HEADS, num_key_value_heads=HEADS, qk_rope_head_dim=ROPE, vocab_size=16)


def _init(module: nn.Module) -> nn.Module:
    for param in module.parameters(recurse=False):
        nn.init.normal_(param, std=0.3)
    return module


class _Root(nn.Module):
    """A block with the ``config`` apply_styles reads, calling ``body`` on its input."""

    def __init__(self, body: Callable[["_Root", Tensor], Tensor], **children: nn.Module) -> None:
        super().__init__()
        self.body, self.config = body, CONFIG
        for name, child in children.items():
            setattr(self, name, child)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self, x)


# -- linears -------------------------------------------------------------------------------
def _gathered_mlp() -> tuple[_Root, TPPlan]:
    root = _Root(lambda m, x: m.down(F.gelu(m.up(x))), up=nn.Linear(H, 2 * H), down=nn.Linear(2 * H, H))
    return root, TPPlan({"up": "colwise_gather_output", "down": "rowwise_split_input"}, None)


# -- embeddings ----------------------------------------------------------------------------
class _Scaled(nn.Embedding):
    """Gemma's shape of embedding: the lookup times a scale."""

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * 3.0


class _OwnLookup(nn.Embedding):
    """A forward that never reaches nn.Embedding.forward: splitting it must refuse."""

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight) * 3.0


def _embedding(cls: type[nn.Embedding], style: str) -> Callable[[], tuple[_Root, TPPlan]]:
    def build() -> tuple[_Root, TPPlan]:
        # ids are the input, floats feed the gradient check: x only scales the lookup.
        table = cls(16, H, padding_idx=13)
        ids = torch.tensor([[0, 13, 7, 15, 8, 13]])
        root = _Root(lambda m, x: m.table(ids) * x, table=table)
        return root, TPPlan({"table": style}, None)
    return build


# -- experts ---------------------------------------------------------------------------------
class _Experts(nn.Module):
    """Mixtral's experts: gate|up (E, 2I, H) and down (E, H, I); ``transposed``: Aria's layout
    (E, H, 2I) and (E, I, H). An optional identity expert joins every token (LongCat's zero
    experts)."""

    def __init__(self, transposed: bool = False, identity: bool = False) -> None:
        super().__init__()
        self.transposed = transposed
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I) if transposed else torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, I, H) if transposed else torch.empty(E, H, I))
        self.identity_expert = nn.Identity() if identity else None
        _init(self)

    def _proj(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight if self.transposed else F.linear(x, weight)

    def forward(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for expert in range(E):
            token, slot = torch.where(top_k_index == expert)
            gate, up = self._proj(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = self._proj(F.silu(gate) * up, self.down_proj[expert]) * top_k_weights[token, slot, None]
            out = out.index_add(0, token, y)
        if self.identity_expert is not None:
            out = out + 0.5 * self.identity_expert(x)
        return out


def _route(m: _Root, x: Tensor) -> Tensor:
    # Mixtral's routing, softmax in float32 as Mixtral does (the experts widen it back).
    probs = m.gate(x).float().softmax(-1)
    weights, index = probs.topk(2, dim=-1)
    return m.experts(x, index, weights / weights.sum(-1, keepdim=True))


def _moe(transposed: bool, identity: bool = False) -> Callable[[], tuple[_Root, TPPlan]]:
    def build() -> tuple[_Root, TPPlan]:
        root = _Root(_route, gate=nn.Linear(H, E, bias=False), experts=_Experts(transposed, identity))
        params = ({"experts.gate_up_proj": "packed_rowwise", "experts.down_proj": "colwise"} if transposed else
                  {"experts.gate_up_proj": "packed_colwise", "experts.down_proj": "rowwise"})
        layers = {"experts": "moe_tp_experts"}
        if identity:
            layers["experts.identity_expert"] = "moe_identity_expert"
        return root, TPPlan(layers, None, params)
    return build


class _Shared(nn.Module):
    """Inkling's shared experts: (S, I, H) gate and up, (S, H, I) down, summed over S."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Parameter(torch.empty(2, I, H)), nn.Parameter(torch.empty(2, I, H))
        self.down_proj = nn.Parameter(torch.empty(2, H, I))
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.silu(torch.einsum("sih,th->sti", self.gate_proj, x)) * torch.einsum("sih,th->sti", self.up_proj, x)
        return torch.einsum("shi,sti->th", self.down_proj, hidden)


def _all_reduce() -> tuple[_Root, TPPlan]:
    root = _Root(lambda m, x: m.shared(x), shared=_Shared())
    params = {"shared.gate_proj": "colwise", "shared.up_proj": "colwise", "shared.down_proj": "rowwise"}
    return root, TPPlan({"shared": "all_reduce"}, None, params)


# -- attention-shaped blocks ----------------------------------------------------------------
class _HeadNorm(nn.Module):
    """Qwen3's q_norm: an RMSNorm over one head's features, applied to every head."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(HD))
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)


def _heads(x: Tensor) -> Tensor:
    return x.view(*x.shape[:-1], -1, HD)  # this rank's heads once q is split


def _head_norm() -> tuple[_Root, TPPlan]:
    root = _Root(lambda m, x: m.o(m.q_norm(_heads(m.q(x))).flatten(-2)),
                 q=nn.Linear(H, HEADS * HD), q_norm=_HeadNorm(), o=nn.Linear(HEADS * HD, H))
    return root, TPPlan({"q": "colwise", "q_norm": "replicated_with_grad_allreduce", "o": "rowwise"}, None)


def _mla_body(m: _Root, x: Tensor) -> Tensor:
    # DeepSeek's kv path: kv_a -> [k_pass | k_rot]; k_pass -> norm -> kv_b (split by heads);
    # k_rot joins every head directly.
    k_pass, k_rot = m.kv_a(x).split([H, ROPE], dim=-1)
    per_head = _heads(m.kv_b(F.layer_norm(k_pass, (H,))))
    return m.o((per_head * k_rot.unsqueeze(-2)).flatten(-2))


def _mla() -> tuple[_Root, TPPlan]:
    root = _Root(_mla_body, kv_a=nn.Linear(H, H + ROPE), kv_b=nn.Linear(H, HEADS * HD), o=nn.Linear(HEADS * HD, H))
    return root, TPPlan({"kv_a": "mla_kv_a_proj", "kv_b": "colwise", "o": "rowwise"}, None)


class _Sinks(nn.Module):
    """GraniteSWA-style attention: a per-head parameter (sinks) its own forward reads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(H, HEADS * HD), nn.Linear(HEADS * HD, H)
        self.sinks = nn.Parameter(torch.empty(HEADS))
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.o((_heads(self.q(x)) * self.sinks[:, None]).flatten(-2))


def _local_params() -> tuple[_Root, TPPlan]:
    root = _Root(lambda m, x: m.attn(x), attn=_Sinks())
    layers = {"attn.q": "colwise", "attn.o": "rowwise", "attn": "local_params"}
    return root, TPPlan(layers, None, {"attn.sinks": "colwise"})


CASES: dict[str, Callable[[], tuple[_Root, TPPlan]]] = {
    "colwise_gather_output+rowwise_split_input": _gathered_mlp,
    "embedding_colwise": _embedding(nn.Embedding, "embedding_colwise"),
    "embedding_rowwise of a scaled subclass": _embedding(_Scaled, "embedding_rowwise"),
    "embedding_colwise of a scaled subclass": _embedding(_Scaled, "embedding_colwise"),
    "moe_tp_experts, packed_colwise + rowwise": _moe(transposed=False),
    "moe_tp_experts, packed_rowwise + colwise": _moe(transposed=True),
    "moe_identity_expert": _moe(transposed=True, identity=True),
    "all_reduce": _all_reduce,
    "replicated_with_grad_allreduce": _head_norm,
    "mla_kv_a_proj": _mla,
    "local_params + a colwise parameter": _local_params,
}


def _build(case: str) -> tuple[_Root, TPPlan, Tensor]:
    torch.manual_seed(0)
    root, plan = CASES[case]()
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init(module)
    torch.manual_seed(1)
    x = torch.randn(6, H, dtype=torch.float64, requires_grad=True)
    return root.double(), plan, x


def _full_grad(param: nn.Parameter, group: dist.ProcessGroup | None) -> Tensor:
    spec = shard_spec(param)
    if spec is None or group is None:
        return param.grad
    parts = [torch.empty_like(param.grad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, param.grad.contiguous(), group=group)
    return spec.gather(parts)


def _run(case: str, ctx: ParallelContext | None = None) -> dict[str, Tensor]:
    root, plan, x = _build(case)
    if ctx is not None:
        apply_styles(root, plan, ctx)
    out = root(x)
    torch.manual_seed(2)
    (out * torch.randn_like(out)).sum().backward()
    group = None if ctx is None else ctx.tp_group
    return {"output": out.detach(), "input grad": x.grad,
            **{f"{name} grad": _full_grad(p, group) for name, p in root.named_parameters()}}


def _every_case(ctx: ParallelContext) -> dict[str, dict[str, Tensor]]:
    return {case: _run(case, ctx) for case in CASES}


def test_every_style_equals_the_unsplit_block_forward_and_backward() -> None:
    for runs in run_distributed(_every_case, 2, timeout=120):
        for case in CASES:
            want, got = _run(case), runs[case]
            assert want.keys() == got.keys(), case
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=PARALLEL.rtol, atol=PARALLEL.atol,
                                           msg=lambda m, case=case, key=key: f"{case}, {key}: {m}")


def _own_lookup(ctx: ParallelContext) -> str:
    root, plan, _ = _build("embedding_rowwise of a scaled subclass")
    root.table = _OwnLookup(16, H).double()
    with pytest.raises(ValueError) as error:
        apply_styles(root, plan, ctx)
    return str(error.value)


def test_an_embedding_forward_that_skips_the_lookup_is_refused() -> None:
    for message in run_distributed(_own_lookup, 2, timeout=60):
        assert "_OwnLookup.forward never calls nn.Embedding.forward" in message


@pytest.mark.parametrize("case, params, message", [
    ("local_params + a colwise parameter", {"attn.sinks": "replicate"},
     r"attn \(_Sinks, local_params\): its forward runs on this rank's share.*held whole: \['attn.sinks'\]"),
    ("local_params + a colwise parameter", {},
     r"held whole: \['attn.sinks'\]"),
    ("moe_tp_experts, packed_colwise + rowwise", {"experts.gate_up_proj": "packed_colwise"},
     r"experts \(_Experts, moe_tp_experts\).*held whole: \['experts.down_proj'\]"),
    ("all_reduce", {"shared.gate_proj": "colwise", "shared.up_proj": "colwise", "shared.down_proj": "replicate"},
     r"held whole: \['shared.down_proj'\]"),
])
def test_a_parameter_held_whole_where_the_work_is_split_is_refused(case: str, params: dict, message: str) -> None:
    root, plan, _ = _build(case)
    with pytest.raises(ValueError, match=message):
        check_sizes(root, TPPlan(plan.layers, None, params), 2)


@pytest.mark.parametrize("style", ["colwise", "rowwise"])
def test_a_packed_gate_up_split_plainly_is_refused(style: str) -> None:
    # Inkling's declared plan: plain colwise on its experts' gate | up.
    root, plan, _ = _build("moe_tp_experts, packed_colwise + rowwise")
    params = {**plan.params, "experts.gate_up_proj": style}
    with pytest.raises(ValueError, match=rf"experts.gate_up_proj: the name says gate \| up are packed.*"
                                         rf"declare it packed_{style}"):
        check_sizes(root, TPPlan(plan.layers, None, params), 2)


def test_a_parameter_entry_needs_an_owner_that_runs_on_the_split() -> None:
    root, plan, _ = _build("replicated_with_grad_allreduce")
    with pytest.raises(ValueError, match=r"q_norm.weight: a parameter entry \(colwise\) needs its module 'q_norm' "
                                         r"styled one of \['moe_tp_experts', 'all_reduce', 'local_params'\]"):
        check_sizes(root, TPPlan(plan.layers, None, {"q_norm.weight": "colwise"}), 2)


class _ScaledLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2.0


@pytest.mark.parametrize("layers, message", [
    ({"up": "packed_rowwise", "down": "rowwise_split_input"},
     r"up: packed_rowwise applies to a parameter \(an experts' gate_up_proj\), not to a Linear module"),
    ({"up": "colwise_gather_output", "down": "rowwise_split_input", "scaled": "colwise"},
     r"scaled \(_ScaledLinear\) overrides Linear.forward; colwise would replace it by a plain split matmul"),
])
def test_a_module_a_style_would_change_is_refused(layers: dict, message: str) -> None:
    root, _, _ = _build("colwise_gather_output+rowwise_split_input")
    root.scaled = _ScaledLinear(H, H)
    with pytest.raises(ValueError, match=message):
        check_sizes(root, TPPlan(layers, None), 2)
