"""Dense masks <-> token graphs: polarity, padding, round trips, multigraphs, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_geometric import EdgeIndex

from gnn_transformer.topology import causal, from_dense_mask, full, is_multigraph, to_dense_mask


def test_polarity_mask_i_j_is_edge_j_to_i():
    ei = torch.tensor([[0], [2]])  # 0 -> 2: query 2 attends to key 0
    m = to_dense_mask(ei, 3, 3)
    assert m.shape == (3, 3)
    assert m[2, 0] and m.sum() == 1


def test_causal_is_lower_triangular():
    m = to_dense_mask(causal(5))
    assert torch.equal(m, torch.ones(5, 5, dtype=torch.bool).tril())


def test_sizes_default_from_edge_index_and_max():
    ei = EdgeIndex(torch.tensor([[0], [1]]), sparse_size=(4, 3))
    assert to_dense_mask(ei).shape == (3, 4)
    assert to_dense_mask(torch.tensor([[3], [1]])).shape == (2, 4)
    assert to_dense_mask(torch.tensor([[3], [1]]), 5, 6).shape == (6, 5)
    assert to_dense_mask(torch.empty(2, 0, dtype=torch.long)).shape == (0, 0)


@pytest.mark.parametrize("lengths", [[1], [3], [2, 1], [1, 4, 2], [3, 0, 2]])
@pytest.mark.parametrize("builder", [full, causal])
def test_padded_mask_per_sequence(lengths, builder):
    ei = builder(lengths)
    m = to_dense_mask(ei, lengths=lengths)
    T = max(lengths)
    assert m.shape == (len(lengths), T, T)
    for b, L in enumerate(lengths):
        assert torch.equal(m[b, :L, :L], to_dense_mask(builder(L)))
        assert not m[b, L:].any() and not m[b, :, L:].any()
    batch = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if 0 not in lengths[:-1] and lengths[-1] != 0:  # a batch vector cannot express empty sequences at the end
        assert torch.equal(to_dense_mask(ei, batch=batch), m)
    assert torch.equal(from_dense_mask(m, lengths).as_tensor(), ei.as_tensor())


def test_padded_cross_attention_lengths():
    # two sequences: 2 queries over 3 keys, 1 query over 1 key, full bipartite
    src = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    dst = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    m = to_dense_mask(torch.stack([src, dst]), lengths=[2, 1], src_lengths=[3, 1])
    assert m.shape == (2, 2, 3)
    assert m[0].all() and m[1, 0, 0] and m[1].sum() == 1
    back = from_dense_mask(m, [2, 1], src_lengths=[3, 1])
    assert back.sparse_size() == (4, 3)
    assert torch.equal(back.as_tensor(), torch.stack([src, dst]))


def test_cross_sequence_edge_refused_for_padded():
    with pytest.raises(ValueError, match="within one sequence"):
        to_dense_mask(torch.tensor([[0], [2]]), lengths=[2, 1])


def test_multigraph_refused_unless_coalesce():
    ei = torch.tensor([[0, 0, 1], [1, 1, 1]])
    assert is_multigraph(ei)
    with pytest.raises(ValueError, match="coalesce=True"):
        to_dense_mask(ei)
    m = to_dense_mask(ei, coalesce=True)
    assert m.sum() == 2 and m[1, 0] and m[1, 1]
    assert not is_multigraph(causal(4))


@pytest.mark.parametrize(
    "bad, match",
    [(torch.zeros(3, 2, dtype=torch.long), "shape"), (torch.zeros(2, 2), "integers"), ([[0], [1]], "tensor")],
)
def test_bad_edge_index(bad, match):
    with pytest.raises(ValueError, match=match):
        to_dense_mask(bad)


def test_out_of_range_and_bad_sizes():
    with pytest.raises(ValueError, match="num_src"):
        to_dense_mask(torch.tensor([[5], [0]]), 3, 3)
    with pytest.raises(ValueError, match="num_dst"):
        to_dense_mask(torch.tensor([[0], [5]]), 3, 3)
    with pytest.raises(ValueError, match="num_src"):
        to_dense_mask(torch.tensor([[0], [0]]), -1, 3)
    with pytest.raises(ValueError, match="lengths"):
        to_dense_mask(causal(3), lengths=[2, 2])
    with pytest.raises(ValueError, match="bool"):
        from_dense_mask(torch.ones(2, 2))
    # an EdgeIndex without a sparse size takes its sizes from the lengths, as a plain tensor does
    one_each = torch.tensor([[0], [0]])
    torch.testing.assert_close(
        to_dense_mask(EdgeIndex(one_each), lengths=[1, 1]), to_dense_mask(one_each, lengths=[1, 1])
    )
    with pytest.raises(ValueError, match="shape"):
        from_dense_mask(torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="lengths"):
        from_dense_mask(torch.ones(2, 3, 3, dtype=torch.bool), [1, 2, 3])


def test_from_dense_mask_ignores_padding_entries():
    m = torch.ones(2, 3, 3, dtype=torch.bool)
    ei = from_dense_mask(m, [1, 3])
    assert torch.equal(ei.as_tensor(), full([1, 3]).as_tensor())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_round_trip_random_masks(t_q, t_k, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(t_q, t_k, generator=g) < 0.4
    ei = from_dense_mask(m)
    assert isinstance(ei, EdgeIndex) and ei.is_sorted_by_col
    assert ei.sparse_size() == (t_k, t_q)
    assert torch.equal(to_dense_mask(ei), m)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_round_trip_batched(lengths, seed):
    T = max(lengths)
    g = torch.Generator().manual_seed(seed)
    valid = torch.zeros(len(lengths), T, T, dtype=torch.bool)
    for b, L in enumerate(lengths):
        valid[b, :L, :L] = True
    m = (torch.rand(len(lengths), T, T, generator=g) < 0.5) & valid
    ei = from_dense_mask(m, lengths)
    assert ei.sparse_size() == (sum(lengths), sum(lengths))
    assert torch.equal(to_dense_mask(ei, lengths=lengths), m)


def test_bool_edge_index_is_refused():
    """A boolean [2, E] tensor is not a list of node ids (True would silently read as node 1)."""
    with pytest.raises(ValueError, match="integers"):
        to_dense_mask(torch.tensor([[True, False], [True, True]]))
    with pytest.raises(ValueError, match="integers"):
        is_multigraph(torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch=torch.tensor([0, 1, 0])), "sorted"),
        (dict(batch=torch.tensor([-1, 0, 0])), "non-negative"),
        (dict(batch=torch.tensor([0, 0, 1]), lengths=[2, 1]), "not both"),
    ],
)
def test_bad_batch_vectors_are_refused(kwargs, match):
    ei = torch.tensor([[0, 1, 2], [0, 1, 2]])  # self-loops, fine for any batch
    with pytest.raises(ValueError, match=match):
        to_dense_mask(ei, **kwargs)


def test_source_lengths_must_sum_to_num_src():
    with pytest.raises(ValueError, match="num_src=3"):
        to_dense_mask(torch.tensor([[0], [0]]), 3, 1, lengths=[1], src_lengths=[2])


def test_is_multigraph_of_two_edges_and_of_sizes_taken_from_the_edges():
    assert is_multigraph(torch.tensor([[0, 0], [1, 1]]))  # one edge twice
    assert not is_multigraph(torch.tensor([[1, 0], [0, 1]]))  # 1 -> 0 and 0 -> 1 are two edges
    assert not is_multigraph(torch.tensor([[2, 0], [0, 1]]))
    assert is_multigraph(torch.tensor([[0, 1, 0], [1, 1, 1]]), 2)


def test_from_dense_mask_of_a_batched_cross_mask_keeps_every_key_by_default():
    """lengths cut the queries; the keys of a [B, T_q, T_k] mask with T_q != T_k are not the
    queries, so without src_lengths all T_k of them stay."""
    m = torch.ones(2, 2, 3, dtype=torch.bool)
    ei = from_dense_mask(m, [1, 2])
    assert ei.sparse_size() == (6, 3)
    want = from_dense_mask(m, [1, 2], src_lengths=[3, 3])
    assert torch.equal(ei.as_tensor(), want.as_tensor()) and ei.size(1) == 1 * 3 + 2 * 3


def test_from_dense_mask_refuses_lengths_past_the_mask():
    with pytest.raises(ValueError, match="at most 2"):
        from_dense_mask(torch.ones(1, 2, 2, dtype=torch.bool), [3])
    with pytest.raises(ValueError, match="at most 3"):
        from_dense_mask(torch.ones(1, 2, 3, dtype=torch.bool), [2], src_lengths=[4])


@pytest.mark.parametrize("edge_index, name", [([[3], [0]], "num_src"), ([[0], [3]], "num_dst")])
def test_node_equal_to_the_node_count_is_out_of_range(edge_index, name):
    """Node ids run 0 .. n - 1: an id equal to n is one past the end (not an IndexError later)."""
    with pytest.raises(ValueError, match=name):
        to_dense_mask(torch.tensor(edge_index), 3, 3)
