"""Attention dropout in the kernels (fused, tiled, split): the keep mask is a hash of (seed, edge, head), the
same in the PyTorch and Triton implementations and in the backward pass.

The reference applies the same mask to the per-edge softmax (``attend_reference`` weights times the
keep scales), forward and backward, in float64 at 1e-10."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gnn_transformer.kernels import _dropout, planner, attend
from gnn_transformer.kernels.fused_torch import chunked_attention
from gnn_transformer.kernels.tiled_torch import tiled_attention
from gnn_transformer.kernels.tiling import build_tiles

from .conftest import (
    TOL,
    assert_splits,
    dropout_reference,
    graph_case,
    make_inputs,
    small_graph,
    split_graph,
    weighted_loss,
)


def _grads(out, lse, inputs, dtype=None):
    """Gradients of a loss on ``out`` and the finite ``lse``; its weights rounded to ``dtype``
    (so that a float32 run and its float64 reference weigh the same numbers)."""
    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).to(dtype or out.dtype).to(out.dtype)
    return torch.autograd.grad(weighted_loss(out, lse, w.view(out.shape)), inputs)


IMPLS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
# (backend, block size): the Triton tiled kernels need blocks of at least 16
BACKENDS = [("fused", None), ("tiled", 16), ("tiled", 4), ("split", 16), ("split", 4)]


# the Triton tiled kernels need blocks of at least 16
CASES = [
    (impl, backend, block) for impl in IMPLS for backend, block in BACKENDS if not (impl == "triton" and block == 4)
]


def _small(name, impl, seed=2):
    """A named graph; for the (slow) Triton interpreter its first 20 targets and sources."""
    return small_graph(name, seed=seed) if impl == "triton" else graph_case(name, seed=seed)


def _check(
    edge_index, n_src, n_dst, backend, block, impl, dtype=torch.float64, bias=True, tile_cost=0.3, p=0.4, seed=123
):
    """``attend`` with dropout on inputs of ``dtype`` equals the masked reference computed in float64
    on the same values: output, lse and the gradients of q, k, v and the bias."""
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=4, kv_heads=2, dim=4, dtype=dtype, bias=bias)
    kw = dict(
        scale=0.5,
        edge_bias=b,
        backend=backend,
        return_lse=True,
        impl=impl,
        dropout_p=p,
        dropout_seed=seed,
        max_edges=50,
        max_cells=300,
    )
    if block is not None:
        kw["block_size"] = block
    if backend == "split":
        kw["tile_cost"] = tile_cost
    out, lse = attend(q, k, v, edge_index, **kw)
    inputs = [x for x in (q, k, v, b) if x is not None]
    up = [x.detach().double().requires_grad_() for x in inputs]
    ref, ref_lse = dropout_reference(up[0], up[1], up[2], edge_index, 0.5, up[3] if bias else None, p, seed)
    assert out.dtype == dtype and lse.dtype == dtype
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse.to(dtype), **TOL[dtype])
    for x, y in zip(_grads(out, lse, inputs), _grads(ref, ref_lse, up, dtype)):
        torch.testing.assert_close(x, y.to(dtype), **TOL[dtype])


# the unsorted graph on the (slow) interpreter: in test_dropout_split_tiles_and_fuses
MAIN_CASES = [
    (name, impl, backend, block)
    for name in ("empty_rows", "hub", "bipartite", "multigraph", "causal", "unsorted")
    for impl, backend, block in CASES
    if not (name == "unsorted" and impl == "triton")
]


@pytest.mark.parametrize(
    "name, impl, backend, block", MAIN_CASES, ids=[f"{n}-{i}-{b}{k or ''}" for n, i, b, k in MAIN_CASES]
)
def test_dropout_matches_the_masked_reference(name, impl, backend, block):
    """Every backend with dropout drops the same weights (the hash of the edge's position in the
    target-sorted order, also for an unsorted edge_index), so each equals the same masked reference.
    split tiles the tiles at least (0.3 + 0.6) / 1.5 = 60% full under dropout: here only causal's,
    in the PyTorch cases (test_dropout_split_tiles_and_fuses has both parts non-empty on every
    implementation)."""
    edge_index, n_src, n_dst = _small(name, impl)
    _check(edge_index, n_src, n_dst, backend, block, impl, bias=name != "bipartite")


F32_CASES = [
    (name, impl, backend, block)
    for name in ("empty_rows", "multigraph", "causal", "unsorted")
    for impl, backend, block in CASES
    if impl == "torch" or (name == "causal" and backend != "split")
]


@pytest.mark.parametrize(
    "name, impl, backend, block", F32_CASES, ids=[f"{n}-{i}-{b}{k or ''}" for n, i, b, k in F32_CASES]
)
def test_dropout_float32_matches_the_masked_reference(name, impl, backend, block):
    """The same in float32, against the float64 masked reference at 1e-5."""
    edge_index, n_src, n_dst = _small(name, impl)
    _check(edge_index, n_src, n_dst, backend, block, impl, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_split_tiles_and_fuses(impl, dtype):
    """split with a non-empty tiled part and a non-empty fused part, on an unsorted edge_index:
    both parts key the mask by the edge's position in the whole target-sorted graph. Causal on 20
    tokens in blocks of 16: the first diagonal tile is 53% full, tiled from (0.15 + 0.6) / 1.5 = 50%."""
    from gnn_transformer.topology import causal

    plain = causal(20).as_tensor()
    edge_index = plain[:, torch.randperm(plain.size(1), generator=torch.Generator().manual_seed(0))]
    assert_splits(edge_index, 20, 20, block_size=16, tile_cost=0.15, dropout=True)
    _check(edge_index, 20, 20, "split", 16, impl, dtype=dtype, tile_cost=0.15)


def test_auto_with_dropout_picks_fused_or_tiled(monkeypatch):
    from gnn_transformer.kernels import choose_backend
    from gnn_transformer.topology import bigbird, causal, random, sliding_window, union

    assert choose_backend(causal(256), "cpu", dropout=True) == "tiled"
    assert choose_backend(random(256, 8), "cpu", dropout=True) == "fused"
    # split drops the same weights too; dropout only adds the cost of hashing the mask
    from gnn_transformer.kernels import DROPOUT_COST, planner

    for graph in (
        bigbird(512, block=16, window=1, num_global=1, num_random=2),
        union(sliding_window(1024, 32), random(1024, 4, seed=0)),
    ):
        assert choose_backend(graph, "cpu", block_size=64) == "split"
        for extra, want in (({"fused": 0.0, "tiled": 0.0}, "split"), ({"fused": 0.0, "tiled": 10.0}, "fused")):
            planner.clear_cache()
            monkeypatch.setitem(DROPOUT_COST, "cpu", extra)
            assert choose_backend(graph, "cpu", block_size=64, dropout=True) == want
    multi = torch.cat([causal(128).as_tensor(), causal(128).as_tensor()[:, :5]], dim=1)
    assert choose_backend(multi, "cpu") == "tiled"
    assert choose_backend(multi, "cpu", dropout=True) == "fused"  # two edges in a cell


def test_keep_rate_and_independence():
    edges = torch.arange(200_000)
    for p in (0.1, 0.5):
        kept = _dropout.keep_hash(7, edges, 0) >= _dropout.threshold(p)
        assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    a = _dropout.keep_hash(7, edges, 0) >= _dropout.threshold(0.5)
    b = _dropout.keep_hash(7, edges, 1) >= _dropout.threshold(0.5)  # another head
    c = _dropout.keep_hash(8, edges, 0) >= _dropout.threshold(0.5)  # another seed
    d = _dropout.keep_hash(7, edges + 2**32, 0) >= _dropout.threshold(0.5)  # the high word counts
    for other in (b, c, d):
        assert abs((a == other).float().mean().item() - 0.5) < 0.005


def test_hash_is_lowbias32():
    """Known values of lowbias32 (C. Wellons' hash-prospector): the 32-bit arithmetic in int64 is
    exact."""
    x = torch.tensor([0, 1, 0xFFFFFFFF, 0x12345678])
    want = []
    for v in x.tolist():
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        v ^= v >> 16
        want.append(v)
    assert _dropout._mix(x).tolist() == want


def test_keep_scales_equal_keep_scale_per_head():
    """The all-heads scales (tiled paths) are the per-head scales (fused path), bit for bit."""
    edges = torch.arange(3000).view(3, 1000) * 7919
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for p in (0.1, 0.3, 0.123456789):
            many = _dropout.keep_scales(11, edges, 5, p, dtype)
            one = torch.stack([_dropout.keep_scale(11, edges, h, p, dtype) for h in range(5)])
            assert many.dtype == dtype and torch.equal(many, one)


@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_gradcheck_with_dropout(backend):
    edge_index, n_src, n_dst = graph_case("empty_rows", seed=4)
    keep = (edge_index[0] < 9) & (edge_index[1] < 8)
    edge_index = edge_index.as_tensor()[:, keep]
    if backend == "split":  # a dense tile (tiled under dropout, at least 60% full) and scattered edges
        edge_index, n_src, n_dst = split_graph()
        assert_splits(edge_index, n_src, n_dst, block_size=4, tile_cost=0.3, dropout=True)
    q, k, v, b = make_inputs(9, 8, edge_index.size(1), heads=2, kv_heads=1, dim=3)
    graph = planner.prepare(edge_index, 9, 8)

    tiles = build_tiles(graph, 4, 4)

    def fn(q, k, v, b):
        if backend == "fused":
            out, lse, _ = chunked_attention(q, k, v, b, graph, 0.7, 7, dropout=(0.3, 99))
        elif backend == "split":
            out, lse = attend(
                q,
                k,
                v,
                edge_index,
                scale=0.7,
                edge_bias=b,
                backend="split",
                block_size=4,
                tile_cost=0.3,
                return_lse=True,
                max_edges=7,
                dropout_p=0.3,
                dropout_seed=99,
            )
        else:
            out, lse, _ = tiled_attention(q, k, v, tiles, b[tiles.edge_ids], 0.7, 64, dropout=(0.3, 99))
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v, b), fast_mode=True)


def test_dropout_errors_name_the_argument():
    edge_index, n_src, n_dst = graph_case("causal")
    q, k, v, _ = make_inputs(n_src, n_dst, edge_index.size(1), bias=False)
    with pytest.raises(ValueError, match="'dropout_p' in \\[0, 1\\) \\(got 1.0\\)"):
        attend(q, k, v, edge_index, scale=1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="'dropout_seed'.*-3"):
        attend(q, k, v, edge_index, scale=1.0, dropout_p=0.1, dropout_seed=-3)


@settings(max_examples=50, deadline=None)
@given(
    n_src=st.integers(1, 12),
    n_dst=st.integers(1, 12),
    density=st.floats(0.0, 1.0),
    backend=st.sampled_from(["fused", "tiled", "split", "auto"]),
    block=st.sampled_from([2, 4, 8]),
    tile_cost=st.floats(0.01, 1.5),
    p=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
    data_seed=st.integers(0, 2**16),
)
def test_random_graphs_with_dropout_match_the_masked_reference(
    n_src, n_dst, density, backend, block, tile_cost, p, seed, data_seed
):
    g = torch.Generator().manual_seed(data_seed)
    dst, src = (torch.rand(n_dst, n_src, generator=g) < density).nonzero(as_tuple=True)  # sorted by target
    edge_index = torch.stack([src, dst])
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=3, seed=data_seed)
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
        dropout_p=p,
        dropout_seed=seed,
    )
    ref, ref_lse = dropout_reference(q, k, v, edge_index, 0.6, b, p, seed)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    inputs = (q, k, v, b)
    for x, y in zip(_grads(out, lse, inputs), _grads(ref, ref_lse, inputs)):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


def test_keep_hash_equals_its_formula():
    """The vectorized hash (seed and head parts computed once) equals the formula edge by edge,
    for positions below and above 2**32."""

    def mix(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    def formula(seed, e, h):
        x = mix((seed ^ ((h * 0x9E3779B9) & 0xFFFFFFFF)) & 0xFFFFFFFF)
        x = mix(x ^ (e >> 32))
        return mix(x ^ (e & 0xFFFFFFFF))

    for edges in ([0, 1, 5, 2**31, 2**32 - 1], [3, 2**32, 2**33 + 7, 2**40 + 1]):
        e = torch.tensor(edges)
        got = _dropout.keep_hashes(12345, e, range(3))
        want = [[formula(12345, x, h) for x in edges] for h in range(3)]
        assert got.tolist() == want
        assert _dropout.keep_hash(12345, e, 2).tolist() == want[2]


def test_int32_hash_equals_the_exact_one():
    """The int32 hash (wrapping products, masked shifts) gives the bits of the exact int64 one, on
    positions whose products overflow, for many seeds and heads; the keep decision too, with an
    int32 position tensor left untouched. Positions from 2**31 take the exact path."""
    assert _dropout._int32_wraps()
    gen = torch.Generator().manual_seed(0)
    edges = torch.cat([torch.randint(0, 2**31, (5000,), generator=gen), torch.tensor([0, 1, 2**31 - 1])])
    for seed in (0, 1, 12345, 2**31 - 1):
        for head in (0, 1, 7, 63):
            fast = _dropout._hash32(seed, edges, head).to(torch.int64) & 0xFFFFFFFF
            prefix = _dropout._mix_int(_dropout._prefixes(seed, [head])[0])
            exact = _dropout._mix(torch.full_like(edges, prefix) ^ edges)
            assert torch.equal(fast, exact)
            for p in (0.1, 0.5, 0.9):
                want = exact >= _dropout.threshold(p)
                as32 = edges.to(torch.int32)
                assert torch.equal(_dropout._kept(seed, as32, head, p, True), want)
                assert torch.equal(as32, edges.to(torch.int32))  # not hashed in place
    big = torch.tensor([5, 2**31, 2**32 + 3])
    assert not _dropout._fast(big) and _dropout._fast(big[:1])
