"""The documentation site builds in strict mode (broken links and missing pages fail)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    out = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr
    for stage in sorted((ROOT / "stages").glob("[0-9][0-9]_*/README.md")):
        assert (tmp_path / "stages" / stage.parent.name / "index.html").exists()
    for page in ("benchmarks/index.html", "benchmarks/gpu/index.html"):  # make bench / make bench-gpu
        assert (tmp_path / page).exists()
