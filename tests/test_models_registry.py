"""The one registry of family knowledge: explicit entries, both halves, found by tp and pp alike."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from goose_core import ParallelContext, TensorParallel, full_state_dict
from goose_core.models import FAMILIES, Family, PipelineParts, register_family
from goose_core.models import pipeline_parts, registry
from goose_core.models.registry import PIPELINE, TENSOR_PARALLEL
from goose_core.pipeline.split import pipeline_parts_of, split_model_for
from goose_core.tensor_parallel import ADAPTERS, register_adapter
from goose_core.testing import PARALLEL, RunResult, assert_matches_reference, run_distributed
from sweep.families import tiny_family_config

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_families import _train, build, reference  # noqa: E402  (the tiny configs)


def test_the_builtin_families_are_listed_with_their_halves() -> None:
    modules = {"bloom", "falcon", "gpt2", "opt", "stablelm", "gemma4_text", "gemma4_unified_text"}
    extended = {"apertus", "apertus1p5_text", "doge", "inkling2_loop_text", "inkling2_text", "inkling_text",
                "sarvam_moe"}  # tp: a declared plan plus entries it lacks
    assert set(FAMILIES) == modules | extended | set(pipeline_parts.PIPELINE_PARTS) | set(pipeline_parts.REFUSED)
    assert sorted(TENSOR_PARALLEL) == sorted({"bloom", "gpt2", "opt", "stablelm"} | extended)
    assert sorted(PIPELINE) == sorted(set(FAMILIES) - extended)
    assert ADAPTERS["gpt2"] is FAMILIES["gpt2"].tp  # the old name is a view of the registry


def test_registering_keeps_the_other_half(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "FAMILIES", dict(FAMILIES))  # restored after the test
    parts = registry.FAMILIES["gpt2"].pp
    register_adapter("gpt2", registry.FAMILIES["bloom"].tp)  # type: ignore[arg-type]
    assert registry.FAMILIES["gpt2"].pp is parts and registry.FAMILIES["gpt2"].tp is registry.FAMILIES["bloom"].tp


def test_registered_pipeline_parts_are_what_the_split_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("llama")  # declares base_model_pp_plan; an entry takes precedence
    assert pipeline_parts_of(model) == PipelineParts(("model.embed_tokens",), "model.layers", ("model.norm", "lm_head"))
    mine = PipelineParts(("model.embed_tokens",), "model.layers", ("model.norm",))
    monkeypatch.setattr(registry, "FAMILIES", dict(FAMILIES))  # this test's entry goes with it
    register_family(Family("llama", pp=mine))
    assert pipeline_parts_of(model) is mine


def _tp_runs(ctx: ParallelContext, families: list[str]) -> dict[str, RunResult]:
    results = {}
    for family in families:
        model = TensorParallel(build(family), ctx).parallelize()
        results[family] = RunResult(_train(model), full_state_dict(model, ctx))
    return results


def test_opt_and_stablelm_train_tensor_parallel() -> None:
    # Neither declares base_model_tp_plan: their registry entries carry one (generic localize).
    families = ["opt", "stablelm"]
    for rank, results in enumerate(run_distributed(_tp_runs, 2, 1, 1, families, timeout=300)):
        for family in families:
            try:
                assert_matches_reference(results[family], reference(family), PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"{family}, rank {rank}: {err}") from err


def _tiny(model_type: str, **fields: object) -> PreTrainedModel:
    """The sweep's tiny model of ``model_type`` (router loss off: its refusals are router_loss.py's);
    skips where the installed transformers predates the family (the registry may name newer ones)."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")
    config = tiny_family_config(model_type)
    for name, value in {"output_router_logits": False, **fields}.items():
        setattr(config, name, value)
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)


@pytest.mark.parametrize("model_type", sorted(pipeline_parts.PIPELINE_PARTS))
def test_every_entry_of_pipeline_parts_names_modules_of_its_family(model_type: str) -> None:
    # The sweep checks each entry equal at pp=2; this catches a renamed module at once.
    model = _tiny(model_type)
    parts = pipeline_parts_of(model)
    assert parts is pipeline_parts.PIPELINE_PARTS[model_type]
    for path in (*parts.embed, *parts.head):
        assert isinstance(model.get_submodule(path), nn.Module), path
    assert isinstance(model.get_submodule(parts.blocks), nn.ModuleList)
    assert len(split_model_for(model).blocks) == model.config.num_hidden_layers
    assert model.get_submodule(parts.embed[0]) is model.get_input_embeddings()


@pytest.mark.parametrize("model_type, reason", [
    ("dory", "runs its recurrent section's blocks n_recurrent_loops times"),
    ("hrm_text", "H_cycles x L_cycles times"),
    ("phimoe", "draws random numbers in training"),
])
def test_families_whose_blocks_the_split_cannot_reproduce_are_refused(model_type: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"cannot split .*{reason}.*use pp=1"):
        split_model_for(_tiny(model_type))


def test_gemma4_per_layer_inputs_and_shared_keys_are_refused() -> None:
    with pytest.raises(ValueError, match=r"per-layer inputs \(hidden_size_per_layer_input=16\).*"
                                         r"set config.hidden_size_per_layer_input=0"):
        split_model_for(_tiny("gemma4_text", hidden_size_per_layer_input=16, vocab_size_per_layer_input=256))
    with pytest.raises(ValueError, match="num_kv_shared_layers=2: .*set config.num_kv_shared_layers=0"):
        split_model_for(_tiny("gemma4_text", hidden_size_per_layer_input=0, num_kv_shared_layers=2))
    assert split_model_for(_tiny("gemma4_text", hidden_size_per_layer_input=0)).blocks_path == "model.layers"


def test_glm_moe_dsa_splits_only_when_every_layer_selects_its_own_top_k() -> None:
    # Its blocks hand (hidden, top-k indices) on; a 'shared' layer reuses the previous full
    # layer's selection, which would have to cross a stage boundary.
    assert split_model_for(_tiny("glm_moe_dsa", indexer_types=["full"] * 4)).blocks_path == "model.layers"
    with pytest.raises(ValueError, match=r"layers \[1, 3\] are 'shared' in config.indexer_types.*use pp=1"):
        split_model_for(_tiny("glm_moe_dsa", indexer_types=["full", "shared"] * 2))


def test_pipeline_parts_must_hold_every_parameter_and_the_token_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # A parameter outside the parts would stay on every stage, each training its own copy.
    model = build("llama")
    monkeypatch.setattr(registry, "FAMILIES", dict(FAMILIES))
    register_family(Family("llama", pp=PipelineParts(("model.embed_tokens",), "model.layers", ("lm_head",))))
    with pytest.raises(ValueError, match=r"\['model.norm.weight'\] lie outside its pipeline parts"):
        split_model_for(model)
    register_family(Family("llama", pp=PipelineParts((), "model.layers", ("model.norm", "lm_head"))))
    with pytest.raises(ValueError, match="its token embedding 'model.embed_tokens' is not among"):
        split_model_for(model)


def test_the_former_names_are_aliases() -> None:
    from goose_core import models
    from goose_core.pipeline import split

    assert models.PipelineLayout is PipelineParts
    assert (split.Adapter, split.adapter_for, split.layout_of) == (split.SplitModel, split_model_for, pipeline_parts_of)
