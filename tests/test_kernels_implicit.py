"""Attention on implicit graphs (``BlockGraph``): outputs, log-sum-exps and gradients equal the
dense reference on the PyTorch and Triton tiled paths, per-head block selection with grouped
heads included; the tiled path never builds an edge list; the layers and models take a
``BlockGraph``; what needs edges materializes them or refuses clearly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gnn_transformer import GraphMultiheadAttention, GraphTransformerEncoder, GraphTransformerEncoderLayer
from gnn_transformer import kernels
from gnn_transformer import topology as T
from gnn_transformer.model import GraphLM, GraphTransformerConfig
from gnn_transformer.topology import BlockGraph
from gnn_transformer.topology.dynamic import BlockTopK, block_topk

from .conftest import TOL, dense_attention

GRAPHS = {
    "causal": lambda: T.causal(37, implicit=True, block_size=16),
    "causal_batch": lambda: T.causal([20, 0, 30], implicit=True, block_size=16),
    "window": lambda: T.sliding_window(45, 4, implicit=True, block_size=16),
    "window_causal": lambda: T.sliding_window([19, 31], 7, causal=True, implicit=True, block_size=16),
    "document": lambda: T.document(50, [13, 30, 7], causal=True, implicit=True, block_size=16),
    "full": lambda: T.full([9, 24], implicit=True, block_size=16),
    "odd_block": lambda: T.sliding_window(40, 5, implicit=True, block_size=12),
}


def _inputs(n, heads=4, kv_heads=2, dim=8, dtype=torch.float64):
    return tuple(torch.randn(n, h, dim, dtype=dtype, requires_grad=True) for h in (heads, kv_heads, kv_heads))


def _reference(q, k, v, graph, scale):
    edges = graph.edges()
    index, head = edges if isinstance(edges, tuple) else (edges, None)
    return dense_attention(q, k, v, index, scale, return_lse=True, edge_head=head)


def _check(q, k, v, graph, dtype, **options):
    scale = 0.3
    out, lse = kernels.attend(q, k, v, graph, scale=scale, return_lse=True, **options)
    ref_out, ref_lse = _reference(q, k, v, graph, scale)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref_out.to(dtype), **tol)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].to(lse.dtype), **tol)
    assert torch.isneginf(lse[~finite]).all()
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum() + lse[finite].sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * grad).sum() + ref_lse[finite].sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.to(dtype), **tol)


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_torch_tiled_equals_dense(name, dtype, backend):
    graph = GRAPHS[name]()
    _check(*_inputs(graph.num_dst, dtype=dtype), graph, dtype, backend=backend, impl="torch")


@pytest.mark.parametrize("block_size", [16, 32])
def test_sub_tiles_equal_dense(block_size):
    graph = T.sliding_window([50, 47], 20, causal=True, implicit=True, block_size=64)
    _check(*_inputs(graph.num_dst), graph, torch.float64, backend="tiled", block_size=block_size)


@pytest.mark.parametrize("name", ["causal_batch", "window", "document"])
def test_triton_tiled_equals_dense(name):
    graph = GRAPHS[name]()
    _check(*_inputs(graph.num_dst, dim=16, dtype=torch.float32), graph, torch.float32, backend="tiled", impl="triton")


def _selection(n, heads, kv_heads, lengths, causal, dtype=torch.float64, block=16, num_blocks=1):
    q, k, v = _inputs(n, heads, kv_heads, dim=16, dtype=dtype)
    return (q, k, v), block_topk(q, k, block, num_blocks, causal=causal, lengths=lengths, implicit=True)


@pytest.mark.parametrize(
    "n,heads,kv_heads,lengths,causal",
    [(64, 4, 2, None, True), (70, 4, 1, [30, 0, 40], True), (50, 2, 2, [21, 29], False), (37, 3, 3, None, True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_head_selection_equals_dense(n, heads, kv_heads, lengths, causal, dtype):
    (q, k, v), graph = _selection(n, heads, kv_heads, lengths, causal, dtype)
    _check(q, k, v, graph, dtype, backend="tiled", impl="torch")


def test_per_head_selection_triton_equals_dense():
    (q, k, v), graph = _selection(70, 4, 2, [30, 40], True, torch.float32)
    _check(q, k, v, graph, torch.float32, backend="tiled", impl="triton")


def test_per_head_selection_sub_tiles():
    (q, k, v), graph = _selection(96, 2, 1, [64, 32], True, block=32)
    _check(q, k, v, graph, torch.float64, backend="tiled", block_size=16)


@pytest.mark.parametrize(
    "n,block,block_size,backend",
    [(40, 16, 8, "tiled"), (40, 16, None, "tiled"), (192, 128, None, "auto"), (150, 64, 32, "tiled")],
)
def test_per_head_selection_with_a_short_last_block_in_sub_tiles(n, block, block_size, backend):
    """One sequence whose last block is short (40 tokens in blocks of 16): each head's rows are
    padded to whole blocks of the structure, also when sub-tiles divide the tokens (blocks of 8)."""
    (q, k, v), graph = _selection(n, 4, 2, None, True, block=block)
    _check(q, k, v, graph, torch.float64, backend=backend, block_size=block_size)


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    block=st.sampled_from([2, 5, 8]),
    num_blocks=st.integers(0, 3),
    causal=st.booleans(),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    one_sequence=st.booleans(),
    sub_tiles=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_selections_equal_dense(lengths, block, num_blocks, causal, heads, one_sequence, sub_tiles, seed):
    """Random block selections (batches, or one sequence: uniform blocks, the last one short), in
    the structure's tiles or in sub-tiles (the largest of 4, 2, 1 smaller than the blocks and dividing them)."""
    torch.manual_seed(seed)
    block = min(block, max(lengths))
    if one_sequence:
        lengths = [sum(lengths)]
    (q, k, v), graph = _selection(
        sum(lengths), *heads, None if one_sequence else lengths, causal, block=block, num_blocks=num_blocks
    )
    block_size = max(b for b in (1, 2, 4) if block % b == 0 and b < block) if sub_tiles and block > 1 else None
    _check(q, k, v, graph, torch.float64, backend="tiled", block_size=block_size)


def _no_edges(monkeypatch):
    def refuse(self):
        raise AssertionError("the implicit path materialized the edges")

    monkeypatch.setattr(BlockGraph, "edges", refuse)


@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_tiled_path_never_materializes(monkeypatch, backend):
    graph = T.sliding_window([30, 34], 9, causal=True, implicit=True, block_size=16)
    (q, k, v), selected = _selection(64, 4, 2, None, True)
    _no_edges(monkeypatch)
    for g, inputs in ((graph, _inputs(64)), (selected, (q, k, v))):
        out, lse = kernels.attend(*inputs, g, scale=0.3, backend=backend, return_lse=True)
        (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert kernels.auto_kernel(graph, "cpu") == "tiled"
    assert kernels.auto_kernel(T.causal(64, implicit=True), "cpu") == "sdpa"


def test_layer_and_selector_never_materialize(monkeypatch):
    _no_edges(monkeypatch)
    layer = GraphMultiheadAttention(16, 4, num_kv_heads=2, select=BlockTopK(16, 1, causal=True)).double()
    x = torch.randn(64, 16, dtype=torch.float64)
    layer(x, T.causal(64, implicit=True, block_size=16)).sum().backward()


def test_auto_runs_sdpa_on_exact_causal():
    graph = T.causal([20, 30], implicit=True, block_size=16)
    _check(*_inputs(50, dtype=torch.float32), graph, torch.float32, backend="auto")


@pytest.mark.parametrize("backend", ["fused", "split"])
def test_edge_backends_materialize(backend):
    graph = GRAPHS["window"]()
    _check(*_inputs(graph.num_dst), graph, torch.float64, backend=backend)


def test_dropout_runs_on_materialized_edges():
    graph = GRAPHS["window_causal"]()
    q, k, v = _inputs(graph.num_dst)
    got = kernels.attend(q, k, v, graph, scale=0.3, dropout_p=0.3, dropout_seed=5)
    want = kernels.attend(q, k, v, graph.edges(), scale=0.3, dropout_p=0.3, dropout_seed=5)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_materialization_past_budget_refused():
    graph = T.causal(200, implicit=True)
    q, k, v = _inputs(200)
    with T.max_edges(100), pytest.raises(ValueError, match="max_edges=100"):
        kernels.attend(q, k, v, graph, scale=0.3, backend="fused")


@pytest.mark.parametrize(
    "call,name",
    [
        (
            lambda q, k, v, g: kernels.attend(q, k, v, g, scale=1.0, edge_bias=torch.zeros(g.num_edges(), 4)),
            "edge_bias",
        ),
        (
            lambda q, k, v, g: kernels.attend(q, k, v, g, scale=1.0, edge_head=torch.zeros(5, dtype=torch.long)),
            "edge_head",
        ),
        (lambda q, k, v, g: kernels.attend(q[:-1], k, v, g, scale=1.0), "query"),
        (lambda q, k, v, g: kernels.attend(q, k, v, g, scale=1.0, block_size=24), "block_size"),
        (lambda q, k, v, g: kernels.attend(q, k, v, g, scale=float("nan")), "scale"),
    ],
)
def test_bad_input(call, name):
    graph = T.causal(37, implicit=True, block_size=16)
    with pytest.raises(ValueError, match=name):
        call(*_inputs(37), graph)


def test_per_head_graph_needs_its_heads():
    (q, k, v), graph = _selection(64, 4, 2, None, True)
    with pytest.raises(ValueError, match="num_heads=4"):
        kernels.attend(q[:, :2], k[:, :1], v[:, :1], graph, scale=1.0)


def _layer(**kw):
    return GraphMultiheadAttention(32, 4, num_kv_heads=2, **kw).double().eval()


@pytest.mark.parametrize("backend", ["auto", "tiled", "fused", "pyg"])
def test_layer_equals_explicit_graph(backend):
    layer = _layer()
    x = torch.randn(60, 32, dtype=torch.float64)
    got = layer(x, T.sliding_window([25, 35], 6, causal=True, implicit=True, block_size=16), backend=backend)
    want = layer(x, T.sliding_window([25, 35], 6, causal=True), backend="pyg")
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_layer_weights_follow_materialized_order():
    layer = _layer()
    x = torch.randn(40, 32, dtype=torch.float64)
    graph = T.causal(40, implicit=True, block_size=16)
    out, alpha = layer(x, graph, return_attention_weights=True)
    want_out, want_alpha = layer(x, graph.edges(), return_attention_weights=True, backend="pyg")
    torch.testing.assert_close(out, want_out, **TOL[torch.float64])
    torch.testing.assert_close(alpha, want_alpha, **TOL[torch.float64])


def test_layer_selection_equals_dense():
    layer = _layer(select=BlockTopK(16, 1, causal=True))
    x = torch.randn(70, 32, dtype=torch.float64)
    got = layer(x, T.causal([30, 40], implicit=True, block_size=16))
    q = layer.project_query(x)
    k, v = layer.project_key_value(x, x)
    index, head = block_topk(q, k, 16, 1, causal=True, lengths=[30, 40])
    heads = dense_attention(q, k, v, index, layer.head_dim**-0.5, edge_head=head)
    want = layer.out_proj(heads.reshape(70, 32))
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_layer_refuses_bias_on_implicit_graph():
    layer = _layer()
    graph = T.causal(20, implicit=True)
    with pytest.raises(ValueError, match="edge_bias"):
        layer(torch.randn(20, 32, dtype=torch.float64), graph, edge_bias=torch.zeros(210, 4, dtype=torch.float64))


def test_selecting_layer_refuses_per_head_graph():
    layer = _layer(select=BlockTopK(16, 1, causal=True))
    x = torch.randn(64, 32, dtype=torch.float64)
    (q, k, _), graph = _selection(64, 4, 2, None, True)
    with pytest.raises(ValueError, match="per-head BlockGraph"):
        layer(x, graph)


def test_dropout_p_checked_before_materializing():
    graph = T.causal(37, implicit=True, block_size=16)
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.attend(*_inputs(37), graph, scale=1.0, dropout_p=1.5)


def test_encoder_stack_and_lm():
    torch.manual_seed(0)
    layer = GraphTransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0)
    stack = GraphTransformerEncoder(layer, 2).double().eval()
    x = torch.randn(50, 32, dtype=torch.float64)
    graph = T.causal([20, 30], implicit=True, block_size=16)
    torch.testing.assert_close(stack(x, graph), stack(x, graph.edges()), **TOL[torch.float64])
    torch.testing.assert_close(stack(x, [graph, graph.edges()]), stack(x, graph.edges()), **TOL[torch.float64])
    lm = (
        GraphLM(
            GraphTransformerConfig(vocab_size=11, d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.0)
        )
        .double()
        .eval()
    )
    tokens = torch.randint(0, 11, (50,))
    pos = torch.cat([torch.arange(20), torch.arange(30)])
    torch.testing.assert_close(lm(tokens, graph, pos=pos), lm(tokens, graph.edges(), pos=pos), **TOL[torch.float64])


def test_alibi_refuses_implicit_graph():
    lm = GraphLM(
        GraphTransformerConfig(vocab_size=11, d_model=32, nhead=4, num_layers=1, dim_feedforward=64, position="alibi")
    )
    with pytest.raises(ValueError, match="alibi"):
        lm(torch.randint(0, 11, (20,)), T.causal(20, implicit=True), pos=torch.arange(20))


def test_one_per_head_graph_under_other_head_groups():
    """The tile list of a per-head BlockGraph is cached per (block, query heads, key/value heads):
    one selection run by layers with other key/value head groups (MHA, GQA, MQA: layers that
    share a graph) maps every query head to its own key/value head each time."""
    (q, k, v), graph = _selection(64, 4, 2, None, True)
    for kv_heads in (4, 2, 1):
        _, k, v = _inputs(64, 4, kv_heads, dim=16)
        _check(q, k, v, graph, torch.float64, backend="tiled", impl="torch")
