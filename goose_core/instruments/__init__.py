"""Instruments: record what a pipeline run did, and draw it.

Read ``timeline`` first (a recorder built on :mod:`goose_core.engine.callbacks`: when each
forward, backward and recompute ran, and the bubble they leave), then ``gantt`` (that timeline
as a chart: partitions as rows, micro-batches as colours). Neither changes what runs.
``accounting`` counts one training step of any layout: bytes held, activation peak, FLOPs and
bytes sent per group (the assembled run's ``--account``, ``goose train --account``).
"""

from goose_core.instruments.accounting import Account, Accounting, gathered_table
from goose_core.instruments.gantt import draw_gantt
from goose_core.instruments.timeline import Span, Timeline, bubble_fraction, busy_time, cell_order, makespan, trim_waits

__all__ = ["Account", "Accounting", "gathered_table", "Span", "Timeline", "bubble_fraction", "busy_time", "cell_order", "draw_gantt", "makespan", "trim_waits"]
