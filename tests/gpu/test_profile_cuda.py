"""The memory profiler's CUDA path: the caching allocator's count of a block's activations.

On the CPU :func:`block_memory` counts the storages autograd saves; on CUDA it reads how much
``torch.cuda.memory_allocated`` grew over the forward (the graph's saved tensors and the output).
For these MLPs both come to the same bytes: ReLU's output (saved by ReLU and by the second
Linear, one storage) plus one 64-wide tensor, the saved input on the CPU and the output on CUDA.
Float64 so the sizes are those of the training harness. Last, the profiling partitioners on a
model that already lives on the GPU, as the profiler is used in training.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from goose_core.partition import ADAM_FACTOR, block_memory, profile_memory, profile_times
from goose_core.pipeline import local_pipeline
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, snapshot, train_loop

pytestmark = pytest.mark.gpu

B, T, D = 8, 32, 64
F64 = 8  # bytes


def _mlp(width: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(D, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, D)).double()


def _sample(device: str) -> torch.Tensor:
    return torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)


def test_the_allocator_counts_the_saved_activations_exactly() -> None:
    block = _mlp(256)
    on_cpu = block_memory(block, _sample("cpu").requires_grad_())
    # A stream of its own: its first matmul makes cuBLAS allocate a workspace for it through the
    # same allocator (32 MiB on Hopper), which is no activation of the block.
    with torch.cuda.stream(torch.cuda.Stream()):
        on_cuda = block_memory(copy.deepcopy(block).cuda(), _sample("cuda").requires_grad_())
    assert on_cuda == on_cpu
    assert on_cuda == (B * T * 256 * F64 + B * T * D * F64, (D * 256 + 256 + 256 * D + D) * F64)


def test_profile_memory_on_cuda_equals_the_cpus() -> None:
    blocks = [_mlp(64), _mlp(256)]
    on_cpu = profile_memory(blocks, _sample("cpu"), num_microbatches=4, optimizer_factor=ADAM_FACTOR)
    on_cuda = profile_memory([copy.deepcopy(b).cuda() for b in blocks], _sample("cuda"), num_microbatches=4,
                             optimizer_factor=ADAM_FACTOR)
    assert on_cuda == on_cpu


def test_profiling_on_cuda_leaves_the_model_and_the_cuda_generator_alone() -> None:
    # Dropout draws from the CUDA generator: the profilers fork it. (Dropout's saved mask is a
    # bool on CUDA and a float64 on the CPU, so its bytes are not compared with the CPU's.)
    blocks = [_mlp(128, dropout=0.5).cuda(), _mlp(128, dropout=0.5).cuda()]
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    rng = torch.cuda.get_rng_state()
    times = profile_times(blocks, _sample("cuda"), repeat=2)
    profile_memory(blocks, _sample("cuda"))
    assert all(t > 0 for t in times)
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    for block, state in zip(blocks, before):
        assert all(p.grad is None for p in block.parameters())
        assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())


@pytest.mark.parametrize("partitioner", ["time", "memory"])
def test_the_profiled_partitioners_split_a_model_already_on_the_gpu(partitioner: str) -> None:
    # The user's model is on its device before it is split (as with ctx.device): the profiling
    # sample must be made there too. SGD keeps a wrong gradient scale visible.
    device = torch.device("cuda", 0)
    spec = TrainSpec(family="llama", steps=2, optimizer="sgd")
    model = local_pipeline(spec.build_model().to(device), 2, 2, partitioner=partitioner, devices=[device] * 2)
    optimizer = spec.build_optimizer(model.parameters())
    batches = ({k: v.to(device) for k, v in batch.items()} for batch in spec.batches())
    result = RunResult(train_loop(model, optimizer, batches), snapshot(model))
    plain = spec.build_model().to(device)
    plain_optimizer = spec.build_optimizer(plain.parameters())
    batches = ({k: v.to(device) for k, v in batch.items()} for batch in spec.batches())
    assert_matches_reference(result, RunResult(train_loop(plain, plain_optimizer, batches), snapshot(plain)), PARALLEL)
