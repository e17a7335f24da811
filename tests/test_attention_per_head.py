"""Per-head graphs in the layer (``GraphMultiheadAttention.forward(..., edge_head=...)``): every
backend, ``pyg`` included, and every attention variant equals its dense counterpart with the
per-head mask ``[1, H, N, N]``, outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer import GraphMultiheadAttention
from gnn_transformer.dense.layers import attention as dense_attention_layer
from gnn_transformer.topology import dilated_per_head, per_head, sliding_window, to_dense_mask
from gnn_transformer.variants import attention_class
from tests.conftest import TOL


def _graph(n, seed=0):
    """Four heads on ``n`` tokens: a window, random edges, nothing (empty rows everywhere), causal."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, n, generator=g) < 0.3
    keep[::3] = False  # empty rows in head 1
    dst, src = keep.nonzero(as_tuple=True)
    none = torch.empty(2, 0, dtype=torch.long)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool)).nonzero().flip(1).t()
    return per_head([sliding_window(n, 2), torch.stack([src, dst]), none, causal])


def _dense(layer, x, edge_index, edge_head, bias=None):
    n = x.size(0)
    mask = to_dense_mask(edge_index, n, n, edge_head=edge_head, num_heads=layer.num_heads)[None]  # [1, H, N, N]
    dense_bias = None
    if bias is not None:
        dense_bias = torch.zeros(1, layer.num_heads, n, n, dtype=bias.dtype)
        dense_bias[0, edge_head, edge_index[1], edge_index[0]] = (
            bias if bias.dim() == 1 else bias.gather(1, edge_head[:, None])[:, 0]
        )
    out, _ = dense_attention_layer(layer, x[None], x[None], mask, bias=dense_bias)
    return out[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("backend", ["pyg", "fused", "tiled", "split", "auto"])
def test_layer_per_head_matches_dense(backend, kv_heads, dtype):
    n = 14
    edge_index, edge_head = _graph(n)
    layer = GraphMultiheadAttention(16, 4, num_kv_heads=kv_heads, backend=backend, dtype=dtype)
    x = torch.randn(n, 16, dtype=dtype, requires_grad=True)
    bias = torch.randn(edge_index.size(1), dtype=dtype, requires_grad=True)
    out = layer(x, edge_index, edge_head=edge_head, edge_bias=bias)
    x_ref, b_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref = _dense(layer, x_ref, edge_index, edge_head, b_ref)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [x, bias, layer.in_proj_weight])
    want = torch.autograd.grad((ref * w).sum(), [x_ref, b_ref, layer.in_proj_weight])
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp, **TOL[dtype])


@pytest.mark.parametrize("attention", ["sigmoid", "linear", "mlp"])
def test_variants_per_head_match_dense(attention):
    n = 12
    edge_index, edge_head = _graph(n, seed=1)
    layer = attention_class(attention)(16, 4, backend="auto" if attention != "mlp" else "fused", dtype=torch.float64)
    x = torch.randn(n, 16, dtype=torch.float64)
    torch.testing.assert_close(
        layer(x, edge_index, edge_head=edge_head), _dense(layer, x, edge_index, edge_head), **TOL[torch.float64]
    )


@pytest.mark.parametrize("backend", ["pyg", "fused", "tiled"])
def test_per_head_attention_weights(backend):
    n = 10
    edge_index, edge_head = dilated_per_head(n, 2, [1, 2, 3, 4])
    layer = GraphMultiheadAttention(16, 4, backend=backend, dtype=torch.float64)
    x = torch.randn(n, 16, dtype=torch.float64)
    _, alpha = layer(x, edge_index, edge_head=edge_head, return_attention_weights=True)
    assert alpha.shape == (edge_index.size(1),)
    mask = to_dense_mask(edge_index, n, n, edge_head=edge_head, num_heads=4)[None]
    from gnn_transformer.dense import multihead_attention

    _, weights = multihead_attention(layer, x[None], x[None], mask)  # [1, H, N, N]
    torch.testing.assert_close(alpha, weights[0, edge_head, edge_index[1], edge_index[0]], **TOL[torch.float64])


def test_per_head_with_precomputed_kv_and_bias_per_head_column():
    n = 9
    edge_index, edge_head = _graph(n, seed=2)
    layer = GraphMultiheadAttention(16, 4, num_kv_heads=2, dtype=torch.float64)
    x = torch.randn(n, 16, dtype=torch.float64)
    bias = torch.randn(edge_index.size(1), 4, dtype=torch.float64)  # [E, H]: read at each edge's head
    got = layer(x, edge_index, kv=layer.key_value(x), edge_head=edge_head, edge_bias=bias)
    torch.testing.assert_close(got, _dense(layer, x, edge_index, edge_head, bias), **TOL[torch.float64])


def test_bipartite_per_head():
    n_src, n_dst = 7, 5
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(3, n_dst, n_src, generator=g) < 0.4
    h, dst, src = keep.nonzero(as_tuple=True)
    edge_index, edge_head = torch.stack([src, dst]), h
    layer = GraphMultiheadAttention(12, 3, dtype=torch.float64)
    x_src, x_dst = torch.randn(n_src, 12, dtype=torch.float64), torch.randn(n_dst, 12, dtype=torch.float64)
    got = layer((x_src, x_dst), edge_index, edge_head=edge_head)
    mask = to_dense_mask(edge_index, n_src, n_dst, edge_head=edge_head, num_heads=3)[None]
    want, _ = dense_attention_layer(layer, x_dst[None], x_src[None], mask)
    torch.testing.assert_close(got, want[0], **TOL[torch.float64])


def test_layer_refuses_a_bias_of_the_wrong_shape_for_a_per_head_graph():
    edge_index, edge_head = _graph(6)
    layer = GraphMultiheadAttention(16, 4)
    with pytest.raises(ValueError, match=r"'edge_bias' to have shape \[\d+\] or \[\d+, 4\]"):
        layer(torch.randn(6, 16), edge_index, edge_head=edge_head, edge_bias=torch.zeros(edge_index.size(1), 2))


def test_layer_refuses_an_edge_head_out_of_range():
    edge_index, edge_head = _graph(6)
    layer = GraphMultiheadAttention(16, 2)
    with pytest.raises(ValueError, match="Found 3 in 'edge_head' but there are 2 query heads"):
        layer(torch.randn(6, 16), edge_index, edge_head=edge_head)


def _positive_score_edges(query, key, edge_index):
    """A selector for the tests: per head, the allowed edges with a positive score ``q_i . k_j``."""
    assert not query.requires_grad and not key.requires_grad  # the choice is not differentiated
    src, dst = edge_index[0], edge_index[1]
    group = query.size(1) // key.size(1)
    score = (query[dst] * key[src].repeat_interleave(group, 1)).sum(-1)  # [E, H]
    e, h = (score > 0).nonzero(as_tuple=True)
    order = torch.argsort(h * (int(dst.max()) + 1) + dst[e], stable=True)
    return edge_index[:, e[order]], h[order]


@pytest.mark.parametrize("backend", ["pyg", "fused", "tiled", "auto"])
def test_select_attends_along_the_chosen_graph(backend):
    n = 12
    layer = GraphMultiheadAttention(
        16, 4, num_kv_heads=2, backend=backend, rope=True, select=_positive_score_edges, dtype=torch.float64
    )
    x = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(n)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)).nonzero().flip(1).t()
    out = layer(x, allowed, pos=pos)
    query = layer.rotate(layer.project_query(x), pos)
    key, _ = layer.key_value(x, pos=pos)
    chosen, chosen_head = _positive_score_edges(query.detach(), key.detach(), allowed)
    assert 0 < chosen.size(1) < 4 * allowed.size(1)
    x2 = x.detach().clone().requires_grad_()
    plain = GraphMultiheadAttention(16, 4, num_kv_heads=2, backend=backend, rope=True, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    want = plain(x2, chosen, pos=pos, edge_head=chosen_head)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    w = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad((out * w).sum(), x)[0], torch.autograd.grad((want * w).sum(), x2)[0], **TOL[torch.float64]
    )


def test_select_refuses_edge_head_and_bad_selectors():
    layer = GraphMultiheadAttention(8, 2, select=_positive_score_edges)
    graph = torch.tensor([[0, 0, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="no 'edge_head' for a layer that selects its graph"):
        layer(torch.randn(2, 8), graph, edge_head=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="'select' to be a callable"):
        GraphMultiheadAttention(8, 2, select="topk")
    wild = GraphMultiheadAttention(8, 2, select=lambda q, k, e: (torch.tensor([[2], [0]]), torch.tensor([0])))
    with pytest.raises(ValueError, match="Found source index 2 in 'edge_index' but there are only 2 source nodes"):
        wild(torch.randn(2, 8), graph)
    bad = GraphMultiheadAttention(8, 2, select=lambda q, k, e: e)
    with pytest.raises(ValueError, match=r"'select' .* to return a pair \(edge_index, edge_head\)"):
        bad(torch.randn(2, 8), graph)
