"""``python -m goose_core.train``: the same as ``goose train``."""

import sys

from goose_core.train.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
