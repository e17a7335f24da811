"""Per-head builders (``per_head``, ``dilated_per_head``, ``streaming``, ``duo_attention``) against
their predicate twins, and the per-head dense mask of ``to_dense_mask``."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer.topology import (
    causal,
    dilated,
    dilated_per_head,
    dilated_predicate,
    duo_attention,
    is_multigraph,
    max_edges,
    per_head,
    sliding_window,
    streaming,
    streaming_predicate,
    to_dense_mask,
)


def _edges(edge_index, edge_head=None):
    """The edge set ``{(h, i, j)}`` (``h = 0`` without heads), and whether it had duplicates."""
    heads = [0] * edge_index.size(1) if edge_head is None else edge_head.tolist()
    triples = [(h, i, j) for h, (j, i) in zip(heads, edge_index.t().tolist())]
    return set(triples), len(set(triples)) != len(triples)


def _brute(lengths, rule):
    out, offset = set(), 0
    for L in lengths:
        out |= {(offset + i, offset + j) for i in range(L) for j in range(L) if rule(i, j)}
        offset += L
    return out


def _assert_sorted_by_head_and_target(edge_index, edge_head):
    key = edge_head * (int(edge_index[1].max()) + 1 if edge_index.numel() else 1) + edge_index[1]
    assert bool((key[1:] >= key[:-1]).all())


@pytest.mark.parametrize("lengths", [[0], [1], [9], [5, 0, 7]])
@pytest.mark.parametrize("num_sinks", [0, 1, 3, 20])
@pytest.mark.parametrize("window", [0, 1, 4, 2**40])
def test_streaming_matches_its_predicate(lengths, num_sinks, window):
    got, dup = _edges(streaming(lengths, num_sinks, window))
    want = _brute(lengths, lambda i, j: streaming_predicate(i, j, num_sinks=num_sinks, window=window))
    assert not dup and got == {(0, i, j) for i, j in want}


def test_streaming_is_sorted_and_sized():
    g = streaming([6, 4], 2, 1)
    assert g.sparse_size() == (10, 10) and g.is_sorted_by_col
    assert bool((g[1][1:] >= g[1][:-1]).all())


@pytest.mark.parametrize("n, num_sinks, window", [(6, 1, 2), (30, 4, 3), (9, 9, 0), (5, 0, 7)])
def test_streaming_counts_its_edges_exactly_before_building(n, num_sinks, window):
    edges = streaming(n, num_sinks, window).size(1)
    with max_edges(edges):
        streaming(n, num_sinks, window)
    with max_edges(edges - 1), pytest.raises(ValueError, match=f"streaming: n={n} would need {edges} edges"):
        streaming(n, num_sinks, window)


def test_per_head_stacks_graphs_by_head():
    graphs = [causal(5), sliding_window(5, 1), torch.empty(2, 0, dtype=torch.long)]
    edge_index, edge_head = per_head(graphs)
    assert edge_index.sparse_size() == (5, 5) and edge_head.dtype == torch.long
    got, _ = _edges(edge_index, edge_head)
    want = set()
    for h, g in enumerate(graphs):
        want |= {(h, i, j) for j, i in g.t().tolist()}
    assert got == want
    _assert_sorted_by_head_and_target(edge_index, edge_head)


@pytest.mark.parametrize(
    "graphs, match",
    [
        ([], "non-empty list"),
        (causal(3), "non-empty list"),
        ([causal(3), causal(4)], "the same sparse_size"),
        ([causal(3), torch.zeros(2, 2)], "each graph of 'per_head' to be an integer edge_index"),
        ([torch.tensor([[0, -1], [0, 0]])], "non-negative"),
        ([causal(3), torch.tensor([[0], [5]])], "outside sparse_size"),
    ],
)
def test_per_head_bad_input(graphs, match):
    with pytest.raises(ValueError, match=match):
        per_head(graphs)


@pytest.mark.parametrize("causal_", [False, True])
@pytest.mark.parametrize("lengths", [[7], [4, 6]])
def test_dilated_per_head_is_one_dilated_window_per_head(lengths, causal_):
    dilations = [1, 2, 3]
    edge_index, edge_head = dilated_per_head(lengths, 2, dilations, causal=causal_)
    got, dup = _edges(edge_index, edge_head)
    want = set()
    for h, d in enumerate(dilations):
        rule = lambda i, j, d=d: dilated_predicate(i, j, window=2, dilation=d, causal=causal_)  # noqa: E731
        want |= {(h, i, j) for i, j in _brute(lengths, rule)}
        assert torch.equal(edge_index[:, edge_head == h], dilated(lengths, 2, d, causal=causal_).as_tensor())
    assert not dup and got == want
    _assert_sorted_by_head_and_target(edge_index, edge_head)


@pytest.mark.parametrize("dilations, match", [([], "'dilations'"), ([1, 0], "'dilations' >= 1"), ("12", "'dilations'")])
def test_dilated_per_head_bad_input(dilations, match):
    with pytest.raises(ValueError, match=match):
        dilated_per_head(5, 1, dilations)


@pytest.mark.parametrize("streaming_heads", [[], [1], [0, 1, 2, 3]])
def test_duo_attention_counts_every_head_against_the_budget(streaming_heads):
    """The budget bounds the per-head graph, not one head's: num_heads copies of a graph that fits
    alone are refused when they do not fit together (also through the catalogue)."""
    edges = duo_attention(8, streaming_heads, 4, num_sinks=1, window=1)[0].size(1)
    with max_edges(edges):
        duo_attention(8, streaming_heads, 4, num_sinks=1, window=1)
    with max_edges(edges - 1), pytest.raises(ValueError, match=f"duo_attention: n=8 would need {edges} edges"):
        duo_attention(8, streaming_heads, 4, num_sinks=1, window=1)


def test_duo_attention_catalogue_spec_keeps_the_budget():
    from gnn_transformer.topology import load

    edges = load("duo_attention", 16)[0].size(1)
    with max_edges(edges - 1), pytest.raises(ValueError, match="duo_attention: n=16 would need"):
        load("duo_attention", 16)


def test_duo_attention_splits_heads():
    edge_index, edge_head = duo_attention([8, 5], [1, 3], 4, num_sinks=2, window=1)
    got, dup = _edges(edge_index, edge_head)
    stream = _brute([8, 5], lambda i, j: streaming_predicate(i, j, num_sinks=2, window=1))
    full = _brute([8, 5], lambda i, j: j <= i)
    want = {(h, i, j) for h in (0, 2) for i, j in full} | {(h, i, j) for h in (1, 3) for i, j in stream}
    assert not dup and got == want
    _assert_sorted_by_head_and_target(edge_index, edge_head)


@pytest.mark.parametrize(
    "heads, num_heads, match",
    [
        ([4], 4, "'streaming_heads' <= 3"),
        ([1, 1], 4, "distinct"),
        ([0], 0, "'num_heads' >= 1"),
        ("1", 4, "list of head indices"),
    ],
)
def test_duo_attention_bad_input(heads, num_heads, match):
    with pytest.raises(ValueError, match=match):
        duo_attention(6, heads, num_heads, num_sinks=1, window=2)


def test_per_head_dense_mask():
    edge_index, edge_head = per_head([causal(3), sliding_window(3, 0)])
    mask = to_dense_mask(edge_index, edge_head=edge_head, num_heads=3)
    assert mask.shape == (3, 3, 3)
    assert torch.equal(mask[0], torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    assert torch.equal(mask[1], torch.eye(3, dtype=torch.bool)) and not mask[2].any()


def test_per_head_dense_mask_padded_per_sequence():
    edge_index, edge_head = per_head([causal([2, 3]), sliding_window([2, 3], 0)])
    mask = to_dense_mask(edge_index, lengths=[2, 3], edge_head=edge_head, num_heads=2)
    assert mask.shape == (2, 2, 3, 3)
    assert torch.equal(mask[1, 0], torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    assert torch.equal(mask[0, 1, :2, :2], torch.eye(2, dtype=torch.bool)) and not mask[0, :, 2].any()


def test_a_duplicate_within_a_head_is_a_multigraph_across_heads_is_not():
    edge_index = torch.tensor([[0, 0], [1, 1]])
    assert not is_multigraph(edge_index, edge_head=torch.tensor([0, 1]))
    assert is_multigraph(edge_index, edge_head=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="duplicated edges"):
        to_dense_mask(edge_index, 2, 2, edge_head=torch.tensor([1, 1]), num_heads=2)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(edge_head=torch.tensor([0, 0, 0])), "'num_heads' to be a positive int"),
        (dict(num_heads=2), "'num_heads' .* needs 'edge_head'"),
        (dict(edge_head=torch.tensor([0, 0]), num_heads=2), r"'edge_head' of shape \[E\] = \[3\]"),
        (dict(edge_head=torch.tensor([0.0, 0.0, 0.0]), num_heads=2), "'edge_head' to hold integers"),
        (dict(edge_head=torch.tensor([0, 2, 0]), num_heads=2), r"'edge_head' in \[0, 2\)"),
    ],
)
def test_per_head_dense_mask_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        to_dense_mask(causal(2), **kw)


def test_draw_per_head_draws_one_matrix_per_head(tmp_path):
    from gnn_transformer.topology import draw_per_head

    edge_index, edge_head = duo_attention(10, [1], 3, num_sinks=1, window=2)
    fig = draw_per_head(edge_index, edge_head, 3, title="duo", path=tmp_path / "heads.png", columns=2)
    assert (tmp_path / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 3
    mask = to_dense_mask(edge_index, edge_head=edge_head, num_heads=3)
    for h in range(3):
        assert (images[h] == mask[h].numpy()).all()


@pytest.mark.parametrize(
    "kw, match",
    [(dict(head_names=["a"]), "'head_names' to have 3 entries"), (dict(columns=0), "'columns' to be a positive int")],
)
def test_draw_per_head_bad_input(kw, match):
    from gnn_transformer.topology import draw_per_head

    edge_index, edge_head = duo_attention(4, [1], 3, num_sinks=1, window=1)
    with pytest.raises(ValueError, match=match):
        draw_per_head(edge_index, edge_head, 3, **kw)


# ---------------------------------------------------------------- per_head dtypes


@pytest.mark.parametrize("dtypes", [(torch.int32, torch.int32), (torch.int32, torch.long), (torch.int16, torch.uint8)])
def test_per_head_of_narrow_integer_graphs_is_long(dtypes):
    """Graphs of any integer dtype stack into a long edge_index (what the kernels index with), same
    edges."""
    graphs = [causal(4).as_tensor().to(dtypes[0]), sliding_window(4, 1).as_tensor().to(dtypes[1])]
    edge_index, edge_head = per_head(graphs)
    assert edge_index.dtype == torch.long and edge_head.dtype == torch.long
    assert edge_index.sparse_size() == (4, 4)
    got, _ = _edges(edge_index, edge_head)
    want = {(h, i, j) for h, g in enumerate(graphs) for j, i in g.long().t().tolist()}
    assert got == want
