"""A user's data: files read as documents, tokenizer folders loaded offline, a BPE trained into one,
documents packed exactly into windows and split into train and eval, and every bad input's error."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from goose_core.data import (CORPUS_PATH, EOS_TOKEN, TextData, TextTokenizer, byte_tokenizer, load_tokenizer,
                             pack_documents, packing, read_documents, split_windows, train_bpe_tokenizer)
from goose_core.data.token_cache import cache_key


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, column: str, values: list[object]) -> Path:
    pq.write_table(pa.table({column: values}), path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe_tokenizer([CORPUS_PATH], tmp_path_factory.mktemp("tok") / "bpe", vocab_size=512)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three formats, a nested folder, and files a folder read must skip."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("Second file.\n\nIts blank line stays inside.", encoding="utf-8")
    write_jsonl(root / "a.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two", "id": 7}])
    (root / "a.jsonl").write_text((root / "a.jsonl").read_text() + "\n", encoding="utf-8")  # a blank line
    write_parquet(root / "sub" / "c.parquet", "text", ["row zero", "row one"])
    (root / "notes.md").write_text("not data", encoding="utf-8")
    (root / ".hidden.txt").write_text("not data either", encoding="utf-8")
    return root


def test_folders_read_every_format_in_sorted_order(folder: Path) -> None:
    docs = read_documents(folder)
    assert [d.text for d in docs] == ["one", "two", "Second file.\n\nIts blank line stays inside.",
                                      "row zero", "row one"]
    assert [Path(d.source).name for d in docs] == ["a.jsonl:1", "a.jsonl:3", "b.txt", "c.parquet:0", "c.parquet:1"]
    # Files given one by one keep the order given.
    assert [d.text for d in read_documents([folder / "b.txt", folder / "a.jsonl"])][1:] == ["one", "two"]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def empty_folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: [], "no data files given"),
    (lambda d: d / "absent.txt", "absent.txt does not exist"),
    (lambda d: write_text(d / "x.csv", "t"), r"x.csv: unknown extension '.csv'"),
    (lambda d: empty_folder(d / "empty"), "holds no .txt/.jsonl/.parquet files"),
    (lambda d: write_jsonl(d / "x.jsonl", [{"text": "ok"}, {"body": "no text"}]), r"x.jsonl:2: the line has no"),
    (lambda d: write_jsonl(d / "x.jsonl", [{"text": 5}]), r"x.jsonl:1: the line has no string \"text\""),
    (lambda d: write_text(d / "x.jsonl", '{"text": "a"}\n{oops\n'), r"x.jsonl:2: not a JSON object"),
    (lambda d: write_parquet(d / "x.parquet", "body", ["a"]), r'x.parquet: no "text" column \(columns: \[.body.\]\)'),
    (lambda d: write_parquet(d / "x.parquet", "text", ["a", None]), r"x.parquet: row 1 of the \"text\" column is None"),
    (lambda d: write_text(d / "x.txt", ""), "the data files hold no text"),
    (lambda d: write_bytes(d / "x.TXT", b"ok \xff"), r"x.TXT: not UTF-8 text \(byte 3: invalid start byte\)"),
])
def test_bad_files_are_clear_errors(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_documents(make(tmp_path))


def test_bpe_folder_loads_in_goose_and_in_transformers(tokenizer_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    def no_network(*args: object) -> None:
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok, hf = load_tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert tok.vocab_size == len(hf) == 512 and tok.vocab_size % 8 == 0
    assert tok.eos_id == tok.pad_id == hf.convert_tokens_to_ids(EOS_TOKEN)
    text = "Four score and seven years ago, naïve café ☕"
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False) and tok.decode(ids) == text
    assert max(ids) < tok.vocab_size and tok.encode_batch([text, "x"])[0] == ids
    # A model folder holding a tokenizer lends it; a weights-only folder or a family name: bytes.
    assert load_tokenizer(model=tokenizer_dir).fingerprint == tok.fingerprint
    assert load_tokenizer(model=tmp_path).name == load_tokenizer(model="llama").name == "bytes"
    # Saved beside a model, the tokenizer comes back from the model folder.
    assert load_tokenizer().save_pretrained(tmp_path / "model") == []
    assert {p.name for p in tok.save_pretrained(tmp_path / "model")} == {"tokenizer.json", "tokenizer_config.json"}
    assert load_tokenizer(model=tmp_path / "model").encode(text) == ids
    assert load_tokenizer().vocab_size == 256 and load_tokenizer().decode(load_tokenizer().encode(text)) == text


def test_tokenizer_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path} holds no tokenizer: none of tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="tokenizer folder .*nowhere does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{ broken")
    with pytest.raises(ValueError, match=f"tokenizer {tmp_path}/tokenizer.json is a file; pass the folder"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=f"could not load the tokenizer in {tmp_path}"):
        load_tokenizer(tmp_path)


def test_bpe_is_deterministic_and_a_multiple_of_8(tmp_path: Path) -> None:
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 3
    a, b = train_bpe_tokenizer(texts, tmp_path / "a", 512), train_bpe_tokenizer(texts, tmp_path / "b", 512)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # Too little text to learn 512 tokens: reserved tokens fill the vocabulary to a multiple of 8.
    small = load_tokenizer(a)
    assert small.vocab_size < 512 and small.vocab_size % 8 == 0
    assert max(small.encode("the cat sat on the log; a new word")) < small.vocab_size
    for bad in (500, 100):
        with pytest.raises(ValueError, match=f"vocab_size {bad} must be an integer >= 257"):
            train_bpe_tokenizer(texts, tmp_path / "c", bad)


def windows_in_order(data: TextData) -> torch.Tensor:
    """train and eval put back in stream order."""
    train, held = split_windows(len(data.train) + len(data.eval), data.eval_fraction, data.seed)
    rows = torch.empty(len(train) + len(held), data.seq_len, dtype=torch.long)
    rows[train], rows[held] = data.train, data.eval
    return rows


def packs_exactly(paths: Path, tok: TextTokenizer, seq_len: int) -> bool:
    """Whether the windows, back in stream order, are each document's ids then EOS, the tail cut."""
    data = TextData(paths, tok, seq_len, eval_fraction=0.25, seed=3)
    eos = [] if tok.eos_id is None else [tok.eos_id]
    stream = [i for doc in read_documents(paths) for i in tok.encode(doc.text) + eos]
    return (data.tokens, data.dropped) == (len(stream), len(stream) % seq_len) and \
        windows_in_order(data).flatten().tolist() == stream[: len(stream) - data.dropped]


def test_packing_is_run_clm_group_texts(folder: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    byte, bpe = byte_tokenizer(), load_tokenizer(tokenizer_dir)
    assert packs_exactly(folder, byte, 8) and packs_exactly(folder, bpe, 4)
    assert packs_exactly(folder, dataclasses.replace(byte, eos_id=None), 8)  # no EOS: plain concatenation
    data = TextData(folder, byte, 8, eval_fraction=0.25)
    assert data.documents == 5 and len(data.eval) == int(0.25 * (len(data.train) + len(data.eval)))
    assert data.train.dtype == torch.long and data.train.shape[1:] == (8,)
    # Planted: documents packed without their EOS.
    monkeypatch.setattr(packing, "pack_documents", lambda ids, eos: pack_documents(ids, None))
    assert not packs_exactly(folder, byte, 8)


def test_split_is_seeded_disjoint_and_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, held = split_windows(100, 0.1, seed=0)
    assert (train, held) == split_windows(100, 0.1, seed=0) and held != split_windows(100, 0.1, seed=1)[1]
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert split_windows(5, 0.01, 0)[1] != [] and split_windows(5, 0.0, 0) == (list(range(5)), [])

    # Counting text: no two windows are equal, so a row stands for its window.
    (tmp_path / "n.txt").write_text(" ".join(f"{i:05d}" for i in range(500)), encoding="utf-8")

    def apart() -> bool:
        data = TextData(tmp_path / "n.txt", byte_tokenizer(), 16, eval_fraction=0.1)
        train, held = ({tuple(r) for r in part.tolist()} for part in (data.train, data.eval))
        return not train & held and len(train) + len(held) == data.tokens // 16

    assert apart()
    # Planted: the held-out windows left in train too.
    monkeypatch.setattr(packing, "split_windows", lambda n, f, seed: (list(range(n)), split_windows(n, f, seed)[1]))
    assert not apart()


def test_the_token_cache_skips_tokenizing_and_misses_on_any_change(
        folder: Path, tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bpe, byte, cache = load_tokenizer(tokenizer_dir), byte_tokenizer(), tmp_path / "cache"

    def served_right(tok: TextTokenizer, seq_len: int = 4) -> bool:
        """Whether data read through the cache equals data tokenized afresh."""
        cached, fresh = TextData(folder, tok, seq_len, cache_dir=cache), TextData(folder, tok, seq_len)
        return torch.equal(cached.train, fresh.train) and torch.equal(cached.eval, fresh.eval)

    assert served_right(bpe) and len(list(cache.glob("tokens-*.pt"))) == 1
    refuses = dataclasses.replace(bpe, _encode_batch=lambda texts: pytest.fail("tokenized again"))
    assert TextData(folder, refuses, 8, cache_dir=cache).cached  # another seq_len reuses the entry
    (folder / "b.txt").write_text("Changed.", encoding="utf-8")
    assert not TextData(folder, bpe, 4, cache_dir=cache).cached and served_right(bpe)
    assert served_right(byte) and len(list(cache.glob("tokens-*.pt"))) == 3
    # Planted: a key blind to the tokenizer serves the bytes' ids to the BPE (ids that fit its
    # vocabulary, so only the comparison can tell).
    monkeypatch.setattr(packing, "cache_key", lambda texts, tok: cache_key(texts, byte))
    assert not served_right(bpe)


def test_eval_batches_are_full_fixed_batches() -> None:
    data = TextData(CORPUS_PATH, byte_tokenizer(), seq_len=64, eval_fraction=0.05)
    batches = data.eval_batches(8)
    assert len(batches) == len(data.eval) // 8 and all(b["input_ids"].shape == (8, 64) for b in batches)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), data.eval[: len(batches) * 8])
    assert all(torch.equal(b["labels"], b["input_ids"]) for b in batches)
    with pytest.raises(ValueError, match=f"the eval part holds {len(data.eval)} windows, fewer than the batch"):
        data.eval_batches(len(data.eval) + 1)


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 1}, "seq_len 1 must be an integer >= 2"),
    ({"seq_len": 8, "eval_fraction": 1.0}, r"eval_fraction 1.0 must lie in \[0, 1\)"),
    ({"seq_len": 8, "seed": "0"}, "seed '0' must be an integer"),
    ({"seq_len": 40}, r"tiny.txt: 22 tokens make 0 windows of 40, fewer than the 2 a train and an eval part need"),
    ({"seq_len": 20}, "22 tokens make 1 windows of 20, fewer than the 2"),
])
def test_bad_arguments_and_too_little_text(tmp_path: Path, kwargs: dict, message: str) -> None:
    (tmp_path / "tiny.txt").write_text("twenty-one bytes long", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        TextData(tmp_path / "tiny.txt", byte_tokenizer(), **kwargs)
    assert len(TextData(tmp_path / "tiny.txt", byte_tokenizer(), 20, eval_fraction=0).train) == 1


def test_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    """A tokenizer whose vocab_size undercounts (an added token left out) would index past the embedding."""
    (tmp_path / "a.txt").write_text("x" * 100, encoding="utf-8")
    byte = byte_tokenizer()
    short = type(byte)(name="short", vocab_size=100, eos_id=0, pad_id=0, fingerprint="short",
                       _encode_batch=byte.encode_batch, _decode=byte.decode)
    with pytest.raises(ValueError, match=r"ids in \[0, 120\], outside its vocab_size 100"):
        TextData(tmp_path, short, 8)
