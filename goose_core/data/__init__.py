"""Training data with no downloads: a shipped corpus, a byte tokenizer, a seeded loader, and a
user's own tokenizer folder and text files packed into a resumable global batch stream::

    tok = load_tokenizer("my_tokenizer/")              # or None: the model folder's, else bytes
    data = TextData(["notes/", "web.jsonl"], tok, seq_len=512, eval_fraction=0.05, seed=0)
    stream = BatchStream(data, batch_size=64, seed=0)  # the same global batches on every rank
    batch = shard_batch(stream.next(), dp_rank, dp_size)
    state = stream.state_dict()                        # into the checkpoint; load_state_dict resumes
"""

from goose_core.data.bpe import EOS_TOKEN, train_bpe_tokenizer
from goose_core.data.documents import EXTENSIONS, Document, expand_paths, read_documents
from goose_core.data.loader import CORPUS_PATH, PAD_ID, PADDINGS, corpus_ids, get_batch, pad_batch, shard_batch
from goose_core.data.packing import SPLITS, TextData, pack_documents, split_windows
from goose_core.data.stream import BatchStream
from goose_core.data.text_tokenizer import TOKENIZER_FILES, TextTokenizer, byte_tokenizer, load_tokenizer
from goose_core.data.tokenizer import ByteTokenizer

__all__ = ["BatchStream", "ByteTokenizer", "CORPUS_PATH", "Document", "EOS_TOKEN", "EXTENSIONS", "PAD_ID",
           "PADDINGS", "SPLITS", "TOKENIZER_FILES", "TextData", "TextTokenizer", "byte_tokenizer", "corpus_ids",
           "expand_paths", "get_batch", "load_tokenizer", "pack_documents", "pad_batch", "read_documents",
           "shard_batch", "split_windows", "train_bpe_tokenizer"]
