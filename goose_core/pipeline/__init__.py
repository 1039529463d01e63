"""Pipeline parallelism for 🤗 causal LMs: the binding of a transformers model to :mod:`goose_core.engine`.

Read it in this order: ``split`` (cutting a causal LM into stages, each cell running the
family's own forward; ``router_loss`` carries the MoE auxiliary loss across stages), ``tied``
(one embedding weight on the first and the last stage), ``custom_loss`` (a loss from the logits,
per micro-batch), ``stage`` (one rank's stage: micro-batches in, the batch loss out, tied and
data-parallel gradients synced), ``generate`` (🤗's ``model.generate`` on a stage: its own KV
cache, the logits on every rank), ``parallel`` (the public entry points, :class:`PipelineParallel`
and :func:`local_pipeline`).

The engine's and the instruments' public names are re-exported here, and their former module
paths (``goose_core.pipeline.schedule``, ``.checkpoint``, ``.timeline``, ...) still import: they
name the modules of :mod:`goose_core.engine` and :mod:`goose_core.instruments`.
"""

import importlib
import sys

from goose_core.engine.activations import InFlight, LiveActivations
from goose_core.engine.callbacks import Callback, CallbackList, Event
from goose_core.engine.emulation import Sleep, SleepPipeline, ideal_gpipe_time
from goose_core.engine.recompute import (MODES, CheckpointMode, RecomputeMode, checkpoint_stop, is_checkpointing,
                                         is_recomputing, recompute_stop, will_recompute)
from goose_core.engine.schedule import (SCHEDULES, GPipe, OneFOneB, Schedule, clock_cycles, format_timetable,
                                        timetable)
from goose_core.engine.stream import trace_waits
from goose_core.instruments.gantt import draw_gantt
from goose_core.instruments.timeline import Span, Timeline, bubble_fraction, busy_time, cell_order, makespan, trim_waits
from goose_core.engine.block_recompute import BLOCK_MODES, RECOMPUTE_MODES
from goose_core.pipeline.parallel import PipelineParallel, is_pipelined, local_pipeline
from goose_core.pipeline.split import SplitModel, adapter_for, split_model_for

#: Former submodules of this package -> the modules that hold them now.
_MOVED = {
    **{name: f"goose_core.engine.{name}" for name in (
        "activations", "callbacks", "dependency", "emulation", "messages", "microbatch", "p2p", "parked",
        "pipeline", "schedule", "stream", "stream_check", "transport")},
    "checkpoint": "goose_core.engine.recompute",
    "gantt": "goose_core.instruments.gantt",
    "timeline": "goose_core.instruments.timeline",
}
# Registered, not copied: `goose_core.pipeline.schedule` *is* goose_core.engine.schedule, so a
# patch or an isinstance check through either name sees the same objects.
for _old, _new in _MOVED.items():
    sys.modules[f"{__name__}.{_old}"] = importlib.import_module(_new)
    globals()[_old] = sys.modules[_new]
del _old, _new

__all__ = [
    "Callback",
    "CallbackList",
    "CheckpointMode",
    "Event",
    "GPipe",
    "InFlight",
    "LiveActivations",
    "BLOCK_MODES",
    "MODES",
    "RECOMPUTE_MODES",
    "OneFOneB",
    "PipelineParallel",
    "RecomputeMode",
    "SCHEDULES",
    "Schedule",
    "Sleep",
    "SleepPipeline",
    "Span",
    "SplitModel",
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
    "recompute_stop",
    "split_model_for",
    "timetable",
    "trace_waits",
    "trim_waits",
    "will_recompute",
]
