"""Combinators, networkx and FlexAttention exports: all built from the same edge set."""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gnn_transformer import topology as T

GRAPHS = {
    "causal": lambda: T.causal([5, 3]),
    "window": lambda: T.sliding_window([20, 13], 3),
    "bigbird": lambda: T.bigbird(40, block=4, num_random=2, seed=1),
    "strided": lambda: T.strided(37, 6),
    "star": lambda: T.star([9, 1, 4]),
}


@pytest.mark.parametrize(
    "a, b",
    [
        (T.causal, functools.partial(T.sliding_window, window=2)),
        (functools.partial(T.global_tokens, num_global=2), functools.partial(T.strided, stride=3, causal=False)),
    ],
)
@pytest.mark.parametrize("lengths", [[1], [7], [4, 1, 6]], ids=str)
def test_combinators_are_set_operations(a, b, lengths):
    ga, gb = a(lengths), b(lengths)
    ma, mb = T.to_dense_mask(ga), T.to_dense_mask(gb)
    for op, expected in ((T.union, ma | mb), (T.intersection, ma & mb), (T.difference, ma & ~mb)):
        out = op(ga, gb)
        assert out.is_sorted_by_col and out.sparse_size() == ga.sparse_size()
        assert not T.is_multigraph(out)
        assert torch.equal(T.to_dense_mask(out), expected)
    assert torch.equal(T.union(ga).as_tensor(), ga.as_tensor())
    assert torch.equal(T.intersection(ga, ga, gb).as_tensor(), T.intersection(ga, gb).as_tensor())


def test_combinator_identities_and_errors():
    assert torch.equal(
        T.intersection(T.causal(9), T.sliding_window(9, 2)).as_tensor(), T.sliding_window(9, 2, causal=True).as_tensor()
    )
    assert torch.equal(
        T.union(T.sliding_window(9, 2), T.global_tokens(9, 1)).as_tensor(), T.global_tokens(9, 1, window=2).as_tensor()
    )
    assert T.difference(T.full(4), T.full(4)).size(1) == 0
    plain = torch.tensor([[0, 1], [1, 1]])
    assert T.union(plain, T.causal(2)).tolist() == [[0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="same sparse_size"):
        T.union(T.causal(3), T.causal(4))
    with pytest.raises(ValueError, match="at least one"):
        T.union()
    with pytest.raises(ValueError, match="edge_index"):
        T.intersection(T.causal(3), torch.zeros(3, 3))


@pytest.mark.parametrize("name", list(GRAPHS))
def test_to_networkx_same_edges(name):
    ei = GRAPHS[name]()
    g = T.to_networkx(ei)
    N = ei.sparse_size(0)
    assert sorted(g.nodes) == list(range(N))
    assert set(g.edges) == set(zip(ei[0].tolist(), ei[1].tolist()))
    assert g.number_of_edges() == ei.size(1)


def test_to_networkx_bipartite_cross():
    ei = T.cross(3, 5, mode="window", window=1)
    g = T.to_networkx(ei)
    assert g.number_of_nodes() == 8 and g.number_of_edges() == ei.size(1)
    assert all(u[0] == "k" and v[0] == "q" for u, v in g.edges)
    assert (("k", 0), ("q", 0)) in g.edges


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize(
    "lookup, block", [("bits", None), ("search", None), ("blocks", 4), ("blocks", 5), ("blocks", 16), ("blocks", 128)]
)
def test_flex_mask_mod_equals_dense_mask(name, lookup, block):
    ei = GRAPHS[name]()
    N = ei.sparse_size(0)
    mm = T.to_flex_mask_mod(ei, lookup=lookup, **({} if block is None else {"block_size": block}))
    q = torch.arange(N).repeat_interleave(N)
    kv = torch.arange(N).repeat(N)
    z = torch.zeros_like(q)
    got = mm(z, z, q, kv).view(N, N)
    assert torch.equal(got, T.to_dense_mask(ei))


@pytest.mark.parametrize("lookup", ["bits", "blocks", "search"])
def test_flex_mask_mod_bipartite_and_bad_lookup(lookup):
    ei = T.cross([2, 3], [4, 1], mode="monotonic")
    mm = T.to_flex_mask_mod(ei, lookup=lookup, block_size=2)
    q = torch.arange(5).repeat_interleave(5)
    kv = torch.arange(5).repeat(5)
    assert torch.equal(mm(q, q, q, kv).view(5, 5), T.to_dense_mask(ei))
    with pytest.raises(ValueError, match="'lookup'.*'dense'"):
        T.to_flex_mask_mod(ei, lookup="dense")
    with pytest.raises(ValueError, match="'block_size'.*0"):
        T.to_flex_mask_mod(ei, lookup="blocks", block_size=0)


def test_flex_mask_mod_blocks_of_empty_and_full_graphs():
    for ei, n, want in ((T.full(12), 12, True), (T.from_dense_mask(torch.zeros(12, 12, dtype=torch.bool)), 12, False)):
        mm = T.to_flex_mask_mod(ei, n, n, lookup="blocks", block_size=4)  # every block full, or empty
        q, kv = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
        assert bool((mm(q, q, q, kv) == want).all())


requires_flex = pytest.mark.skipif(
    not T.flex_attention_available(),
    reason="FlexAttention (torch.nn.attention.flex_attention) unavailable in this torch",
)


@requires_flex
@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*")
@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("lookup", ["blocks", "bits"])
def test_flex_attention_with_block_mask_equals_masked_sdpa(name, lookup):
    from torch.nn.attention.flex_attention import flex_attention

    ei = GRAPHS[name]()
    N = ei.sparse_size(0)
    bm = T.to_block_mask(ei, block_size=16, lookup=lookup)
    assert bm.shape[-2:] == (N, N)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=bm)
    mask = T.to_dense_mask(ei)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@requires_flex
@pytest.mark.parametrize("name", list(GRAPHS) + ["full"])
@pytest.mark.parametrize("block", [4, 8, 16])
def test_block_mask_equals_torchs_create_block_mask(name, block):
    """Built from the edges, the blocks (empty, partial, full) are those torch finds by evaluating
    the mask on every pair, boundary blocks included."""
    from torch.nn.attention.flex_attention import create_block_mask

    ei = T.full(21) if name == "full" else GRAPHS[name]()
    n = ei.sparse_size(0)
    bm = T.to_block_mask(ei, block_size=block)
    ref = create_block_mask(T.to_flex_mask_mod(ei), None, None, n, n, device="cpu", BLOCK_SIZE=block)
    assert bm.shape[-2:] == ref.shape[-2:] == (n, n)
    assert torch.equal(bm.to_dense(), ref.to_dense())
    assert torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)
    for a, b, num in (
        (bm.kv_indices, ref.kv_indices, ref.kv_num_blocks),
        (bm.full_kv_indices, ref.full_kv_indices, ref.full_kv_num_blocks),
    ):
        for row, count in enumerate(num.flatten().tolist()):
            assert torch.equal(a[0, 0, row, :count], b[0, 0, row, :count])


@requires_flex
def test_block_mask_of_a_long_sparse_graph_needs_no_dense_mask():
    """200k tokens: an N × N mask would take 40 GB; the blocks take a few MB."""
    n = 200_000
    bm = T.to_block_mask(T.sliding_window(n, 4), block_size=128)
    num_blocks = -(-n // 128)
    assert bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum() == 3 * num_blocks - 2  # a band
    z = torch.zeros(4, dtype=torch.long)
    q, kv = torch.tensor([0, 150_000, 150_000, n - 1]), torch.tensor([4, 149_996, 149_995, n - 5])
    assert bm.mask_mod(z, z, q, kv).tolist() == [True, True, False, True]


@requires_flex
def test_block_mask_skips_empty_blocks():
    bm = T.to_block_mask(T.sliding_window(64, 3), block_size=16)  # 4 x 4 blocks, a band of 10
    assert bm.sparsity() == pytest.approx(100 * 6 / 16)


@requires_flex
@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0), st.sampled_from([1, 3, 8, 16]), st.integers(0, 2**16)
)
def test_block_mask_of_random_graphs(n_dst, n_src, p, block, seed):
    """Random bipartite edge sets, densities from empty to full: the blocks equal torch's, and the
    ``mask_mod`` is the edge set."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_dst, n_src, generator=g) < p
    dst, src = mask.nonzero(as_tuple=True)
    ei = torch.stack([src, dst])
    bm = T.to_block_mask(ei, n_src, n_dst, block_size=block)
    ref = create_block_mask(
        T.to_flex_mask_mod(ei, n_src, n_dst), None, None, n_dst, n_src, device="cpu", BLOCK_SIZE=block
    )
    assert torch.equal(bm.to_dense(), ref.to_dense())
    assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)
    q, kv = torch.arange(n_dst).repeat_interleave(n_src), torch.arange(n_src).repeat(n_dst)
    assert torch.equal(bm.mask_mod(q, q, q, kv).view(n_dst, n_src), mask)


@requires_flex
@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*")
def test_block_mask_of_a_cross_graph_has_the_query_and_key_lengths():
    """A bipartite graph of 20 queries on 45 keys: the BlockMask is [20 queries, 45 keys] (seq_lengths
    (num_dst, num_src), as create_block_mask's Q_LEN, KV_LEN) and FlexAttention on it is the masked SDPA."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_dst, n_src = 20, 45
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(n_dst, n_src, generator=g) < 0.4
    mask[:, 0] = True  # every query reads a key
    dst, src = mask.nonzero(as_tuple=True)
    ei = torch.stack([src, dst])
    bm = T.to_block_mask(ei, n_src, n_dst, block_size=16)
    ref = create_block_mask(T.to_flex_mask_mod(ei, n_src, n_dst), None, None, n_dst, n_src, device="cpu", BLOCK_SIZE=16)
    assert bm.seq_lengths == ref.seq_lengths == (n_dst, n_src)
    assert bm.shape[-2:] == (n_dst, n_src)
    q = torch.randn(1, 2, n_dst, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, n_src, 8, generator=g, dtype=torch.float64) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=bm), want, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- combinators


@pytest.mark.parametrize("q_len, k_len", [(3, 5), (5, 2), (1, 4)])
def test_combinators_on_bipartite_graphs_keep_the_sparse_size(q_len, k_len):
    """Cross-attention graphs (``num_src != num_dst``): each set operation keeps ``(num_src,
    num_dst)`` and gives the set operation of the dense masks."""
    ga = T.cross(q_len, k_len, mode="window", window=1)
    gb = T.from_predicate(q_len, lambda i, j: (i + j) % 2 == 0, src_lengths=k_len)
    assert ga.sparse_size() == gb.sparse_size() == (k_len, q_len)
    ma, mb = T.to_dense_mask(ga), T.to_dense_mask(gb)
    for op, expected in ((T.union, ma | mb), (T.intersection, ma & mb), (T.difference, ma & ~mb)):
        out = op(ga, gb)
        assert out.sparse_size() == (k_len, q_len), op.__name__
        assert out.is_sorted_by_col and not T.is_multigraph(out)
        assert torch.equal(T.to_dense_mask(out), expected), op.__name__


@pytest.mark.parametrize("op", [T.union, T.intersection])
def test_combinators_of_plain_tensors_size_the_graph_by_the_largest_node(op):
    """Plain ``[2, E]`` operands give ``sparse_size = (max + 1, max + 1)``: the largest node is kept."""
    plain = torch.tensor([[0, 2, 1], [1, 2, 0]])
    out = op(plain, plain)
    assert out.sparse_size() == (3, 3)
    assert out.tolist() == [[1, 0, 2], [0, 1, 2]]


@pytest.mark.parametrize(
    "plain",
    [
        torch.tensor([[3], [0]]),  # source node == num_src
        torch.tensor([[0], [2]]),  # target node == num_dst
        torch.tensor([[4], [0]]),  # source node past num_src
    ],
)
def test_combinators_refuse_plain_nodes_at_or_past_the_sparse_size(plain):
    """A plain operand with a node at index ``num_src`` / ``num_dst`` of the EdgeIndex operands (one
    past the last) is refused, also when ``num_src != num_dst``."""
    bipartite = T.cross(2, 3)  # sparse_size (3, 2)
    with pytest.raises(ValueError, match=r"nodes outside sparse_size \(3, 2\)"):
        T.union(bipartite, plain)


def test_to_networkx_bipartite_argument_overrides_the_sizes():
    """bipartite=True splits even a square graph into key and query nodes; bipartite=False keeps
    one node set, as large as the larger side, even for a cross graph."""
    ei = T.causal(3)
    g = T.to_networkx(ei, bipartite=True)
    assert sorted(g.nodes) == sorted([("k", j) for j in range(3)] + [("q", i) for i in range(3)])
    assert set(g.edges) == {(("k", j), ("q", i)) for j, i in zip(ei[0].tolist(), ei[1].tolist())}
    assert {g.nodes[("k", 0)]["bipartite"], g.nodes[("q", 0)]["bipartite"]} == {0, 1}
    c = T.cross(2, 5)  # 5 keys, 2 queries
    h = T.to_networkx(c, bipartite=False)
    assert sorted(h.nodes) == list(range(5))
    assert set(h.edges) == set(zip(c[0].tolist(), c[1].tolist()))
    lone = torch.tensor([[0], [0]])  # 1 key, 3 queries, only query 0 hears it: nodes for the others too
    h = T.to_networkx(lone, 1, 3, bipartite=False)
    assert sorted(h.nodes) == [0, 1, 2] and list(h.edges) == [(0, 0)]


@pytest.mark.parametrize("lookup", ["bits", "blocks", "search"])
def test_flex_mask_mod_of_a_graph_without_edges_is_false_everywhere(lookup):
    mm = T.to_flex_mask_mod(torch.empty(2, 0, dtype=torch.long), 3, 3, lookup=lookup, block_size=2)
    q, kv = torch.arange(3).repeat_interleave(3), torch.arange(3).repeat(3)
    z = torch.zeros_like(q)
    assert not mm(z, z, q, kv).any()


@pytest.mark.parametrize("block_size", [0, -2, 1.5, True])
def test_flex_mask_mod_blocks_refuses_a_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        T.to_flex_mask_mod(T.causal(3), lookup="blocks", block_size=block_size)
