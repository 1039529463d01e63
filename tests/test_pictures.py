"""The course's pictures are current: docs/pictures.py draws exactly the committed SVGs, from
goose's own grid and schedules (regenerate with ``python docs/pictures.py``)."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("matplotlib")

from goose_core.pipeline import GPipe, OneFOneB  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _pictures() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pictures", DOCS / "pictures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pictures = _pictures()


@pytest.mark.parametrize("name", sorted(pictures.PICTURES))
def test_the_committed_picture_is_what_pictures_py_draws(name: str, tmp_path: Path) -> None:
    drawn = pictures.write(name, tmp_path).read_bytes()
    committed = DOCS / "img" / f"{name}.svg"
    assert committed.exists(), f"{committed} is missing: run python docs/pictures.py"
    assert drawn == committed.read_bytes(), \
        f"{committed} is stale: run python docs/pictures.py (matplotlib as pinned in constraints.txt)"


def test_drawing_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    first = pictures.write("grid", tmp_path / "a").read_bytes()
    assert first == pictures.write("grid", tmp_path / "b").read_bytes()
    assert b"<dc:date>" not in first  # no timestamp in the metadata


def test_the_numbers_the_pictures_print() -> None:
    # zero_sharding: 2 + 2 + 12 bytes, then ZeRO-1/2/3 over 4 ranks.
    assert [pictures.bytes_per_rank(sharded, 4) for _, sharded in pictures.ZERO_STAGES] == [16, 7, 5.5, 4]
    # 1f1b: GPipe holds every micro-batch on every stage; 1F1B at most p - j.
    assert pictures.in_flight(GPipe(8, 4)) == [8, 8, 8, 8]
    assert pictures.in_flight(OneFOneB(8, 4)) == [4, 3, 2, 1]
