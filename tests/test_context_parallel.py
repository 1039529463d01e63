"""Context parallelism's arithmetic and refusals, without processes: which positions each cp rank
holds, how a batch is sliced (labels shifted before it), and the families and layouts refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config

from goose_core.context_parallel import ContextParallel, balanced_positions, slice_batch
from goose_core.context_parallel.attention import refuse_unsupported
from goose_core.context_parallel.ring import allowed
from goose_core.metadata import set_module_grad_sync
from goose_core.testing import build_model
from goose_core.testing.models import seeded_model


def test_rank_i_holds_chunks_i_and_2c_minus_1_minus_i() -> None:
    assert [p.tolist() for p in balanced_positions(8, 2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    four = balanced_positions(16, 4)
    assert [p.tolist() for p in four] == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert sorted(torch.cat(four).tolist()) == list(range(16))


def test_every_rank_scores_as_many_causal_pairs() -> None:
    # Load balance: the (query, key) pairs under the causal mask, summed over all key positions.
    for size in (2, 4):
        positions = balanced_positions(32, size)
        work = [int(allowed(p, torch.arange(32), None, None).sum()) for p in positions]
        assert len(set(work)) == 1, work


def test_a_sequence_that_does_not_cut_into_2c_chunks_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"2 \* 4 = 8 equal chunks, but the sequence length is 12; pad the batch "
                                         r"to a multiple of 8"):
        balanced_positions(12, 4)


def test_labels_are_shifted_before_slicing_and_positions_are_global() -> None:
    ids = torch.arange(8).unsqueeze(0)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    late = slice_batch(batch, balanced_positions(8, 2)[1])  # positions 2..5
    assert late["input_ids"].tolist() == [[2, 3, 4, 5]]
    assert late["position_ids"].tolist() == [[2, 3, 4, 5]]
    assert late["shift_labels"].tolist() == [[3, 4, 5, 6]]  # the target of 5 is 6, held by rank 0
    first = slice_batch(batch, balanced_positions(8, 2)[0])  # positions 0, 1, 6, 7
    assert first["shift_labels"].tolist() == [[1, 2, 7, -100]]  # the last token has no target


def test_the_mask_is_causal_windowed_and_padded_in_global_positions() -> None:
    q, k = torch.tensor([6, 7]), torch.tensor([4, 5, 6, 7])
    real = torch.ones(1, 8, dtype=torch.bool)
    real[0, 4] = False
    ok = allowed(q, k, real, window=3)
    assert ok[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]


def _ctx(**sizes: int) -> SimpleNamespace:
    return SimpleNamespace(pipeline_parallel_size=sizes.get("pp", 1), context_parallel_size=sizes.get("cp", 2))


def test_an_unknown_method_is_refused() -> None:
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"method must be one of \('ring', 'ulysses'\), got 'star'"):
        ContextParallel(model, _ctx(), method="star")  # type: ignore[arg-type]


def test_softcapped_attention_is_refused_by_family() -> None:
    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(ValueError, match=r"does not support 'gemma2': it softcaps its attention scores"):
        refuse_unsupported(seeded_model(config))


def test_context_parallel_after_data_parallel_is_refused() -> None:
    model = build_model("llama")
    set_module_grad_sync(model, object())  # type: ignore[arg-type]  # what DataParallel leaves
    with pytest.raises(ValueError, match="ContextParallel must wrap the model before DataParallel"):
        ContextParallel(model, _ctx())  # type: ignore[arg-type]
