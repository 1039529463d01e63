"""The one registry of family knowledge: explicit entries, both halves, found by tp and pp alike."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from goose_core import ParallelContext, TensorParallel, full_state_dict
from goose_core.models import FAMILIES, Family, PipelineLayout, register_family
from goose_core.models import registry
from goose_core.models.registry import PIPELINE, TENSOR_PARALLEL
from goose_core.pipeline.split import layout_of
from goose_core.tensor_parallel import ADAPTERS, register_adapter
from goose_core.testing import PARALLEL, RunResult, assert_matches_reference, run_distributed

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_families import _train, build, reference  # noqa: E402  (the tiny configs)


def test_the_builtin_families_are_listed_with_their_halves() -> None:
    extended = ["apertus", "apertus1p5_text", "doge", "inkling2_loop_text", "inkling2_text", "inkling_text",
                "sarvam_moe"]  # tp: a declared plan plus entries it lacks
    assert sorted(FAMILIES) == sorted(["bloom", "falcon", "gpt2", "opt", "stablelm", *extended])
    assert sorted(TENSOR_PARALLEL) == sorted(["bloom", "gpt2", "opt", "stablelm", *extended])
    assert sorted(PIPELINE) == ["bloom", "falcon", "gpt2", "opt", "stablelm"]
    assert ADAPTERS["gpt2"] is FAMILIES["gpt2"].tp  # the old name is a view of the registry


def test_registering_keeps_the_other_half(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "FAMILIES", dict(FAMILIES))  # restored after the test
    layout = registry.FAMILIES["gpt2"].pp
    register_adapter("gpt2", registry.FAMILIES["bloom"].tp)  # type: ignore[arg-type]
    assert registry.FAMILIES["gpt2"].pp is layout and registry.FAMILIES["gpt2"].tp is registry.FAMILIES["bloom"].tp


def test_a_registered_layout_is_what_the_split_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("llama")  # declares base_model_pp_plan; an entry takes precedence
    assert layout_of(model) == PipelineLayout(("model.embed_tokens",), "model.layers", ("model.norm", "lm_head"))
    mine = PipelineLayout(("model.embed_tokens",), "model.layers", ("model.norm",))
    monkeypatch.setattr(registry, "FAMILIES", dict(FAMILIES))  # this test's entry goes with it
    register_family(Family("llama", pp=mine))
    assert layout_of(model) is mine


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
