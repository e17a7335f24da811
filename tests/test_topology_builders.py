"""Every deterministic builder equals the brute-force graph of its predicate twin, on single
sequences, batches, and edge cases (n = 0, n = 1, n smaller than the window, a batch with a
length-1 sequence); every output is a target-sorted EdgeIndex without duplicates."""

import functools

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_geometric import EdgeIndex

from gnn_transformer import topology as T

LENGTHS = [[0], [1], [2], [5], [13], [3, 1, 4], [7, 0, 2], [1, 12]]


def _case(name, build, pred, **params):
    return pytest.param(
        functools.partial(build, **params),
        functools.partial(pred, **params),
        id=f"{name}-" + "-".join(f"{k}={v}" for k, v in params.items()),
    )


CASES = (
    [_case("full", T.full, T.full_predicate), _case("causal", T.causal, T.causal_predicate)]
    + [
        _case("sliding_window", T.sliding_window, T.sliding_window_predicate, window=w, causal=c)
        for w in (0, 1, 2, 20)
        for c in (False, True)
    ]
    + [
        _case("dilated", T.dilated, T.dilated_predicate, window=w, dilation=d, causal=c)
        for w in (0, 1, 3)
        for d in (1, 3)
        for c in (False, True)
    ]
    + [
        _case("strided", T.strided, T.strided_predicate, stride=s, causal=c)
        for s in (1, 2, 3, 20)
        for c in (True, False)
    ]
    + [
        _case("fixed", T.fixed, T.fixed_predicate, block=b, num_summary=k, causal=c)
        for b, k in ((1, 0), (1, 1), (2, 1), (3, 0), (3, 2), (4, 4), (20, 3))
        for c in (True, False)
    ]
    + [
        _case("global_tokens", T.global_tokens, T.global_tokens_predicate, num_global=g, window=w)
        for g in (0, 2, 30)
        for w in (None, 0, 2)
    ]
    + [
        _case(
            "bigbird_no_random",
            functools.partial(T.bigbird, num_random=0),
            T.bigbird_predicate,
            block=b,
            window=w,
            num_global=g,
        )
        for b in (1, 2, 3)
        for w in (0, 1)
        for g in (0, 1, 2)
    ]
    + [_case("prefix_lm", T.prefix_lm, T.prefix_lm_predicate, prefix=p) for p in (0, 1, 3, 40)]
    + [
        _case("document", T.document, T.document_predicate, doc_lengths=d, causal=c)
        for d in (1, 2, 3, 50)
        for c in (False, True)
    ]
)


def _check_invariants(ei, num_src, num_dst=None):
    num_dst = num_src if num_dst is None else num_dst
    assert isinstance(ei, EdgeIndex)
    assert ei.is_sorted_by_col
    assert ei.sparse_size() == (num_src, num_dst)
    assert ei.dtype == torch.long
    plain = ei.as_tensor()
    assert not T.is_multigraph(plain, num_src)
    key = plain[1] * max(num_src, 1) + plain[0]
    assert torch.equal(key, key.sort().values)  # by target, then source
    if plain.numel():
        assert int(plain[0].min()) >= 0 and int(plain[0].max()) < num_src
        assert int(plain[1].min()) >= 0 and int(plain[1].max()) < num_dst


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("build, pred", CASES)
def test_builder_equals_predicate(build, pred, lengths):
    ei = build(lengths)
    _check_invariants(ei, sum(lengths))
    expected = T.from_predicate(lengths, pred)
    assert torch.equal(ei.as_tensor(), expected.as_tensor())
    if len(lengths) == 1:  # an int and a one-element list give the same graph
        assert torch.equal(build(lengths[0]).as_tensor(), ei.as_tensor())


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("block, window, num_global", [(1, 0, 1), (1, 1, 2), (2, 1, 3), (3, 0, 2), (2, 2, 5)])
def test_bigbird_global_at_ends_equals_predicate(lengths, block, window, num_global):
    kw = dict(block=block, window=window, num_global=num_global, global_at="ends")
    ei = T.bigbird(lengths, num_random=0, **kw)
    _check_invariants(ei, sum(lengths))
    expected = T.from_predicate(lengths, lambda i, j, n: T.bigbird_predicate(i, j, n, **kw), with_length=True)
    assert torch.equal(ei.as_tensor(), expected.as_tensor())


def test_bigbird_predicate_global_at_ends_needs_the_length():
    assert T.bigbird_predicate(0, 5, 6, block=2, num_global=2, global_at="ends")  # key block 2: global
    with pytest.raises(ValueError, match="'L'.*global_at='ends'.*None"):
        T.bigbird_predicate(0, 5, block=2, num_global=2, global_at="ends")


@pytest.mark.parametrize("lengths", [[1], [9], [30], [20, 1, 7]], ids=str)
def test_bigbird_global_at_ends_random_blocks(lengths):
    kw = dict(block=2, window=1, num_global=2, global_at="ends")
    ei = T.bigbird(lengths, num_random=2, seed=3, **kw)
    det = T.bigbird(lengths, num_random=0, **kw)
    _check_invariants(ei, sum(lengths))
    assert torch.equal(T.intersection(ei, det).as_tensor(), det.as_tensor())
    extra = T.difference(ei, det)
    seq = T.batch_vector(lengths)
    pos = torch.arange(sum(lengths)) - T.ptr_vector(lengths)[seq]
    nb = (torch.tensor(lengths)[seq] + 1) // 2  # blocks per sequence, per node
    qb, kb = pos[extra[1]] // 2, pos[extra[0]] // 2
    last = nb[extra[1]] - 1
    assert ((qb - kb).abs() > 1).all()  # outside the window
    assert ((qb > 0) & (qb < last) & (kb > 0) & (kb < last)).all()  # never a global block
    for i, length in enumerate(lengths):  # a sequence of >= 5 blocks draws some random blocks
        if (length + 1) // 2 >= 5:
            assert (seq[extra[1]] == i).any()


def test_bigbird_global_at_bad_value():
    with pytest.raises(ValueError, match="'global_at'.*'middle'"):
        T.bigbird(8, global_at="middle")


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("ring", [True, False])
def test_star_equals_predicate(lengths, ring):
    ei = T.star(lengths, ring=ring)
    _check_invariants(ei, sum(lengths))
    expected = T.from_predicate(lengths, lambda i, j, n: T.star_predicate(i, j, n, ring=ring), with_length=True)
    assert torch.equal(ei.as_tensor(), expected.as_tensor())


@pytest.mark.parametrize("L", [5, 6, 12])
@pytest.mark.parametrize("ring", [True, False])
def test_star_edge_count_and_two_hops(L, ring):
    ei = T.star(L, ring=ring)
    assert ei.size(1) == L + 4 * (L - 1) - (0 if ring else 2)
    reach = T.to_dense_mask(ei).float()
    two = (reach @ reach) > 0
    assert two.all()  # any token reaches any other in two hops through the relay


@pytest.mark.parametrize(
    "q_len, k_len",
    [([0], [3]), ([1], [1]), ([3], [0]), ([2], [4]), ([4], [2]), ([5, 1, 3], [2, 6, 3]), ([7], [7]), ([1, 9], [9, 1])],
)
@pytest.mark.parametrize("mode", ["full", "window", "monotonic"])
@pytest.mark.parametrize("window", [0, 1, 3])
def test_cross_equals_predicate(q_len, k_len, mode, window):
    ei = T.cross(q_len, k_len, mode=mode, window=window)
    _check_invariants(ei, sum(k_len), sum(q_len))
    expected = T.from_predicate(
        q_len,
        lambda i, j, lq, lk: T.cross_predicate(i, j, lq, lk, mode=mode, window=window),
        src_lengths=k_len,
        with_length=True,
    )
    assert torch.equal(ei.as_tensor(), expected.as_tensor())


@pytest.mark.parametrize("lq, lk", [(3, 7), (7, 3), (5, 5), (1, 4)])
def test_cross_monotonic_last_query_reads_everything(lq, lk):
    m = T.to_dense_mask(T.cross(lq, lk, mode="monotonic"))
    assert m[-1].all()
    assert (m.sum(1)[1:] >= m.sum(1)[:-1]).all()  # monotone: the read prefix never shrinks
    assert torch.equal(T.to_dense_mask(T.cross(lq, lk)), torch.ones(lq, lk, dtype=torch.bool))
    if lq == lk:
        assert torch.equal(T.to_dense_mask(T.cross(lq, lk, mode="window")), torch.eye(lq, dtype=torch.bool))


GRAPHS = [
    nx.path_graph(4),
    nx.cycle_graph(5),
    nx.karate_club_graph(),
    nx.empty_graph(1),
    nx.empty_graph(3),
    nx.gnp_random_graph(8, 0.3, seed=1, directed=True),
    nx.Graph([("a", "b"), ("b", "c")]),
]


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda g: f"{type(g).__name__}{g.number_of_nodes()}")
@pytest.mark.parametrize("self_loops", [False, True])
@pytest.mark.parametrize("virtual_node", [False, True])
def test_from_graph_equals_predicate(graph, self_loops, virtual_node):
    ei = T.from_graph(graph, self_loops=self_loops, virtual_node=virtual_node)
    n = graph.number_of_nodes() + virtual_node
    _check_invariants(ei, n)
    pred = T.from_graph_predicate(graph, self_loops=self_loops, virtual_node=virtual_node)
    assert torch.equal(ei.as_tensor(), T.from_predicate(n, pred).as_tensor())
    extra = (n if self_loops else 0) + (2 * n - 1 if virtual_node else 0)
    if not self_loops or not virtual_node:
        arcs = graph.number_of_edges() * (1 if graph.is_directed() else 2)
        assert ei.size(1) == arcs + extra


def test_from_graph_batch_and_pyg_data():
    from torch_geometric.data import Data

    data = Data(edge_index=torch.tensor([[0, 0, 2], [1, 1, 0]]), num_nodes=3)  # duplicated edge
    ei = T.from_graph([data, nx.path_graph(2)], virtual_node=True)
    parts = [T.from_graph(data, virtual_node=True), T.from_graph(nx.path_graph(2), virtual_node=True)]
    assert ei.sparse_size() == (7, 7)
    off = parts[1].as_tensor() + 4
    assert torch.equal(ei.as_tensor(), torch.cat([parts[0].as_tensor(), off], dim=1))
    assert T.from_graph(data).size(1) == 2  # duplicate merged


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=4), st.integers(0, 14), st.integers(1, 5), st.booleans())
def test_dilated_hypothesis(lengths, window, dilation, causal):
    ei = T.dilated(lengths, window, dilation, causal=causal)
    _check_invariants(ei, sum(lengths))
    pred = functools.partial(T.dilated_predicate, window=window, dilation=dilation, causal=causal)
    assert torch.equal(ei.as_tensor(), T.from_predicate(lengths, pred).as_tensor())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=1, max_size=3),
    st.integers(1, 6),
    st.integers(0, 3),
    st.integers(0, 3),
    st.integers(0, 4),
    st.integers(0, 9),
    st.sampled_from(["start", "ends"]),
)
def test_bigbird_is_its_block_graph_expanded(lengths, block, window, num_global, num_random, seed, at):
    """BigBird's token edges are the token pairs of its (overlapping) window, global and random
    block edges, each once, sorted by target, then source: the builder's linear-time expansion
    of the distinct block pairs against brute force over the block edges."""
    from gnn_transformer.topology.bigbird import _block_edges

    bsrc, bdst, start, size = _block_edges(lengths, block, window, num_global, num_random, seed, at)
    start, size = start.tolist(), size.tolist()
    expected = sorted(
        {
            (i, j)
            for s, d in zip(bsrc.tolist(), bdst.tolist())
            for i in range(start[d], start[d] + size[d])
            for j in range(start[s], start[s] + size[s])
        }
    )
    ei = T.bigbird(
        lengths, block=block, window=window, num_global=num_global, num_random=num_random, seed=seed, global_at=at
    )
    _check_invariants(ei, sum(lengths))
    assert list(zip(ei[1].tolist(), ei[0].tolist())) == expected


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=3), st.integers(0, 45), st.booleans())
def test_sliding_window_edge_count_formula(lengths, w, causal):
    ei = T.sliding_window(lengths, w, causal=causal)
    d_range = range(0, w + 1) if causal else range(-w, w + 1)
    assert ei.size(1) == sum(max(L - abs(d), 0) for L in lengths for d in d_range)


@pytest.mark.parametrize("L", [1, 4, 9])
@pytest.mark.parametrize("p", [0, 2, 12])
def test_prefix_lm_edge_count(L, p):
    q = min(p, L)
    assert T.prefix_lm(L, p).size(1) == L * (L + 1) // 2 + q * (q - 1) // 2


def test_prefix_lm_per_sequence_prefixes_and_special_cases():
    ei = T.prefix_lm([3, 4], [1, 4])
    assert torch.equal(T.to_dense_mask(ei, lengths=[3, 4])[1], torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(T.prefix_lm(5, 0).as_tensor(), T.causal(5).as_tensor())
    assert torch.equal(T.prefix_lm(5, 5).as_tensor(), T.full(5).as_tensor())


def test_document_batches_and_explicit_lengths():
    ei = T.document([5, 3], [[2, 3], [3]], causal=True)
    assert torch.equal(ei.as_tensor(), T.causal([2, 3, 3]).as_tensor())
    assert torch.equal(T.document(5, [2, 0, 3]).as_tensor(), T.full([2, 3]).as_tensor())
    assert torch.equal(T.document([7, 3], 3).as_tensor(), T.full([3, 3, 1, 3]).as_tensor())
    pred = functools.partial(T.document_predicate, doc_lengths=[2, 1, 3])
    assert torch.equal(T.document(6, [2, 1, 3]).as_tensor(), T.from_predicate(6, pred).as_tensor())


def test_known_identities():
    """Patterns that coincide with simpler ones at the extremes."""
    assert torch.equal(T.sliding_window(6, 5).as_tensor(), T.full(6).as_tensor())
    assert torch.equal(T.sliding_window(6, 9, causal=True).as_tensor(), T.causal(6).as_tensor())
    assert torch.equal(T.strided(6, 1).as_tensor(), T.causal(6).as_tensor())
    assert torch.equal(T.fixed(6, 6, 0, causal=False).as_tensor(), T.full(6).as_tensor())
    assert torch.equal(T.global_tokens(6, 6).as_tensor(), T.full(6).as_tensor())
    assert torch.equal(T.dilated(6, 2, 1).as_tensor(), T.sliding_window(6, 2).as_tensor())
    assert torch.equal(T.bigbird(9, window=9, num_random=3).as_tensor(), T.full(9).as_tensor())


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: T.sliding_window(5, -1), "window"),
        (lambda: T.sliding_window(5, 1.5), "window"),
        (lambda: T.sliding_window(5, 1, causal="yes"), "causal"),
        (lambda: T.sliding_window(-3, 1), "'n'"),
        (lambda: T.sliding_window("5", 1), "'n'"),
        (lambda: T.dilated(5, 1, 0), "dilation"),
        (lambda: T.strided(5, 0), "stride"),
        (lambda: T.fixed(5, 2, 3), "num_summary"),
        (lambda: T.fixed(5, 0), "block"),
        (lambda: T.global_tokens(5, -1), "num_global"),
        (lambda: T.global_tokens(5, 1, window=-2), "window"),
        (lambda: T.bigbird(5, block=0), "block"),
        (lambda: T.bigbird(5, num_random=-1), "num_random"),
        (lambda: T.random(5, 6), "'k'"),
        (lambda: T.random([8, 2], 3), "'k'"),
        (lambda: T.expander(5, 3), "degree"),
        (lambda: T.expander(5, -1), "degree"),
        (lambda: T.star(5, ring=1), "ring"),
        (lambda: T.document(5, [2, 2]), "doc_lengths"),
        (lambda: T.document(5, 0), "doc_lengths"),
        (lambda: T.document([2, 3], [[2]]), "doc_lengths"),
        (lambda: T.prefix_lm(5, -1), "prefix"),
        (lambda: T.prefix_lm([5, 2], [1]), "prefix"),
        (lambda: T.cross(3, 4, mode="diagonal"), "mode"),
        (lambda: T.cross([3, 2], [4]), "n_k"),
        (lambda: T.cross(3, 4, window=-1), "window"),
        (lambda: T.from_graph("graph"), "graph"),
        (lambda: T.from_predicate(2000, lambda i, j: True), "max_pairs"),
        (lambda: T.union(torch.tensor([[-1], [0]]), T.causal(3)), "non-negative.*-1"),
        (lambda: T.difference(T.causal(3), torch.tensor([[0], [-2]])), "non-negative.*-2"),
    ],
)
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()


def test_bigbird_more_random_blocks_than_there_are():
    """num_random beyond the blocks a query can draw takes them all, in time and memory bounded
    by the blocks, not by num_random (2**31 - 1 used to allocate an [R, 2**31 - 1] tensor)."""
    every = T.bigbird(40, block=2, window=1, num_global=1, num_random=2**31 - 1, seed=1)
    assert torch.equal(
        every.as_tensor(), T.bigbird(40, block=2, window=1, num_global=1, num_random=20, seed=1).as_tensor()
    )
    assert torch.equal(every.as_tensor(), T.full(40).as_tensor())  # every block reachable


# ---------------------------------------------------------------- from_predicate


@pytest.mark.parametrize("q_len, k_len", [([3], [5]), ([2, 4], [3, 1]), ([1], [4])])
def test_from_predicate_bipartite_passes_query_then_key_length(q_len, k_len):
    """With ``with_length``, a bipartite rule is called ``fn(i, j, L_q, L_k)``; the graph is
    ``(num_src, num_dst) = (sum L_k, sum L_q)``: here every query but the last of its sequence
    attends to the last key of its sequence."""
    calls = set()

    def fn(i, j, lq, lk):
        calls.add((lq, lk))
        return j == lk - 1 and i < lq - 1

    out = T.from_predicate(q_len, fn, src_lengths=k_len, with_length=True)
    assert calls == set(zip(q_len, k_len))
    assert out.sparse_size() == (sum(k_len), sum(q_len))
    src, dst, q_off, k_off = [], [], 0, 0
    for lq, lk in zip(q_len, k_len):
        for i in range(lq - 1):
            src.append(k_off + lk - 1)
            dst.append(q_off + i)
        q_off, k_off = q_off + lq, k_off + lk
    assert out.tolist() == [src, dst]


@pytest.mark.parametrize("n, max_pairs", [(2, 4), ([2, 3], 13), (0, 0)])
def test_from_predicate_builds_exactly_at_max_pairs(n, max_pairs):
    """``max_pairs`` is the largest number of candidate pairs allowed: at it the graph is built,
    one below it is refused."""
    out = T.from_predicate(n, lambda i, j: True, max_pairs=max_pairs)
    assert out.size(1) == max_pairs
    if max_pairs:
        with pytest.raises(ValueError, match=rf"{max_pairs} pairs exceed 'max_pairs'={max_pairs - 1}"):
            T.from_predicate(n, lambda i, j: True, max_pairs=max_pairs - 1)


def test_from_predicate_refuses_mismatched_src_lengths_and_non_callables():
    with pytest.raises(ValueError, match=r"'src_lengths' to have 2 entries \(got 1\)"):
        T.from_predicate([2, 3], lambda i, j: True, src_lengths=[4])
    with pytest.raises(ValueError, match=r"'src_lengths' to have 1 entries \(got 2\)"):
        T.from_predicate([2], lambda i, j: True, src_lengths=[4, 1])
    with pytest.raises(ValueError, match="'fn' to be callable"):
        T.from_predicate(3, "j <= i")


def test_from_graph_of_pyg_data_keeps_the_direction_of_its_edges():
    """A PyG edge_index row 0 is the source: Data edge 0 -> 1 lets node 1 attend to node 0."""
    from torch_geometric.data import Data

    data = Data(edge_index=torch.tensor([[0, 2], [1, 1]]), num_nodes=3)  # 0 -> 1, 2 -> 1
    ei = T.from_graph(data)
    assert ei.tolist() == [[0, 2], [1, 1]]
    assert T.to_dense_mask(ei)[1, 0] and not T.to_dense_mask(ei)[0, 1]
    # the same graph as a networkx DiGraph gives the same token graph
    assert torch.equal(T.from_graph(nx.DiGraph([(0, 1), (2, 1)])).as_tensor(), ei.as_tensor())


@pytest.mark.parametrize("edge_index", [[[0], [2]], [[2], [0]], [[-1], [0]], [[0], [-1]]], ids=str)
def test_from_graph_refuses_pyg_edges_outside_its_nodes(edge_index):
    from torch_geometric.data import Data

    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        T.from_graph(Data(edge_index=torch.tensor(edge_index), num_nodes=2))


@pytest.mark.parametrize("suffix", [".edgelist", ".adjlist"])
def test_read_graph_reads_the_directed_header(tmp_path, suffix):
    """An .edgelist / .adjlist file that starts with '# directed' is a DiGraph; without it the
    edges are undirected (both directions in the token graph)."""
    lines = "0 1\n1 2\n2\n" if suffix == ".adjlist" else "0 1\n1 2\n"
    directed, undirected = tmp_path / f"d{suffix}", tmp_path / f"u{suffix}"
    directed.write_text("# directed\n" + lines)
    undirected.write_text(lines)
    d, u = T.read_graph(directed), T.read_graph(undirected)
    assert d.is_directed() and set(d.edges) == {(0, 1), (1, 2)}
    assert not u.is_directed() and {frozenset(e) for e in u.edges} == {frozenset((0, 1)), frozenset((1, 2))}
    assert T.from_graph(d).tolist() == [[0, 1], [1, 2]]  # 1 hears 0, 2 hears 1, not back
    assert T.from_graph(u).size(1) == 4


def test_read_graph_other_formats_and_bad_paths(tmp_path):
    nx.write_gml(nx.path_graph(3), tmp_path / "p.gml")
    nx.write_graphml(nx.cycle_graph(4), tmp_path / "c.graphml")
    assert T.read_graph(tmp_path / "p.gml").number_of_edges() == 2
    assert T.read_graph(str(tmp_path / "c.graphml")).number_of_edges() == 4
    with pytest.raises(ValueError, match="'path' with a suffix"):
        T.read_graph(tmp_path / "g.txt")
    with pytest.raises(ValueError, match="No graph file"):
        T.read_graph(tmp_path / "missing.edgelist")


def test_prefix_lm_refuses_more_prefixes_than_sequences():
    with pytest.raises(ValueError, match="one 'prefix' per sequence"):
        T.prefix_lm([5, 2], [1, 2, 3])


@pytest.mark.parametrize("n, block, window, num_global", [(12, 1, 1, 2), (24, 2, 1, 2), (30, 3, 2, 3), (13, 2, 2, 4)])
def test_bigbird_global_at_ends_with_every_random_block_is_full(n, block, window, num_global):
    """With global blocks at both ends, a query block whose window reaches the last global blocks
    can still draw every other non-global block: enough random blocks give full attention."""
    every = T.bigbird(n, block=block, window=window, num_global=num_global, num_random=n, seed=0, global_at="ends")
    assert torch.equal(every.as_tensor(), T.full(n).as_tensor())
