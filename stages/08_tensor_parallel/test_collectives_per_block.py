"""Stage 08: Megatron's minimum communication: 2 all-reduces per block forward, 2 backward."""

from unittest import mock

import pytest
import torch.distributed as dist

from goose_core import ParallelContext
from goose_core.testing import TrainSpec, run_distributed

from course import load_train_script

train_script = load_train_script("08")
LAYERS = 4


def _count(ctx: ParallelContext, family: str) -> dict[str, int]:
    """All-reduces in one decoder layer's forward, the whole forward, and the whole backward."""
    spec = TrainSpec(family=family)
    model = train_script.build(ctx, spec)
    calls = {"first": 0, "layer": 0, "forward": 0, "backward": 0}
    phase = ["first"]
    inside_layer = [False]
    layer = model.base_model.get_submodule("h" if family != "llama" else "layers")[1]
    layer.register_forward_pre_hook(lambda m, a: inside_layer.__setitem__(0, True))
    layer.register_forward_hook(lambda m, a, o: inside_layer.__setitem__(0, False))
    real = dist.all_reduce

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls[phase[0]] += 1
        calls["layer"] += inside_layer[0] and phase[0] == "forward"
        return real(*args, **kwargs)

    with mock.patch.object(dist, "all_reduce", counting):
        # the first step also checks, in its backward, that the parameters left whole got one
        # gradient (tensor_parallel.grad_check)
        model(**spec.batch(0)).loss.backward()
        phase[0] = "forward"
        loss = model(**spec.batch(0)).loss
        phase[0] = "backward"
        loss.backward()
    return calls


@pytest.mark.parametrize("family", ["gpt2", "llama", "bloom"])
def test_two_all_reduces_per_block_each_way(family: str) -> None:
    # Forward: 2 per block + 1 (vocab-parallel embedding) + 2 (loss: max, then (target, sum-exp))
    # + 1 (the batch check: shapes and ids agreed over the group, every forward; on the first it
    # carries the same-batch checksum too). Backward: 2 per block (the f before attention and
    # before the MLP) + 1 (f before lm_head). The first step adds one, once per model: the check
    # of the whole parameters' gradients in its backward.
    for calls in run_distributed(_count, 2, 1, 1, family, timeout=60):
        forward, backward = 2 * LAYERS + 3 + 1, 2 * LAYERS + 1
        assert calls == {"first": forward + backward + 1, "layer": 2, "forward": forward, "backward": backward}
