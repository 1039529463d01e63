"""The pipeline engine: GPipe and 1F1B over processes, streams, and checkpointing by virtual dependencies.

Read it in this order: ``schedule`` (what runs when), ``messages`` (the point-to-point order it
implies), ``microbatch``, ``dependency`` (Fork/Join),
``checkpoint`` (Checkpoint/Recompute), ``stream``, ``transport`` and ``p2p`` (how tensors cross
a boundary), ``pipeline`` (the executor and the ``Root`` of a step's backward), ``parked`` (1F1B's
gradients, handed over by ``loss.backward()``), ``activations`` (memory in flight, measured), ``split``
(cutting a transformers model: each cell runs the family's own forward; ``router_loss`` carries
the MoE auxiliary loss across stages), ``tied``, ``stage`` (one rank's stage: loss broadcast, tied and
data-parallel gradient syncing), ``parallel`` (the public entry points); ``emulation`` has
sleep-calibrated stages for timing; ``timeline`` and ``gantt`` record and draw what ran when,
through ``callbacks``.
"""

from goose_core.pipeline.callbacks import Callback, CallbackList, Event
from goose_core.pipeline.checkpoint import MODES, CheckpointMode, checkpoint_stop, is_checkpointing, is_recomputing
from goose_core.pipeline.emulation import Sleep, SleepPipeline, ideal_gpipe_time
from goose_core.pipeline.gantt import draw_gantt
from goose_core.pipeline.parallel import PipelineParallel, is_pipelined, local_pipeline
from goose_core.pipeline.activations import InFlight, LiveActivations
from goose_core.pipeline.schedule import (SCHEDULES, GPipe, OneFOneB, Schedule, clock_cycles, format_timetable,
                                          timetable)
from goose_core.pipeline.split import adapter_for
from goose_core.pipeline.stream import trace_waits
from goose_core.pipeline.timeline import Span, Timeline, bubble_fraction, busy_time, cell_order, makespan, trim_waits

__all__ = [
    "Callback",
    "CallbackList",
    "CheckpointMode",
    "Event",
    "GPipe",
    "InFlight",
    "LiveActivations",
    "MODES",
    "OneFOneB",
    "PipelineParallel",
    "SCHEDULES",
    "Schedule",
    "Sleep",
    "SleepPipeline",
    "Span",
    "Timeline",
    "adapter_for",
    "bubble_fraction",
    "busy_time",
    "cell_order",
    "checkpoint_stop",
    "clock_cycles",
    "draw_gantt",
    "format_timetable",
    "ideal_gpipe_time",
    "is_checkpointing",
    "is_pipelined",
    "is_recomputing",
    "local_pipeline",
    "makespan",
    "timetable",
    "trace_waits",
    "trim_waits",
]
