"""The one-GPU pipeline and the Copy/Wait race tests again under PyTorch's CUDA sanitizer.

``TORCH_CUDA_SANITIZER=1`` must be set before torch is imported, so the tests run in a child
pytest. The sanitizer (CSAN) records, for every kernel launch, which stream reads and writes
which memory and which events each stream waited for, and raises on an access from one stream
that no synchronisation orders after another stream's write: the missing ``wait_stream`` of
issue 10, whether or not the timing of this run exposed it. It does not model the caching
allocator's reuse of a block (``record_stream``): ``test_copy_wait.py`` catches that by timing.
The child runs tiny models for two steps (``GOOSE_GPU_TINY``, see conftest.py): every launch
costs a Python check there. A second child runs issue 10's copy and must see it reported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CHECKED = ("test_local_pipeline.py", "test_copy_wait.py")


def _sanitized_pytest(*arguments: str, timeout: float) -> str:
    """stdout and stderr of a child pytest under the sanitizer, which must exit 0."""
    if "TORCH_CUDA_SANITIZER" in os.environ:
        pytest.skip("this run is already under the sanitizer: the other gpu tests are checked in this process")
    env = {**os.environ, "TORCH_CUDA_SANITIZER": "1", "GOOSE_GPU_TINY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *arguments]
    try:
        child = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        partial = "".join(o.decode() if isinstance(o, bytes) else o for o in (err.stdout, err.stderr) if o)
        pytest.fail(f"the sanitized run took over {err.timeout:.0f} s; its output so far:\n{partial[-8000:]}")
    output = child.stdout + child.stderr
    found = "the CUDA sanitizer found a race" if "CSAN detected" in output else "it failed"
    assert child.returncode == 0, f"sanitized pytest, rc {child.returncode}: {found}:\n{output[-12000:]}"
    return output


@pytest.mark.timeout(500)  # inside the 10 minutes a lent GPU machine gives one command
def test_the_pipeline_is_race_free_under_the_cuda_sanitizer() -> None:
    output = _sanitized_pytest("-k", "not issue_10", *(str(HERE / name) for name in CHECKED), timeout=450)
    assert "CSAN detected" not in output, f"the CUDA sanitizer found a race:\n{output[-12000:]}"
    assert " passed" in output, output[-4000:]


@pytest.mark.timeout(200)
def test_the_sanitizer_reports_issue_10s_copy() -> None:
    # The run above has teeth: the copy of issue 10 is reported (the child's test expects it).
    # -s: the child's test passes, and pytest would keep the sanitizer's report to itself.
    output = _sanitized_pytest("-s", "-k", "issue_10", str(HERE / "test_copy_wait.py"), timeout=180)
    assert "CSAN detected a possible data race" in output and "1 passed" in output, output[-8000:]
