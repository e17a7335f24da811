"""Hypothesis: on random (multi)graphs every backend equals the per-edge reference, and the weights
of each non-empty target sum to one."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_geometric import EdgeIndex

from gnn_transformer.kernels import attend, attend_reference, edge_weights


@st.composite
def graphs(draw):
    n_src = draw(st.integers(1, 14))
    n_dst = draw(st.integers(1, 14))
    num_edges = draw(st.integers(0, 60))
    src = draw(st.lists(st.integers(0, n_src - 1), min_size=num_edges, max_size=num_edges))
    dst = draw(st.lists(st.integers(0, n_dst - 1), min_size=num_edges, max_size=num_edges))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    backend = draw(st.sampled_from(["fused", "tiled", "split", "auto"]))
    block = draw(st.sampled_from([2, 4, 8]))
    seed = draw(st.integers(0, 2**16))
    with_bias = draw(st.booleans())
    tile_cost = draw(st.floats(0.01, 1.5))  # which tiles split tiles: none, some or all
    # the order the builders emit (by target, then source, no repeats) takes linear-time paths
    # (tiling.sorted_unique; an EdgeIndex's CSC from PyG): drawn as such too
    order = draw(st.sampled_from(["as drawn", "sorted", "sorted unique", "EdgeIndex"]))
    pairs = list(zip(dst, src))
    if order != "as drawn":
        pairs = sorted(set(pairs) if order != "sorted" else pairs)
    edge_index = torch.tensor([[j for _, j in pairs], [i for i, _ in pairs]], dtype=torch.long).view(2, -1)
    if order == "EdgeIndex":
        edge_index = EdgeIndex(edge_index, sparse_size=(n_src, n_dst), sort_order="col")
    return n_src, n_dst, edge_index, heads, kv_heads, backend, block, seed, with_bias, tile_cost


@settings(max_examples=60, deadline=None)
@given(graphs())
def test_random_graphs_match_reference(case):
    n_src, n_dst, edge_index, heads, kv_heads, backend, block, seed, with_bias, tile_cost = case
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    q, k, v = r(n_dst, heads, 3), r(n_src, kv_heads, 3), r(n_src, kv_heads, 3)
    b = r(edge_index.size(1), heads) if with_bias else None
    out, lse = attend(
        q,
        k,
        v,
        edge_index,
        scale=0.6,
        edge_bias=b,
        backend=backend,
        block_size=block,
        tile_cost=tile_cost,
        return_lse=True,
    )
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.6, edge_bias=b, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    inputs = [x for x in (q, k, v, b) if x is not None]
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), inputs)
    want = torch.autograd.grad((ref * w).sum(), inputs)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)
    alpha = edge_weights(q, k, edge_index, lse, scale=0.6, edge_bias=b)  # [E, H]
    sums = torch.zeros(n_dst, heads, dtype=torch.float64).index_add_(0, edge_index[1], alpha.detach())
    nonempty = torch.bincount(edge_index[1], minlength=n_dst) > 0
    torch.testing.assert_close(sums[nonempty], torch.ones_like(sums[nonempty]), atol=1e-10, rtol=1e-10)
    assert (out[~nonempty] == 0).all()
