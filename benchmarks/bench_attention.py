"""Benchmark of attention on token graphs: this project's backends against dense SDPA and FlexAttention.

The same as ``gnn-transformer bench`` (same options); kept as a script for source checkouts.

Usage:
    python benchmarks/bench_attention.py --quick                  # CPU, 4k tokens, float32
    python benchmarks/bench_attention.py --device cuda --markdown gpu.md   # 4k-64k (+256k, 1M)

The measurement lives in :mod:`gnn_transformer.bench.benchmark` (``run_benchmark`` returns rows).
"""

from __future__ import annotations

import sys

from gnn_transformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
