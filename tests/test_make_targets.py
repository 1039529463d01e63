"""The Makefile's named test ids exist: `make test-latest` selects tests by node id, and a renamed
test or parameter would make it fail on collection instead of running the subset."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _latest_tests() -> list[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    block = re.search(r"^LATEST_TESTS :=(.*?)(?<!\\)\n", text, re.S | re.M)
    assert block, "the Makefile has no LATEST_TESTS"
    return [t.strip("'") for t in block.group(1).replace("\\\n", " ").split()]


def test_make_test_latest_names_tests_that_exist() -> None:
    tests = _latest_tests()
    assert len(tests) >= 5
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *tests], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_the_kernel_free_list_names_files_that_exist() -> None:
    # `make test-kernels` skips conftest.py's kernel-free files: a stale name would skip nothing
    # and say nothing, a misspelt one would hide that the list no longer means what it says.
    sys.path.insert(0, str(ROOT))
    try:
        from conftest import _KERNEL_FREE
    finally:
        sys.path.remove(str(ROOT))
    assert [p for p in _KERNEL_FREE if not (ROOT / p).is_file()] == []
