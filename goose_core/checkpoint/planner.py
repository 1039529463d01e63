"""DCP planners for a flat dict of :class:`Pieces` and plain objects: no DTensor needed.

torch.distributed.checkpoint (DCP) reshards DTensors, but a DTensor cannot say "three pieces of
this parameter" (a fused q|k|v shard), and its meshes are more than goose's groups need. DCP's
planner interface takes any list of chunks with global offsets, and its resharding (reading the
overlap of saved and wanted chunks) works on those: these planners speak it directly, with
public classes of DCP that torch 2.11 (goose's floor) and 2.13 both have.

Values of the state dict: :class:`Pieces` (tensors by global offset) or any picklable object
(every rank may hold the same one; DCP writes it once).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, ReadItem, SavePlan, TensorWriteData,
                                                  WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from goose_core.checkpoint.chunks import Pieces

__all__ = ["PiecesSavePlanner", "PiecesLoadPlanner"]


def _write_items(fqn: str, value: Any) -> list[WriteItem]:
    if not isinstance(value, Pieces):
        return [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)]
    return [WriteItem(index=MetadataIndex(fqn, offset), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offset, t.shape),
                                                  properties=TensorProperties.create_from_tensor(t),
                                                  size=value.size))
            for offset, t in zip(value.offsets, value.tensors)]


class PiecesSavePlanner(DefaultSavePlanner):
    """Each rank plans its pieces; DCP's global plan drops the duplicates and checks coverage."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan([item for fqn, value in self.state_dict.items() for item in _write_items(fqn, value)])
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        value = self.state_dict[index.fqn]
        if not isinstance(value, Pieces):
            return value
        # a clone: a view would drag its whole parameter's storage into the file
        return value.at(index.offset).detach().cpu().contiguous().clone()


def _byte_read(fqn: str) -> ReadItem:
    zero = torch.Size((0,))
    return ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(fqn), dest_offsets=zero,
                    storage_index=MetadataIndex(fqn), storage_offsets=zero, lengths=zero)


class PiecesLoadPlanner(DefaultLoadPlanner):
    """Each rank reads the saved chunks that overlap its pieces, straight into them; an object's
    entry is replaced by the loaded object."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False, *args: Any, **kwargs: Any) -> None:
        self.state_dict, self.original_state_dict = state_dict, state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator
        self.loaded: dict[str, Any] = {}  # dcp.load may hand us a copy of the dict: keep objects here

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        items: list[ReadItem] = []
        for fqn, value in self.state_dict.items():
            md = self.metadata.state_dict_metadata[fqn]
            if isinstance(md, BytesStorageMetadata):
                items.append(_byte_read(fqn))
            else:
                assert isinstance(md, TensorStorageMetadata) and isinstance(value, Pieces)
                chunks = [ChunkStorageMetadata(o, t.shape) for o, t in zip(value.offsets, value.tensors)]
                items += create_read_items_for_chunk_list(fqn, md, chunks)
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].at(index.offset)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        self.state_dict[fqn] = self.loaded[fqn] = torch.load(value, weights_only=False)
