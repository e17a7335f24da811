"""Per-head and data-dependent token graphs: a head is an edge type.

Builds DuoAttention's per-head graph (retrieval heads causal, streaming heads sinks + a window),
runs one attention layer on it and checks it against dense attention with the same per-head mask;
then lets a layer choose its graph from its own queries and keys (top-k keys per query and head)
and prints what each head kept. Optionally draws the per-head graphs.

Usage:
    python examples/per_head_graphs.py [--n 32] [--picture per_head.png]
"""

from __future__ import annotations

import argparse

import torch

from gnn_transformer import GraphMultiheadAttention, topology
from gnn_transformer.dense import multihead_attention
from gnn_transformer.topology import dynamic


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--picture", default=None, help="write the per-head graphs as a PNG here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with torch.no_grad():
        return _run(args.n, args.picture)


def _run(n: int, picture: str | None) -> dict[str, float]:
    heads = 4

    # 1. a fixed per-head graph: heads 1 and 3 stream (2 sinks + a causal window of 4), 0 and 2 retrieve
    edge_index, edge_head = topology.duo_attention(n, [1, 3], heads, num_sinks=2, window=4)
    layer = GraphMultiheadAttention(32, heads, dtype=torch.float64)
    x = torch.randn(n, 32, dtype=torch.float64)
    out = layer(x, edge_index, edge_head=edge_head)
    mask = topology.to_dense_mask(edge_index, n, n, edge_head=edge_head, num_heads=heads)  # [H, N, N]
    ref, _ = multihead_attention(layer, x[None], x[None], mask[None])
    errors = {"duo_attention": float((out - ref[0]).abs().max())}
    per_head = torch.bincount(edge_head, minlength=heads).tolist()
    print(
        f"DuoAttention on {n} tokens: edges per head {per_head}, {edge_index.size(1)} in all (a union graph "
        f"with a -inf bias per head would run {heads * n * (n + 1) // 2}); max |graph - dense| = "
        f"{errors['duo_attention']:.1e}"
    )

    # 2. a graph chosen from the data on every call: each query's 4 best keys per head, causal
    def top4(query, key, allowed):
        return dynamic.topk(query, key, 4, allowed=allowed)

    chooser = GraphMultiheadAttention(32, heads, select=top4, dtype=torch.float64)
    causal = topology.causal(n)
    out = chooser(x, causal)
    chosen, chosen_head = top4(chooser.project_query(x), chooser.key_value(x)[0], causal)
    plain = GraphMultiheadAttention(32, heads, dtype=torch.float64)
    plain.load_state_dict(chooser.state_dict())
    errors["topk"] = float((out - plain(x, chosen, edge_head=chosen_head)).abs().max())
    print(
        f"top-4 selection: {chosen.size(1)} edges over {heads} heads (causal has {causal.size(1)} per head); "
        f"max |select - fixed graph| = {errors['topk']:.1e}"
    )
    last = chosen[0][(chosen[1] == n - 1) & (chosen_head == 0)].tolist()
    print(f"token {n - 1}, head 0 reads tokens {last}")
    if picture:
        topology.draw_per_head(
            edge_index,
            edge_head,
            heads,
            title=f"DuoAttention, n = {n}",
            path=picture,
            head_names=["retrieval", "streaming", "retrieval", "streaming"],
        )
        print(f"Wrote {picture}")
    return errors


if __name__ == "__main__":
    main()
