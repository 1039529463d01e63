"""The kernel families CI runs the suite on really differ where bf16 rounding is concerned.

``make test-kernels CAPABILITY=avx2`` stands in for a CPU with AVX2 but no AVX-512: ATen's own
variable alone leaves bf16 matmuls in oneDNN (which picks its own instruction set), so the
Makefile caps oneDNN too. These tests show, in fresh processes, that the cap moves bf16 matmuls
out of oneDNN and changes their bits, and that the split-reduction floor of
:mod:`goose_core.testing.split_reductions` rounds as a tensor-parallel layer does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from goose_core.testing import split_reductions

# A reduction long enough that the kernels' blocking of it shows in the bf16 result.
_PROBE = """
import hashlib, torch
torch.manual_seed(0)
a, b = torch.randn(64, 4096).bfloat16(), torch.randn(4096, 96).bfloat16()
print(torch.ops.mkldnn._is_mkldnn_bf16_supported(), hashlib.md5((a @ b).view(torch.int16).numpy().tobytes()).hexdigest())
"""


def _probe(**env: str) -> tuple[bool, str]:
    full = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"} | env
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0] == "True", out[1]


def test_capping_onednn_at_avx2_takes_bf16_matmuls_out_of_onednn_and_changes_their_bits() -> None:
    native_onednn, native = _probe()
    if not native_onednn:
        pytest.skip("this CPU has no oneDNN bf16 matmuls (no AVX-512): it already runs the fallback "
                    "family, and CAPABILITY=default is its other family")
    capped_onednn, capped = _probe(ONEDNN_MAX_CPU_ISA="AVX2")
    assert not capped_onednn
    assert capped != native, "ONEDNN_MAX_CPU_ISA=AVX2 left bf16 matmuls as they were: the avx2 pass tests nothing new"


def test_split_reductions_round_each_partial_product_as_a_row_parallel_layer_does() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    with split_reductions(2):
        y = F.linear(x, w)
        y.backward(torch.ones_like(y))
    # tp = 2: each rank's bf16 partial product, then the all-reduce's bf16 sum.
    assert torch.equal(y, F.linear(x[:, :32], w[:, :32]) + F.linear(x[:, 32:], w[:, 32:]))
    # The input gradient is split over output features: a column-parallel layer's backward.
    g = torch.ones(8, 32, dtype=torch.bfloat16)
    assert torch.equal(x.grad, g[:, :16] @ w[:16] + g[:, 16:] @ w[16:])
    assert torch.equal(w.grad, g.t() @ x.detach())
    assert not torch.equal(y, F.linear(x, w))  # the planted-bug check: the split is visible


def test_split_reductions_leave_full_precision_and_indivisible_layers_alone() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(3, 6, dtype=torch.bfloat16)  # 3 rows: 4 cannot split them
    x32, w32 = torch.randn(4, 64), torch.randn(32, 64)
    expected = F.linear(x, w), F.linear(x32, w32)
    with split_reductions(4):
        assert torch.equal(F.linear(x, w), expected[0]) and torch.equal(F.linear(x32, w32), expected[1])
    with pytest.raises(ValueError, match="parts must be at least 1"):
        with split_reductions(0):
            pass
