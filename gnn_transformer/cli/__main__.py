"""``python -m gnn_transformer.cli`` (as ``torchrun ... -m gnn_transformer.cli train`` needs)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
