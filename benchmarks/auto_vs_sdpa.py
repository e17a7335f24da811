"""``attend(backend="auto")`` against ``scaled_dot_product_attention(is_causal=True)`` on a causal
graph, the calls of the two interleaved (so that load from other processes hits both alike), each
side in its own layout (``[N, H, D]`` and contiguous ``[1, H, N, D]``).

Usage:
    python benchmarks/auto_vs_sdpa.py            # 4096 tokens, 12 heads x 64, float32, 2 threads
    python benchmarks/auto_vs_sdpa.py --tokens 16384 --threads 4 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gnn_transformer.kernels import attend, auto_kernel
from gnn_transformer.topology import causal


def _median_pair(a, b, repeats: int) -> tuple[float, float]:
    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times_a), statistics.median(times_b)


def main(n: int = 4096, heads: int = 12, dim: int = 64, threads: int = 2, repeats: int = 7) -> None:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(n, heads, dim, generator=gen) for _ in range(4))  # [N, H, D]
    edge_index = causal(n)
    scale = dim**-0.5
    qb, kb, vb, gradb = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v, grad))  # [1, H, N, D]
    print(f"auto runs {auto_kernel(edge_index, 'cpu')}")

    def auto_fwd():
        with torch.no_grad():
            attend(q, k, v, edge_index, scale=scale)

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    leaves_b = [x.clone().requires_grad_() for x in (qb, kb, vb)]

    def auto_bwd():
        torch.autograd.grad(attend(*leaves, edge_index, scale=scale), leaves, grad)

    def sdpa_bwd():
        torch.autograd.grad(F.scaled_dot_product_attention(*leaves_b, is_causal=True, scale=scale), leaves_b, gradb)

    for name, a, b in (("fwd", auto_fwd, sdpa_fwd), ("fwd+bwd", auto_bwd, sdpa_bwd)):
        ta, tb = _median_pair(a, b, repeats)
        print(f"{name}: auto {1e3 * ta:.1f} ms, sdpa is_causal {1e3 * tb:.1f} ms, auto / sdpa {ta / tb:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    main(n=args.tokens, threads=args.threads, repeats=args.repeats)
