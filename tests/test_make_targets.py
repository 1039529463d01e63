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
