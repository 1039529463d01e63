"""The pipeline engine: schedules, micro-batches, recompute, streams and transports, with no model in sight.

Everything here runs cells, functions of one tensor, over partitions; nothing imports 🤗
transformers or knows a model family (:mod:`goose_core.pipeline` binds a 🤗 causal LM to it).
Read it in this order:

* ``schedule``: GPipe and 1F1B as data, which (micro-batch, partition) cells run when;
* ``messages``: the point-to-point order a schedule implies (NCCL matches by order, not tags);
* ``microbatch``: cut a batch into M micro-batches, glue the outputs back;
* ``dependency``: Fork and Join, empty "phony" tensors that add edges to the autograd graph;
* ``recompute``: a cell that keeps no activations and rebuilds them before its backward;
  ``block_recompute``: recompute inside each block only (``"blocks"``, ``"selective"``), whose
  op policy is ``selective``'s;
* ``stream``: CUDA streams, and a CPU stand-in so the same code runs in CI;
  ``stream_check`` runs CPU code as a GPU would queue it and raises on races;
* ``transport``: how a tensor crosses a partition boundary (in-process Copy/Wait);
  ``p2p``: the same across processes, by isend/irecv;
* ``callbacks``: the hook interface the executor fires around every forward, backward, recompute;
* ``pipeline``: the executor, and the ``Root`` of a step's backward;
* ``parked``: 1F1B's gradients, computed in the forward call, handed over by ``loss.backward()``;
* ``activations``: activation memory in flight, measured;
* ``emulation``: sleep-calibrated stages, for timing schedules without maths.
"""

from goose_core.engine.activations import InFlight, LiveActivations
from goose_core.engine.callbacks import Callback, CallbackList, Event
from goose_core.engine.emulation import Sleep, SleepPipeline, ideal_gpipe_time
from goose_core.engine.p2p import DistributedTransport
from goose_core.engine.pipeline import Partition, Pipeline, Root, StepOutput
from goose_core.engine.recompute import MODES, RecomputeMode, is_recomputing, recompute_stop, will_recompute
from goose_core.engine.schedule import (SCHEDULES, GPipe, OneFOneB, Schedule, clock_cycles, format_timetable,
                                        schedule_named, timetable)
from goose_core.engine.stream import trace_waits
from goose_core.engine.transport import LocalTransport, Transport

__all__ = [
    "Callback",
    "CallbackList",
    "DistributedTransport",
    "Event",
    "GPipe",
    "InFlight",
    "LiveActivations",
    "LocalTransport",
    "MODES",
    "OneFOneB",
    "Partition",
    "Pipeline",
    "RecomputeMode",
    "Root",
    "SCHEDULES",
    "Schedule",
    "Sleep",
    "SleepPipeline",
    "StepOutput",
    "Transport",
    "clock_cycles",
    "format_timetable",
    "ideal_gpipe_time",
    "is_recomputing",
    "recompute_stop",
    "schedule_named",
    "timetable",
    "trace_waits",
    "will_recompute",
]
