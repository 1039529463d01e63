"""A user's text files read as documents: .txt, .jsonl (a "text" field), .parquet (a "text" column).

What a document is, per format::

    .txt       the whole file is one document (blank lines inside it are kept as text)
    .jsonl     one document per line: a JSON object whose "text" is a string (blank lines skipped)
    .parquet   one document per row of the "text" column (pyarrow reads it)

A folder stands for every file with one of these extensions (in any case) below it, recursively,
in sorted path order, hidden files and folders (a leading ".") left out; other files there are
ignored. A file named on its own must have one of the extensions. Text is UTF-8. Empty documents
are dropped (they would only add an end-of-document token). Plain ``json`` and pyarrow rather
than 🤗 ``datasets``: reading three formats is a few lines, and ``datasets`` would add an on-disk
cache, a network check to switch off, and a dozen packages for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ["EXTENSIONS", "Document", "expand_paths", "read_documents"]

#: The file types a document can come from.
EXTENSIONS = (".txt", ".jsonl", ".parquet")

PathLike = str | os.PathLike


class Document(NamedTuple):
    """One document's text and where it came from: its file and, in a .jsonl or .parquet file, its
    line (from 1) or row (from 0)."""

    text: str
    file: str
    item: int | None = None

    @property
    def source(self) -> str:
        """``file``, ``file:line`` or ``file:row``, for a message."""
        return self.file if self.item is None else f"{self.file}:{self.item}"


def _as_list(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _kind(path: Path) -> str:
    """The extension, lower case: "A.TXT" is a .txt file."""
    return path.suffix.lower()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """The files ``paths`` stand for, folders expanded (recursively, sorted), in the order given.

    Raises:
        ValueError: no path given, a path that does not exist, a file with another extension,
            or nothing readable in all of them.
    """
    given = _as_list(paths)
    if not given:
        raise ValueError(f"no data files given; pass files or folders of {'/'.join(EXTENSIONS)} files")
    files: list[Path] = []
    for path in given:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) in EXTENSIONS
                           and not _hidden(p, path))
            if not found:
                raise ValueError(f"folder {path} holds no {'/'.join(EXTENSIONS)} files; "
                                 "put the text there or name the files")
            files += found
        elif path.is_file():
            if _kind(path) not in EXTENSIONS:
                raise ValueError(f"{path}: unknown extension {path.suffix!r}; goose reads "
                                 f"{', '.join(EXTENSIONS)} (rename the file or convert it)")
            files.append(path)
        else:
            raise ValueError(f"data path {path} does not exist")
    return files


def _read_txt(path: Path) -> Iterable[Document]:
    yield Document(path.read_text(encoding="utf-8"), str(path))


def _read_jsonl(path: Path) -> Iterable[Document]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not a JSON object ({error.msg}); each line of a .jsonl file "
                                 'must be one object such as {"text": "..."}') from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{where}: the line has no string "text" field; each line must be an '
                                 'object such as {"text": "..."}')
            yield Document(text, str(path), number)


def _read_parquet(path: Path) -> Iterable[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow; pip install 'goose[train]' "
                         "(or pyarrow) or convert the file to .jsonl") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise ValueError(f'{path}: no "text" column (columns: {table.column_names}); '
                         'rename the column holding the documents to "text"')
    for row, text in enumerate(table.column("text").to_pylist()):
        if not isinstance(text, str):
            raise ValueError(f'{path}: row {row} of the "text" column is {text!r}, not a string; '
                             "drop or fill that row")
        yield Document(text, str(path), row)


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _read(path: Path) -> list[Document]:
    try:
        return list(_READERS[_kind(path)](path))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); "
                         "convert the file to UTF-8") from None


def read_documents(paths: PathLike | Sequence[PathLike]) -> list[Document]:
    """Every non-empty document of ``paths`` (see the module docstring), in a fixed order.

    Raises:
        ValueError: as :func:`expand_paths`, a malformed line or row (naming ``file:line``), or
            no text at all.
    """
    files = expand_paths(paths)
    documents = [doc for path in files for doc in _read(path) if doc.text]
    if not documents:
        raise ValueError(f"the data files hold no text: {', '.join(map(str, files))}")
    return documents
