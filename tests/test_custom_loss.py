"""A loss computed from the logits under the pipeline (``PipelineParallel(..., loss_fn=...)``)
equals the same loss computed outside the model on one device; a pipelined forward that could
build no loss is refused on every rank (goose_core.pipeline.custom_loss)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from goose_core import ParallelContext, full_state_dict
from goose_core.loss import causal_lm_loss
from goose_core.pipeline import local_pipeline
from goose_core.pipeline.custom_loss import CustomLoss
from goose_core.testing import (PARALLEL, RunResult, TrainSpec, assert_matches_reference, at_layout,
                                reference_run, run_distributed, snapshot, train_loop)

NO_LOSS = "needs a loss computed inside the pipeline"
FIXES = ("Pass labels=", "PipelineParallel(..., loss_fn=...)")


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The founding example's loss, outside the model: mean cross-entropy of the next token."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))


def token_weighted_loss(logits: Tensor, labels: Tensor, num_items_in_batch: Tensor) -> Tensor:
    """🤗's loss_function convention: the micro-batch's token-loss sum over the batch's count."""
    return causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch)


LOSSES: dict[str, Callable[..., Tensor]] = {"mean": next_token_loss, "tokens": token_weighted_loss}


def _spec(family: str, padding: str | None = None) -> TrainSpec:
    return TrainSpec(family=family, steps=2, optimizer="sgd", padding=padding)  # SGD keeps a wrong scale visible


def _outside_the_model(spec: TrainSpec) -> RunResult:
    """One device, the loop computing the loss from ``model(input_ids).logits`` itself."""
    model = spec.build_model()
    optimizer = spec.build_optimizer(model.parameters())
    losses = []
    for batch in spec.batches():
        loss = next_token_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, snapshot(model))


def _train_shards(ctx: ParallelContext, configs: list[tuple[str, int, str, str, str | None]]) -> list[RunResult]:
    """Each config trained at ctx's layout, every dp rank on its shard of each batch."""
    results = []
    for family, m, schedule, loss, padding in configs:
        spec = _spec(family, padding)
        model = at_layout(spec.build_model(), ctx, num_microbatches=m, schedule=schedule, loss_fn=LOSSES[loss])
        optimizer = spec.build_optimizer(model.parameters())
        losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size))
        results.append(RunResult(losses, full_state_dict(model, ctx)))
    return results


def _expected(family: str, loss: str, padding: str | None) -> RunResult:
    # The token-weighted form is goose's own loss: the harness's reference computes it.
    return _outside_the_model(_spec(family)) if loss == "mean" else reference_run(_spec(family, padding))


def _assert_every_rank_matches(per_rank: list[list[RunResult]], configs: list) -> None:
    for k, (family, m, schedule, loss, padding) in enumerate(configs):
        expected = _expected(family, loss, padding)
        for rank, results in enumerate(per_rank):
            try:
                assert_matches_reference(results[k], expected, PARALLEL)
            except AssertionError as err:
                raise AssertionError(f"{family} M={m} {schedule} {loss} rank {rank}: {err}") from err


# (family, M, schedule, loss form, padding). GPT-2's tied embedding lives on two stages.
PP2 = [("gpt2", 4, "gpipe", "mean", None), ("llama", 2, "1f1b", "mean", None),
       ("llama", 4, "gpipe", "tokens", "right"), ("gpt2", 4, "1f1b", "tokens", "empty")]
TP2_PP2 = [("bloom", 2, "gpipe", "mean", None), ("llama", 4, "1f1b", "mean", None),
           ("gpt2", 2, "gpipe", "tokens", "left")]


# Data parallelism averages the replicas as the pipeline averages micro-batches (mean form), or
# passes the global count (token form).
PP2_DP2 = [("llama", 2, "gpipe", "mean", None), ("gpt2", 2, "1f1b", "tokens", "right")]


@pytest.mark.parametrize("tp, dp, configs", [(1, 1, PP2), (2, 1, TP2_PP2), (1, 2, PP2_DP2)],
                         ids=["pp2", "tp2xpp2", "pp2xdp2"])
def test_a_custom_loss_equals_the_loss_outside_the_model_on_one_device(tp: int, dp: int, configs: list) -> None:
    per_rank = run_distributed(_train_shards, tp, 2, dp, configs, timeout=240)
    _assert_every_rank_matches(per_rank, configs)


def _unscaled(self: CustomLoss, body: Callable) -> Callable:
    """A planted bug: each micro-batch's mean counts whole, not 1/M."""
    def cell(x: Tensor, inputs: dict[str, Any]) -> Tensor:
        plain = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
        return self.loss_fn(body(x, plain), inputs["labels"])
    return cell


def test_a_mean_loss_not_scaled_per_micro_batch_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CustomLoss, "wrap", _unscaled)  # the forked ranks inherit it
    configs = [("llama", 2, "gpipe", "mean", None)]
    per_rank = run_distributed(_train_shards, 1, 2, 1, configs, timeout=120)
    with pytest.raises(AssertionError, match="losses differ beyond"):
        _assert_every_rank_matches(per_rank, configs)


def test_local_pipeline_takes_a_custom_loss_too() -> None:
    spec = _spec("gpt2")
    model = local_pipeline(spec.build_model(), 2, 4, loss_fn=next_token_loss)
    optimizer = spec.build_optimizer(model.parameters())
    got = RunResult(train_loop(model, optimizer, spec.batches()), snapshot(model))
    assert_matches_reference(got, _outside_the_model(spec), PARALLEL)


def _forward(ctx: ParallelContext, loss: str | None, with_labels: bool, padding: str | None = None) -> str:
    spec = _spec("llama", padding)
    model = at_layout(spec.build_model(), ctx, num_microbatches=2, loss_fn=loss and LOSSES[loss])
    batch = spec.batch(0)
    labels = batch["labels"] if with_labels else None
    try:
        model(input_ids=batch["input_ids"], labels=labels).loss.backward()
    except ValueError as err:
        return str(err)
    return "trained"


@pytest.mark.parametrize("tp, loss, with_labels, padding, message", [
    (1, None, False, None, NO_LOSS),                           # the founding loop's forward
    (2, None, False, None, NO_LOSS),
    (1, "mean", False, None, "loss_fn=...) needs the targets: call model(input_ids=..., labels=targets)"),
    (2, "mean", True, "right", "labels hold IGNORE_INDEX (-100) with num_microbatches=2 and a mean loss_fn"),
], ids=["pp2", "tp2xpp2", "loss_fn-without-labels", "mean-with-padding"])
def test_a_step_without_a_loss_is_refused_on_every_rank(tp: int, loss: str | None, with_labels: bool,
                                                        padding: str | None, message: str) -> None:
    outcomes = run_distributed(_forward, tp, 2, 1, loss, with_labels, padding, timeout=60)
    assert len(outcomes) == 2 * tp
    for outcome in outcomes:
        assert message in outcome
    if message == NO_LOSS:
        assert all(fix in outcome for fix in FIXES for outcome in outcomes)


def test_without_grad_a_forward_without_labels_still_gives_logits() -> None:
    spec = _spec("gpt2")
    model = local_pipeline(spec.build_model(), 2, 2, loss_fn=next_token_loss)
    with torch.no_grad():
        logits = model(input_ids=spec.batch(0)["input_ids"]).logits
    assert logits.shape == (*spec.batch(0)["input_ids"].shape, spec.build_model().config.vocab_size)


def test_a_loss_fn_that_is_not_callable_or_a_router_loss_is_refused() -> None:
    spec = _spec("llama")
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        local_pipeline(spec.build_model(), 2, 2, loss_fn="cross_entropy")  # type: ignore[arg-type]
    model = spec.build_model()
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="output_router_logits=True"):
        CustomLoss(next_token_loss, 2, model)


def test_the_form_follows_the_signature() -> None:
    model = _spec("llama").build_model()
    assert not CustomLoss(next_token_loss, 2, model).token_weighted
    assert CustomLoss(token_weighted_loss, 2, model).token_weighted
    assert CustomLoss(functools.partial(causal_lm_loss, vocab_size=256), 2, model).token_weighted
