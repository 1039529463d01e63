"""The family sweep: every 🤗 causal-LM family, tiny, at tp=2, pp=2 and tp=2 x pp=2 against one device.

A tool beside the library, not part of it: run from the repository root as
``PYTHONPATH=tools python -m sweep`` (``make coverage``), it writes docs/coverage.md and
docs/coverage.json. Read ``families`` (which families, at which tiny size), then ``coverage``
(the driver: reference runs, one process group per mode, the classification), then ``report``
(the record and its Markdown page).
"""

from sweep.coverage import MODES, main, run_sweep
from sweep.families import SweepFamily, families, tiny_family_config
from sweep.report import BUILD, STATUSES, Outcome

__all__ = ["BUILD", "MODES", "Outcome", "STATUSES", "SweepFamily", "families", "main", "run_sweep",
           "tiny_family_config"]
