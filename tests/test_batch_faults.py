"""A batch's report and the faults read from it: each fault found in the max and min of the
reports alone, -100 labels and broadcast position_ids accepted (goose_core.distributed.batch_faults)."""

from __future__ import annotations

import torch
from torch import Tensor

from goose_core.distributed.batch_faults import REPORT_SIZE, batch_report, first_fault

VOCAB = 256
WHO = "tensor-parallel peers"


def _batch(**changes: Tensor | None) -> dict[str, Tensor]:
    ids = torch.arange(32).view(2, 16) % VOCAB
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    batch.update(changes)
    return {k: v for k, v in batch.items() if v is not None}


def _fault(*batches: dict[str, Tensor], checksum: bool = False, vocab: int | None = VOCAB) -> str | None:
    """The fault every rank would find after reducing these ranks' reports (one dp shard)."""
    reports = torch.stack([batch_report(b, checksum) for b in batches])
    return first_fault(reports.amax(0, keepdim=True), reports.amin(0, keepdim=True), vocab, [0], WHO)


def test_a_good_batch_has_no_fault_and_a_short_report() -> None:
    assert batch_report(_batch()).numel() == REPORT_SIZE < 48
    assert _fault(_batch(), _batch()) is None
    ignored = _batch(labels=torch.full((2, 16), -100))
    ignored["labels"][0, 3] = VOCAB - 1
    assert _fault(ignored) is None  # -100 is the ignore index, VOCAB - 1 the last id
    assert _fault(_batch(position_ids=torch.arange(16)[None])) is None  # broadcast over rows
    assert _fault(_batch(position_ids=torch.arange(16).repeat(3, 2, 1))) is None  # (3, B, S): mrope


def test_ids_and_labels_outside_the_vocabulary_are_named() -> None:
    for field, value in [("input_ids", VOCAB), ("input_ids", -5), ("labels", 300), ("labels", -1)]:
        bad = _batch()
        bad[field] = bad[field].clone()
        bad[field][1, 7] = value
        fault = _fault(bad)
        assert fault is not None and fault.startswith(f"{field} hold {value}"), fault
        assert f"outside [0, {VOCAB})" in fault and "resize_token_embeddings" in fault, fault
        assert _fault(bad, vocab=None) is None  # no vocabulary known: not bounded


def test_shapes_that_do_not_fit_input_ids_are_named() -> None:
    cases = {"labels": (torch.zeros(2, 15, dtype=torch.long), "labels have shape (2, 15) but input_ids (2, 16)"),
             "attention_mask": (torch.ones(2, 8), "attention_mask has shape (2, 8) but input_ids (2, 16)"),
             "position_ids": (torch.arange(15)[None], "position_ids have shape (1, 15) but input_ids (2, 16)")}
    for field, (value, message) in cases.items():
        fault = _fault(_batch(**{field: value}))
        assert fault is not None and fault.startswith(message), fault
    assert _fault(_batch(attention_mask=torch.ones(2, 1, 16, 16))) is None  # a 4-D mask: not compared


def test_shapes_that_differ_between_ranks_are_named_before_anything_else() -> None:
    short = {k: v[:, :-1] for k, v in _batch().items()}
    fault = _fault(_batch(), short)
    assert fault is not None and fault.startswith(f"the {WHO} of data-parallel rank 0 were fed batches of "
                                                  f"different shapes: input_ids's shape ranges from (2, 15) to (2, 16)"), fault
    fault = _fault(_batch(), _batch(attention_mask=None))  # a field given on one rank only
    assert fault is not None and "attention_mask's shape ranges from None to (2, 16)" in fault, fault
    # a shape fault hides the misfit and the bad id it comes with
    bad = _batch(labels=torch.full((2, 15), 999))
    assert "different shapes" in _fault(_batch(), bad)  # type: ignore[operator]


def test_the_checksum_names_the_fields_that_differ() -> None:
    other = _batch(labels=_batch()["labels"].roll(1, 1))
    fault = _fault(_batch(), other, checksum=True)
    assert fault is not None and "were fed different batches (labels differ)" in fault, fault
    assert _fault(_batch(), other) is None  # without the checksum only shapes and ids are compared


def test_each_shard_is_read_apart_and_named() -> None:
    bad = _batch()
    bad["input_ids"] = bad["input_ids"].clone()
    bad["input_ids"][0, 0] = 1000
    reports = torch.stack([batch_report(_batch()), batch_report(bad)])  # one rank per dp shard
    fault = first_fault(reports, reports, VOCAB, [0, 1], WHO)
    assert fault is not None and fault.startswith("input_ids on data-parallel rank 1 hold 1000"), fault
