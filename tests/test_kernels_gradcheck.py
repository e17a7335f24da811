"""``torch.autograd.gradcheck`` in float64 of the PyTorch autograd functions and of the merge."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer.kernels import planner, attend
from gnn_transformer.kernels.fused_torch import chunked_attention
from gnn_transformer.kernels.merge import merge_partials
from gnn_transformer.kernels.tiled_torch import tiled_attention
from gnn_transformer.kernels.tiling import build_tiles

from .conftest import assert_splits, graph_case, make_inputs, split_graph


def _finite(result):
    """``(out, lse)`` of a kernel's ``(out, lse, lse_lo)`` (or of attend's ``(out, lse)``) with the
    ``-inf`` of empty rows replaced by 0 (finite differences need it)."""
    out, lse = result[:2]
    return out, lse.masked_fill(torch.isinf(lse), 0.0)


def _tiny(name):
    edge_index, n_src, n_dst = graph_case(name, seed=5)
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    keep = (plain[0] < 9) & (plain[1] < 8)
    return plain[:, keep], min(n_src, 9), min(n_dst, 8)


@pytest.mark.parametrize("name", ["empty_rows", "multigraph", "bipartite", "causal"])
def test_gradcheck_chunked(name):
    edge_index, n_src, n_dst = _tiny(name)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=3)
    graph = planner.prepare(edge_index, n_src, n_dst)
    assert graph.perm is None
    for max_edges in (1 << 20, 3):
        assert torch.autograd.gradcheck(
            lambda *x: _finite(chunked_attention(*x, graph, 0.7, max_edges)), (q, k, v, b), fast_mode=True
        )


@pytest.mark.parametrize("name", ["empty_rows", "multigraph", "causal"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_tiled(name, with_bias):
    edge_index, n_src, n_dst = _tiny(name)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=3, bias=with_bias)

    def fn(q, k, v, *b):  # a multigraph's repeated copies run fused beside the tiles, merged
        return _finite(
            attend(
                q,
                k,
                v,
                edge_index,
                scale=0.7,
                edge_bias=b[0] if b else None,
                backend="tiled",
                block_size=4,
                max_cells=64,
                impl="torch",
                return_lse=True,
            )
        )

    inputs = (q, k, v, b) if with_bias else (q, k, v)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("name", ["empty_rows", "causal", "bipartite"])
def test_gradcheck_tiled_edge_bias(name):
    """An edge bias ``[E_t, H]`` read per cell (no bias tiles), its gradient written per edge."""
    edge_index, n_src, n_dst = _tiny(name)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=1, dim=3)
    graph = planner.prepare(edge_index, n_src, n_dst)
    tiles = build_tiles(graph, 4, 4)

    def fn(q, k, v, b):
        return _finite(tiled_attention(q, k, v, tiles, b[tiles.edge_ids], 0.7, max_cells=64))

    assert torch.autograd.gradcheck(fn, (q, k, v, b), fast_mode=True)


def test_gradcheck_split_through_attend():
    edge_index, n_src, n_dst = split_graph()
    assert_splits(edge_index, n_src, n_dst, block_size=4, tile_cost=0.5)
    q, k, v, b = make_inputs(n_src, n_dst, edge_index.size(1), heads=2, kv_heads=2, dim=3)

    def fn(q, k, v, b):
        return _finite(
            attend(
                q,
                k,
                v,
                edge_index,
                scale=0.7,
                edge_bias=b,
                backend="split",
                block_size=4,
                tile_cost=0.5,
                return_lse=True,
            )
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, b), fast_mode=True)


def test_gradcheck_merge_with_empty_rows():
    g = torch.Generator().manual_seed(0)
    out_a, out_b = (torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lse_a = torch.randn(5, 2, generator=g, dtype=torch.float64)
    lse_b = torch.randn(5, 2, generator=g, dtype=torch.float64)
    lse_a[0], lse_b[1] = float("-inf"), float("-inf")
    lse_a.requires_grad_()
    lse_b.requires_grad_()
    assert torch.autograd.gradcheck(merge_partials, (out_a, lse_a, out_b, lse_b))
    # both empty: zero output, -inf lse, zero gradients
    inf = torch.full((1, 2), float("-inf"), dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    out, lse = merge_partials(zero, inf, zero, inf)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), (zero, inf))
    assert all(torch.isfinite(x).all() for x in grads)


def test_gradcheck_merge_with_remainders():
    """With the parts' lse remainders (``lse_lo``) the merge stays differentiable in out and lse, and
    its own remainder is 0 on rows empty in both parts."""
    g = torch.Generator().manual_seed(1)
    out_a, out_b = (torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lse_a = torch.randn(5, 2, generator=g, dtype=torch.float64)
    lse_b = torch.randn(5, 2, generator=g, dtype=torch.float64)
    lse_a[0], lse_b[0] = float("-inf"), float("-inf")
    lo_a = torch.randn(5, 2, generator=g, dtype=torch.float64) * 1e-17
    lo_b = torch.randn(5, 2, generator=g, dtype=torch.float64) * 1e-17
    lo_a[0] = lo_b[0] = 0.0
    lse_a.requires_grad_()
    lse_b.requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: _finite(merge_partials(*x, (lo_a, lo_b))), (out_a, lse_a, out_b, lse_b))
    _, lse, lo = merge_partials(out_a, lse_a, out_b, lse_b, (lo_a, lo_b))
    assert torch.isneginf(lse[0]).all() and (lo[0] == 0).all() and not lo.requires_grad


def test_gradcheck_merge_with_remainders_that_need_gradients():
    """A remainder passed with ``requires_grad`` gets its part's log-sum-exp gradient (it is part of
    the same number), and gradcheck agrees; outputs in bfloat16 get bfloat16 gradients."""
    g = torch.Generator().manual_seed(2)
    out_a, out_b = (torch.randn(4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lse_a, lse_b, lo_a, lo_b = (
        torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)
    )
    assert torch.autograd.gradcheck(
        lambda *x: _finite(merge_partials(*x[:4], (x[4], x[5]))), (out_a, lse_a, out_b, lse_b, lo_a, lo_b)
    )
    half_a, half_b = (x.detach().bfloat16().requires_grad_() for x in (out_a, out_b))
    out, _ = merge_partials(half_a, lse_a.detach().float(), half_b, lse_b.detach().float())
    out.float().sum().backward()
    assert out.dtype == half_a.grad.dtype == half_b.grad.dtype == torch.bfloat16
