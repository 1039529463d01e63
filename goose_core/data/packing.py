"""TextData: documents tokenized, packed into fixed windows the way 🤗's run_clm packs, split into
train and eval.

Packing (``group_texts`` of 🤗's ``run_clm.py`` with ``block_size = seq_len``)::

    documents   [a a a] [b b] [c c c c]              E = the tokenizer's EOS, after every document
    stream      a a a E b b E c c c c E
    windows     |a a a E|b b E c|c c c c|E           seq_len = 4: the tail shorter than a window
                                                     is dropped

A window is a row of ``input_ids`` and, unchanged, of ``labels``: 🤗 causal LMs shift inside
``forward``, so a window of ``seq_len`` tokens trains ``seq_len - 1`` next-token targets (the
pair across two windows is not one). Attention crosses document boundaries inside a window, as
in 🤗's packing: no attention mask, no position reset; EOS is what tells the model a document
ended. A tokenizer without EOS (``eos_id`` None) concatenates documents with no separator, as
run_clm does with a tokenizer that adds none.

The split is by window: ``eval_fraction`` of the windows (at least one when the fraction is
above 0), drawn by a generator seeded by ``seed``, form the held-out part; both parts keep the
stream's order. Windows never overlap, so no eval token is a train token (the text of one
document may fall on both sides). With a ``cache_dir``, the token stream is kept on disk (see
:mod:`goose_core.data.token_cache`) and a restart skips tokenizing.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from goose_core.data.documents import read_documents
from goose_core.data.token_cache import cache_key, load_tokens, save_tokens

__all__ = ["SPLITS", "TextData", "pack_documents", "split_windows"]

#: The parts of a :class:`TextData`.
SPLITS = ("train", "eval")

Batch = dict[str, Tensor]

# Documents are encoded this many at a time: batch-parallel, with bounded memory for a long list.
_ENCODE_CHUNK = 1024


def pack_documents(token_lists: Sequence[Sequence[int]], eos_id: int | None) -> Tensor:
    """Every document's ids followed by ``eos_id`` (if any), concatenated: 1-D int64."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        if eos_id is not None:
            flat.append(eos_id)
    return torch.tensor(flat, dtype=torch.long)


def split_windows(windows: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, eval)`` window indices, each ascending: a seeded ``eval_fraction`` held out."""
    held = 0 if eval_fraction == 0 else max(1, int(windows * eval_fraction))
    chosen = set(random.Random(f"goose-split:{seed}").sample(range(windows), held))
    return [i for i in range(windows) if i not in chosen], sorted(chosen)


def _digest(windows: Tensor) -> str:
    head = f"{tuple(windows.shape)}".encode()
    return hashlib.sha256(head + windows.contiguous().numpy().tobytes()).hexdigest()[:16]


def _check_args(seq_len: Any, eval_fraction: Any, seed: Any) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len {seq_len!r} must be an integer >= 2 (a window of one token has no target)")
    if not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction {eval_fraction!r} must lie in [0, 1), e.g. 0.05; 0 holds out nothing")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed {seed!r} must be an integer")


class TextData:
    """A user's files as packed windows: ``train`` and ``eval``, int64 ``[windows, seq_len]``.

    Args:
        paths: files and folders (see :mod:`goose_core.data.documents` for the formats).
        tok: a :class:`~goose_core.data.TextTokenizer` (``load_tokenizer``), or anything with
            ``encode``, ``eos_id`` and ``vocab_size``.
        seq_len: tokens per window (the model's sequence length).
        eval_fraction: the share of windows held out for evaluation.
        seed: draws the held-out windows.
        cache_dir: a folder to keep the token stream in between runs (None: tokenize every time).

    Raises:
        ValueError: bad arguments, bad files (naming the file), ids outside the tokenizer's
            vocabulary, or text too short for one train window (and one eval window).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], tok: Any, seq_len: int,
                 eval_fraction: float = 0.05, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> None:
        _check_args(seq_len, eval_fraction, seed)
        self.seq_len, self.eval_fraction, self.seed, self.tokenizer = seq_len, eval_fraction, seed, tok
        documents = read_documents(paths)
        self.documents = len(documents)
        #: The files the documents came from, in reading order.
        self.files = list(dict.fromkeys(d.file for d in documents))
        stream = self._tokens([d.text for d in documents], cache_dir)
        self.tokens = len(stream)
        count = self.tokens // seq_len
        needed = 1 if eval_fraction == 0 else 2
        if count < needed:
            raise ValueError(f"{self.named_files()}: {self.tokens} tokens make {count} windows of {seq_len}, fewer than "
                             f"the {needed} a train and an eval part need; give more text or a smaller seq_len")
        self.dropped = self.tokens - count * seq_len
        windows = stream[: count * seq_len].view(count, seq_len)
        train, held = split_windows(count, eval_fraction, seed)
        self.train, self.eval = windows[train], windows[held]
        self._fingerprints = {"train": _digest(self.train), "eval": _digest(self.eval)}

    def named_files(self, most: int = 3) -> str:
        """The files, for a message: the first ``most`` and how many more."""
        more = f" and {len(self.files) - most} more" if len(self.files) > most else ""
        return ", ".join(self.files[:most]) + more

    def _tokens(self, texts: list[str], cache_dir: str | os.PathLike | None) -> Tensor:
        """The packed stream of ``texts``: from the cache if it holds it, else tokenized (and cached)."""
        key = cache_key(texts, self.tokenizer) if cache_dir is not None else None
        stream = load_tokens(cache_dir, key) if key is not None else None
        self.cached = stream is not None
        if stream is None:
            stream = pack_documents(self._encode(texts), getattr(self.tokenizer, "eos_id", None))
            if key is not None:
                save_tokens(cache_dir, key, stream)
        self._check_ids(stream)
        return stream

    def _encode(self, texts: list[str]) -> list[list[int]]:
        batch = getattr(self.tokenizer, "encode_batch", None)
        if batch is None:
            return [list(self.tokenizer.encode(t)) for t in texts]
        return [ids for i in range(0, len(texts), _ENCODE_CHUNK) for ids in batch(texts[i : i + _ENCODE_CHUNK])]

    def _check_ids(self, stream: Tensor) -> None:
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if len(stream) and vocab is not None and not 0 <= int(stream.min()) <= int(stream.max()) < vocab:
            raise ValueError(f"the tokenizer produced ids in [{int(stream.min())}, {int(stream.max())}], "
                             f"outside its vocab_size {vocab}; its vocab_size must count every id")

    def split(self, name: str) -> Tensor:
        """The windows of part ``name`` (one of :data:`SPLITS`)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        return self.train if name == "train" else self.eval

    def fingerprint(self, name: str) -> str:
        """A digest of part ``name``'s windows: any change of files, tokenizer, seq_len or split changes it."""
        self.split(name)
        return self._fingerprints[name]

    def eval_batches(self, batch_size: int) -> list[Batch]:
        """The eval windows as a fixed list of full batches, in stream order (a partial last one dropped).

        Raises:
            ValueError: fewer eval windows than ``batch_size``.
        """
        if len(self.eval) < batch_size:
            raise ValueError(f"the eval part holds {len(self.eval)} windows, fewer than the batch size {batch_size}; "
                             "raise eval_fraction, give more text, or lower the batch size")
        rows = len(self.eval) // batch_size * batch_size
        return [{"input_ids": w.clone(), "labels": w.clone()} for w in self.eval[:rows].split(batch_size)]

    def summary(self) -> str:
        """One line for a log: documents, tokens, windows of each part."""
        name = getattr(self.tokenizer, "name", type(self.tokenizer).__name__)
        eos = getattr(self.tokenizer, "eos_id", None)
        ends = "no EOS between documents" if eos is None else f"EOS {eos} after each"
        return (f"{self.documents} documents, {self.tokens} tokens ({name}, {ends}"
                f"{', from the cache' if self.cached else ''}) -> windows of {self.seq_len}: "
                f"train {len(self.train)}, eval {len(self.eval)}, {self.dropped} tail tokens dropped")
