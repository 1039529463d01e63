"""The MoE router loss under pipeline parallelism equals the single-device run at any micro-batch count.

The whole-batch exactness is tested twice: on the loss function alone (random router logits, the
micro-batches' sums and records finished against 🤗's ``load_balancing_loss_func``, to the bit)
and end to end (Mixtral and Qwen2-MoE trained at M=2 and M=4, right-padded, against the
single-device run at PARALLEL). Cost: in-process runs only; the pp=2 and tp=2 x pp=2 spawns of
tests/test_pipeline_families.py run Mixtral and Qwen2-MoE at M=2 too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from goose_core.engine.schedule import OneFOneB
from goose_core.pipeline import local_pipeline
from goose_core.pipeline.split import split_model_for
from goose_core.pipeline.router_loss import RouterLoss, WholeBatchProbs
from goose_core.testing import PARALLEL, RunResult, assert_matches_reference, seeded_model, snapshot
from sweep.coverage import build_family_model

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_families import _train, build, reference  # noqa: E402  (the tiny configs)

E, TOP_K, COEF, LAYERS = 4, 2, 0.5, 3


def _gate_logits(seed: int, rows: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(rows, E, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(LAYERS)]
    mask = torch.ones(rows // 16, 16, dtype=torch.long)
    mask[:, 11:] = 0  # right padding
    return logits, mask


def _pipelined(logits: list[torch.Tensor], mask: torch.Tensor, m: int, exact: bool) -> torch.Tensor:
    """The aux loss as the stages compute it: per micro-batch sums, finished once."""
    router = RouterLoss(E, TOP_K, COEF, recorder=None)
    probs = WholeBatchProbs(LAYERS, E)
    pieces = [l.chunk(m) for l in logits]
    outputs = []
    for i, mask_i in enumerate(mask.chunk(m)):
        sums = router.add(router.zeros(torch.device("cpu")), [p[i] for p in pieces], mask_i,
                          lambda k, rows, i=i: probs.record(k, i, rows))
        outputs.append(router.pack_loss(torch.zeros((), dtype=torch.float64), sums))
    return router.finish(outputs, probs.sums(m, torch.device("cpu")) if exact else None)


@pytest.mark.parametrize("m", [2, 4])
def test_the_finished_loss_is_the_single_device_one_to_the_bit(m: int) -> None:
    differs = 0
    for seed in range(32):
        logits, mask = _gate_logits(seed, 64)
        want = COEF * load_balancing_loss_func(tuple(logits), E, TOP_K, mask)
        want_grads = torch.autograd.grad(want, logits)
        got = _pipelined(logits, mask, m, exact=True)
        assert torch.equal(got.float(), want), (seed, got.item(), want.item())
        for a, b in zip(torch.autograd.grad(got, logits), want_grads):
            torch.testing.assert_close(a, b, rtol=PARALLEL.rtol, atol=PARALLEL.atol)
        # Without the whole-batch record, the micro-batches' float32 sums round differently.
        differs += not torch.equal(_pipelined(logits, mask, m, exact=False).float(), want)
    assert differs > 0, "no seed shows the float32 reordering: the test would not catch its loss"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_the_router_loss_at_four_microbatches_equals_the_single_device_run(family: str) -> None:
    # pp=2 and tp=2 x pp=2 at M=2 run in tests/test_pipeline_families.py's spawns.
    model = local_pipeline(build(family), 2, num_microbatches=4)
    assert_matches_reference(RunResult(_train(model), snapshot(model)), reference(family), PARALLEL)


def test_a_family_whose_forward_adds_no_router_loss_runs() -> None:
    # Cohere2-MoE records router logits (output_router_logits=True) but its forward adds no
    # auxiliary loss: nothing to carry, the loss is its own cross-entropy at any M.
    def run(pipelined: bool) -> RunResult:
        model = build_family_model("cohere2_moe")
        if not getattr(model.config, "output_router_logits", False):
            pytest.skip(f"transformers {transformers.__version__}'s Cohere2-MoE records no router logits")
        model = local_pipeline(model, 2, num_microbatches=2) if pipelined else model
        return RunResult(_train(model), snapshot(model))

    assert_matches_reference(run(True), run(False), PARALLEL)


def test_one_f_one_b_with_microbatches_is_refused_and_with_one_runs() -> None:
    with pytest.raises(ValueError, match="output_router_logits=True.*schedule=OneFOneB.*schedule='gpipe'.*"
                                         "num_microbatches=1 \\(got 2\\)"):
        local_pipeline(build("mixtral"), 2, num_microbatches=2, schedule="1f1b")
    model = local_pipeline(build("mixtral"), 2, schedule="1f1b")
    assert_matches_reference(RunResult(_train(model), snapshot(model)), reference("mixtral"), PARALLEL)


def test_a_different_load_balancing_function_is_refused_by_what_differs() -> None:
    # Doge's product-key routing: its load_balancing_loss_func takes num_keys. Without experts
    # (the sweep's tiny Doge is dense) no router records anything: it runs, equal.
    config = build_family_model("doge").config
    want = seeded_model(config, 0, torch.float64, "eager")
    try:
        expected = RunResult(_train(want), snapshot(want))
    except IndexError:  # 🤗's load_balancing_loss_func indexes the empty tuple of router logits
        pytest.skip(f"transformers {transformers.__version__}: a dense Doge with output_router_logits=True "
                    f"fails on one device, in 🤗's own code")
    dense = local_pipeline(seeded_model(config, 0, torch.float64, "eager"), 2, num_microbatches=2)
    assert_matches_reference(RunResult(_train(dense), snapshot(dense)), expected, PARALLEL)
    config.is_moe, config.num_experts = True, 4
    with pytest.raises(ValueError, match=r"DogeForCausalLM .*load_balancing_loss_func\(.*'num_keys'.*\) is not "
                                         r"the Switch-Transformer function goose mirrors"):
        local_pipeline(seeded_model(config, 0, torch.float64, "eager"), 2)


def test_one_f_one_b_with_the_router_loss_over_dp_shards_is_refused() -> None:
    # Expert parallelism's dp shards: the loss needs every shard's sums before any backward.
    split = split_model_for(build("mixtral"))
    with pytest.raises(ValueError, match="the data-parallel batch's routing, which schedule=OneFOneB.*"
                                         "schedule='gpipe', or set config.output_router_logits=False"):
        split.check(1, OneFOneB, dp_group=object())
    split.check(1, dp_group=object())  # GPipe: the loss is added once the batch's sums are in
    assert split.batch_router() is split.router and split.dp_group is not None
