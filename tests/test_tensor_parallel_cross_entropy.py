"""Unit tests of vocab-parallel cross-entropy: loss and gradient equal F.cross_entropy's."""

import pytest
import torch
import torch.nn.functional as F

from goose_core import ParallelContext
from goose_core.loss import causal_lm_loss
from goose_core.tensor_parallel import VocabParallelCausalLMLoss, vocab_parallel_cross_entropy
from goose_core.testing import run_distributed

VOCAB = 16


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, VOCAB, generator=gen, dtype=torch.float64) * 4
    target = torch.randint(0, VOCAB, (3, 5), generator=gen)
    target[0, 1] = target[2, 4] = -100  # ignored tokens, as HF pads labels
    return logits, target


def _mean_loss_and_grad(ctx: ParallelContext) -> tuple[torch.Tensor, torch.Tensor]:
    logits, target = _inputs()
    shard = logits.chunk(ctx.tp_size, dim=-1)[ctx.tp_rank].clone().requires_grad_()
    per_token = vocab_parallel_cross_entropy(shard, target, ctx.tp_group)
    (per_token.sum() / (target != -100).sum()).backward()
    return per_token.detach(), shard.grad


@pytest.mark.parametrize("tp", [2, 4])
def test_loss_and_gradient_equal_cross_entropy_on_the_gathered_logits(tp: int) -> None:
    logits, target = _inputs()
    logits.requires_grad_()
    want = F.cross_entropy(logits.view(-1, VOCAB), target.view(-1), ignore_index=-100, reduction="none")
    (want.sum() / (target != -100).sum()).backward()
    results = run_distributed(_mean_loss_and_grad, tp, timeout=60)
    for per_token, _ in results:
        torch.testing.assert_close(per_token.view(-1), want.detach(), rtol=1e-12, atol=1e-12)
    grad = torch.cat([g for _, g in results], dim=-1)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-12, atol=1e-12)
    assert grad[0, 1].abs().sum() == 0 and grad[2, 4].abs().sum() == 0


def _hf_loss(ctx: ParallelContext) -> tuple[float, torch.Tensor]:
    logits, labels = _inputs()
    shard = logits.chunk(ctx.tp_size, dim=-1)[ctx.tp_rank].clone().requires_grad_()
    loss = VocabParallelCausalLMLoss(ctx.tp_group, VOCAB)(logits=shard, labels=labels, vocab_size=VOCAB)
    loss.backward()
    return loss.item(), shard.grad


def test_hf_loss_function_keeps_the_label_shift() -> None:
    # goose's causal_lm_loss is 🤗's ForCausalLMLoss in the logits' own precision (tests/test_loss.py):
    # float64 here, so the comparison is about the shift and the split, not fp32 rounding.
    logits, labels = _inputs()
    logits.requires_grad_()
    want = causal_lm_loss(logits, labels, vocab_size=VOCAB)
    want.backward()
    results = run_distributed(_hf_loss, 2, timeout=60)
    for loss, _ in results:
        assert loss == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat([g for _, g in results], -1), logits.grad, rtol=1e-12, atol=1e-12)


def _whole_logits(ctx: ParallelContext) -> None:
    logits, labels = _inputs()
    VocabParallelCausalLMLoss(ctx.tp_group, VOCAB)(logits=logits, labels=labels, vocab_size=VOCAB)


def test_whole_logits_are_rejected() -> None:
    with pytest.raises(Exception, match="expects logits with 8 vocabulary columns"):
        run_distributed(_whole_logits, 2, timeout=60)


def _token_weighted(ctx: ParallelContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fp64 logits; the whole batch, then a piece with no target, each over the batch's count."""
    logits, labels = _inputs()
    loss_fn = VocabParallelCausalLMLoss(ctx.tp_group, VOCAB)
    out = []
    for rows, n in ((slice(None), None), (slice(None), 7), (slice(2, 3), 7), (slice(2, 3), None)):
        shard = logits[rows].chunk(ctx.tp_size, dim=-1)[ctx.tp_rank].clone().requires_grad_()
        piece = labels[rows].clone()
        if rows != slice(None):
            piece[:] = -100  # no target at all
        loss = loss_fn(logits=shard, labels=piece, vocab_size=VOCAB, num_items_in_batch=n)
        loss.backward()
        out.append((loss.detach(), shard.grad))
    return out


def test_fp64_stays_fp64_and_no_target_gives_zero() -> None:
    """The same convention as goose_core.loss.causal_lm_loss, to fp64 rounding."""
    from goose_core.loss import causal_lm_loss

    logits, labels = _inputs()
    results = run_distributed(_token_weighted, 2, timeout=60)
    for i, n in enumerate((None, 7)):
        whole = logits.clone().requires_grad_()
        want = causal_lm_loss(whole, labels, num_items_in_batch=n)
        want.backward()
        for rank, per_rank in enumerate(results):
            loss, grad = per_rank[i]
            assert loss.dtype == torch.float64
            torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0)
            torch.testing.assert_close(grad, whole.grad.chunk(2, dim=-1)[rank], rtol=1e-12, atol=1e-15)
    for per_rank in results:
        for loss, grad in per_rank[2:]:
            assert loss.item() == 0.0 and not grad.abs().any()
