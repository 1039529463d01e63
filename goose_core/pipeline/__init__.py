"""The pipeline engine: GPipe over processes, streams, and checkpointing by virtual dependencies.

Read it in this order: ``schedule`` (what runs when), ``microbatch``, ``dependency`` (Fork/Join),
``checkpoint`` (Checkpoint/Recompute), ``stream``, ``transport`` and ``p2p`` (how tensors cross
a boundary), ``pipeline`` (the executor and the ``Root`` of a step's backward), ``split``
(cutting a transformers model), ``tied``, ``stage`` (one rank's stage: loss broadcast, tied and
data-parallel gradient syncing), ``parallel`` (the public entry points); ``emulation`` has
sleep-calibrated stages for timing; ``timeline`` and ``gantt`` record and draw what ran when,
through ``callbacks``.
"""

from goose_core.pipeline.callbacks import Callback, CallbackList, Event
from goose_core.pipeline.checkpoint import is_checkpointing, is_recomputing
from goose_core.pipeline.parallel import PipelineParallel, local_pipeline
from goose_core.pipeline.gantt import draw_gantt
from goose_core.pipeline.schedule import GPipe, Schedule, clock_cycles
from goose_core.pipeline.timeline import Span, Timeline

__all__ = ["Callback", "CallbackList", "Event", "GPipe", "PipelineParallel", "Schedule", "Span",
           "Timeline", "clock_cycles", "draw_gantt", "is_checkpointing", "is_recomputing",
           "local_pipeline"]
