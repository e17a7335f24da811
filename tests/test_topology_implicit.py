"""Implicit graphs (``BlockGraph``): the builders' ``implicit=True`` and block selection's tiles
materialize to exactly the explicit builders' edges, their counts and dense twins agree, and bad
input is refused with errors that name the argument."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gnn_transformer import topology as T
from gnn_transformer.topology import BlockGraph, interval_graph
from gnn_transformer.topology.dynamic import BlockTopK, block_topk

SIZES = [0, 1, 5, 16, 37, 64, 100, [3, 0, 70, 5], [16, 16], [1, 1, 1]]
BLOCKS = [None, 16, 4, 7]
BUILDERS = {
    "causal": lambda n, **kw: T.causal(n, **kw),
    "full": lambda n, **kw: T.full(n, **kw),
    "window": lambda n, **kw: T.sliding_window(n, 3, **kw),
    "window_causal": lambda n, **kw: T.sliding_window(n, 20, causal=True, **kw),
    "window_wide": lambda n, **kw: T.sliding_window(n, 1000, **kw),
    "document": lambda n, **kw: T.document(n, 6, **kw),
    "document_causal": lambda n, **kw: T.document(n, 6, causal=True, **kw),
}


def _fits(n, block):
    total = n if isinstance(n, int) else sum(n)
    return block is None or block <= max(total, 16)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("n", SIZES, ids=str)
@pytest.mark.parametrize("block", BLOCKS)
def test_materialized_equals_builder(name, n, block):
    if not _fits(n, block):
        pytest.skip("block larger than the sequence")
    graph = BUILDERS[name](n, implicit=True, block_size=block)
    explicit = BUILDERS[name](n)
    assert isinstance(graph, BlockGraph)
    edges = graph.edges()
    assert torch.equal(edges.as_tensor(), explicit.as_tensor())
    assert edges.sparse_size() == explicit.sparse_size()
    assert graph.num_edges() == explicit.size(1)


@pytest.mark.parametrize("name", ["causal", "window", "document_causal"])
@pytest.mark.parametrize("n", [1, 37, [3, 0, 20, 5]], ids=str)
def test_dense_twin(name, n):
    graph = BUILDERS[name](n, implicit=True, block_size=16)
    assert torch.equal(graph.to_dense(), T.to_dense_mask(BUILDERS[name](n)))


@pytest.mark.parametrize("n,kind,bounds", [(5, "causal", (0, 5)), ([3, 0, 4], "causal", (0, 3, 7))])
def test_dense_pattern_causal(n, kind, bounds):
    assert T.causal(n, implicit=True).dense == (kind, bounds)


def test_dense_pattern_others():
    assert T.full([2, 3], implicit=True).dense == ("full", (0, 2, 5))
    assert T.document(10, [4, 6], causal=True, implicit=True).dense == ("causal", (0, 4, 10))
    assert T.sliding_window(10, 9, causal=True, implicit=True).dense == ("causal", (0, 10))
    assert T.sliding_window(10, 3, implicit=True).dense is None
    assert T.causal(0, implicit=True).dense is None


def test_causal_memory_follows_tiles():
    graph = T.causal(1 << 17, implicit=True)  # 8.6e9 edges
    assert graph.num_edges() == (1 << 17) * ((1 << 17) + 1) // 2
    blocks = (1 << 17) // 64
    assert graph.num_tiles == blocks * (blocks + 1) // 2
    assert graph.masks.numel() == blocks * 64 * 64  # one mask per diagonal tile, 8 MiB of bool


def test_edges_refused_past_budget():
    graph = T.causal(100, implicit=True)
    with T.max_edges(1000):
        with pytest.raises(ValueError, match="BlockGraph.edges.*5050 edges.*max_edges=1000"):
            graph.edges()


def test_edges_refused_past_budget_without_allocating():
    graph = T.causal(1 << 17, implicit=True)
    with pytest.raises(ValueError, match="8590000128 edges.*max_edges"):
        graph.edges()


@pytest.mark.parametrize(
    "n,lengths,block,num_blocks,causal,heads,kv_heads",
    [
        (64, None, 16, 1, True, 4, 2),
        (100, None, 16, 2, False, 2, 1),
        (70, [30, 0, 40], 16, 1, True, 4, 4),
        (50, [20, 30], 8, 10, True, 2, 1),
        (128, None, 32, 0, True, 3, 3),
        (1, None, 1, 3, True, 2, 2),
        (0, None, 4, 1, True, 2, 1),
        (33, [17, 16], 16, 1, False, 2, 2),
    ],
)
def test_block_topk_materialized_equals_explicit(n, lengths, block, num_blocks, causal, heads, kv_heads):
    q, k = torch.randn(n, heads, 8), torch.randn(n, kv_heads, 8)
    graph = block_topk(q, k, block, num_blocks, causal=causal, lengths=lengths, implicit=True)
    edge_index, edge_head = block_topk(q, k, block, num_blocks, causal=causal, lengths=lengths)
    index, head = graph.edges()
    assert torch.equal(index.as_tensor(), edge_index) and torch.equal(head, edge_head)
    assert graph.num_edges() == edge_head.numel()
    assert graph.num_heads == heads


def test_block_topk_shares_masks():
    q = k = torch.randn(4096, 12, 8)
    graph = block_topk(q, k, 64, 8, causal=True, implicit=True)
    assert graph.masks.size(0) == 1  # the causal own block; every other tile is full
    assert graph.num_tiles == 12 * sum(min(b, 8) + 1 for b in range(64))


def test_block_topk_dense_twin():
    q, k = torch.randn(40, 2, 4), torch.randn(40, 1, 4)
    graph = block_topk(q, k, 8, 1, causal=True, lengths=[13, 27], implicit=True)
    edge_index, edge_head = block_topk(q, k, 8, 1, causal=True, lengths=[13, 27])
    want = torch.zeros(2, 40, 40, dtype=torch.bool)
    want[edge_head, edge_index[1], edge_index[0]] = True
    assert torch.equal(graph.to_dense(), want)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    block=st.sampled_from([1, 3, 8, 16]),
    num_blocks=st.integers(0, 4),
    causal=st.booleans(),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    seed=st.integers(0, 2**16),
)
def test_block_topk_random_selections(lengths, block, num_blocks, causal, heads, seed):
    n = sum(lengths)
    if n and block > max(lengths):
        block = max(lengths)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, heads[0], 4, generator=g), torch.randn(n, heads[1], 4, generator=g)
    graph = block_topk(q, k, block, num_blocks, causal=causal, lengths=lengths, implicit=True)
    edge_index, edge_head = block_topk(q, k, block, num_blocks, causal=causal, lengths=lengths)
    index, head = graph.edges()
    assert torch.equal(index.as_tensor(), edge_index) and torch.equal(head, edge_head)


def test_selector_implicit_on_covering_graphs():
    q, k = torch.randn(50, 2, 4), torch.randn(50, 2, 4)
    selector = BlockTopK(8, 1, causal=True)
    want_index, want_head = selector(q, k, T.causal([20, 30]))
    for allowed in (T.causal([20, 30]), T.causal([20, 30], implicit=True), T.full([20, 30])):
        graph = selector.implicit(q, k, allowed)
        assert graph is not None
        index, head = graph.edges()
        assert torch.equal(index.as_tensor(), want_index) and torch.equal(head, want_head)


def test_selector_implicit_declines_other_graphs():
    q, k = torch.randn(50, 2, 4), torch.randn(50, 2, 4)
    assert BlockTopK(8, 1, causal=True).implicit(q, k, T.sliding_window(50, 3)) is None
    assert BlockTopK(8, 1).implicit(q, k, T.causal(50)) is None  # non-causal selection, causal graph
    assert BlockTopK(8, 1).implicit(q, k, T.sliding_window(50, 3, implicit=True)) is None


def test_selector_call_on_implicit_graph():
    q, k = torch.randn(30, 2, 4), torch.randn(30, 2, 4)
    a = BlockTopK(8, 1, causal=True)(q, k, T.sliding_window(30, 5, implicit=True))
    b = BlockTopK(8, 1, causal=True)(q, k, T.sliding_window(30, 5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_interval_graph():
    lo = torch.tensor([0, 0, 1, 1, 4])
    hi = torch.tensor([1, 2, 2, 4, 4])
    graph = interval_graph(lo, hi, 5, 2)
    dense = graph.to_dense()
    want = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(5):
        want[i, lo[i] : hi[i] + 1] = True
    assert torch.equal(dense, want)


def _tiles(**change):
    base = dict(
        num_dst=8,
        num_src=8,
        block_q=4,
        block_k=4,
        q_block=torch.tensor([0, 1, 1]),
        k_block=torch.tensor([0, 0, 1]),
        mask_index=torch.tensor([0, -1, 0]),
        masks=torch.ones(1, 4, 4, dtype=torch.bool).tril(),
    )
    base.update(change)
    return BlockGraph(**base)


def test_constructor_accepts_valid():
    graph = _tiles()
    assert torch.equal(graph.to_dense(), T.to_dense_mask(T.causal(8)))
    assert graph.edges().tolist() == T.causal(8).tolist()
    assert _tiles(dense=("causal", (0, 8))).dense == ("causal", (0, 8))


@pytest.mark.parametrize(
    "build",
    [
        lambda b: T.causal(37, implicit=True, block_size=b),
        lambda b: T.causal([5, 0, 17, 16], implicit=True, block_size=b),
        lambda b: T.full([9, 23], implicit=True, block_size=b),
        lambda b: T.full(40, implicit=True, block_size=b),
    ],
)
@pytest.mark.parametrize("block", [4, 16])
def test_dense_claims_of_the_builders_hold_on_their_tiles(build, block):
    """The builders' ``dense`` claims, checked on their bounds, hold on their tiles too: the same
    tiles given to the constructor with the claim (checked there cell by cell) are accepted, and
    with the other kind refused."""
    graph = build(block)
    assert graph.dense is not None
    fields = dict(
        num_dst=graph.num_dst,
        num_src=graph.num_src,
        block_q=graph.block_q,
        block_k=graph.block_k,
        q_block=graph.q_block,
        k_block=graph.k_block,
        mask_index=graph.mask_index,
        masks=graph.masks,
    )
    assert BlockGraph(**fields, dense=graph.dense).dense == graph.dense
    other = ("full" if graph.dense[0] == "causal" else "causal", graph.dense[1])
    with pytest.raises(ValueError, match="as 'dense' says"):
        BlockGraph(**fields, dense=other)


@pytest.mark.parametrize(
    "lo, hi, dense",
    [
        ([0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], ("causal", (0, 6))),  # a window of 2, claimed causal
        ([0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5], ("causal", (0, 3, 6))),  # causal, claimed in documents
        ([0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5], ("full", (0, 6))),
    ],
)
def test_interval_graph_refuses_a_false_dense_claim(lo, hi, dense):
    """``dense`` lets ``auto`` run PyTorch's own attention without reading an edge: a claim that
    the bounds contradict is refused (it ran SDPA's causal kernel on a window before)."""
    with pytest.raises(ValueError, match="as 'dense' says"):
        interval_graph(torch.tensor(lo), torch.tensor(hi), 6, 2, dense=dense)
    assert interval_graph(torch.tensor(lo), torch.tensor(hi), 6, 2).dense is None


@pytest.mark.parametrize(
    "change,name",
    [
        (dict(q_block=torch.tensor([0, 1, 2])), "q_block"),
        (dict(k_block=torch.tensor([0, 0, -1])), "k_block"),
        (dict(mask_index=torch.tensor([0, -1, 1])), "mask_index"),
        (dict(k_block=torch.tensor([0, 0])), "k_block"),
        (dict(masks=torch.ones(1, 4, 3, dtype=torch.bool)), "masks"),
        (dict(masks=torch.ones(1, 4, 4)), "masks"),
        (dict(q_block=torch.tensor([1, 0, 1])), "sorted"),
        (dict(num_dst=7), "mask for tile"),
        (dict(num_src=6, mask_index=torch.tensor([0, 0, 0])), "past the tokens"),
        (dict(block_q=0), "block_q"),
        (dict(num_dst=-1), "num_dst"),
        (dict(tile_head=torch.tensor([0, 0, 0])), "num_heads"),
        (dict(tile_head=torch.tensor([0, 0, 2]), num_heads=2), "tile_head"),
        (dict(q_ptr=torch.tensor([0, 4, 9])), "q_ptr"),
        (dict(q_ptr=torch.tensor([0, 6, 8])), "q_ptr"),
        (dict(dense=("sparse", (0, 8))), "dense"),
        (dict(dense=("full", (0, 8))), "full attention within the documents starting at \\[0\\], as 'dense' says"),
        (dict(dense=("causal", (0, 4, 8))), "causal attention within the documents starting at \\[0, 4\\]"),
        (dict(dense=("causal", (0, 8)), tile_head=torch.tensor([0, 0, 0]), num_heads=1), "shared by every head"),
        (dict(dense=("causal", (0, 8)), num_src=9), "as many sources as targets"),
    ],
)
def test_constructor_refuses(change, name):
    with pytest.raises(ValueError, match=name):
        _tiles(**change)


@pytest.mark.parametrize(
    "build,name",
    [
        (lambda: T.causal(10, implicit=True, block_size=32), "block_size"),
        (lambda: T.causal(10, implicit=True, block_size=0), "block_size"),
        (lambda: T.causal(10, implicit="yes"), "implicit"),
        (lambda: T.sliding_window(10, -1, implicit=True), "window"),
        (lambda: T.document(10, [4, 5], implicit=True), "doc_lengths"),
        (lambda: block_topk(torch.randn(8, 1, 2), torch.randn(8, 1, 2), 4, 1, implicit=1), "implicit"),
        (lambda: block_topk(torch.randn(8, 1, 2), torch.randn(8, 1, 2), 16, 1, implicit=True), "block_size"),
    ],
)
def test_builders_refuse(build, name):
    with pytest.raises(ValueError, match=name):
        build()


@pytest.mark.parametrize(
    "lo,hi,name",
    [
        ([0, 2, 1], [1, 2, 2], "non-decreasing"),
        ([0, 1], [1, 0], "'lo' <= 'hi'"),
        ([0, 1], [1, 5], "num_src"),
        ([0, 1], [1], "same shape|one shape"),
    ],
)
def test_interval_graph_refuses(lo, hi, name):
    with pytest.raises(ValueError, match=name):
        interval_graph(torch.tensor(lo), torch.tensor(hi), 3, 2)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 150), min_size=1, max_size=4).filter(lambda x: sum(x) > 0),
    window=st.one_of(st.none(), st.integers(0, 160)),
    causal=st.booleans(),
    block=st.sampled_from([16, 32, 64]),
)
def test_window_tiles_counts_the_tiles_and_masks_before_building(lengths, window, causal, block):
    """The budget check counts tiles and masks from the query blocks' bounds alone: the counts of
    the graph built."""
    from gnn_transformer.topology.implicit import window_tiles

    if block > max(sum(lengths), 16):
        return
    if window is None:
        graph = (T.causal if causal else T.full)(lengths, implicit=True, block_size=block)
    else:
        graph = T.sliding_window(lengths, window, causal=causal, implicit=True, block_size=block)
    clamped = None if window is None else min(window, max(lengths))
    assert window_tiles(lengths, clamped, causal, block) == (graph.num_tiles, graph.masks.size(0))


@pytest.mark.parametrize(
    "name,build",
    [
        ("full", lambda: T.full([50, 30], implicit=True)),
        ("causal", lambda: T.causal(200, implicit=True)),
        ("sliding_window", lambda: T.sliding_window(300, 20, implicit=True)),
        ("document", lambda: T.document(120, [40, 80], causal=True, implicit=True)),
    ],
)
def test_implicit_graphs_are_refused_past_the_budget(name, build):
    """An implicit graph counts the bytes of its arrays (per token, per tile, a mask per partial
    tile) against the edge budget's int64 edge_index, ``16 * max_edges`` bytes: built exactly at
    the budget, refused one below, naming the builder."""
    from gnn_transformer.topology.implicit import IMPLICIT_TILE_BYTES, IMPLICIT_TOKEN_BYTES

    graph = build()
    need = (
        IMPLICIT_TOKEN_BYTES * graph.num_dst
        + IMPLICIT_TILE_BYTES * graph.num_tiles
        + graph.block_q * graph.block_k * graph.masks.size(0)
    )
    with T.max_edges(-(-need // 16)):
        build()
    with (
        T.max_edges(-(-need // 16) - 1),
        pytest.raises(ValueError, match=rf"^{name}: .* with implicit=True would hold"),
    ):
        build()
    with T.max_edges(None):
        build()


def test_huge_implicit_graphs_are_refused_without_allocating():
    """Counting takes O(N / B) memory a chunk at a time; a token count beyond the budget is refused
    before counting."""
    with pytest.raises(ValueError, match=r"full: n=10000000 with implicit=True would hold 24414062500 tiles"):
        T.full(10**7, implicit=True)
    with pytest.raises(ValueError, match=r"causal: n=1000000000000 with implicit=True would hold 1000000000000 tokens"):
        T.causal(10**12, implicit=True)


@pytest.mark.parametrize(
    "n, block",
    [
        (0, 16),
        (1, 16),
        (15, 16),
        (16, 16),
        (17, 32),
        (32, 32),
        (33, 64),
        (64, 64),
        (65, 64),
        ([10, 6], 16),
        ([10, 7], 32),
    ],
    ids=str,
)
def test_default_block_is_the_smallest_power_of_two_that_covers_the_tokens(n, block):
    """Without block_size, the tile side is 64 shrunk to the smallest power of two (at least 16)
    that holds every token: a graph of exactly 16 or 32 tokens is one tile, not a quarter of one."""
    total = n if isinstance(n, int) else sum(n)
    expected = min(64, max(16, 1 << max(total - 1, 0).bit_length()))
    assert expected == block  # the rule, spelled out by hand above
    for g in (T.causal(n, implicit=True), T.full(n, implicit=True), T.sliding_window(n, 2, implicit=True)):
        assert (g.block_q, g.block_k) == (block, block)


def test_constructor_refuses_a_tile_twice_and_an_empty_block():
    """The same (query block, key block) tile twice would count its edges twice; a block of
    q_ptr / k_ptr holds at least one token."""
    with pytest.raises(ValueError, match="no tile twice"):
        _tiles(k_block=torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="q_ptr"):  # blocks 0, 1 (empty), 2; the tiles skip block 1
        _tiles(q_ptr=torch.tensor([0, 4, 4, 8]), q_block=torch.tensor([0, 2, 2]))


def test_tiles_of_unequal_sides_count_their_edges():
    """A full tile of block_q x block_k holds block_q * block_k edges, also when the sides differ."""
    graph = _tiles(
        num_dst=4,
        num_src=6,
        block_k=2,
        q_block=torch.tensor([0, 0, 0]),
        k_block=torch.tensor([0, 1, 2]),
        mask_index=torch.tensor([-1, 0, -1]),
        masks=torch.tensor([[[True, False]] * 4]),
    )
    dense = graph.to_dense()
    want = torch.ones(4, 6, dtype=torch.bool)
    want[:, 3] = False  # the masked tile (keys 2, 3) keeps key 2 only
    assert torch.equal(dense, want)
    assert graph.num_edges() == int(want.sum()) == graph.edges().size(1) == 20
    assert graph.tile_edges().tolist() == [8, 4, 8]


@pytest.mark.parametrize(
    "lo,hi,name",
    [
        ([0, 0, 0], [2, 1, 2], "non-decreasing"),  # lo non-decreasing, hi not
        ([0, 1], [1, 3], "num_src"),  # hi == num_src: one past the last source
    ],
)
def test_interval_graph_refuses_bad_upper_bounds(lo, hi, name):
    with pytest.raises(ValueError, match=name):
        interval_graph(torch.tensor(lo), torch.tensor(hi), 3, 2)


def test_interval_graph_refuses_a_dense_claim_with_more_sources_than_targets():
    """causal within (0, 3) over 3 targets, but 5 sources: not the square graph 'dense' promises."""
    lo, hi = torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="as 'dense' says"):
        interval_graph(lo, hi, 5, 2, dense=("causal", (0, 3)))
    assert interval_graph(lo, hi, 3, 2, dense=("causal", (0, 3))).dense == ("causal", (0, 3))


@pytest.mark.parametrize("build", [lambda: T.causal([5, 0, 17], implicit=True, block_size=4), lambda: _tiles()])
def test_to_keeps_every_field_and_the_dense_claim(build):
    graph = build()
    moved = graph.to("cpu")
    assert moved.dense == graph.dense
    assert (moved.num_dst, moved.num_src, moved.block_q, moved.block_k) == (
        graph.num_dst,
        graph.num_src,
        graph.block_q,
        graph.block_k,
    )
    for name in ("q_block", "k_block", "mask_index", "masks"):
        assert torch.equal(getattr(moved, name), getattr(graph, name))
    assert torch.equal(moved.to_dense(), graph.to_dense())


def test_selector_implicit_declines_graphs_that_only_count_like_full_or_causal():
    q, k = torch.randn(8, 2, 4), torch.randn(8, 2, 4)
    full = T.full(8).as_tensor()
    twice = torch.cat([full[:, :-1], full[:, :1]], dim=1)  # as many edges as full: one pair twice, (7, 7) missing
    assert BlockTopK(2, 1).implicit(q, k, twice) is None
    causal = T.causal(8).as_tensor()
    back = (causal[0] < causal[1]).nonzero()[0, 0]
    flipped = causal.clone()
    flipped[:, back] = causal[:, back].flip(0)  # as many edges as causal, one of them j > i
    assert BlockTopK(2, 1, causal=True).implicit(q, k, flipped) is None


@pytest.mark.parametrize("n", [10, [], [4, 6]])
@pytest.mark.parametrize("implicit", [False, True])
def test_document_refuses_a_document_length_of_zero(implicit, n):
    with pytest.raises(ValueError, match="'doc_lengths' >= 1"):
        T.document(n, 0, implicit=implicit)


def test_constructor_refuses_a_causal_claim_with_a_full_tile_above_the_diagonal():
    """Tiles with as many cells as causal attention over 8 tokens, but one full tile above the
    diagonal instead of below it: the claim 'causal' is false and refused; without it the same tiles
    are a valid (non-causal) graph."""
    upper = dict(q_block=torch.tensor([0, 0, 1]), k_block=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="as 'dense' says"):
        _tiles(**upper, dense=("causal", (0, 8)))
    graph = _tiles(**upper)
    assert graph.dense is None
    assert graph.num_edges() == T.causal(8).size(1)
    assert not torch.equal(graph.to_dense(), T.to_dense_mask(T.causal(8)))
