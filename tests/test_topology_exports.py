"""Combinators, networkx and FlexAttention exports: all built from the same edge set."""
import functools

import pytest
import torch
import torch.nn.functional as F

from gnn_transformer import topology as T

GRAPHS = {
    "causal": lambda: T.causal([5, 3]),
    "window": lambda: T.sliding_window([20, 13], 3),
    "bigbird": lambda: T.bigbird(40, block=4, num_random=2, seed=1),
    "strided": lambda: T.strided(37, 6),
    "star": lambda: T.star([9, 1, 4]),
}


@pytest.mark.parametrize("a, b", [(T.causal, functools.partial(T.sliding_window, window=2)),
                                  (functools.partial(T.global_tokens, num_global=2),
                                   functools.partial(T.strided, stride=3, causal=False))])
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
    assert torch.equal(T.intersection(T.causal(9), T.sliding_window(9, 2)).as_tensor(),
                       T.sliding_window(9, 2, causal=True).as_tensor())
    assert torch.equal(T.union(T.sliding_window(9, 2), T.global_tokens(9, 1)).as_tensor(),
                       T.global_tokens(9, 1, window=2).as_tensor())
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
@pytest.mark.parametrize("lookup", ["bits", "search"])
def test_flex_mask_mod_equals_dense_mask(name, lookup):
    ei = GRAPHS[name]()
    N = ei.sparse_size(0)
    mm = T.to_flex_mask_mod(ei, lookup=lookup)
    q = torch.arange(N).repeat_interleave(N)
    kv = torch.arange(N).repeat(N)
    z = torch.zeros_like(q)
    got = mm(z, z, q, kv).view(N, N)
    assert torch.equal(got, T.to_dense_mask(ei))


def test_flex_mask_mod_bipartite_and_bad_lookup():
    ei = T.cross([2, 3], [4, 1], mode="monotonic")
    mm = T.to_flex_mask_mod(ei)
    q = torch.arange(5).repeat_interleave(5)
    kv = torch.arange(5).repeat(5)
    assert torch.equal(mm(q, q, q, kv).view(5, 5), T.to_dense_mask(ei))
    with pytest.raises(ValueError, match="lookup"):
        T.to_flex_mask_mod(ei, lookup="dense")


requires_flex = pytest.mark.skipif(not T.flex_attention_available(),
                                   reason="FlexAttention (torch.nn.attention.flex_attention) unavailable in this torch")


@requires_flex
@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*")
@pytest.mark.parametrize("name", list(GRAPHS))
def test_flex_attention_with_block_mask_equals_masked_sdpa(name):
    from torch.nn.attention.flex_attention import flex_attention

    ei = GRAPHS[name]()
    N = ei.sparse_size(0)
    bm = T.to_block_mask(ei, block_size=16)
    assert bm.shape[-2:] == (N, N)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=bm)
    mask = T.to_dense_mask(ei)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)



@requires_flex
def test_block_mask_skips_empty_blocks():
    bm = T.to_block_mask(T.sliding_window(64, 3), block_size=16)  # 4 x 4 blocks, a band of 10
    assert bm.sparsity() == pytest.approx(100 * 6 / 16)
