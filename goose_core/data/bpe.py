"""train_bpe_tokenizer: a byte-level BPE trained offline with 🤗 ``tokenizers``, saved as a 🤗 folder.

The folder (``tokenizer.json`` + ``tokenizer_config.json``) loads with :func:`load_tokenizer`
and with ``transformers.AutoTokenizer.from_pretrained``. Byte-level, as GPT-2's: any text
encodes (no unknown token), ``<|endoftext|>`` is the EOS and the pad token. The vocabulary,
special and reserved tokens included, is a multiple of ``multiple_of`` (8): a corpus too small
to learn ``vocab_size`` tokens gets ``<|reserved_k|>`` tokens up to the next multiple, so a
model whose embedding has ``len(tokenizer)`` rows splits over 2, 4 or 8 tensor-parallel ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from goose_core.data.documents import read_documents

__all__ = ["EOS_TOKEN", "train_bpe_tokenizer"]

#: The end-of-document (and padding) token, GPT-2's spelling.
EOS_TOKEN = "<|endoftext|>"

# 256 byte symbols + EOS: a smaller vocabulary cannot hold the alphabet.
_ALPHABET = 256 + 1


def _texts(texts_or_paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """A ``Path`` (or a string naming an existing file or folder) is read; other strings are text."""
    for item in texts_or_paths:
        is_path = isinstance(item, os.PathLike) or ("\n" not in item and len(item) < 4096 and os.path.exists(item))
        if is_path:
            yield from (d.text for d in read_documents(item))
        else:
            yield str(item)


def train_bpe_tokenizer(texts_or_paths: Iterable[str | os.PathLike] | str | os.PathLike, out_dir: str | os.PathLike,
                        vocab_size: int = 4096, min_frequency: int = 2, multiple_of: int = 8) -> Path:
    """Train a byte-level BPE on ``texts_or_paths`` and save it into ``out_dir``; return the folder.

    Training is deterministic (the same texts give the same ``tokenizer.json``), but train it once
    and share the folder rather than once per rank.

    Args:
        texts_or_paths: texts, or files / folders in the formats of :func:`read_documents`
            (a single path or text is accepted too).
        vocab_size: the vocabulary to learn, special tokens included; a multiple of ``multiple_of``.
        min_frequency: a pair merges only if seen this often.

    Raises:
        ValueError: ``vocab_size`` below 257 or not a multiple of ``multiple_of``, or no text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < _ALPHABET or vocab_size % multiple_of:
        raise ValueError(f"vocab_size {vocab_size!r} must be an integer >= {_ALPHABET} (256 bytes + EOS) and a "
                         f"multiple of {multiple_of}, so a tensor-parallel embedding splits; e.g. 4096")
    if isinstance(texts_or_paths, (str, os.PathLike)):
        texts_or_paths = [texts_or_paths]
    texts = [t for t in _texts(texts_or_paths) if t]
    if not texts:
        raise ValueError("no text to train the tokenizer on; pass texts or files that hold some")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    short = -tokenizer.get_vocab_size(with_added_tokens=True) % multiple_of
    tokenizer.add_special_tokens([f"<|reserved_{k}|>" for k in range(short)])
    # model_max_length: documents are longer than any window and cut by the packer, not here.
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                 model_max_length=1 << 40)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out
