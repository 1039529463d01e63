"""Unit tests of the comparison half of the reference harness: it must be able to fail."""

import pytest
import torch

from goose_core.testing import EXACT, PARALLEL, RunResult, assert_matches_reference, largest_errors


def _run() -> RunResult:
    # float64, as the harness trains: one ulp of 1.0 is 2.2e-16, far inside PARALLEL.
    f64 = torch.float64
    return RunResult([2.5, 2.25], {"w": torch.tensor([1.0, -2.0], dtype=f64), "b": torch.tensor([0.5], dtype=f64)})


def test_identical_runs_pass_exact() -> None:
    assert_matches_reference(_run(), _run(), EXACT)


def test_one_ulp_fails_exact() -> None:
    other = _run()
    other.params["w"][0] = torch.nextafter(other.params["w"][0], torch.tensor(2.0))
    with pytest.raises(AssertionError, match="w: max abs difference"):
        assert_matches_reference(other, _run(), EXACT)
    assert_matches_reference(other, _run(), PARALLEL)


@pytest.mark.parametrize("tol", [PARALLEL])
def test_parameter_error_beyond_tolerance_fails(tol) -> None:
    other = _run()
    other.params["b"] += 10 * (tol.atol + tol.rtol * 0.5)
    with pytest.raises(AssertionError, match=r"b: max abs difference .* the allowance"):
        assert_matches_reference(other, _run(), tol)


def test_loss_error_fails() -> None:
    other = _run()
    other.losses[1] += 1e-3
    with pytest.raises(AssertionError, match="losses differ"):
        assert_matches_reference(other, _run(), PARALLEL)


def test_missing_or_reshaped_parameters_fail() -> None:
    other = _run()
    del other.params["b"]
    with pytest.raises(AssertionError, match=r"missing \['b'\]"):
        assert_matches_reference(other, _run(), PARALLEL)
    other = _run()
    other.params["w"] = other.params["w"][:1]
    with pytest.raises(AssertionError, match=r"w: shape \(1,\), expected \(2,\)"):
        assert_matches_reference(other, _run(), PARALLEL)


def test_accumulation_equals_the_whole_batch_and_uses_no_sync_on_all_but_the_last() -> None:
    from contextlib import nullcontext

    from goose_core.testing import TrainSpec, reference_run, snapshot, train_loop

    spec = TrainSpec(family="gpt2", steps=2, optimizer="sgd")
    reference = reference_run(spec)
    entered = []

    def quiet():
        entered.append(1)
        return nullcontext()

    for reverse in (False, True):
        model = spec.build_model()
        optimizer = spec.build_optimizer(model.parameters())
        losses = train_loop(model, optimizer, spec.batches(), micro_batches=4, no_sync=quiet, reverse=reverse)
        assert_matches_reference(RunResult(losses, snapshot(model)), reference, PARALLEL)
    assert len(entered) == 2 * 2 * 3  # two runs x two steps x (4 - 1) quiet micro-batches


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_fails(bad: float) -> None:
    other = _run()
    other.params["w"][1] = bad
    with pytest.raises(AssertionError, match="w: max abs difference"):
        assert_matches_reference(other, _run(), PARALLEL)
    other = _run()
    other.losses[0] = bad
    with pytest.raises(AssertionError, match="losses differ"):
        assert_matches_reference(other, _run(), PARALLEL)


def test_largest_errors_reports_the_worst_rank_parameter_and_loss() -> None:
    want = RunResult([5.0, 4.0], {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)})
    same = RunResult([5.0, 4.0], {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)})
    off = RunResult([5.0, 4.0 + 1e-9], {"w": torch.tensor([1.0, -2.0 + 4e-10], dtype=torch.float64)})
    assert largest_errors(same, want) == (0.0, 0.0, 0.0)
    param, loss, share = largest_errors([same, off], want)  # every rank's run: the worst one counts
    assert param == pytest.approx(4e-10) and loss == pytest.approx(1e-9)
    # the loss is the worse of the two: 1e-9 against 1e-12 + 1e-10 * 4 of PARALLEL's allowance
    assert share == pytest.approx(1e-9 / (1e-12 + 4e-10))
    assert largest_errors(RunResult([5.0, 4.0], {"w": torch.tensor([1.0, float("nan")])}), want)[2] == float("inf")
