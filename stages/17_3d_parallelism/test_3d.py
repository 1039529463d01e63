"""Stage 17: train.py's assembled run (tp=2 x pp=2 x dp=2, ZeRO-1, clipping) equals the
single-device run, and its resume is the uninterrupted run bit for bit.

The library's own checkpoint and export tests (resharding, a kill during a save, every tensor
of the exported folder) are tests/test_checkpoint_io.py and tests/test_export.py (``make test``
runs them; ``make test-stage 17`` runs this folder).
"""

import io
import os
from pathlib import Path

import pytest
import torch

from goose_core import ParallelContext, full_state_dict
from goose_core.testing import (EXACT, PARALLEL, RunResult, TrainSpec, assert_matches_reference, reference_run,
                                run_distributed)

from course import beside_reference_diffs, load_train_script, run_train_script

train_script = load_train_script("17")

# The demo's model and loop, three float64 steps with clipping at 0.5 (the first steps' norm is
# above it, so the clip acts): every layout only reorders fp64 sums, so PARALLEL holds.
SPEC = TrainSpec(family="bloom", steps=3, max_grad_norm=0.5)
M = 2  # micro-batches: 8 rows / dp 2 = 4 rows a rank, 2 a micro-batch

pytestmark = pytest.mark.usefixtures("one_thread")  # the reference runs in this process


def _run_and_resume(ctx: ParallelContext, spec: TrainSpec, path: str) -> tuple[RunResult, list[float], bool,
                                                                             tuple[float, float]]:
    """train.py's run (a checkpoint after 2 steps), its resume from there and its export check."""
    model, optimizer = train_script.build(ctx, spec, M)
    losses = train_script.train(ctx, model, optimizer, spec, 0, spec.steps, save_at=2, path=path)
    resumed_model, at, resumed = train_script.resume(ctx, spec, M, path, spec.steps)
    assert at == 2
    same = train_script.same_everywhere(ctx, model, resumed_model)
    export = train_script.export_check(ctx, resumed_model, spec, path + "-export")
    return RunResult(losses, full_state_dict(model, ctx)), resumed, same, export


def test_3d_with_zero1_and_clipping_equals_the_single_device_run_resumes_bit_exactly_and_exports(
        tmp_path: Path) -> None:
    reference = reference_run(SPEC)
    results = run_distributed(_run_and_resume, 2, 2, 2, SPEC, str(tmp_path / "ckpt"), timeout=180)
    for rank, (result, resumed, same, (diff, share)) in enumerate(results):
        try:
            assert_matches_reference(result, reference, PARALLEL)
            assert_matches_reference(RunResult(resumed, {}), RunResult(result.losses[2:], {}), EXACT)
        except AssertionError as err:
            raise AssertionError(f"rank {rank}: {err}") from err
        assert same, f"rank {rank}: the resumed model's parameters differ from the uninterrupted run's"
        # The exported folder, loaded by from_pretrained on one device, gives the 3D model's logits.
        assert share <= 1, f"rank {rank}: logits differ by {diff:.2e}, {share:.0%} of PARALLEL's allowance"
    assert (tmp_path / "ckpt-export" / "model.safetensors").is_file()


def test_progress_line_shows_loss_tokens_per_second_and_eta() -> None:
    bar = train_script.Progress(first=4, last=12, tokens_per_step=256)
    # Steps 4 and 5 done in 2 s: 1 s a step, 256 tokens/s, 6 steps (6 s) to go.
    line = bar.line(5, 4.25, 4.2500000001, elapsed=2.0)
    assert line == ("[##########..........]  6/12 steps  loss 4.250000 (1 device 4.250000)  256 tok/s  "
                    "ETA 6.0s")
    assert "1 device" not in bar.line(11, 4.0, None, elapsed=8.0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal_and_writes_lines_into_a_pipe() -> None:
    terminal, pipe = _Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        bar = train_script.Progress(first=0, last=3, tokens_per_step=256, stream=stream)
        for step, reference in enumerate([1.0, None, None]):  # the line gets shorter after step 0
            bar.update(step, 2.0, reference)
    drawn = terminal.getvalue().split("\r")[1:]
    assert len(drawn) == 3 and terminal.getvalue().count("\n") == 1 and drawn[-1].endswith("\n")
    assert len(drawn[1]) == len(drawn[0])  # padded over the longer line before it
    assert "\r" not in pipe.getvalue() and pipe.getvalue().count("\n") == 3


def test_a_local_folder_trains_as_its_own_weights(tmp_path: Path) -> None:
    TrainSpec(family="gpt2").build_model().save_pretrained(tmp_path / "gpt2")
    spec = train_script.spec_for(str(tmp_path / "gpt2"), steps=2)
    model, want = spec.build_model(), TrainSpec(family="gpt2").build_model()
    assert model.dtype == torch.float64 and model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), want.parameters()))
    with pytest.raises(ValueError, match="--model 'nope' is neither a family"):
        train_script.spec_for("nope", steps=2)


def test_a_bad_save_at_is_refused_before_any_process_group() -> None:
    with pytest.raises(ValueError, match="--save-at 5 must lie strictly between 0 and --steps 4"):
        train_script.main(["--steps", "4", "--save-at", "5"])


@pytest.mark.skipif(not os.environ.get("GOOSE_FULL"), reason="the whole demo on 8 ranks, ~1 min: GOOSE_FULL=1")
def test_the_demo_runs_as_make_demo_runs_it(tmp_path: Path) -> None:
    out = run_train_script("17", 8, "--out", str(tmp_path), timeout=300)
    assert "losses bit for bit, every rank's parameters bit for bit" in out
    assert "loads with AutoModelForCausalLM.from_pretrained" in out
    assert len(beside_reference_diffs(out)) == train_script.SPEC.steps
    assert all(d <= PARALLEL.atol + PARALLEL.rtol * 10 for d in beside_reference_diffs(out))
    assert (tmp_path / "demo.png").stat().st_size > 10_000
