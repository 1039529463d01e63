"""The family sweep's fast subset: a dozen families across the tensor-parallel style kinds, each at
tp=2, pp=2 and tp=2 x pp=2, is equal to the single-device run or refused with a message; never
wrong numbers, never a crash. Plus the sweep's own parts: its classification and its page."""

from pathlib import Path

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from goose_core.testing import RunResult
from sweep.coverage import BUILD, MODES, Outcome, classify_error, combine, compare, run_sweep, settings
from sweep.families import families, tiny_family_config
from sweep.report import markdown, merge, write_json

# GPT-2 and Bloom (goose's own adapters), Llama/Mistral/Qwen2 (colwise/rowwise, sliding windows),
# Gemma2/Gemma3 (embedding scale, softcapping, per-layer-type rotary), Granite (multipliers),
# Mixtral (moe_tp_experts, router loss on), Phi3 (colwise_gather_output, packed), Qwen3 (q/k norms
# replicated_with_grad_allreduce), GPT-NeoX (embedding_rowwise, parallel residual), Beam (its SwiGLU
# and sigmoid router in float32 by its own casts: equal only because the harness widens them).
# Pipeline parts of goose_core.models.pipeline_parts (no base_model_pp_plan): Bamba (a Mamba/attention hybrid
# whose parent unpacks each block's output as a pair), Falcon-H1 (its multiplier applies to
# looked-up ids only), GraniteMoE (MoE, multipliers).
FAST = ("gpt2", "bloom", "llama", "mistral", "qwen2", "gemma2", "granite", "mixtral", "phi3", "qwen3",
        "gpt_neox", "gemma3_text", "beam", "bamba", "falcon_h1", "granitemoe")
#: Families split by goose's registered pipeline parts that must be equal, not merely refused, at pp=2.
REGISTERED_PARTS = ("bamba", "falcon_h1")


def _lacking(family: str) -> str | None:
    """Why the installed transformers cannot run ``family``'s premise on one device, from its own
    facts, or None: the family is absent (Beam is newer than 5.17), or its config turns the router
    loss on but its model records no router logits (5.17's GraniteMoE: its forward then adds
    load_balancing_loss_func's int 0 with ``.to`` and fails, in 🤗's own code)."""
    if family not in CONFIG_MAPPING:
        return f"transformers {transformers.__version__} has no {family!r}"
    config = tiny_family_config(family)
    if getattr(config, "output_router_logits", False):
        base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).base_model
        if base(input_ids=torch.zeros(1, 2, dtype=torch.long), output_router_logits=True).router_logits is None:
            return (f"transformers {transformers.__version__}'s {type(base).__name__} records no router logits, "
                    f"so its forward with output_router_logits=True fails on one device")
    return None


@pytest.fixture(scope="module")
def fast_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Outcome]:
    state = tmp_path_factory.mktemp("coverage") / "state.jsonl"
    return run_sweep(list(FAST), list(MODES), timeout=60, state=state)


@pytest.mark.parametrize("family", FAST)
def test_family_is_equal_or_refused_with_a_reason(fast_sweep: dict[tuple[str, str], Outcome], family: str) -> None:
    if reason := _lacking(family):
        pytest.skip(reason)
    assert fast_sweep[family, BUILD].status == "ok", fast_sweep[family, BUILD].detail
    bad = [f"{mode}: {o.status} {o.detail} (error {o.error})" for mode in MODES
           if (o := fast_sweep[family, mode]).status not in ("equal", "refused")]
    assert not bad, "\n".join(bad)
    for mode in MODES:
        assert fast_sweep[family, mode].status != "refused" or fast_sweep[family, mode].detail.strip()


@pytest.mark.parametrize("family", REGISTERED_PARTS)
def test_registered_pipeline_parts_split_equal(fast_sweep: dict[tuple[str, str], Outcome], family: str) -> None:
    # The pipeline parts are goose's, the tp plan the installed config's: 5.17's Bamba and Falcon-H1 declare
    # none, so there tp2xpp2 must be refused for exactly that; pp=2 must be equal either way.
    planned = bool(getattr(tiny_family_config(family), "base_model_tp_plan", None))
    for mode in ("pp2", "tp2xpp2"):
        outcome = fast_sweep[family, mode]
        if mode == "tp2xpp2" and not planned:
            assert outcome.status == "refused" and "declares no config.base_model_tp_plan" in outcome.detail, \
                f"{mode}: {outcome.status} {outcome.detail}"
        else:
            assert outcome.status == "equal", f"{mode}: {outcome.status} {outcome.detail}"


def test_every_declaring_family_is_listed_and_the_fast_ones_build() -> None:
    found = {f.model_type: f for f in families()}
    assert {"llama", "mixtral", "gpt2", "opt", "falcon", "stablelm"} <= found.keys()
    assert found["llama"].declares == "tp+pp" and found["opt"].declares == "none"
    absent = [name for name in FAST if name not in CONFIG_MAPPING]
    for name in FAST:
        if name not in absent:
            config = tiny_family_config(name)
            assert config.vocab_size == 256 and config.num_hidden_layers == 4, name
    if absent:  # every present one was checked; say which were not
        pytest.skip(f"transformers {transformers.__version__} has no {', '.join(map(repr, absent))}")


def _result(loss: float, weight: float) -> RunResult:
    return RunResult([5.0, loss], {"w": torch.full((2,), weight, dtype=torch.float64)})


def test_numbers_that_differ_are_wrong_with_their_size() -> None:
    reference = _result(4.0, 1.0)
    assert compare(_result(4.0, 1.0 + 1e-14), reference)[0] == "equal"
    status, detail, error = compare(_result(4.0, 1.0 + 1e-6), reference)
    assert status == "wrong" and "worst at w" in detail and 1e3 < error < 1e5
    assert compare(_result(float("nan"), 1.0), reference)[0] == "wrong"
    assert compare(RunResult([5.0, 4.0], {}), reference)[0] == "crash"


def _raise(err: Exception) -> Exception:
    try:
        raise err
    except Exception as caught:
        return caught


def test_only_goose_errors_before_the_first_step_are_refusals() -> None:
    from goose_core import PipelineParallel

    try:
        PipelineParallel(torch.nn.Linear(2, 2), None, num_microbatches=0)  # type: ignore[arg-type]
    except ValueError as err:  # goose's own error, before any collective
        goose_error: Exception = err
    assert classify_error(goose_error, stepped=False)[0] == "refused"
    assert classify_error(goose_error, stepped=True)[0] == "crash"
    status, detail = classify_error(_raise(TypeError("object of type 'Dropout' has no len()")), False)
    assert status == "crash" and detail.startswith("TypeError: object of type 'Dropout'")
    assert classify_error(_raise(ValueError("raised outside goose")), False)[0] == "crash"


def test_ranks_combine_to_the_worst_and_disagreement_is_a_crash() -> None:
    equal = {"status": "equal", "detail": "", "error": 0.1, "seconds": 1.0}
    refused = {"status": "refused", "detail": "style x is not supported", "error": None, "seconds": 0.1}
    wrong = {"status": "wrong", "detail": "worst at w", "error": 50.0, "seconds": 1.0}
    assert combine("f", "tp2", [equal, equal]).status == "equal"
    assert combine("f", "tp2", [refused, refused]).detail == "style x is not supported"
    assert combine("f", "tp2", [equal, wrong]).detail == "rank 1: worst at w"
    assert combine("f", "tp2", [refused, equal]).status == "crash"


def test_the_page_names_the_versions_counts_and_reasons(tmp_path: Path) -> None:
    chosen = [f for f in families() if f.model_type in ("llama", "qwen3", "opt")]
    outcomes = {("llama", BUILD): Outcome("llama", BUILD, "ok"), ("qwen3", BUILD): Outcome("qwen3", BUILD, "ok"),
                ("opt", BUILD): Outcome("opt", BUILD, "not buildable", "config rejects the tiny size"),
                ("llama", "tp2"): Outcome("llama", "tp2", "equal", "", 0.01),
                ("qwen3", "tp2"): Outcome("qwen3", "tp2", "refused", "style 'replicated_with_grad_allreduce'")}
    record = write_json(tmp_path / "coverage.json", chosen, ["tp2"], outcomes, settings(["tp2"]))
    assert record["counts"]["tp2"] == {"equal": 1, "refused": 1, "wrong": 0, "crash": 0, "not buildable": 1}
    page = markdown(record)
    import transformers
    assert f"transformers {transformers.__version__}" in page and f"torch {torch.__version__}" in page
    assert "| tp=2 | 1 | 1 | 0 | 0 | 1 | 50 % |" in page
    assert "- `qwen3` tp=2, refused: style 'replicated_with_grad_allreduce'" in page
    assert "- `opt` (none): config rejects the tiny size" in page


@pytest.mark.kernel_free  # text: the record and its page
def test_an_expert_sweep_merges_beside_the_other_modes() -> None:
    chosen = [f for f in families() if f.model_type in ("llama", "mixtral")]
    built = {(n, BUILD): Outcome(n, BUILD, "ok") for n in ("llama", "mixtral")}
    dense = {(n, "tp2"): Outcome(n, "tp2", "equal") for n in ("llama", "mixtral")}
    base = write_json(None, chosen, ["tp2"], {**built, **dense}, settings(["tp2"]))
    experts = write_json(None, [f for f in chosen if f.model_type == "mixtral"], ["ep2"],
                         {**built, ("mixtral", "ep2"): Outcome("mixtral", "ep2", "equal")}, settings(["ep2"]))
    merged = merge(base, experts)
    assert merged["families"]["mixtral"]["tp2"]["status"] == merged["families"]["mixtral"]["ep2"]["status"] == "equal"
    assert "ep2" not in merged["families"]["llama"] and "ep2" not in base["counts"]  # the record is not changed
    page = markdown(merged)
    assert "| tp=2 | ep=2 |" in page and "| `llama` | tp+pp | equal | – |" in page
    assert "| `mixtral` | tp+pp | equal | equal |" in page and "| ep=2 | 1 | 0 | 0 | 0 | 0 | 100 % |" in page
    with pytest.raises(ValueError, match="torch 0.0"):
        merge(base, {**experts, "torch": "0.0"})
