"""Attention as message passing, step by step, on a 4-token causal graph.

Computes one attention head by hand in PyG's vocabulary (``query_i``, ``key_j``, ``value_j``,
``softmax(alpha, index)``), then checks it against :class:`gnn_transformer.GraphMultiheadAttention`
and against dense masked attention with the same weights.

Usage:
    python examples/message_passing.py
"""

from __future__ import annotations

import math

import torch
from torch_geometric.utils import scatter, softmax

from gnn_transformer import GraphMultiheadAttention, dense
from gnn_transformer.topology import causal, to_dense_mask


def main() -> dict[str, float]:
    torch.manual_seed(0)
    n, dim = 4, 8
    x = torch.randn(n, dim)
    edge_index = causal(n).as_tensor()  # j -> i for j <= i
    src, dst = edge_index  # row 0: source j (key, value); row 1: target i (query)
    print(f"token graph: {edge_index.size(1)} edges j -> i")
    print("  " + ", ".join(f"{j}->{i}" for j, i in zip(src.tolist(), dst.tolist())))

    layer = GraphMultiheadAttention(dim, num_heads=1, backend="pyg").eval()
    w_q, w_k, w_v = layer.projection_weights()
    b_q, b_k, b_v = layer.projection_biases()
    query, key, value = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v  # [N, C] each

    # 1. every edge j -> i computes a score from the query of i and the key of j
    query_i, key_j, value_j = query[dst], key[src], value[src]  # [E, C]
    alpha = (query_i * key_j).sum(-1) / math.sqrt(dim)  # [E]
    # 2. softmax over the incoming edges of each target i
    alpha = softmax(alpha, dst, num_nodes=n)  # [E]
    print("attention weights per edge (they sum to 1 at each query):")
    for j, i, a in zip(src.tolist(), dst.tolist(), alpha.tolist()):
        print(f"  {j} -> {i}: {a:.3f}")
    # 3. messages alpha_ji * v_j, summed at each target, then the output projection
    out = scatter(alpha.unsqueeze(-1) * value_j, dst, dim=0, dim_size=n, reduce="sum")  # [N, C]
    out = layer.out_proj(out)

    with torch.no_grad():
        out_layer = layer(x, edge_index)
        mask = to_dense_mask(edge_index, n, n)  # [N, N], mask[i, j] = edge j -> i
        out_dense, _ = dense.multihead_attention(layer, x[None], x[None], mask[None])
    errors = {
        "by hand vs layer": (out - out_layer).abs().max().item(),
        "layer vs dense": (out_layer - out_dense[0]).abs().max().item(),
    }
    for name, err in errors.items():
        print(f"max |difference| {name}: {err:.2e}")
    return errors


if __name__ == "__main__":
    main()
