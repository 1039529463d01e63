"""Stage 00: the reference run is deterministic, the models learn the shipped corpus, and one
fp32 AdamW step holds 16 bytes per parameter besides its activations."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from goose_core.testing import EXACT, TINY_MODELS, TrainSpec, assert_matches_reference, reference_run

from course import load_train_script

train_script = load_train_script("00")


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_same_seed_same_bits(family: str) -> None:
    spec = TrainSpec(family=family, steps=3, max_grad_norm=1.0)
    assert_matches_reference(reference_run(spec), reference_run(spec), EXACT)


def test_a_different_seed_gives_a_different_run() -> None:
    a, b = reference_run(TrainSpec(steps=2)), reference_run(TrainSpec(steps=2, seed=1))
    assert a.losses != b.losses


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_loss_falls_on_the_corpus(family: str) -> None:
    losses = reference_run(TrainSpec(family=family, steps=30, lr=3e-3)).losses
    # Byte-level uniform guessing costs ln(256) = 5.55; English bytes are far more predictable.
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5


def test_the_loop_written_out_is_the_reference_run() -> None:
    spec = TrainSpec(family="gpt2", steps=3, max_grad_norm=1.0)
    assert_matches_reference(train_script.train(spec), reference_run(spec), EXACT)


def test_train_script_runs() -> None:
    script = Path(__file__).with_name("train.py")
    out = subprocess.run([sys.executable, str(script), "--steps", "3", "--family", "gpt2"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "step   2" in out and "gpt2:" in out


def _load_measure() -> ModuleType:
    """measure.py beside this file, under a name no other stage's module takes."""
    spec = importlib.util.spec_from_file_location("goose_stage_00_measure", Path(__file__).with_name("measure.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


measure = _load_measure()


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_one_fp32_adamw_step_holds_16_bytes_per_parameter(family: str) -> None:
    found = measure.step_memory(TrainSpec(family=family, dtype=torch.float32))
    n = found["count"]
    assert (found["parameters"], found["gradients"], found["optimizer state"]) == (4 * n, 4 * n, 8 * n)
    assert found["activations"] > 0  # the forward saved tensors for the backward, weights not counted
