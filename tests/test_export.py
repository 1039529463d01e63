"""export_pretrained writes, from any layout, the folder 🤗 writes for the single-device model:
from_pretrained loads it on one device with the parallel model's weights and logits; and
save_pretrained on a split model refuses, pointing to export_pretrained."""

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from goose_core import DistributedOptimizer, ParallelContext, export_pretrained, full_state_dict
from goose_core.data import shard_batch
from goose_core.testing import PARALLEL, TrainSpec, at_layout, run_distributed, train_loop, widen_float32


def _export(ctx: ParallelContext, spec: TrainSpec, path: str) -> tuple[Any, dict[str, torch.Tensor], str]:
    """Train, export, try save_pretrained; the parallel model's logits (last stage) and weights."""
    model = at_layout(spec.build_model(), ctx, num_microbatches=2)
    optimizer = spec.build_optimizer(model.parameters())
    optimizer = DistributedOptimizer(optimizer, ctx) if ctx.dp_size > 1 else optimizer
    train_loop(model, optimizer, (shard_batch(spec.batch(s), ctx.dp_rank, ctx.dp_size) for s in range(spec.steps)))
    export_pretrained(model, ctx, path)
    try:
        model.save_pretrained(path + "-rank-part")
        refused = ""
    except ValueError as err:
        refused = str(err)
    with torch.no_grad():
        logits = model(input_ids=spec.batch(spec.steps)["input_ids"]).logits
    return logits, full_state_dict(model, ctx), refused


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: this process's own model on one thread


# GPT-2: fused q|k|v over tp, the tied head on the last stage; Llama: GQA kv replicas, ZeRO-1.
@pytest.mark.parametrize("family, tp, pp, dp", [("gpt2", 2, 2, 1), ("llama", 2, 1, 2)])
def test_export_loads_on_one_device_with_the_parallel_models_logits(tmp_path: Path, family: str, tp: int,
                                                                    pp: int, dp: int) -> None:
    spec = TrainSpec(family=family, steps=2)
    results = run_distributed(_export, tp, pp, dp, spec, str(tmp_path / "export"), timeout=120)
    logits, weights, refused = results[-1]  # the last rank is on the last stage
    assert all("export_pretrained(model, ctx, path)" in r[2] for r in results), refused
    assert not (tmp_path / "export-rank-part").exists()

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=spec.dtype)
    widen_float32(loaded)  # float64 throughout, as the harness ran the parallel model (Llama's norm casts)
    state = loaded.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)  # every bit, tied head included
    with torch.no_grad():
        mine = loaded(input_ids=spec.batch(spec.steps)["input_ids"]).logits
    torch.testing.assert_close(logits, mine, rtol=PARALLEL.rtol, atol=PARALLEL.atol)

    spec.build_model().save_pretrained(tmp_path / "single")  # what 🤗 writes for the unsplit model
    assert _tensors(tmp_path / "export").keys() == _tensors(tmp_path / "single").keys()
