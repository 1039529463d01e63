"""goose train survives kill -9: a tp2 x pp2 x dp2 run from a local BPE tokenizer folder and local
.jsonl + .txt files, killed mid-run and started again with the same command, logs the same losses
bit for bit as the run nobody killed; its checkpoint resumed at tp1 x pp2 x dp4 continues the
same token stream (losses at PARALLEL: another layout sums in another order)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from goose_core.data import CORPUS_PATH, BatchStream, train_bpe_tokenizer
from goose_core.distributed.launch import RankError, spawn
from goose_core.testing import EXACT, PARALLEL
from goose_core.train.loop import KILL_ENV
from goose_core.train.watch import read_jsonl

STEPS, EVERY = 6, 2
KILLED_RANK, KILLED_AFTER = 5, 5  # a rank of the second stage dies after step 5: step 4's checkpoint is the latest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BPE tokenizer folder trained here and two data files: one .jsonl, one .txt."""
    root = tmp_path_factory.mktemp("train")
    text = CORPUS_PATH.read_text(encoding="utf-8")[:24_000]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[::2]),
                                     encoding="utf-8")
    (root / "more.txt").write_text("\n\n".join(paragraphs[1::2]), encoding="utf-8")
    tokenizer = train_bpe_tokenizer([root / "docs.jsonl", root / "more.txt"], root / "tokenizer", vocab_size=384)
    return {"root": root, "tokenizer": tokenizer, "jsonl": root / "docs.jsonl", "txt": root / "more.txt"}


def _argv(inputs: dict[str, Path], name: str, tp: int = 2, pp: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    run = inputs["root"] / name
    return ["--model", "llama", "--tokenizer", str(inputs["tokenizer"]), "--data", str(inputs["jsonl"]),
            str(inputs["txt"]), "--seq-len", "32", "--batch-size", "8", "--microbatches", "2", "--tp", str(tp),
            "--pp", str(pp), "--zero", "--dtype", "float64", "--steps", str(STEPS), "--lr", "3e-3", "--warmup", "2",
            "--checkpoint-dir", str(run / "checkpoints"), "--checkpoint-every", str(EVERY), "--keep", "2",
            "--log-jsonl", str(run / "log.jsonl"), "--no-progress", *extra]


def _train(argv: list[str], kill: str | None = None, plant: str | None = None) -> int:
    """One rank of ``goose train argv``. ``kill``: "RANK:STEP" (that rank SIGKILLs itself then);
    ``plant="stream"``: a resume that does not restore the data stream's position (a planted bug)."""
    if kill is not None:
        os.environ[KILL_ENV] = kill
    if plant == "stream":
        BatchStream.load_state_dict = lambda self, state: None  # type: ignore[method-assign]
    from goose_core.train.cli import train_main

    return train_main(argv)


def _losses(log: Path) -> dict[int, float]:
    records = read_jsonl(log)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"the log holds each step once, in order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _within(got: dict[int, float], want: dict[int, float], tol: Any) -> list[str]:
    return [f"step {s}: {got[s]!r} vs {want[s]!r}" for s in got
            if not abs(got[s] - want[s]) <= tol.atol + tol.rtol * abs(want[s])]


def test_kill_9_then_the_same_command_is_bit_identical_and_resumes_at_another_layout(
        inputs: dict[str, Path]) -> None:
    root = inputs["root"]
    # The run nobody kills (with --verify 2: the layout beside one device before training).
    spawn(_train, 8, _argv(inputs, "whole", extra=("--verify", "2")), timeout=240)
    whole = _losses(root / "whole" / "log.jsonl")
    assert sorted(whole) == list(range(1, STEPS + 1))
    assert [p.name for p in sorted((root / "whole" / "checkpoints").glob("step_*"))] == \
        ["step_00000004", "step_00000006"], "--keep 2 keeps the last two"

    # kill -9 of rank 5 after step 5, then the same command: it resumes from step 4's checkpoint.
    argv = _argv(inputs, "killed")
    with pytest.raises(RankError, match=f"rank {KILLED_RANK}"):
        spawn(_train, 8, argv, f"{KILLED_RANK}:{KILLED_AFTER}", timeout=240)
    assert max(_losses(root / "killed" / "log.jsonl")) <= KILLED_AFTER
    spawn(_train, 8, argv, timeout=240)
    again = _losses(root / "killed" / "log.jsonl")
    assert again == whole, "losses after kill -9 and the same command differ from the uninterrupted run"
    assert EXACT.atol == EXACT.rtol == 0  # == above is EXACT
    resumed_from = [r["resumed_from"] for r in read_jsonl(root / "killed" / "log.jsonl") if "resumed_from" in r]
    assert resumed_from == [4]

    # Step 4's checkpoint at tp1 x pp2 x dp4: the same token stream, the same losses at PARALLEL.
    step4 = str(root / "whole" / "checkpoints" / "step_00000004")
    spawn(_train, 8, _argv(inputs, "dp4", tp=1, extra=("--resume", step4)), timeout=240)
    dp4 = _losses(root / "dp4" / "log.jsonl")
    assert sorted(dp4) == [5, 6]
    assert not _within(dp4, whole, PARALLEL)

    # Planted bug: a resume that forgets the stream's position trains on step 1's batches again.
    spawn(_train, 8, _argv(inputs, "planted", tp=1, extra=("--resume", step4)), None, "stream", timeout=240)
    planted = _losses(root / "planted" / "log.jsonl")
    assert _within(planted, whole, PARALLEL), "a resume without the stream's position went unnoticed"


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_kill_9_resume_is_bit_identical_in_low_precision(inputs: dict[str, Path], dtype: str) -> None:
    """fp32, and bf16 with fp32 masters (MasterWeights, no ZeRO): CPU kernels are deterministic,
    so the resumed run must repeat the uninterrupted one bit for bit too."""
    root = inputs["root"]
    extra = ("--dtype", dtype, "--steps", "4", "--no-zero")
    spawn(_train, 4, _argv(inputs, f"{dtype}-whole", extra=extra), timeout=180)
    argv = _argv(inputs, f"{dtype}-killed", extra=extra)
    with pytest.raises(RankError, match="rank 3"):
        spawn(_train, 4, argv, "3:3", timeout=180)
    spawn(_train, 4, argv, timeout=180)
    whole, again = _losses(root / f"{dtype}-whole" / "log.jsonl"), _losses(root / f"{dtype}-killed" / "log.jsonl")
    assert sorted(whole) == [1, 2, 3, 4] and again == whole
