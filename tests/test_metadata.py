"""goose_core.metadata: the facts wrappers leave on parameters and models, and their one home."""

import re
from pathlib import Path

import torch
from torch import nn

from goose_core import metadata

PACKAGE = Path(__file__).resolve().parents[1] / "goose_core"


def test_parameter_facts_start_unset_and_read_back() -> None:
    p = nn.Parameter(torch.zeros(2))
    assert metadata.shard_spec(p) is None and not metadata.is_duplicate(p) and not metadata.is_dp_shard(p)
    assert metadata.grad_shards(p) is None and metadata.grad_sync_of(p) is None
    spec = metadata.ShardSpec(dim=1, blocks=3)
    assert metadata.mark_sharded(p, spec) is p and metadata.shard_spec(p) == spec
    assert metadata.is_duplicate(metadata.mark_duplicate(p))
    assert metadata.is_dp_shard(metadata.mark_dp_shard(p))
    shards = lambda: [p]  # noqa: E731
    metadata.set_grad_shards(p, shards)
    assert metadata.grad_shards(p) is shards


def test_attribute_names_live_in_metadata_only() -> None:
    """No other module of goose_core names a ``_goose_`` attribute (the message bus it replaced)."""
    offenders = [f"{path.relative_to(PACKAGE)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "metadata.py" or path.parent != PACKAGE
                 for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"_goose_", line)]
    assert not offenders, f"use goose_core.metadata's accessors instead: {offenders}"
