"""Stage 03: fp32 parameters under autocast on one device: the matmuls run in bf16 (or fp16) while
parameters, gradients and the loss stay fp32, and the run tracks the fp32 run within the format's
roundoff; autocast for a device type the model is not on casts nothing."""

from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from goose_core.testing import EXACT, RunResult, TrainSpec, assert_matches_reference, reference_run

from course import load_train_script

train_script = load_train_script("03")
SPEC = train_script.SPEC
pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = {torch.float32}


def linear_in_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """What ``torch.autocast(device_type, dtype=torch.bfloat16)`` does to one ``nn.Linear``: cast
    the input, the fp32 weight and the bias to bf16 and multiply in bf16 (the weight's cast is
    cached for the whole ``with`` block: one cast per weight, however many micro-batches)."""
    b = None if bias is None else bias.to(torch.bfloat16)
    return torch.nn.functional.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16), b)


def test_a_linear_under_autocast_is_a_bf16_linear_of_bf16_casts() -> None:
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 32), torch.randn(8, 64)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = linear(x)
    assert linear.weight.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(out, linear_in_bf16(x, linear.weight, linear.bias))
    assert not torch.equal(out, linear(x).to(torch.bfloat16))  # not fp32 math rounded afterwards


def _one_process(spec: TrainSpec, dtype: torch.dtype, device_type: str | None = None) -> tuple[RunResult, dict]:
    """train.py's train, in this process: one device needs no process group."""
    return train_script.train(spec, dtype, device_type)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_computes_in_16_bits_and_tracks_the_fp32_run(dtype: torch.dtype) -> None:
    # Measured over 24 steps: 2.7e-4 relative for bf16 (bound 2**-9), 1.3e-4 for fp16 (2**-12).
    run, seen = _one_process(SPEC, dtype)
    assert seen == {"linear outputs": {dtype}, "losses": FP32, "grads": FP32, "params": FP32}, seen
    equal, line = train_script.verdict(run.losses, reference_run(SPEC).losses, seen, dtype)
    assert equal, line


def test_autocast_for_another_device_type_casts_nothing() -> None:
    # The planted bug: "cuda" autocast around a CPU model (or "cpu" around a GPU one) is a no-op:
    # the run is the fp32 run bit for bit, and the verdict says it is no bf16 run.
    other = "cuda" if SPEC.build_model().device.type == "cpu" else "cpu"
    run, seen = _one_process(replace(SPEC, steps=2), torch.bfloat16, other)
    assert seen["linear outputs"] == FP32
    assert_matches_reference(run, reference_run(replace(SPEC, steps=2)), EXACT)
    equal, line = train_script.verdict(run.losses, run.losses, seen, torch.bfloat16)
    assert not equal and "NOT A bf16 RUN" in line


def test_train_py_prints_its_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_script.main(["--steps", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("EQUAL (within bf16 roundoff)")
