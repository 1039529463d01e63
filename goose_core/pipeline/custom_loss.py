"""A loss computed outside the model, per micro-batch, on the last pipeline stage.

Without a pipeline a training loop may compute its loss from the logits itself
(``loss = F.cross_entropy(model(ids).logits.view(-1, V), targets.view(-1))``). Under a pipeline
only the last stage ever holds logits, one micro-batch at a time, so the loss must be computed
there, inside the schedule: as torch.distributed.pipelining's schedules take
``loss_fn(output, target)``, :class:`~goose_core.pipeline.PipelineParallel` takes ``loss_fn``
and the loop passes the targets as ``labels=``::

    model = PipelineParallel(model, ctx, num_microbatches=M, loss_fn=loss_fn).parallelize()
    loss = model(input_ids=ids, labels=targets).loss      # on every stage: the batch's loss
    loss.backward()

``loss_fn`` receives one micro-batch's logits (whole: under tensor parallelism the LM head
gathers its vocabulary shards) and that micro-batch's rows of ``labels``, exactly as given. Two
forms, told apart by the signature:

    loss_fn(logits, labels)                      a mean over the micro-batch (torch's reduction
                                                 default): each micro-batch's loss is divided by
                                                 M and the M are summed, torch's
                                                 ``scale_grads=True``. That is the one-device loss
                                                 of the whole batch when every micro-batch
                                                 averages as many items, so labels holding
                                                 IGNORE_INDEX (-100) are refused at M > 1.
    loss_fn(logits, labels, num_items_in_batch)  🤗's ``loss_function`` convention
                                                 (:mod:`goose_core.loss`): the micro-batch's
                                                 token-loss sum over the whole batch's target
                                                 count (the count data parallelism passes, else
                                                 ``count_items(labels)``), summed as is: equal to
                                                 one device however padding falls.

A model with ``output_router_logits=True`` is refused with a ``loss_fn``: its auxiliary loss is
the model's own, added only where the model computes the loss.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from torch import Tensor, nn

from goose_core.loss import IGNORE_INDEX

__all__ = ["LossFn", "CustomLoss"]

LossFn = Callable[..., Tensor]
Body = Callable[[Tensor, dict[str, Any]], Tensor]


class CustomLoss:
    """``loss_fn`` applied to each micro-batch's logits on the last stage.

    Args:
        loss_fn: ``(logits, labels) -> mean loss`` or ``(logits, labels, num_items_in_batch) ->
            sum / num_items_in_batch`` (see the module docstring).
        num_microbatches: M, what a mean loss is divided by.
        model: the 🤗 model whose last stage computes the logits.

    Raises:
        ValueError: ``loss_fn`` not callable, or a model that adds a router loss to its own.
    """

    def __init__(self, loss_fn: LossFn, num_microbatches: int, model: nn.Module) -> None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(logits, labels), got {loss_fn!r}")
        if getattr(getattr(model, "config", None), "output_router_logits", False):
            raise ValueError(f"{type(model).__name__} has output_router_logits=True: its auxiliary router "
                             f"loss is added only to the model's own loss. Pass labels= without a loss_fn, "
                             f"or set config.output_router_logits=False to train on loss_fn alone")
        self.loss_fn, self.num_microbatches, self.model = loss_fn, num_microbatches, model
        self.token_weighted = _takes_num_items(loss_fn)

    def check(self, labels: Tensor | None) -> None:
        """Raise, on every rank before any collective, what a step cannot make equal to one device.

        Every stage and tensor-parallel peer holds the same ``labels``, so all of them raise.
        """
        if labels is None:
            raise ValueError("PipelineParallel(..., loss_fn=...) needs the targets: call "
                             "model(input_ids=..., labels=targets); loss_fn receives each "
                             "micro-batch's logits and rows of labels")
        if self.token_weighted or self.num_microbatches == 1:
            return
        if bool((labels == IGNORE_INDEX).any()):
            raise ValueError(
                f"labels hold IGNORE_INDEX ({IGNORE_INDEX}) with num_microbatches="
                f"{self.num_microbatches} and a mean loss_fn(logits, labels): micro-batches may "
                f"average different numbers of targets, so the mean of their means is not the "
                f"batch's mean. Give loss_fn a num_items_in_batch parameter and return the "
                f"micro-batch's loss sum / num_items_in_batch (🤗's loss_function convention), "
                f"or pass no loss_fn and let the model's own loss weight the tokens")

    def wrap(self, body: Body) -> Body:
        """The last partition's cell body: ``body`` run for the logits, then the loss (the
        logits alone without labels: inference)."""
        def cell(x: Tensor, inputs: dict[str, Any]) -> Tensor:
            labels, n = inputs.get("labels"), inputs.get("num_items_in_batch")
            plain = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
            with _whole_logits(self.model):
                logits = body(x, plain)
            if labels is None:
                return logits
            if self.token_weighted:
                return self.loss_fn(logits, labels, num_items_in_batch=n)
            # torch's scale_grads: each mean counts 1/M, so the M add up to the batch's mean
            return self.loss_fn(logits, labels) / self.num_microbatches
        return cell


@contextmanager
def _whole_logits(model: nn.Module) -> Iterator[None]:
    """During a cell, a vocabulary-split LM head (tensor parallelism's ``gather_output``) gathers
    its shards: ``loss_fn`` sees the logits one device computes, and the gather's backward hands
    each rank its shard's gradient. Set here, not by the whole model's call: a recomputed cell
    runs after that call has ended."""
    head = model.get_output_embeddings()
    before = getattr(head, "gather_output", None)
    if before is None:
        yield
        return
    head.gather_output = True
    try:
        yield
    finally:
        head.gather_output = before


def _takes_num_items(loss_fn: LossFn) -> bool:
    try:
        return "num_items_in_batch" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the plain form
        return False
