"""Helpers of the Triton kernel tests (``test_kernels_fused_triton*.py``, ``test_kernels_tiled_triton*.py``):
the backends they run, the checks both kernels share (against the reference, forward and backward),
a record of the launches, and the hypothesis strategy of random small (multi)graphs.

The kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (set in conftest): graphs stay tiny.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch_geometric import EdgeIndex

from gnn_transformer.kernels import _pieces, attend, attend_reference, clear_cache, plan_costs

from .conftest import TOL, dense_attention, graph_case, make_inputs, small_graph, weighted_loss

TINY = ["single_edge", "no_edges", "empty_rows", "bipartite", "multigraph"]
# (backend, options): "split" runs the dense tiles on the tiled kernels and the other edges fused
FUSED = ("fused", {})
TILED = ("tiled", {"block_size": 16})
SPLIT = ("split", {"block_size": 16, "tile_cost": 0.25})
BATCH_CASES = [("batch", 2, 2), ("unsorted", 4, 2)]


def check_matches_reference(name, backend, kw, dtype):
    """On the tiny graph ``name``, ``out``, ``lse`` and the gradients equal the reference in ``dtype``."""
    edge_index, n_src, n_dst = small_graph(name, seed=3)
    bias = name != "bipartite"
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=4, dtype=dtype, bias=bias)
    out, lse = attend(
        q, k, v, edge_index, scale=0.4, edge_bias=b, backend=backend, return_lse=True, impl="triton", **kw
    )
    ref, ref_lse = attend_reference(q, k, v, edge_index, scale=0.4, edge_bias=b, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **TOL[dtype])
    w = torch.randn(out.shape, dtype=dtype)
    inputs = [x for x in (q, k, v, b) if x is not None]
    got = torch.autograd.grad(weighted_loss(out, lse, w), inputs)
    want = torch.autograd.grad(weighted_loss(ref, ref_lse, w), inputs)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL[dtype])


def check_bfloat16(name, heads, kv_heads, backend, kw):
    """bfloat16 inputs give a bfloat16 output equal to the float32 reference within 1e-2, gradients
    within 2e-2."""
    edge_index, n_src, n_dst = small_graph(name, seed=3)
    q, k, v, b = make_inputs(
        n_src, n_dst, edge_index.size(1), heads=heads, kv_heads=kv_heads, dim=16, dtype=torch.bfloat16
    )
    out, lse = attend(
        q, k, v, edge_index, scale=0.25, edge_bias=b, backend=backend, return_lse=True, impl="triton", **kw
    )
    up = [x.detach().float().requires_grad_() for x in (q, k, v, b)]
    ref = attend_reference(*up[:3], edge_index, scale=0.25, edge_bias=up[3])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    got = torch.autograd.grad(out.float().sum(), (q, k, v, b))
    want = torch.autograd.grad(ref.sum(), up)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.float(), y, atol=2e-2, rtol=2e-2)


def launched(monkeypatch):
    """``[(kernel name, constexprs)]`` of the Triton launches from here on (the kernels still run)."""
    from gnn_transformer.kernels import fused_triton, tiled_triton

    seen = []
    for module in (fused_triton, tiled_triton):

        def launch(kernel, grid, *args, _real=module.launch, **meta):
            seen.append((kernel.__name__, meta))
            return _real(kernel, grid, *args, **meta)

        monkeypatch.setattr(module, "launch", launch)
    return seen


def check_float64(out, lse, inputs, edge_index, scale, w):
    """``out``, ``lse`` and the gradients of ``weighted_loss`` w.r.t. ``inputs`` (q, k, v[, bias]) equal
    the reference run in float64 on the same values."""
    dtype = out.dtype
    up = [x.detach().double().requires_grad_() for x in inputs]
    ref, ref_lse = attend_reference(
        *up[:3], edge_index, scale=scale, edge_bias=up[3] if len(up) > 3 else None, return_lse=True
    )
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **TOL[dtype])
    got = torch.autograd.grad(weighted_loss(out, lse, w.to(dtype)), inputs)
    want = torch.autograd.grad(weighted_loss(ref, ref_lse, w.double()), up)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y.to(dtype), **TOL[dtype])


def run_plain_multi_head(name, heads, backend, kw, dtype, monkeypatch):
    """heads == kv_heads on the tiny graph ``name``: forward and backward equal the float64 reference;
    returns the names of the kernels launched."""
    edge_index, n_src, n_dst = small_graph(name, seed=3)
    q, k, v, b = make_inputs(
        n_src,
        n_dst,
        edge_index.size(1),
        heads=heads,
        kv_heads=heads,
        dim=4,
        dtype=dtype,
        bias=name != "bipartite",
        seed=1,
    )
    seen = launched(monkeypatch)
    out, lse = attend(
        q, k, v, edge_index, scale=0.4, edge_bias=b, backend=backend, return_lse=True, impl="triton", **kw
    )
    inputs = [x for x in (q, k, v, b) if x is not None]
    check_float64(out, lse, inputs, edge_index, 0.4, torch.randn(out.shape, dtype=torch.float64))
    return {n for n, _ in seen}


def batch():
    """Two disjoint graphs: causal over tokens 0..23, random edges among tokens 24..39."""
    from gnn_transformer.topology import causal

    g = torch.Generator().manual_seed(4)
    first = causal(24).as_tensor()
    keep = torch.rand(16, 16, generator=g) < 0.3
    dst, src = keep.nonzero(as_tuple=True)
    edge_index = torch.cat([first, torch.stack([src, dst]) + 24], 1)
    return edge_index, 40, 40


def check_batch_and_unsorted(name, heads, kv_heads, backend, kw, dtype):
    """A batch of two disjoint graphs, and an edge_index in random order (a plain LongTensor that
    attend sorts, edge biases following their columns), forward and backward."""
    from gnn_transformer.kernels import planner

    edge_index, n_src, n_dst = batch() if name == "batch" else graph_case("unsorted", seed=3)
    assert type(edge_index) is torch.Tensor
    if name == "unsorted":
        assert planner.prepare(edge_index, n_src, n_dst).perm is not None  # really out of order
    q, k, v, b = make_inputs(
        n_src, n_dst, edge_index.size(1), heads=heads, kv_heads=kv_heads, dim=4, dtype=dtype, seed=5
    )
    if backend == "split":  # both parts run: dense tiles tiled, the other edges fused
        costs = plan_costs(edge_index, "cpu", block_size=16, tile_cost=0.25, num_src=n_src, num_dst=n_dst)
        assert costs["dense_tiles"] > 0 and 0 < costs["dense_edges"] < costs["edges"], costs
    out, lse = attend(
        q, k, v, edge_index, scale=0.4, edge_bias=b, backend=backend, return_lse=True, impl="triton", **kw
    )
    check_float64(out, lse, [q, k, v, b], edge_index, 0.4, torch.randn(out.shape, dtype=torch.float64))
    if name == "batch":  # nothing crosses between the graphs: each one alone gives the same rows
        alone = attend(
            q[:24],
            k[:24],
            v[:24],
            edge_index[:, :300],
            scale=0.4,
            edge_bias=b[:300],
            backend=backend,
            impl="triton",
            **kw,
        )
        torch.testing.assert_close(out[:24], alone, **TOL[dtype])


# ---- hypothesis: random small (multi)graphs against the dense softmax --------------------------

BLOCK = 16
HEADS = [(2, 2), (3, 3), (4, 4), (2, 1), (3, 1), (4, 2), (4, 1)]  # (H, H_kv): plain and grouped


def _edge_list(draw, n_src, n_dst, max_edges):
    num = draw(st.integers(0, max_edges))
    src = draw(st.lists(st.integers(0, n_src - 1), min_size=num, max_size=num))
    dst = draw(st.lists(st.integers(0, n_dst - 1), min_size=num, max_size=num))
    return src, dst


@st.composite
def cases(draw, backends):
    """A random case for one of ``backends`` (a list of "fused", "tiled", "split")."""
    backend = draw(st.sampled_from(backends))
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
        backend=backend,
        n_src=n_src,
        n_dst=n_dst,
        src=src,
        dst=dst,
        heads=heads,
        kv_heads=kv_heads,
        tile_cost=tile_cost,
        dense=dense,
        layout=draw(st.sampled_from(["shuffled", "sorted", "edge_index"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        bias=draw(st.booleans()),
        length=draw(st.sampled_from([None, 1, 2, 3])),
        seed=draw(st.integers(0, 2**16)),
    )


def check_random_graph(case):
    """The case drawn by :func:`cases` equals a dense float64 masked softmax, forward (out, lse) and
    backward (q, k, v, edge_bias), with long rows forced into pieces (``_pieces.LENGTH``)."""
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
        costs = plan_costs(
            edge_index, "cpu", block_size=BLOCK, tile_cost=case["tile_cost"], num_src=n_src, num_dst=n_dst
        )
        # both parts run: some tiles tiled, the other edges fused
        assert costs["dense_tiles"] > 0 and costs["dense_edges"] < costs["edges"], costs
    previous = _pieces.LENGTH
    _pieces.LENGTH = case["length"]  # rows longer than this run in pieces (None: never on the CPU)
    clear_cache()
    try:
        out, lse = attend(
            q, k, v, edge_index, scale=0.6, edge_bias=b, backend=case["backend"], return_lse=True, impl="triton", **kw
        )
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
