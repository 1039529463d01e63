"""BatchStream: deterministic, a permutation per epoch, resumable from a JSON position (a planted
restart of the epoch caught), the same global batch at every layout, eval apart from train, and
a position from other data refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from goose_core import ParallelContext
from goose_core.data import CORPUS_PATH, BatchStream, TextData, byte_tokenizer, shard_batch
from goose_core.testing import run_distributed

SEQ_LEN = 16
BATCH = 8


@pytest.fixture(scope="module")
def data() -> TextData:
    # 54 kB of bytes in windows of 16: ~3,200 windows, far too many to read in a test; a slice.
    return TextData(CORPUS_PATH, byte_tokenizer(), SEQ_LEN)


@pytest.fixture
def small(tmp_path: Path) -> TextData:
    """21 train windows: batches of 8 straddle every epoch's end."""
    (tmp_path / "a.txt").write_text(CORPUS_PATH.read_text(encoding="utf-8")[: 22 * SEQ_LEN - 1], encoding="utf-8")
    return TextData(tmp_path / "a.txt", byte_tokenizer(), SEQ_LEN)


def take(stream: BatchStream, count: int) -> list[torch.Tensor]:
    return [stream.next()["input_ids"] for _ in range(count)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_streams_are_deterministic_and_seeded(small: TextData) -> None:
    a, b = take(BatchStream(small, BATCH, seed=1), 12), take(BatchStream(small, BATCH, seed=1), 12)
    assert same(a, b) and not same(a, take(BatchStream(small, BATCH, seed=2), 12))
    batch = BatchStream(small, BATCH).next()
    assert batch["input_ids"].shape == (BATCH, SEQ_LEN) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_each_epoch_reads_every_window_once(small: TextData) -> None:
    stream, windows = BatchStream(small, BATCH), len(small.train)
    batches = -(-3 * windows // BATCH)  # enough for three epochs
    rows = [small.train.tolist().index(r) for b in take(stream, batches) for r in b.tolist()]
    epochs = [rows[e * windows : (e + 1) * windows] for e in range(3)]
    assert all(sorted(e) == list(range(windows)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch
    assert divmod(batches * BATCH, windows) == (stream.epoch, stream.index) == (3, 1)


def resumes(make: Callable[[], BatchStream], before: int, after: int) -> bool:
    """Whether a stream saved after ``before`` batches, its state through JSON, continues as one never stopped."""
    whole = take(make(), before + after)
    first = make()
    take(first, before)
    state = json.loads(json.dumps(first.state_dict()))
    again = make()
    again.load_state_dict(state)
    return same(take(again, after), whole[before:])


class RestartingStream(BatchStream):
    """Planted: a resume that keeps the epoch but starts its order over."""

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({**state, "index": 0})


class ReseededStream(BatchStream):
    """Planted: every epoch in the first epoch's order (the epoch left out of the seed)."""

    def order(self, epoch: int) -> list[int]:
        return super().order(0)


def test_resume_continues_the_same_stream(small: TextData) -> None:
    for before in (1, 2, 3, 5):  # inside the first epoch, at and across its end
        assert resumes(lambda: BatchStream(small, BATCH, seed=4), before, 6)
    assert not resumes(lambda: RestartingStream(small, BATCH, seed=4), 1, 6)
    # At another batch size the windows keep coming in the same order.
    first = BatchStream(small, 4)
    take(first, 3)
    other = BatchStream(small, 6)
    other.load_state_dict(first.state_dict())
    whole = torch.cat(take(BatchStream(small, 6), 7))
    assert torch.equal(torch.cat(take(other, 5)), whole[12:42])


def test_the_planted_reseed_is_caught(small: TextData) -> None:
    windows = len(small.train)
    for cls, repeats in ((BatchStream, False), (ReseededStream, True)):
        epochs = torch.cat(take(cls(small, windows), 2))
        assert torch.equal(epochs[:windows], epochs[windows:]) == repeats


def test_global_batches_do_not_depend_on_dp(data: TextData) -> None:
    batches = take(BatchStream(data, BATCH, seed=5), 3)
    for dp in (1, 2, 4):
        streams = [BatchStream(data, BATCH, seed=5) for _ in range(dp)]  # one per rank
        for batch in batches:
            shards = [shard_batch(s.next(), r, dp)["input_ids"] for r, s in enumerate(streams)]
            assert torch.equal(torch.cat(shards), batch)


def _gather(ctx: ParallelContext, shard: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(ctx.dp_size)]
    dist.all_gather(parts, shard, group=ctx.data_parallel_group)
    return torch.cat(parts)


def _ranks_take(ctx: ParallelContext, path: str, state: dict, steps: int) -> tuple[list, list]:
    """Each rank's own stream from a saved position; its dp shard gathered back over the dp group.
    Beside it, planted: shards cut over the whole world (a sampler's default), as tp peers must not be."""
    stream = BatchStream(TextData(path, byte_tokenizer(), SEQ_LEN), BATCH, seed=5)
    stream.load_state_dict(state)
    kept, planted = [], []
    for _ in range(steps):
        batch = stream.next()["input_ids"]
        kept.append(_gather(ctx, shard_batch({"x": batch}, ctx.dp_rank, ctx.dp_size)["x"]))
        planted.append(_gather(ctx, shard_batch({"x": batch}, ctx.rank, ctx.world_size)["x"]))
    return kept, planted


def test_every_rank_of_tp2_dp2_draws_the_same_global_batches(data: TextData) -> None:
    """Forked ranks (tp peers included) resume one saved position and agree with one process."""
    stream = BatchStream(data, BATCH, seed=5)
    take(stream, 2)
    state = stream.state_dict()
    expected = take(stream, 3)
    for kept, planted in run_distributed(_ranks_take, 2, 1, 2, str(CORPUS_PATH), state, 3, timeout=60):
        assert same(kept, expected) and not same(planted, expected)


def test_eval_is_apart_from_train(tmp_path: Path) -> None:
    # Counting text: no two windows are equal, so rows stand for window indices.
    (tmp_path / "n.txt").write_text(" ".join(f"{i:05d}" for i in range(2000)), encoding="utf-8")
    data = TextData(tmp_path / "n.txt", byte_tokenizer(), SEQ_LEN, eval_fraction=0.1)
    eval_rows, train_rows = {tuple(r) for r in data.eval.tolist()}, {tuple(r) for r in data.train.tolist()}
    assert len(train_rows) == len(data.train) and len(eval_rows) == len(data.eval) > 0
    assert not train_rows & eval_rows
    for split, rows in (("eval", eval_rows), ("train", train_rows)):
        seen = {tuple(r) for b in take(BatchStream(data, BATCH, split=split), -(-len(rows) // BATCH))
                for r in b.tolist()}
        assert seen == rows


def test_positions_from_other_data_are_refused(small: TextData, data: TextData, tmp_path: Path) -> None:
    stream = BatchStream(small, BATCH, seed=3)
    state = stream.state_dict()
    with pytest.raises(ValueError, match=f"saved stream read {len(small.train)} train windows .* this data has "
                                         f"{len(data.train)}.*use the same ones to resume"):
        BatchStream(data, BATCH, seed=3).load_state_dict(state)
    # The same number of windows, other text: the fingerprint tells them apart.
    (tmp_path / "b.txt").write_text("x" * (22 * SEQ_LEN - 1), encoding="utf-8")
    other = TextData(tmp_path / "b.txt", byte_tokenizer(), SEQ_LEN)
    assert len(other.train) == len(small.train)
    with pytest.raises(ValueError, match="fingerprint"):
        BatchStream(other, BATCH, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="the saved stream has seed 3, this one 4; resume with seed 3"):
        BatchStream(small, BATCH, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"not a BatchStream state: \['index'\] missing"):
        stream.load_state_dict({k: v for k, v in state.items() if k != "index"})
    with pytest.raises(ValueError, match="index 21 lies outside 21 windows"):
        stream.load_state_dict({**state, "index": 21})


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 22}, "a.txt: the train part holds 21 windows of 16 tokens, fewer than the batch size 22"),
    ({"batch_size": 0}, "batch_size 0 must be a positive integer"),
    ({"batch_size": 2, "split": "test"}, r"unknown split 'test'; choose one of \('train', 'eval'\)"),
    ({"batch_size": 2, "split": "eval"}, "the eval part holds 1 windows of 16 tokens, fewer than the batch size 2"),
])
def test_bad_streams_are_clear_errors(small: TextData, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchStream(small, **kwargs)
