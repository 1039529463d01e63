"""Unit tests of the per-block profilers: exact bytes, relative times, and an undisturbed model."""

import pytest
import torch
from torch import nn

from goose_core.partition import ADAM_FACTOR, block_memory, profile_memory, profile_times

X_BYTES = 8 * 32 * 64 * 4  # one micro-batch of hidden states: batch 8, seq 32, width 64, fp32


def _mlp(width: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 64))


def _sample() -> torch.Tensor:
    return torch.randn(8, 32, 64, generator=torch.Generator().manual_seed(0))


def test_activation_and_parameter_bytes_are_exact() -> None:
    x = _sample().requires_grad_()
    # Linear saves its input; ReLU saves its output; the second Linear saves that same output
    # (one storage, counted once). Weights are parameters, never activations.
    activations, params = block_memory(_mlp(256), x)
    assert activations == X_BYTES + 8 * 32 * 256 * 4
    assert params == (64 * 256 + 256 + 256 * 64 + 64) * 4


def test_a_closure_is_measured_like_its_module() -> None:
    block = _mlp(128)
    x = _sample().requires_grad_()
    assert block_memory(lambda h: block(h), x) == block_memory(block, x)


def test_memory_counts_microbatches_and_optimizer_state() -> None:
    blocks = [_mlp(64), _mlp(256)]
    one = profile_memory(blocks, _sample(), num_microbatches=1, optimizer_factor=0.0)
    four = profile_memory(blocks, _sample(), num_microbatches=4, optimizer_factor=ADAM_FACTOR)
    for block, act, total in zip(blocks, one, four):
        params = sum(p.numel() * 4 for p in block.parameters())
        assert total == 4 * act + 4.0 * params


@pytest.mark.usefixtures("one_thread")
def test_wide_blocks_take_longer() -> None:
    # 16x the hidden units: ~7x the time on one thread; the fastest of 5 runs filters out the
    # other processes.
    narrow, wide = profile_times([_mlp(64), _mlp(1024)], _sample(), repeat=5)
    assert 0 < narrow and wide > 3 * narrow


def test_profiling_leaves_the_model_and_the_random_stream_untouched() -> None:
    blocks = [_mlp(128, dropout=0.5), _mlp(128, dropout=0.5)]
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    rng = torch.get_rng_state()
    profile_times(blocks, _sample(), repeat=2)
    profile_memory(blocks, _sample())
    profile_times([lambda h: blocks[0](h)], _sample(), repeat=2)  # a closure: no copy, still no .grad
    assert torch.equal(torch.get_rng_state(), rng)
    for block, state in zip(blocks, before):
        assert all(p.grad is None for p in block.parameters())
        assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator counters need CUDA")
def test_cuda_allocator_sees_the_saved_activations() -> None:
    x = _sample().cuda().requires_grad_()
    activations, params = block_memory(_mlp(256).cuda(), x)
    # The graph holds the ReLU output (and the Linear's bias-added result feeds it); plus the output.
    assert activations >= 8 * 32 * 256 * 4
    assert params == (64 * 256 + 256 + 256 * 64 + 64) * 4


@pytest.mark.parametrize("kwargs, message", [({"repeat": 0}, "repeat must be >= 1"),
                                             ({"warmup": -1}, "warmup >= 0")])
def test_bad_time_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        profile_times([_mlp(64)], _sample(), **kwargs)


def test_bad_memory_settings_and_no_blocks() -> None:
    with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
        profile_memory([_mlp(64)], _sample(), num_microbatches=0)
    with pytest.raises(ValueError, match="no blocks to profile"):
        profile_memory([], _sample())
