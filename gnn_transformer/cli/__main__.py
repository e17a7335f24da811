"""``python -m gnn_transformer.cli`` (as ``torchrun ... -m gnn_transformer.cli train`` needs)."""
import sys

from . import main

sys.exit(main())
