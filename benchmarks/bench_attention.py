"""Benchmark of attention on token graphs: this project's backends against dense SDPA and FlexAttention.

Usage:
    python benchmarks/bench_attention.py --quick                  # CPU, 4k tokens, float32
    python benchmarks/bench_attention.py --device cuda --markdown docs/gpu.md   # 4k-64k (+256k, 1M)

The measurement lives in :mod:`gnn_transformer.kernels.benchmark` (``run_benchmark`` returns rows;
``gnn-transformer bench`` can wrap it); this script parses arguments and prints the table.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from gnn_transformer.kernels.benchmark import (BACKENDS, LINEAR, TOPOLOGIES, format_markdown,
                                               format_table, run_benchmark)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="token counts (default: 4096 16384 65536, plus 262144 1048576 for "
                             "window / bigbird / random on CUDA)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 4096 tokens, 3 repeats")
    parser.add_argument("--markdown", default=None, help="also write the table as markdown here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.quick:
        sizes, repeats = args.sizes or [4096], min(args.repeats, 3)
    else:
        sizes, repeats = args.sizes or [4096, 16384, 65536], args.repeats
    rows = []
    for topology in args.topologies:
        extra = [262144, 1048576] if (args.sizes is None and not args.quick and topology in LINEAR
                                       and torch.device(device).type == "cuda") else []
        rows += run_benchmark([topology], list(sizes) + extra, args.backends, device=device, dtype=dtype,
                              heads=args.heads, head_dim=args.head_dim, repeats=repeats,
                              backward=not args.no_backward, log=print)
    print()
    print(format_table(rows))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows) + "\n")
    return rows


if __name__ == "__main__":
    main()
