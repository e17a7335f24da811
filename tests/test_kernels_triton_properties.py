"""Hypothesis: on random small (multi)graphs the Triton kernels (fused, tiled, split) equal a dense
float64 masked softmax, forward (out, lse) and backward (q, k, v, edge_bias), in float32 and float64,
with plain multi-head and grouped-query heads, and with long rows forced into pieces
(``_pieces.LENGTH``). Runs under ``TRITON_INTERPRET=1`` on CPU tensors: graphs stay tiny."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors need the interpreter (set in conftest)
    pytest.skip("TRITON_INTERPRET=1 is needed to run Triton kernels on CPU tensors", allow_module_level=True)

from torch_geometric import EdgeIndex  # noqa: E402

from gnn_transformer.kernels import _pieces, attend, clear_cache, plan_costs  # noqa: E402

from .conftest import TOL, dense_attention  # noqa: E402

BLOCK = 16
HEADS = [(2, 2), (3, 3), (4, 4), (2, 1), (3, 1), (4, 2), (4, 1)]  # (H, H_kv): plain and grouped


def _edge_list(draw, n_src, n_dst, max_edges):
    num = draw(st.integers(0, max_edges))
    src = draw(st.lists(st.integers(0, n_src - 1), min_size=num, max_size=num))
    dst = draw(st.lists(st.integers(0, n_dst - 1), min_size=num, max_size=num))
    return src, dst


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(["fused", "tiled", "split"]))
    if backend != "split":  # any graph: single nodes, N_src != N_dst, empty rows, no edges at all
        n_src, n_dst = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        src, dst = _edge_list(draw, n_src, n_dst, 70)
        tile_cost, dense = None, None
    else:  # a dense tile (0, 0) that split tiles, and sparse edges elsewhere that it runs fused
        n_src, n_dst = draw(st.integers(BLOCK + 1, 24)), draw(st.integers(BLOCK + 1, 24))
        tile_cost = draw(st.floats(0.1, 0.3))  # dense: >= 77 of the 256 cells; sparse: < 26
        dense = draw(st.sampled_from(["full", "causal", "random"]))
        r, c = torch.arange(BLOCK).repeat_interleave(BLOCK), torch.arange(BLOCK).repeat(BLOCK)
        if dense == "causal":
            keep = c <= r
        elif dense == "random":
            keep = torch.rand(BLOCK * BLOCK, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) < 0.7
        else:
            keep = torch.ones_like(r, dtype=torch.bool)
        # outside the dense tile: a query row >= BLOCK or a key column >= BLOCK; fewer than 26
        # distinct edges, so no other tile is dense
        num = draw(st.integers(1, 12))
        q_out = draw(st.lists(st.booleans(), min_size=num, max_size=num))
        src, dst = c[keep].tolist(), r[keep].tolist()
        for out_q in q_out:
            if out_q:
                dst.append(draw(st.integers(BLOCK, n_dst - 1)))
                src.append(draw(st.integers(0, n_src - 1)))
            else:
                dst.append(draw(st.integers(0, n_dst - 1)))
                src.append(draw(st.integers(BLOCK, n_src - 1)))
    # duplicated edges, anywhere (in split's dense tile too): separate messages, the copies run fused
    copies = draw(st.lists(st.integers(0, len(src) - 1), max_size=10)) if src else []
    src, dst = src + [src[i] for i in copies], dst + [dst[i] for i in copies]
    heads, kv_heads = draw(st.sampled_from(HEADS))
    return dict(
        backend=backend, n_src=n_src, n_dst=n_dst, src=src, dst=dst, heads=heads, kv_heads=kv_heads,
        tile_cost=tile_cost, dense=dense, layout=draw(st.sampled_from(["shuffled", "sorted", "edge_index"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])), bias=draw(st.booleans()),
        length=draw(st.sampled_from([None, 1, 2, 3])), seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=25, deadline=None)
@given(cases())
def test_triton_random_graphs_match_dense(case):
    gen = torch.Generator().manual_seed(case["seed"])
    src, dst = torch.tensor(case["src"], dtype=torch.long), torch.tensor(case["dst"], dtype=torch.long)
    n_src, n_dst, dtype = case["n_src"], case["n_dst"], case["dtype"]
    if case["layout"] == "shuffled":  # a plain LongTensor in random order
        perm = torch.randperm(src.numel(), generator=gen)
        src, dst = src[perm], dst[perm]
        edge_index = torch.stack([src, dst])
    else:  # sorted by target: a plain LongTensor, or an EdgeIndex that says so
        perm = torch.argsort(dst * n_src + src, stable=True)
        src, dst = src[perm], dst[perm]
        edge_index = torch.stack([src, dst])
        if case["layout"] == "edge_index":
            edge_index = EdgeIndex(edge_index, sparse_size=(n_src, n_dst), sort_order="col")

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    heads, kv_heads, dim = case["heads"], case["kv_heads"], 4
    q, k, v = r(n_dst, heads, dim), r(n_src, kv_heads, dim), r(n_src, kv_heads, dim)
    b = r(src.numel(), heads) if case["bias"] else None
    kw = {}
    if case["backend"] != "fused":
        kw["block_size"] = BLOCK
    if case["backend"] == "split":
        kw["tile_cost"] = case["tile_cost"]
        costs = plan_costs(edge_index, "cpu", block_size=BLOCK, tile_cost=case["tile_cost"], num_src=n_src,
                           num_dst=n_dst)
        # both parts run: some tiles tiled, the other edges fused
        assert costs["dense_tiles"] > 0 and costs["dense_edges"] < costs["edges"], costs
    previous = _pieces.LENGTH
    _pieces.LENGTH = case["length"]  # rows longer than this run in pieces (None: never on the CPU)
    clear_cache()
    try:
        out, lse = attend(q, k, v, edge_index, scale=0.6, edge_bias=b, backend=case["backend"],
                          return_lse=True, impl="triton", **kw)
        w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        inputs = [x for x in (q, k, v, b) if x is not None]
        loss = (out * w.to(dtype)).sum() + 0.3 * lse[torch.isfinite(lse)].sum()
        got = torch.autograd.grad(loss, inputs)
    finally:
        _pieces.LENGTH = previous
        clear_cache()
    ref, ref_lse = dense_attention(q, k, v, torch.stack([src, dst]), 0.6, b, return_lse=True)
    assert out.dtype == dtype and lse.dtype == dtype
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse.to(dtype), **TOL[dtype])
    want = torch.autograd.grad((ref * w).sum() + 0.3 * ref_lse[torch.isfinite(ref_lse)].sum(), inputs)
    for name, x, y in zip("qkvb", got, want):
        assert x.dtype == dtype, name
        torch.testing.assert_close(x, y.to(dtype), **TOL[dtype], msg=lambda m, name=name: f"grad {name}: {m}")
