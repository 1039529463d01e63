"""The composed API on one rank under torchrun with NCCL (``composed_nccl.py`` says what it checks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from goose_core.distributed.context import BACKEND_ENV, DEVICE_ENV

pytestmark = pytest.mark.gpu

SCRIPT = Path(__file__).with_name("composed_nccl.py")
ROOT = SCRIPT.parents[2]


def test_tp_pp_dp_zero1_and_clipping_train_on_one_rank_over_nccl() -> None:
    # The context must choose NCCL by itself: no backend or device forced from outside.
    env = {k: v for k, v in os.environ.items() if k not in (BACKEND_ENV, DEVICE_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(SCRIPT)]
    child = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    output = child.stdout + child.stderr
    assert child.returncode == 0, f"torchrun failed (rc {child.returncode}):\n{output[-12000:]}"
    assert output.count("equals the plain run") == 2, output[-4000:]
