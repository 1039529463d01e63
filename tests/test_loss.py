"""Unit tests of goose_core.loss: the token-weighted causal-LM loss every layout shares."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from goose_core.loss import IGNORE_INDEX, causal_lm_loss, count_items, loss_dtype, nonzero, targets_of

VOCAB = 11


def _batch(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 6, VOCAB, generator=gen, dtype=dtype)
    labels = torch.randint(0, VOCAB, (4, 6), generator=gen)
    labels[0, 3:] = IGNORE_INDEX  # right padding
    labels[1, :4] = IGNORE_INDEX  # left padding
    labels[3] = IGNORE_INDEX      # a row with no target
    return logits, labels


def test_targets_shift_left_and_the_count_leaves_out_ignored_and_last_positions() -> None:
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7], [1, 2, 3, 4]])
    assert targets_of(labels).tolist() == [[6, IGNORE_INDEX, 7, IGNORE_INDEX], [2, 3, 4, IGNORE_INDEX]]
    assert count_items(labels).item() == 5 and count_items(labels).dtype == torch.int64


def test_equals_the_hf_loss_as_a_mean_and_with_a_given_count() -> None:
    logits, labels = _batch()
    assert torch.equal(causal_lm_loss(logits, labels, VOCAB), ForCausalLMLoss(logits, labels, VOCAB))
    n = torch.tensor(40)
    assert torch.equal(causal_lm_loss(logits, labels, VOCAB, num_items_in_batch=n),
                       ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=n))


def test_pieces_over_the_batch_count_add_up_to_the_batch_mean_and_its_gradient() -> None:
    logits, labels = _batch()
    whole = logits.clone().requires_grad_()
    causal_lm_loss(whole, labels).backward()
    pieces = logits.clone().requires_grad_()
    n = count_items(labels)
    total = sum(causal_lm_loss(pieces[i:i + 1], labels[i:i + 1], num_items_in_batch=n) for i in range(4))
    total.backward()
    assert torch.allclose(total, causal_lm_loss(logits, labels), rtol=1e-6, atol=0)
    assert torch.allclose(pieces.grad, whole.grad, rtol=1e-6, atol=1e-9)
    # The mean of the pieces' own means is another number: this is what goose must not compute.
    means = [causal_lm_loss(logits[i:i + 1], labels[i:i + 1]) for i in range(3)]
    assert abs(float(sum(means) / 3 - total.detach())) > 1e-3


@pytest.mark.parametrize("n", [None, 0, 7, torch.tensor(7), torch.tensor(0)])
def test_no_target_gives_zero_loss_and_zero_gradient_not_nan(n) -> None:
    logits, labels = _batch()
    logits = logits[3:].clone().requires_grad_()
    loss = causal_lm_loss(logits, labels[3:], num_items_in_batch=n)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    assert ForCausalLMLoss(logits, labels[3:], VOCAB).isnan()  # why goose owns its loss


def test_a_fractional_count_is_kept() -> None:
    """Data parallelism divides by N / dp, below 1 when a batch has fewer targets than ranks."""
    assert nonzero(0) == 1 and nonzero(0.5) == 0.5 and nonzero(3) == 3
    assert nonzero(torch.tensor([0.0, 0.5, 2.0])).tolist() == [1.0, 0.5, 2.0]
    logits, labels = _batch()
    total = causal_lm_loss(logits, labels, num_items_in_batch=1)
    assert torch.equal(causal_lm_loss(logits, labels, num_items_in_batch=0.5), total / 0.5)


@pytest.mark.parametrize("dtype, want", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                         (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_keeps_fp32_and_wider_and_upcasts_half_types(dtype: torch.dtype, want: torch.dtype) -> None:
    logits, labels = _batch(dtype=dtype)
    assert loss_dtype(dtype) == want
    assert causal_lm_loss(logits, labels).dtype == want
    assert causal_lm_loss(logits, labels, num_items_in_batch=0.5).dtype == want
    assert causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor(9)).dtype == want
