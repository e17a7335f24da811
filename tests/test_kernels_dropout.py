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

from gnn_transformer.kernels import _dropout, _graph, attend, attend_reference
from gnn_transformer.kernels.chunked import chunked_attention
from gnn_transformer.kernels.tiled_torch import tiled_attention
from gnn_transformer.kernels.tiling import build_tiles

from .test_kernels_common import graph_case, make_inputs


def _reference(q, k, v, edge_index, scale, bias, p, seed):
    """Per-edge attention with the kernels' mask: ``out_i = sum_j m_ji alpha_ji v_j``."""
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    graph = _graph.prepare(edge_index, k.size(0), q.size(0))
    assert graph.perm is None  # sorted graphs: positions are columns
    src, dst = plain[0], plain[1]
    group = q.size(1) // k.size(1)
    s = (q[dst] * k[src].repeat_interleave(group, 1)).sum(-1) * scale  # [E, H]
    if bias is not None:
        s = s + bias
    _, lse = attend_reference(q, k, v, edge_index, scale=scale, edge_bias=bias, return_lse=True)
    alpha = torch.exp(s - lse[dst])  # [E, H]
    edges = torch.arange(src.numel())
    m = torch.stack([_dropout.keep_scale(seed, edges, h, p, q.dtype) for h in range(q.size(1))], 1)
    msg = (alpha * m).unsqueeze(-1) * v[src].repeat_interleave(group, 1)  # [E, H, D]
    out = torch.zeros(q.shape, dtype=q.dtype).index_add(0, dst, msg)
    return out, lse


def _grads(out, lse, inputs):
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    loss = (out * w).sum() + 0.3 * lse[torch.isfinite(lse)].sum()
    return torch.autograd.grad(loss, inputs)


IMPLS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
# (backend, block size): the Triton tiled kernels need blocks of at least 16
BACKENDS = [("fused", None), ("tiled", 16), ("tiled", 4), ("split", 16), ("split", 4)]


# the Triton tiled kernels need blocks of at least 16
CASES = [(impl, backend, block) for impl in IMPLS for backend, block in BACKENDS
         if not (impl == "triton" and block == 4)]


@pytest.mark.parametrize("impl, backend, block", CASES, ids=[f"{i}-{b}{k or ''}" for i, b, k in CASES])
@pytest.mark.parametrize("name", ["empty_rows", "hub", "bipartite", "multigraph", "causal"])
def test_dropout_matches_the_masked_reference(name, backend, block, impl):
    """Every backend with dropout drops the same weights (the hash of the edge's position), so each
    equals the same masked reference."""
    edge_index, n_src, n_dst = graph_case(name, seed=2)
    if impl == "triton":  # the interpreter is slow: the first 20 targets and sources
        keep = (edge_index[0] < 20) & (edge_index[1] < 20)
        edge_index, n_src, n_dst = edge_index.as_tensor()[:, keep], min(n_src, 20), min(n_dst, 20)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=4, kv_heads=2, dim=4,
                             bias=name != "bipartite")
    kw = dict(scale=0.5, edge_bias=b, backend=backend, return_lse=True, impl=impl, dropout_p=0.4,
              dropout_seed=123, max_edges=50, max_cells=300)
    if block is not None:
        kw["block_size"] = block
    if backend == "split":  # tiles at least 30% full tiled, the other edges fused (both parts non-empty)
        kw["tile_cost"] = 0.3
    if backend == "tiled" and name in ("multigraph", "hub"):  # repeated edges share a cell
        # (split keeps the tiles with repeated edges on its fused part)
        with pytest.raises(ValueError, match="without repeated edges"):
            attend(q, k, v, edge_index, **kw)
        return
    out, lse = attend(q, k, v, edge_index, **kw)
    ref, ref_lse = _reference(q, k, v, edge_index, 0.5, b, 0.4, 123)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    inputs = [x for x in (q, k, v, b) if x is not None]
    for x, y in zip(_grads(out, lse, inputs), _grads(ref, ref_lse, inputs)):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


def test_auto_with_dropout_picks_fused_or_tiled(monkeypatch):
    from gnn_transformer.kernels import choose_backend
    from gnn_transformer.topology import bigbird, causal, random, sliding_window, union

    assert choose_backend(causal(256), "cpu", dropout=True) == "tiled"
    assert choose_backend(random(256, 8), "cpu", dropout=True) == "fused"
    # split drops the same weights too; dropout only adds the cost of hashing the mask
    from gnn_transformer.kernels import DROPOUT_COST, _graph

    for graph in (bigbird(512, block=16, window=1, num_global=1, num_random=2),
                  union(sliding_window(1024, 32), random(1024, 4, seed=0))):
        assert choose_backend(graph, "cpu", block_size=64) == "split"
        for extra, want in (({"fused": 0.0, "tiled": 0.0}, "split"), ({"fused": 0.0, "tiled": 10.0}, "fused")):
            _graph.clear_cache()
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
    d = _dropout.keep_hash(7, edges + 2 ** 32, 0) >= _dropout.threshold(0.5)  # the high word counts
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
    q, k, v, b = make_inputs(9, 8, edge_index.size(1), heads=2, kv_heads=1, dim=3)
    graph = _graph.prepare(edge_index, 9, 8)

    tiles = build_tiles(graph, 4, 4)

    def fn(q, k, v, b):
        if backend == "fused":
            out, lse = chunked_attention(q, k, v, b, graph, 0.7, 7, dropout=(0.3, 99))
        elif backend == "split":
            out, lse = attend(q, k, v, edge_index, scale=0.7, edge_bias=b, backend="split", block_size=4,
                              tile_cost=0.3, return_lse=True, max_edges=7, dropout_p=0.3, dropout_seed=99)
        else:
            out, lse = tiled_attention(q, k, v, tiles, b[tiles.edge_ids], 0.7, 64, dropout=(0.3, 99))
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
@given(n_src=st.integers(1, 12), n_dst=st.integers(1, 12), density=st.floats(0.0, 1.0),
       backend=st.sampled_from(["fused", "tiled", "split", "auto"]), block=st.sampled_from([2, 4, 8]),
       tile_cost=st.floats(0.01, 1.5), p=st.floats(0.0, 0.9), seed=st.integers(0, 2 ** 31 - 1),
       data_seed=st.integers(0, 2 ** 16))
def test_random_graphs_with_dropout_match_the_masked_reference(n_src, n_dst, density, backend, block, tile_cost,
                                                                 p, seed, data_seed):
    g = torch.Generator().manual_seed(data_seed)
    dst, src = (torch.rand(n_dst, n_src, generator=g) < density).nonzero(as_tuple=True)  # sorted by target
    edge_index = torch.stack([src, dst])
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=3, seed=data_seed)
    out, lse = attend(q, k, v, edge_index, scale=0.6, edge_bias=b, backend=backend, block_size=block,
                      tile_cost=tile_cost, return_lse=True, dropout_p=p, dropout_seed=seed)
    ref, ref_lse = _reference(q, k, v, edge_index, 0.6, b, p, seed)
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

    for edges in ([0, 1, 5, 2 ** 31, 2 ** 32 - 1], [3, 2 ** 32, 2 ** 33 + 7, 2 ** 40 + 1]):
        e = torch.tensor(edges)
        got = _dropout.keep_hashes(12345, e, range(3))
        want = [[formula(12345, x, h) for x in edges] for h in range(3)]
        assert got.tolist() == want
        assert _dropout.keep_hash(12345, e, 2).tolist() == want[2]
