"""``local_pipeline`` with 2 and 4 partitions on one GPU equals the plain run on that GPU.

Every recompute mode and both schedules, GPT-2 (tied embeddings: the first and last partition
share the weight) and the GQA Llama. The models train in float64, where a GPU run differs from
another only by reordered sums, as on the CPU (TF32 never applies: it is a float32 matmul mode),
so the tolerance is the suite's ``PARALLEL``.

All partitions share the device's default stream for compute, and copies run on each
partition's copy stream. A race needs a producer that is still running when its reader starts,
so every cell begins with ``torch.cuda._sleep`` on its stream (a callback): the copy of a cell's
output, or of a gradient, that forgot to wait for it reads memory not written yet and the run
leaves the plain one at once (``test_issue_10_race_fails_the_comparison`` checks that). Without
the sleeps a race shows only when the GPU happens to lag behind the CPU: issue 10's (10.419 vs
10.142 at step 2) was seen on a 768-wide GPT-2 at 8 x 1024 tokens.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import pytest
import torch

from goose_core.pipeline import MODES, Callback, Event, local_pipeline
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, snapshot, train_loop

pytestmark = pytest.mark.gpu

SCHEDULES = ("gpipe", "1f1b")
MICROBATCHES = 4
#: Each cell's sleep: longer than the host takes to queue the cell's kernels, so that a copy that
#: forgot to wait runs while its producer has not started. On an H200 (host: the machine's own
#: 16-core x86) issue 10's copy passed the comparison at 0.5 and 2 ms and failed it at 8 ms;
#: 10 ms keeps a margin and costs ~0.3 s a test.
CELL_SLEEP_S = 0.010

#: Wide enough that the kernels of a cell are real work; 8 blocks fill 4 partitions twice.
GPU_SIZES: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8},
    "gpt2": {"n_embd": 256, "n_layer": 8},
}


def _spec(family: str, tiny: bool) -> TrainSpec:
    """Tiny configs (4 blocks) and 2 steps under the sanitizer, which checks every launch in Python."""
    if tiny:
        return TrainSpec(family=family, steps=2, batch_size=8, seq_len=32)
    return TrainSpec(family=family, steps=3, batch_size=8, seq_len=128, overrides=GPU_SIZES[family])


def _batches(spec: TrainSpec, device: torch.device) -> Any:
    for batch in spec.batches():
        yield {k: v.to(device) for k, v in batch.items()}


_plain: dict[tuple[str, bool], RunResult] = {}


def _plain_run(spec: TrainSpec, tiny: bool, device: torch.device) -> RunResult:
    """The unsplit model trained on the same GPU (once per family and size)."""
    key = (spec.family, tiny)
    if key not in _plain:
        model = spec.build_model().to(device)
        optimizer = spec.build_optimizer(model.parameters())
        _plain[key] = RunResult(train_loop(model, optimizer, _batches(spec, device)), snapshot(model))
    return _plain[key]


def _schedule_kwargs(schedule: str) -> dict[str, str]:
    """``{"schedule": ...}`` when local_pipeline takes it; GPipe, the default, also without it."""
    if "schedule" in inspect.signature(local_pipeline).parameters:
        return {"schedule": schedule}
    if schedule == "gpipe":
        return {}
    pytest.skip(f"local_pipeline takes no schedule= yet, so {schedule!r} cannot be asked for "
                f"(1F1B is issue 10, item 4); GPipe, the default, runs")


def _pipelined(family: str, partitions: int, recompute: str, tiny: bool, sleep: Callable[[float], None],
               **kwargs: str) -> RunResult:
    """The family's run through local_pipeline on cuda:0, every cell starting ``CELL_SLEEP_S`` late."""
    device = torch.device("cuda", 0)
    spec = _spec(family, tiny)

    def late(event: Event) -> None:
        if event.phase == "before":
            sleep(CELL_SLEEP_S)

    model = local_pipeline(spec.build_model().to(device), partitions, MICROBATCHES, recompute,
                           callbacks=[Callback(late)], devices=[device] * partitions, **kwargs)
    assert {p.device for p in model.parameters()} == {device}
    optimizer = spec.build_optimizer(model.parameters())
    return RunResult(train_loop(model, optimizer, _batches(spec, device)), snapshot(model))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("recompute", MODES)
@pytest.mark.parametrize("partitions", [2, 4])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_gpu_pipeline_equals_the_plain_run(family: str, partitions: int, recompute: str, schedule: str,
                                              tiny: bool, cuda_sleep: Callable[[float], None]) -> None:
    result = _pipelined(family, partitions, recompute, tiny, cuda_sleep, **_schedule_kwargs(schedule))
    assert_matches_reference(result, _plain_run(_spec(family, tiny), tiny, torch.device("cuda", 0)), PARALLEL)


@pytest.mark.usefixtures("issue_10_copy")
def test_issue_10_race_fails_the_comparison(tiny: bool, sanitized: bool, cuda_sleep: Callable[[float], None]) -> None:
    # The comparison above has teeth on a GPU: issue 10's copy trains to other numbers.
    if sanitized:
        pytest.skip("the sanitizer stops issue 10's copy at its first launch (test_copy_wait's issue_10 test)")
    result = _pipelined("llama", 2, "never", tiny, cuda_sleep)
    with pytest.raises(AssertionError, match="differ"):
        assert_matches_reference(result, _plain_run(_spec("llama", tiny), tiny, torch.device("cuda", 0)), PARALLEL)
