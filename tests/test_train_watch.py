"""What goose train shows: the JSONL log reads as one run across a resume, TensorBoard event
files, the loss PNG, the plain progress line, checkpoint rotation and the latest complete one."""

from __future__ import annotations

import io
import json
from pathlib import Path

from goose_core.checkpoint import atomic
from goose_core.train import checkpoints
from goose_core.train.watch import Board, JsonlLog, Progress, draw_losses, read_jsonl


def test_jsonl_drops_the_killed_runs_steps_past_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = JsonlLog(path, 0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    with path.open("a") as f:
        f.write('{"step": 4, "lo')  # the line a kill -9 cut short
    log = JsonlLog(path, 2)  # resumed from step 2's checkpoint
    log.write({"step": 3, "loss": 0.25})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert json.loads(path.read_text().splitlines()[0])["loss"] == 1.0


def test_tensorboard_png_and_progress(tmp_path: Path) -> None:
    board = Board(tmp_path / "tb", 0)
    board.write(1, {"loss": 2.0, "lr": 1e-3})
    board.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "TensorBoard event file written"
    png = draw_losses([(1, 2.0), (2, 1.5)], [(2, 1.7)], tmp_path / "loss.png", "a run", [1])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = io.StringIO()
    bar = Progress(0, 10, stream=out)
    bar.update(1, 2.5, 1234.0, "  eval 2.6")
    assert out.getvalue().startswith("step  1/10  loss 2.500000  1,234 tok/s  ETA ") and "eval 2.6" in out.getvalue()


def test_rotation_keeps_the_last_k_and_finds_the_latest_complete(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        path = checkpoints.folder(tmp_path, step)
        path.mkdir()
        (path / atomic.METADATA).write_text("")
    (tmp_path / "step_00000008.saving").mkdir()  # a save that died: no checkpoint
    broken = checkpoints.folder(tmp_path, 10)
    broken.mkdir()  # a folder without DCP's metadata: not complete
    assert checkpoints.latest(tmp_path) == checkpoints.folder(tmp_path, 6)
    assert checkpoints.rotate(tmp_path, 2) == [checkpoints.folder(tmp_path, 2)]
    assert [s for s, _ in checkpoints.complete_checkpoints(tmp_path)] == [4, 6]
    checkpoints.folder(tmp_path, 6).rename(atomic.old(checkpoints.folder(tmp_path, 6)))  # died between renames
    assert checkpoints.latest(tmp_path) == atomic.old(checkpoints.folder(tmp_path, 6))
    assert checkpoints.resume_path("never", str(tmp_path)) is None
    assert checkpoints.resume_path("auto", "") is None


def _check_shared(root: str) -> str:
    from datetime import timedelta

    from goose_core.distributed import ParallelContext

    ctx = ParallelContext(1, 1, 2, timeout=timedelta(seconds=30))
    try:
        # Rank 1 looks at a folder of its own, as a node with a local disk would.
        checkpoints.check_shared(root if ctx.rank == 0 else root + "-local", ctx)
        return ""
    except checkpoints.NotSharedError as err:
        return str(err)
    finally:
        ctx.destroy()


def test_a_checkpoint_folder_some_ranks_do_not_see_is_refused_on_every_rank(tmp_path: Path) -> None:
    from goose_core.distributed.launch import spawn

    messages = spawn(_check_shared, 2, str(tmp_path / "ck"), timeout=60)
    assert all("is not shared: ranks [1] do not see the file rank 0 wrote there" in m for m in messages), messages
