"""Per-head graphs in the kernels (``attend(..., edge_head=...)``): every backend and implementation
equals dense attention with the same per-head mask, outputs, log-sum-exps and gradients; the cost
follows the edges that exist."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_geometric import EdgeIndex

from gnn_transformer import kernels
from gnn_transformer.kernels import attend, edge_weights, fused_torch, heads
from tests.conftest import (
    GRAPHS,
    TOL,
    assert_matches_dense,
    dense_attention,
    dropout_reference,
    graph_case,
    small_graph,
)

HEADS, KV_HEADS = 4, 2


def per_head_case(name: str, seed: int = 0, heads: int = HEADS, empty_head: bool = True, small: bool = False):
    """A named test graph made per head: each edge kept for a random subset of the heads (an edge
    may sit in several heads, or in none); the last head without edges when ``empty_head``.
    Columns grouped by head, each group in the graph's own order."""
    edge_index, n_src, n_dst = small_graph(name, seed) if small else graph_case(name, seed)
    plain = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    g = torch.Generator().manual_seed(seed + 7)
    cols, hs = [], []
    for h in range(heads - 1 if empty_head else heads):
        keep = torch.rand(plain.size(1), generator=g) < 0.6
        cols.append(plain[:, keep])
        hs.append(torch.full((int(keep.sum()),), h, dtype=torch.long))
    return torch.cat(cols, 1), torch.cat(hs), n_src, n_dst


def _run(backend, impl=None, **kw):
    def fn(q, k, v, b, *, edge_index, edge_head):
        return attend(
            q,
            k,
            v,
            edge_index,
            scale=0.45,
            edge_bias=b,
            backend=backend,
            impl=impl,
            return_lse=True,
            edge_head=edge_head,
            **kw,
        )

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["fused", "tiled", "split", "auto"])
@pytest.mark.parametrize("name", GRAPHS)
def test_per_head_matches_dense(name, backend, dtype):
    edge_index, edge_head, n_src, n_dst = per_head_case(name)
    fn = _run(backend, block_size=8, tile_cost=0.3)
    assert_matches_dense(
        lambda q, k, v, b: fn(q, k, v, b, edge_index=edge_index, edge_head=edge_head),
        edge_index,
        n_src,
        n_dst,
        dtype,
        edge_head=edge_head,
        bias_shape=(edge_index.size(1),),
    )


@pytest.mark.parametrize("bias", ["none", "per_edge", "per_edge_and_head"])
@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_per_head_bias_shapes_and_groups(bias, backend, kv_heads):
    edge_index, edge_head, n_src, n_dst = per_head_case("batch", seed=3)
    shape = {"none": None, "per_edge": (edge_index.size(1),), "per_edge_and_head": (edge_index.size(1), HEADS)}[bias]
    fn = _run(backend, block_size=8)
    assert_matches_dense(
        lambda q, k, v, b: fn(q, k, v, b, edge_index=edge_index, edge_head=edge_head),
        edge_index,
        n_src,
        n_dst,
        torch.float64,
        bias=bias != "none",
        kv_heads=kv_heads,
        edge_head=edge_head,
        bias_shape=shape,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
@pytest.mark.parametrize("name", ["causal", "empty_rows", "bipartite", "multigraph", "no_edges", "unsorted"])
def test_per_head_triton_matches_dense(name, backend, dtype):
    edge_index, edge_head, n_src, n_dst = per_head_case(name, small=True)
    fn = _run(backend, impl="triton", block_size=16, tile_cost=0.3)
    assert_matches_dense(
        lambda q, k, v, b: fn(q, k, v, b, edge_index=edge_index, edge_head=edge_head),
        edge_index,
        n_src,
        n_dst,
        dtype,
        edge_head=edge_head,
        bias_shape=(edge_index.size(1),),
    )


@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_every_head_the_same_graph_is_the_shared_graph(backend):
    edge_index, n_src, n_dst = graph_case("batch")
    plain = edge_index.as_tensor()
    stacked = plain.repeat(1, HEADS)  # [2, H E]
    edge_head = torch.arange(HEADS).repeat_interleave(plain.size(1))
    q, k, v = torch.randn(n_dst, HEADS, 8), torch.randn(n_src, KV_HEADS, 8), torch.randn(n_src, KV_HEADS, 8)
    want = attend(q, k, v, edge_index, scale=0.3, backend=backend, block_size=8)
    got = attend(q, k, v, stacked, scale=0.3, backend=backend, block_size=8, edge_head=edge_head)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_cost_follows_the_edges(monkeypatch):
    """The fused path sees E edges on H * N_dst rows, not H copies of the union."""
    edge_index, edge_head, n_src, n_dst = per_head_case("empty_rows")
    seen = []
    original = fused_torch.chunked_attention

    def spy(q, k, v, bias, graph, *args):
        seen.append((graph.num_edges, graph.num_dst, graph.num_src, q.shape, k.shape))
        return original(q, k, v, bias, graph, *args)

    monkeypatch.setattr(kernels.dispatch, "chunked_attention", spy)
    q, k, v = torch.randn(n_dst, HEADS, 8), torch.randn(n_src, KV_HEADS, 8), torch.randn(n_src, KV_HEADS, 8)
    attend(q, k, v, edge_index, scale=0.3, backend="fused", edge_head=edge_head)
    assert seen == [
        (edge_index.size(1), HEADS * n_dst, KV_HEADS * n_src, (HEADS * n_dst, 1, 8), (KV_HEADS * n_src, 1, 8))
    ]


@pytest.mark.parametrize("backend", ["fused", "tiled", "split"])
def test_per_head_dropout_equals_its_reference(backend):
    """Dropout on a per-head graph: the mask of the one-head graph on (head, token) nodes, the same
    on every backend."""
    edge_index, edge_head, n_src, n_dst = per_head_case("window", seed=2)
    q, k, v, b = (x.detach() for x in _inputs(n_src, n_dst, edge_index.size(1)))
    got, lse = attend(
        q,
        k,
        v,
        edge_index,
        scale=0.45,
        edge_bias=b,
        backend=backend,
        block_size=8,
        dropout_p=0.3,
        dropout_seed=11,
        return_lse=True,
        edge_head=edge_head,
    )
    index, bias = heads.head_inputs(q, k, edge_index, edge_head, b)
    want, want_lse = dropout_reference(
        heads.heads_to_nodes(q), heads.heads_to_nodes(k), heads.heads_to_nodes(v), index, 0.45, bias, 0.3, 11
    )
    torch.testing.assert_close(got, heads.nodes_to_heads(want, HEADS), **TOL[torch.float64])
    torch.testing.assert_close(lse, heads.nodes_to_heads(want_lse, HEADS), **TOL[torch.float64])


def _inputs(n_src, n_dst, num_edges, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(n_dst, HEADS, 8, generator=g, dtype=dtype),
        torch.randn(n_src, KV_HEADS, 8, generator=g, dtype=dtype),
        torch.randn(n_src, KV_HEADS, 8, generator=g, dtype=dtype),
        torch.randn(num_edges, generator=g, dtype=dtype),
    )


def test_per_head_edge_weights_are_the_dense_weights():
    edge_index, edge_head, n_src, n_dst = per_head_case("hub", seed=1)
    q, k, v, b = _inputs(n_src, n_dst, edge_index.size(1))
    _, lse = attend(q, k, v, edge_index, scale=0.45, edge_bias=b, return_lse=True, edge_head=edge_head)
    w = edge_weights(q, k, edge_index, lse, scale=0.45, edge_bias=b, edge_head=edge_head)
    assert w.shape == (edge_index.size(1),)
    _, ref_lse = dense_attention(q, k, v, edge_index, 0.45, b, return_lse=True, edge_head=edge_head)
    src, dst = edge_index
    group = HEADS // KV_HEADS
    s = (q[dst, edge_head] * k[src, edge_head // group]).sum(-1) * 0.45 + b  # [E]
    torch.testing.assert_close(w, torch.exp(s - ref_lse[dst, edge_head]), **TOL[torch.float64])
    sums = torch.zeros(n_dst, HEADS, dtype=w.dtype).index_put_((dst, edge_head), w, accumulate=True)
    nonempty = torch.isfinite(lse)
    torch.testing.assert_close(sums[nonempty], torch.ones_like(sums[nonempty]))


def test_relabelled_graph_is_cached_and_refreshed_after_a_write():
    edge_index, edge_head, n_src, n_dst = per_head_case("causal")
    first = heads.head_graph(edge_index, edge_head, n_src, n_dst, HEADS, KV_HEADS)
    assert heads.head_graph(edge_index, edge_head, n_src, n_dst, HEADS, KV_HEADS) is first
    assert first.shape == edge_index.shape
    edge_head[0] = (edge_head[0] + 1) % HEADS  # a write in place: a new version
    second = heads.head_graph(edge_index, edge_head, n_src, n_dst, HEADS, KV_HEADS)
    assert second is not first and int(second[1, 0]) == int(edge_head[0]) * n_dst + int(edge_index[1, 0])


def test_relabelled_graph_is_refreshed_after_a_write_to_an_edge_index_data():
    """A write through an EdgeIndex's data (``as_tensor()``) moves the data's version counter, not
    the wrapper's: the relabelled graph is made again, and attention runs the new edges."""
    edge_index, edge_head, n_src, n_dst = per_head_case("causal")
    edge_index = EdgeIndex(edge_index.clone(), sparse_size=(n_src, n_dst))
    shapes = ((n_dst, HEADS), (n_src, KV_HEADS), (n_src, KV_HEADS))
    q, k, v = (torch.randn(n, h, 8, dtype=torch.float64) for n, h in shapes)
    first = heads.head_graph(edge_index, edge_head, n_src, n_dst, HEADS, KV_HEADS)
    edge_index.as_tensor()[0] = 0  # every edge now reads key 0
    assert heads.head_graph(edge_index, edge_head, n_src, n_dst, HEADS, KV_HEADS) is not first
    for backend in ("fused", "tiled", "auto"):
        out = attend(q, k, v, edge_index, scale=0.3, edge_head=edge_head, backend=backend)
        want = dense_attention(q, k, v, edge_index.as_tensor().clone(), 0.3, edge_head=edge_head)
        torch.testing.assert_close(out, want, **TOL[torch.float64])


def test_int32_edge_head_is_cached():
    """An int32 edge_head is checked as a long copy; the cache keeps the caller's tensor, so the
    second call reuses the relabelled graph (and with it the kernels' plan of it)."""
    edge_index, edge_head, n_src, n_dst = per_head_case("causal")
    head32 = edge_head.to(torch.int32)
    first = heads.head_graph(edge_index, head32, n_src, n_dst, HEADS, KV_HEADS)
    assert heads.head_graph(edge_index, head32, n_src, n_dst, HEADS, KV_HEADS) is first
    head32[0] = (head32[0] + 1) % HEADS
    assert heads.head_graph(edge_index, head32, n_src, n_dst, HEADS, KV_HEADS) is not first


def test_sorted_by_head_and_target_needs_no_sort():
    """A graph sorted by (head, target), as the per-head builders emit it, is target-sorted on
    (head, token) nodes: the kernels' graph keeps the columns in place."""
    edge_index, edge_head, n_src, n_dst = per_head_case("causal")
    index = heads.head_graph(edge_index, edge_head, n_src, n_dst, HEADS, KV_HEADS)
    graph = kernels.planner.prepare(index, KV_HEADS * n_src, HEADS * n_dst)
    assert graph.perm is None and graph.num_edges == edge_index.size(1)


@pytest.mark.parametrize(
    "edge_head, match",
    [
        (torch.zeros(3, dtype=torch.long), r"'edge_head' of shape \[E\]"),
        (torch.zeros(6), "'edge_head' to hold integers"),
        (torch.tensor([0, 1, 2, 3, 4, 0]), "Found 4 in 'edge_head' but there are 4 query heads"),
        (torch.tensor([0, -1, 0, 0, 0, 0]), "Found -1 in 'edge_head'"),
        ([0, 0, 0, 0, 0, 0], "'edge_head' to be a tensor"),
    ],
)
def test_bad_edge_head(edge_head, match):
    q, k, v = torch.randn(3, HEADS, 8), torch.randn(3, KV_HEADS, 8), torch.randn(3, KV_HEADS, 8)
    edge_index = torch.tensor([[0, 0, 1, 0, 1, 2], [0, 1, 1, 2, 2, 2]])
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, edge_index, scale=0.3, edge_head=edge_head)


@pytest.mark.parametrize(
    "edge_index, match",
    [
        (torch.tensor([[3], [0]]), "Found source index 3 in 'edge_index' but there are only 3 source nodes"),
        (torch.tensor([[0], [3]]), "Found target index 3 in 'edge_index' but there are only 3 target nodes"),
        (torch.tensor([[-1], [0]]), "non-negative"),
    ],
)
def test_nodes_out_of_range_are_refused_before_relabelling(edge_index, match):
    """Source 3 of 3 would be node 3 of the (head, token) nodes, key/value head 1's token 0: the
    kernels' own range check cannot see it after relabelling."""
    q, k, v = torch.randn(3, HEADS, 8), torch.randn(3, KV_HEADS, 8), torch.randn(3, KV_HEADS, 8)
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, edge_index, scale=0.3, edge_head=torch.zeros(1, dtype=torch.long))


def test_bad_per_head_bias_shape():
    q, k, v = torch.randn(3, HEADS, 8), torch.randn(3, KV_HEADS, 8), torch.randn(3, KV_HEADS, 8)
    edge_index = torch.tensor([[0, 0, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match=r"'edge_bias' of shape \[E\] = \[3\] or \[E, H\] = \[3, 4\]"):
        attend(q, k, v, edge_index, scale=0.3, edge_head=torch.zeros(3, dtype=torch.long), edge_bias=torch.zeros(3, 2))


def test_edge_head_on_another_device():
    q, k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    edge_index = torch.tensor([[0, 0, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="'edge_head' on the device"):
        attend(q, k, v, edge_index, scale=0.3, edge_head=torch.zeros(3, dtype=torch.long, device="meta"))


@st.composite
def per_head_graphs(draw):
    n_src, n_dst = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kv_heads = draw(st.sampled_from([1, 2]))
    num_heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    num_edges = draw(st.integers(0, 50))
    triples = draw(
        st.lists(
            st.tuples(st.integers(0, num_heads - 1), st.integers(0, n_dst - 1), st.integers(0, n_src - 1)),
            min_size=num_edges,
            max_size=num_edges,
        )
    )
    if draw(st.booleans()):  # the builders' order: by head, target, source
        triples = sorted(set(triples))
    edge_head = torch.tensor([h for h, _, _ in triples], dtype=torch.long)
    edge_index = torch.tensor([[j for _, _, j in triples], [i for _, i, _ in triples]], dtype=torch.long).view(2, -1)
    backend = draw(st.sampled_from(["fused", "tiled", "split", "auto"]))
    block = draw(st.sampled_from([2, 4, 8]))
    return edge_index, edge_head, n_src, n_dst, num_heads, kv_heads, backend, block, draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(per_head_graphs())
def test_random_per_head_graphs_match_dense(case):
    edge_index, edge_head, n_src, n_dst, num_heads, kv_heads, backend, block, bias = case

    def fn(q, k, v, b):
        return attend(
            q,
            k,
            v,
            edge_index,
            scale=0.45,
            edge_bias=b,
            backend=backend,
            block_size=block,
            return_lse=True,
            edge_head=edge_head,
        )

    assert_matches_dense(
        fn,
        edge_index,
        n_src,
        n_dst,
        torch.float64,
        bias=bias,
        heads=num_heads,
        kv_heads=kv_heads,
        edge_head=edge_head,
        bias_shape=(edge_index.size(1),),
    )


@pytest.mark.parametrize("backend", ["fused", "tiled", "auto"])
def test_one_per_head_graph_on_other_sizes_and_head_groups(backend):
    """The relabelled graph is cached per edge_head *and* the sizes it was made for: the same
    (edge_index, edge_head) under other key/value head groups (a GQA layer next to an MHA one)
    or on more keys (a growing memory) is relabelled again and equals the dense reference."""
    edge_index, edge_head, n_src, n_dst = per_head_case("bipartite")
    for kv_heads, extra_keys in ((HEADS, 0), (KV_HEADS, 0), (1, 0), (KV_HEADS, 5)):
        assert_matches_dense(
            lambda q, k, v, b: attend(
                q, k, v, edge_index, scale=0.45, edge_bias=b, backend=backend, return_lse=True, edge_head=edge_head
            ),
            edge_index,
            n_src + extra_keys,
            n_dst,
            torch.float64,
            kv_heads=kv_heads,
            edge_head=edge_head,
            bias_shape=(edge_index.size(1),),
        )
