"""python -m goose_core.plan: the ``goose plan`` command."""

import sys

from goose_core.plan.cli import plan_main

sys.exit(plan_main())
