"""TextTokenizer: one interface over a local 🤗 tokenizer folder or goose's byte tokenizer, offline."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from goose_core.data.tokenizer import ByteTokenizer

__all__ = ["TOKENIZER_FILES", "TextTokenizer", "byte_tokenizer", "load_tokenizer"]

#: The files that make a folder a 🤗 tokenizer (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class TextTokenizer:
    """What the data layer needs of a tokenizer.

    ``encode`` adds no special tokens (no BOS, no EOS): the packer puts ``eos_id`` after each
    document itself. Every id lies in ``[0, vocab_size)``; ``vocab_size`` counts added special
    tokens (``len(tokenizer)`` in 🤗's terms), so a model's embedding must have at least that
    many rows. ``pad_id`` is the tokenizer's pad token, else its EOS, else 0. ``fingerprint``
    changes whenever the vocabulary or the rules do (it keys anything derived from the tokens).
    """

    name: str
    vocab_size: int
    eos_id: int | None
    pad_id: int
    fingerprint: str
    _encode_batch: Callable[[list[str]], list[list[int]]] = field(repr=False)
    _decode: Callable[[list[int]], str] = field(repr=False)
    #: The 🤗 folder it was loaded from; None for the byte tokenizer.
    folder: Path | None = None

    def encode(self, text: str) -> list[int]:
        return self._encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of many texts at once (🤗's fast tokenizers encode them in parallel)."""
        return self._encode_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])

    def save_pretrained(self, out_dir: str | os.PathLike) -> list[Path]:
        """Copy the tokenizer's files into ``out_dir`` (beside an exported model, say), so that
        ``load_tokenizer(model=out_dir)`` finds it; the byte tokenizer has none. Returns the copies."""
        if self.folder is None:
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(self.folder / name, out / name)) for name in _RULE_FILES
                if (self.folder / name).is_file()]


def byte_tokenizer() -> TextTokenizer:
    """Each UTF-8 byte a token (256 ids, no files). Byte 0 (NUL, absent from text) ends a document."""
    byte = ByteTokenizer()
    return TextTokenizer(name="bytes", vocab_size=byte.vocab_size, eos_id=0, pad_id=0, fingerprint="bytes",
                         _encode_batch=lambda texts: [list(t.encode("utf-8")) for t in texts],
                         _decode=byte.decode)


#: The files whose bytes define a 🤗 tokenizer's behaviour (its fingerprint).
_RULE_FILES = TOKENIZER_FILES + ("merges.txt", "special_tokens_map.json", "added_tokens.json")


def _holds_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _fingerprint(folder: Path) -> str:
    """The folder's rule files and the versions of the libraries that apply them."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(f"{transformers.__version__}\0{tokenizers.__version__}\0".encode())
    for name in _RULE_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def _from_folder(folder: Path) -> TextTokenizer:
    """A 🤗 tokenizer folder through ``AutoTokenizer`` (local files only)."""
    from transformers import AutoTokenizer

    try:
        hf: Any = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... by format
        raise ValueError(f"could not load the tokenizer in {folder}: {type(error).__name__}: {error}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: batch-parallel, and no warning about texts longer
        # than model_max_length (documents are cut into windows later).
        def encode_batch(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        def encode_batch(texts: list[str]) -> list[list[int]]:
            return [hf.encode(t, add_special_tokens=False) for t in texts]
    eos = hf.eos_token_id
    pad = hf.pad_token_id if hf.pad_token_id is not None else eos if eos is not None else 0
    return TextTokenizer(name=folder.name or str(folder), vocab_size=len(hf), eos_id=eos, pad_id=pad,
                         fingerprint=_fingerprint(folder), _encode_batch=encode_batch,
                         _decode=lambda ids: hf.decode(ids), folder=folder)


def load_tokenizer(tokenizer: str | os.PathLike | None = None,
                   model: str | os.PathLike | None = None) -> TextTokenizer:
    """The tokenizer a run uses; never touches the network.

    ``tokenizer``, a local 🤗 tokenizer folder, wins. Without it: the ``model`` folder's
    tokenizer if ``model`` is a folder holding one (a ``save_pretrained`` model folder usually
    does), else goose's byte tokenizer (``model`` may be a family name, or a folder of weights
    only).

    Raises:
        ValueError: ``tokenizer`` is not a folder, holds none of :data:`TOKENIZER_FILES`, or
            🤗 cannot load it.
    """
    if tokenizer is not None:
        folder = Path(tokenizer)
        if folder.is_file():
            raise ValueError(f"tokenizer {folder} is a file; pass the folder that holds it ({folder.parent})")
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder {folder} does not exist; pass a local 🤗 tokenizer folder "
                             "(one with tokenizer.json), or leave it out for the byte tokenizer")
        if not _holds_tokenizer(folder):
            raise ValueError(f"{folder} holds no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there; "
                             "save one with tokenizer.save_pretrained(folder) or train_bpe_tokenizer")
        return _from_folder(folder)
    if model is not None and Path(model).is_dir() and _holds_tokenizer(Path(model)):
        return _from_folder(Path(model))
    return byte_tokenizer()
