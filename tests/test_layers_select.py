"""A layer that selects its graph (``GraphMultiheadAttention(..., select=...)`` with the selector
objects of ``topology.dynamic``) equals the same layer without a selector given the selected
per-head graph (``edge_head=``), in outputs and gradients, on every backend. The reference graph is
recomputed here from the layer's own projections with the plain selection functions on the
batch's lengths, kept to the allowed (causal) graph. The graph is rebuilt on every call; routing
centroids are layer state, moved in training mode only."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer import GraphMultiheadAttention
from gnn_transformer import topology as T
from gnn_transformer.topology.dynamic import LSH, BlockTopK, Routing, TopK, block_topk, lsh, routing, selector, topk

from .conftest import TOL

LENGTHS = [5, 7]  # a batch of two sequences: the allowed graph is causal within each
POS = torch.cat([torch.arange(L) for L in LENGTHS])  # RoPE positions, local to each sequence
BACKENDS = ["pyg", "fused", "tiled", "split"]
SELECTORS = {  # name: a fresh selector object; the non-causal ones select future keys the graph removes
    "topk": lambda: TopK(3, causal=True),
    "block_topk": lambda: BlockTopK(2, 1, causal=True),
    "lsh": lambda: LSH(4, num_hashes=2, chunk_size=2, seed=1),
    "routing": lambda: Routing(4, 4, 3, seed=2),
}
FUNCTIONS = {  # name: the plain function with the selector's parameters, on the batch's lengths
    "topk": lambda s, q, k: topk(q, k, s.num_keys, causal=s.causal, lengths=LENGTHS),
    "block_topk": lambda s, q, k: block_topk(q, k, s.block_size, s.num_blocks, causal=s.causal, lengths=LENGTHS),
    "lsh": lambda s, q, k: lsh(
        q,
        k,
        s.num_buckets,
        num_hashes=s.num_hashes,
        chunk_size=s.chunk_size,
        seed=s.seed,
        causal=s.causal,
        lengths=LENGTHS,
    ),
    "routing": lambda s, q, k: routing(q, k, s.centroids.clone(), causal=s.causal, lengths=LENGTHS),
}


def _layers(select, dtype, backend):
    """The selecting layer (RoPE, grouped-query heads) and the same layer without a selector."""
    layer = GraphMultiheadAttention(16, 4, num_kv_heads=2, rope=True, backend=backend, select=select, dtype=dtype)
    plain = GraphMultiheadAttention(16, 4, num_kv_heads=2, rope=True, backend=backend, dtype=dtype)
    plain.load_state_dict({key: v for key, v in layer.state_dict().items() if not key.startswith("select.")})
    return layer.eval(), plain.eval()


def _reference_graph(name, layer, x):
    """The selection recomputed from the layer's projections, kept to the causal graph (``j <= i``:
    the plain functions already keep every edge inside its sequence)."""
    with torch.no_grad():
        query = layer.rotate(layer.project_query(x), POS)
        key, _ = layer.key_value(x, pos=POS)
        edge_index, edge_head = FUNCTIONS[name](layer.select, query, key)
    keep = edge_index[0] <= edge_index[1]
    return edge_index[:, keep], edge_head[keep]


def _outputs_and_gradients(layer, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    out = layer(x, *args, pos=POS, **kwargs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), [x, *layer.parameters()])
    return out, grads


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_selecting_layer_equals_the_layer_on_the_selected_graph(name, backend, dtype):
    layer, plain = _layers(SELECTORS[name](), dtype, backend)
    x = torch.randn(sum(LENGTHS), 16, dtype=dtype)
    edge_index, edge_head = _reference_graph(name, layer, x)
    assert 0 < edge_index.size(1) < 4 * T.causal(LENGTHS).size(1)
    out, grads = _outputs_and_gradients(layer, x, T.causal(LENGTHS))
    want, want_grads = _outputs_and_gradients(plain, x, edge_index, edge_head=edge_head)
    torch.testing.assert_close(out, want, **TOL[dtype])
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("name", SELECTORS)
def test_selecting_layer_rebuilds_the_graph_on_every_call(name):
    layer, plain = _layers(SELECTORS[name](), torch.float64, "fused")
    x1, x2 = torch.randn(2, sum(LENGTHS), 16, dtype=torch.float64)
    graph1, graph2 = _reference_graph(name, layer, x1), _reference_graph(name, layer, x2)
    assert (
        graph1[0].shape != graph2[0].shape
        or not torch.equal(graph1[0], graph2[0])
        or not torch.equal(graph1[1], graph2[1])
    )
    allowed = T.causal(LENGTHS)
    for x, (edge_index, edge_head) in ((x1, graph1), (x2, graph2), (x1, graph1)):
        torch.testing.assert_close(
            layer(x, allowed, pos=POS), plain(x, edge_index, pos=POS, edge_head=edge_head), **TOL[torch.float64]
        )


def test_routing_centroids_are_layer_state():
    layer = GraphMultiheadAttention(16, 4, num_kv_heads=2, select=Routing(4, 4, 3, seed=2))
    assert torch.equal(layer.state_dict()["select.centroids"], layer.select.centroids)
    other = GraphMultiheadAttention(16, 4, num_kv_heads=2, select=Routing(4, 4, 3, seed=5))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.select.centroids, layer.select.centroids)
    assert layer.to(torch.float64).select.centroids.dtype == torch.float64


def test_routing_centroids_move_in_training_mode_only():
    layer = GraphMultiheadAttention(
        16, 4, num_kv_heads=2, rope=True, select=Routing(4, 4, 3, decay=0.5, seed=2), dtype=torch.float64
    )
    x, allowed = torch.randn(sum(LENGTHS), 16, dtype=torch.float64), T.causal(LENGTHS)
    before = layer.select.centroids.clone()
    layer.eval()(x, allowed, pos=POS)
    assert torch.equal(layer.select.centroids, before)
    with torch.no_grad():  # the online k-means step over every token, written with the function
        query = layer.rotate(layer.project_query(x), POS)
        key, _ = layer.key_value(x, pos=POS)
        expected = before.clone()
        routing(query, key, expected, lengths=LENGTHS, update=True, decay=0.5)
    layer.train()(x, allowed, pos=POS)
    assert not torch.equal(layer.select.centroids, before)
    torch.testing.assert_close(layer.select.centroids, expected, **TOL[torch.float64])


def test_routing_layer_in_training_mode_attends_with_the_centroids_before_the_step():
    layer, plain = _layers(Routing(4, 4, 3, decay=0.5, seed=2), torch.float64, "fused")
    x = torch.randn(sum(LENGTHS), 16, dtype=torch.float64)
    edge_index, edge_head = _reference_graph("routing", layer, x)
    out = layer.train()(x, T.causal(LENGTHS), pos=POS)
    torch.testing.assert_close(out, plain(x, edge_index, pos=POS, edge_head=edge_head), **TOL[torch.float64])


@pytest.mark.parametrize(
    "spec, name",
    [
        ("topk:num_keys=3,causal=true", "topk"),
        ({"name": "block_topk", "block_size": 2, "num_blocks": 1, "causal": True}, "block_topk"),
        ("lsh:num_buckets=4,num_hashes=2,chunk_size=2,seed=1", "lsh"),
        ("routing:num_clusters=3,seed=2", "routing"),
    ],
    ids=str,
)
def test_selector_by_name_selects_as_its_object(spec, name):
    by_name = GraphMultiheadAttention(16, 4, num_kv_heads=2, select=selector(spec, num_heads=4, head_dim=4))
    by_object = GraphMultiheadAttention(16, 4, num_kv_heads=2, select=SELECTORS[name]())
    by_object.load_state_dict(by_name.state_dict())
    x = torch.randn(sum(LENGTHS), 16)
    assert repr(by_name) == repr(by_object)
    torch.testing.assert_close(
        by_name.eval()(x, T.causal(LENGTHS)), by_object.eval()(x, T.causal(LENGTHS)), **TOL[torch.float32]
    )
