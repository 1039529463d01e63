"""Unit tests of the tokenizer, the shipped corpus and the seeded loader."""

import pytest
import torch

from goose_core.data import CORPUS_PATH, ByteTokenizer, corpus_ids, get_batch, shard_batch


def test_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "Four score and seven years ago"
    assert tok.decode(tok.encode(text)) == text
    assert int(tok.encode("\x00\xff").max()) < tok.vocab_size


def test_corpus_is_small_real_text() -> None:
    size = CORPUS_PATH.stat().st_size
    assert 20_000 < size < 300_000
    assert len(corpus_ids()) == size and int(corpus_ids().max()) < 128


def test_batches_are_seeded_and_independent_of_history() -> None:
    a, b = get_batch(5, 4, 16, seed=1), get_batch(5, 4, 16, seed=1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], a["input_ids"])
    assert not torch.equal(get_batch(6, 4, 16, seed=1)["input_ids"], a["input_ids"])
    assert not torch.equal(get_batch(5, 4, 16, seed=2)["input_ids"], a["input_ids"])
    assert a["input_ids"].shape == (4, 16) and a["input_ids"].dtype == torch.long


def test_shards_tile_the_global_batch() -> None:
    batch = get_batch(0, 8, 16)
    shards = [shard_batch(batch, r, 4) for r in range(4)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])


def test_uneven_shard_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="batch size 8 does not divide into 3"):
        shard_batch(get_batch(0, 8, 16), 0, 3)
