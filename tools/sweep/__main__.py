"""``python -m sweep``: the whole sweep, or a subset (``--help``)."""

from sweep.coverage import main

raise SystemExit(main())
