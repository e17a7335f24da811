"""Causal attention on implicit graphs too large for an edge list: ``topology.causal(n, implicit=True)``
(tiles, no edge list; 8.6e9 edges at 128k tokens would be 137 GB as int64 pairs), through
``kernels.attend`` with the ``tiled`` backend and with ``auto`` (which recognizes the causal graph and
runs SDPA's kernel), forward and forward + backward, against SDPA's ``is_causal`` output.

Usage:
    python benchmarks/implicit_causal.py --markdown implicit_causal.md   # 64k and 128k, bf16, CUDA
    python benchmarks/implicit_causal.py --device cpu --dtype float32 --sizes 1024 2048

Each row: tokens, edges, tiles, the graph's build time (seconds), backend, pass, the median time of
``--repeats`` calls (ms), the peak of allocated GPU memory during them (GiB; ``—`` on the CPU) and the
largest absolute difference of the output from SDPA's.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gnn_transformer import kernels
from gnn_transformer.bench.benchmark import median_seconds
from gnn_transformer.topology import causal

HEADER = ["| n | edges | tiles | graph s | backend | pass | ms | peak GiB | max_err vs sdpa |", "|" + " --- |" * 9]


def _rows_of_size(n, device, dtype, heads, dim, repeats, backends, gen):
    t0 = time.perf_counter()
    graph = causal(n, implicit=True).to(device)
    built = time.perf_counter() - t0
    scale = dim**-0.5
    q, k, v = (torch.randn(n, heads, dim, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    with torch.no_grad():  # SDPA's own causal kernel on [1, H, N, D]
        bhnd = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        ref = F.scaled_dot_product_attention(*bhnd, is_causal=True, scale=scale)[0].transpose(0, 1).float()
        del bhnd
    for backend in backends:
        for pas in ("fwd", "fwd+bwd"):

            def call():
                with torch.no_grad() if pas == "fwd" else contextlib.nullcontext():
                    out = kernels.attend(q, k, v, graph, scale=scale, backend=backend)
                if pas == "fwd+bwd":
                    out.sum().backward()
                return out

            err = float((call().detach().float() - ref).abs().max())
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = median_seconds(call, device, repeats)
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "—"
            yield (
                f"| {n} | {graph.num_edges()} | {graph.num_tiles} | {built:.2f} | {backend} | {pas} | "
                f"{1e3 * seconds:.1f} | {peak} | {err:.1e} |"
            )


def rows(
    sizes: Sequence[int],
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    heads: int = 12,
    dim: int = 64,
    repeats: int = 3,
    backends: Sequence[str] = ("tiled", "auto"),
):
    """Yield one markdown row per size, backend and pass (see the module docstring)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        yield from _rows_of_size(n, device, dtype, heads, dim, repeats, backends, gen)
        if device.type == "cuda":  # the last size's tensors are gone with its generator's frame
            torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", help="also write the table to this file (after the last row)")
    args = parser.parse_args(argv)
    lines = list(HEADER)
    print("\n".join(lines), flush=True)
    for row in rows(args.sizes, args.device, getattr(torch, args.dtype), repeats=args.repeats):
        lines.append(row)
        print(row, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
