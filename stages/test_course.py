"""The course's tooling: the stage lookup behind ``make test-stage N``."""

import subprocess
import sys

import pytest

from course import STAGES_DIR, stage_dir


@pytest.mark.parametrize("number", ["0", "00", "1", "01"])
def test_numbers_with_and_without_padding(number: str) -> None:
    assert stage_dir(number).name.startswith(number.zfill(2))


@pytest.mark.parametrize("number, message", [("99", "no stage 99; the stages are: 00_reference"),
                                             ("x", "must be a number"), ("", "must be a number")])
def test_unknown_stage_is_a_clear_error(number: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stage_dir(number)


def test_make_test_stage_lists_the_stages_for_an_unknown_number() -> None:
    # What `make test-stage 99` runs: the folder on stdout, or the stages and the usage.
    found = subprocess.run([sys.executable, str(STAGES_DIR / "course.py"), "3"], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip().endswith("03_zero1")
    unknown = subprocess.run([sys.executable, str(STAGES_DIR / "course.py"), "99"], capture_output=True, text=True)
    assert unknown.returncode == 1 and "the stages are: 00_reference" in unknown.stderr
    assert "usage: make test-stage 3" in unknown.stderr
