"""Micro-batches: equal chunks of every batched input, clear errors."""

import pytest
import torch

from goose_core.engine.microbatch import gather, scatter


def test_scatter_splits_every_tensor_and_copies_the_rest() -> None:
    ids = torch.arange(24).view(8, 3)
    chunks = scatter({"input_ids": ids, "labels": ids + 1, "use_cache": False}, 4)
    assert len(chunks) == 4
    assert all(c["use_cache"] is False for c in chunks)
    assert torch.equal(chunks[1]["input_ids"], ids[2:4])
    assert torch.equal(chunks[3]["labels"], ids[6:8] + 1)
    assert torch.equal(gather([c["input_ids"] for c in chunks]), ids)


@pytest.mark.parametrize("m, match", [(3, "does not split into 3"), (0, "must be >= 1"), (-2, "must be >= 1")])
def test_bad_micro_batch_counts_name_the_fix(m: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        scatter({"input_ids": torch.zeros(8, 4)}, m)


def test_inputs_of_different_batch_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="disagree"):
        scatter({"input_ids": torch.zeros(8, 4), "labels": torch.zeros(4, 4)}, 2)

