"""Unit tests of the stage lookup behind ``make test-stage N``."""

import pytest

from goose_core.testing.stages import stage_dir


@pytest.mark.parametrize("number", ["0", "00", "1", "01"])
def test_numbers_with_and_without_padding(number: str) -> None:
    assert stage_dir(number).name.startswith(number.zfill(2))


@pytest.mark.parametrize("number, message", [("99", "no stage 99; the stages are: 00_reference"),
                                             ("x", "must be a number"), ("", "must be a number")])
def test_unknown_stage_is_a_clear_error(number: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stage_dir(number)
