"""Unit tests of TensorParallel.parallelize(): per-rank attributes, logits, tp=1, misuse."""

import pytest
import torch

from goose_core import ParallelContext, TensorParallel
from goose_core.testing import PARALLEL, TrainSpec, run_distributed


def _logits(ctx: ParallelContext) -> dict[str, torch.Tensor]:
    spec = TrainSpec(family="llama")
    model = TensorParallel(spec.build_model(), ctx).parallelize()
    batch = spec.batch(0)
    with torch.no_grad():
        whole = model(input_ids=batch["input_ids"]).logits
        hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
        direct = model.lm_head(hidden)  # as a pipeline's last stage calls it, after the above
        shard = model(**batch).logits
    return {"whole": whole, "shard": shard, "direct": direct}


def test_logits_are_whole_without_labels_and_shards_with_them() -> None:
    spec = TrainSpec(family="llama")
    with torch.no_grad():
        want = spec.build_model()(input_ids=spec.batch(0)["input_ids"]).logits
    for rank, got in enumerate(run_distributed(_logits, 2, timeout=60)):
        torch.testing.assert_close(got["whole"], want, rtol=PARALLEL.rtol, atol=PARALLEL.atol)
        mine = want.chunk(2, dim=-1)[rank]
        torch.testing.assert_close(got["shard"], mine, rtol=PARALLEL.rtol, atol=PARALLEL.atol)
        torch.testing.assert_close(got["direct"], mine, rtol=PARALLEL.rtol, atol=PARALLEL.atol)


def _attributes(ctx: ParallelContext, family: str) -> list[int]:
    model = TensorParallel(TrainSpec(family=family).build_model(), ctx).parallelize()
    layer = model.base_model.get_submodule("layers.0" if family == "llama" else "h.0")
    if family == "llama":
        return [layer.self_attn.num_key_value_groups]
    if family == "gpt2":
        return [layer.attn.num_heads, layer.attn.split_size]
    return [layer.self_attention.num_heads]


@pytest.mark.parametrize("family, tp, want", [("gpt2", 2, [2, 32]), ("bloom", 4, [1]),
                                              ("llama", 2, [2]), ("llama", 4, [1])])
def test_attention_sees_per_rank_head_counts(family: str, tp: int, want: list[int]) -> None:
    assert run_distributed(_attributes, tp, 1, 1, family, timeout=60) == [want] * tp


def _tp1(ctx: ParallelContext) -> float:
    spec = TrainSpec(family="gpt2")
    return TensorParallel(spec.build_model(), ctx).parallelize()(**spec.batch(0)).loss.item()


def test_tp_of_one_is_the_plain_model() -> None:
    spec = TrainSpec(family="gpt2")
    assert run_distributed(_tp1, 1, timeout=60)[0] == pytest.approx(spec.build_model()(**spec.batch(0)).loss.item(),
                                                                   rel=1e-6)


def _twice(ctx: ParallelContext) -> None:
    model = TensorParallel(TrainSpec(family="gpt2").build_model(), ctx).parallelize()
    TensorParallel(model, ctx).parallelize()


def test_parallelizing_twice_is_an_error() -> None:
    with pytest.raises(Exception, match="already tensor-parallel"):
        run_distributed(_twice, 2, timeout=60)


def _narrow_head(ctx: ParallelContext) -> None:
    model = TrainSpec(family="llama").build_model()
    model.lm_head = torch.nn.Linear(64, 200, bias=False, dtype=model.lm_head.weight.dtype)  # Inkling 2's unpadded head
    TensorParallel(model, ctx).parallelize()


def test_a_head_narrower_than_the_vocabulary_is_refused_before_any_collective() -> None:
    with pytest.raises(Exception, match="LM head has 200 output rows but config.vocab_size is 256"):
        run_distributed(_narrow_head, 1, timeout=60)


def _layer_by_layer(ctx: ParallelContext, family: str) -> tuple[float, float]:
    """Call the tp model the way a pipeline does: each decoder layer alone with what the parent
    passed it (captured), then lm_head and model.loss_function on the last stage."""
    spec = TrainSpec(family=family)
    model = TensorParallel(spec.build_model(), ctx).parallelize()
    batch = spec.batch(0)
    layers = model.base_model.get_submodule("layers" if family == "llama" else "h")
    calls: list[tuple[tuple, dict]] = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        whole = model(**batch, use_cache=False).loss.item()
        args, kwargs = calls[0]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for layer, (_, layer_kwargs) in zip(layers, calls):
            layer_kwargs = {k: v for k, v in layer_kwargs.items() if k != "hidden_states"}
            out = layer(hidden, **layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        norm = model.base_model.get_submodule("norm" if family == "llama" else "ln_f")
        logits = model.get_output_embeddings()(norm(hidden))
        staged = model.loss_function(logits=logits, labels=batch["labels"], vocab_size=256).item()
    return whole, staged


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_decoder_layers_run_alone_with_what_the_parent_passes(family: str) -> None:
    for whole, staged in run_distributed(_layer_by_layer, 2, 1, 1, family, timeout=60):
        assert staged == whole


class _ScaledSiLU(torch.nn.Module):
    """A learnable activation (xIELU-like): one whole parameter acting on tp-split activations."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * torch.nn.functional.silu(x)


def _replica_grads(ctx: ParallelContext, planted: str) -> str:
    spec = TrainSpec(family="llama")
    model = spec.build_model()
    if planted == "activation":
        model.model.layers[1].mlp.act_fn = _ScaledSiLU()
    elif planted == "f":  # Megatron's f forgotten: the block's input gradient is never summed
        import goose_core.tensor_parallel.layers as layers
        layers.copy_to_region = lambda x, group: x
    model = TensorParallel(model, ctx).parallelize()
    for step in range(2):  # checked once: the second backward runs without the hooks
        try:
            model(**spec.batch(step)).loss.backward()
        except (ValueError, RuntimeError) as err:
            return f"step {step}: {err}"
    return "trained"


def test_a_whole_parameter_on_split_activations_is_refused_at_the_first_backward() -> None:
    # The plan splits the MLP around act_fn; alpha stays whole, so each tp rank would hold only its
    # share of alpha's gradient: silently wrong. Refused on every rank before any optimizer step.
    for got in run_distributed(_replica_grads, 2, 1, 1, "activation", timeout=60):
        assert got.startswith("step 0:") and "model.layers.1.mlp.act_fn.alpha" in got, got
        assert "replicated_with_grad_allreduce" in got
    for got in run_distributed(_replica_grads, 2, 1, 1, "f", timeout=60):  # a goose bug, caught too
        assert got.startswith("step 0:") and "input_layernorm.weight" in got, got
    assert run_distributed(_replica_grads, 2, 1, 1, "", timeout=60) == ["trained", "trained"]
