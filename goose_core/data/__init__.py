"""Training data with no downloads: a shipped corpus, a byte tokenizer, a seeded loader."""

from goose_core.data.loader import CORPUS_PATH, PAD_ID, PADDINGS, corpus_ids, get_batch, pad_batch, shard_batch
from goose_core.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "CORPUS_PATH", "PAD_ID", "PADDINGS", "corpus_ids", "get_batch", "pad_batch", "shard_batch"]
