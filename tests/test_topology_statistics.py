"""Graph statistics (networkx) and pictures (matplotlib Agg)."""

import math

import pytest
import torch
from matplotlib.figure import Figure

from gnn_transformer import topology as T
from gnn_transformer.topology import pictures, statistics


def test_topology_stats_causal_and_batch():
    s = statistics.topology_stats(T.causal(4))
    assert (s.num_src, s.num_dst, s.num_edges) == (4, 4, 10)
    assert s.density == pytest.approx(10 / 16)
    assert (s.in_degree.min, s.in_degree.max, s.in_degree.mean) == (1, 4, 2.5)
    assert (s.out_degree.min, s.out_degree.max) == (1, 4)
    assert s.self_loops == 4 and s.empty_rows == 0 and s.causal
    b = statistics.topology_stats(T.full([3, 2]), [3, 2])
    assert b.density == 1.0 and not b.causal and b.num_edges == 13
    assert statistics.topology_stats(T.full([3, 2])).density == pytest.approx(13 / 25)  # as one sequence
    g = statistics.topology_stats(T.global_tokens(5, 1))
    assert g.empty_rows == 0 and g.self_loops == 1 and g.in_degree.std > 0
    c = statistics.topology_stats(T.cross(2, 3))
    assert c.density == 1.0 and c.num_src == 3 and c.num_dst == 2
    e = statistics.topology_stats(T.from_dense_mask(torch.zeros(3, 3, dtype=torch.bool)))
    assert e.empty_rows == 3 and e.num_edges == 0


@pytest.mark.parametrize("L", [1, 2, 9, 17])
@pytest.mark.parametrize("w", [1, 2, 3])
def test_layers_to_match_sliding_window(L, w):
    """A window of radius w needs ceil((L - 1) / w) layers to span the sequence."""
    expected = math.ceil((L - 1) / w) if L > 1 else 0
    assert statistics.layers_to_match(T.sliding_window(L, w)) == expected
    assert statistics.layers_to_match(T.sliding_window(L, w, causal=True), reference="causal") == expected
    assert statistics.layers_to_match(T.sliding_window(L, w, causal=True)) is (None if L > 1 else 0)


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: T.full(8), 1),
        (lambda: T.star(9), 2),
        (lambda: T.global_tokens(9, 1), 2),
        (lambda: T.strided(16, 4), 2),
        (lambda: T.fixed(16, 4, 1, causal=False), 2),
        (lambda: T.document(8, 4), None),
        (lambda: T.full([3, 4]), 1),
    ],
)
def test_layers_to_match_known(build, expected):
    ei = build()
    lengths = [3, 4] if ei.sparse_size(0) == 7 else None
    ref = "causal" if statistics.topology_stats(ei).causal else "full"
    assert statistics.layers_to_match(ei, lengths, reference=ref) == expected


def test_receptive_field_grows_with_layers():
    ei = T.sliding_window(10, 1, causal=True)
    rf = statistics.receptive_field(ei, 3)
    assert rf[9] == {6, 7, 8, 9} and rf[0] == {0}
    assert statistics.receptive_field(ei, 0)[5] == {5}
    sizes = statistics.receptive_field_sizes(ei, 3)
    assert sizes[0] == [1] * 10 and sizes[3][9] == 4 and sizes[1][0] == 1
    assert statistics.diameter(T.star(10)) == 2
    assert statistics.diameter(T.causal(3)) is None
    with pytest.raises(ValueError, match="num_layers"):
        statistics.receptive_field(ei, -1)
    with pytest.raises(ValueError, match="reference"):
        statistics.layers_to_match(ei, reference="sparse")


def test_draw_topology_returns_figure_and_saves_png(tmp_path):
    fig = pictures.draw_topology(T.load("bigbird", small=True), title="bigbird", path=tmp_path / "a.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    data = (tmp_path / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    fig = pictures.draw_topology(T.cross(3, 5, mode="window", window=1))
    assert isinstance(fig, Figure)


def test_draw_receptive_field(tmp_path):
    fig = pictures.draw_receptive_field(T.sliding_window(12, 1), 3, token=5, path=tmp_path / "rf.png")
    assert isinstance(fig, Figure)
    assert (tmp_path / "rf.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="token"):
        pictures.draw_receptive_field(T.sliding_window(12, 1), 3, token=12)
    with pytest.raises(ValueError, match="num_layers"):
        pictures.draw_receptive_field(T.sliding_window(12, 1), 0)


def test_topology_does_not_import_models():
    import ast
    import pathlib

    root = pathlib.Path(T.__file__).parent
    for f in root.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                pytest.fail(f"{f.name} imports from outside topology: {ast.dump(node)}")
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("gnn_transformer")
                and not (node.module or "").startswith("gnn_transformer.topology")
            ):
                pytest.fail(f"{f.name} imports {node.module}")
        assert "print(" not in f.read_text(), f"{f.name} prints"


def test_topology_stats_plain_tensor_is_one_node_set():
    s = statistics.topology_stats(torch.tensor([[0, 0, 0], [0, 1, 2]]))  # key 0 seen by queries 0..2
    assert (s.num_src, s.num_dst, s.self_loops) == (3, 3, 1)
    assert s.density == pytest.approx(1 / 3)
    assert statistics.topology_stats(torch.tensor([[0, 1, 2], [0, 0, 0]])).num_dst == 3
    s = statistics.topology_stats(torch.tensor([[0, 1], [1, 1]]), num_src=3, num_dst=3)
    assert s.density == pytest.approx(2 / 9)
    assert statistics.topology_stats(torch.tensor([[0], [1]]), [3, 2]).num_src == 5  # sizes from the lengths
    c = statistics.topology_stats(torch.tensor([[0, 0, 0], [0, 1, 2]]), bipartite=True)
    assert (c.num_src, c.num_dst, c.self_loops, c.density) == (1, 3, 0, 1.0)


def test_topology_stats_bipartite_equal_sizes_and_src_lengths():
    assert statistics.topology_stats(T.cross(3, 3)).self_loops == 3  # inferred: self-attention
    assert statistics.topology_stats(T.cross(3, 3), bipartite=True).self_loops == 0
    with pytest.raises(ValueError, match="bipartite"):
        statistics.topology_stats(T.cross(2, 3), bipartite=False)
    assert statistics.topology_stats(T.cross(2, 3), [2]).density == 1.0  # one sequence: all the keys
    cross = T.cross([2, 2], [3, 3])
    assert statistics.topology_stats(cross, [2, 2], src_lengths=[3, 3]).density == 1.0
    with pytest.raises(ValueError, match="'src_lengths'.*got \\[3, 2\\]"):
        statistics.topology_stats(cross, [2, 2], src_lengths=[3, 2])
    with pytest.raises(ValueError, match="'src_lengths'.*got src_lengths=None"):
        statistics.topology_stats(cross, [2, 2])
    with pytest.raises(ValueError, match="'lengths'.*got \\[2, 2\\]"):
        statistics.topology_stats(T.causal([3, 2]), [2, 2])


def test_layer_counts_are_validated():
    ei = T.causal(3)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_layers"):
            statistics.receptive_field_sizes(ei, bad)
        with pytest.raises(ValueError, match="cutoff"):
            statistics.hop_distances(ei, cutoff=bad)
    assert statistics.hop_distances(ei, cutoff=0) == {0: {0: 0}, 1: {1: 0}, 2: {2: 0}}


def test_draw_receptive_field_errors_name_the_argument():
    with pytest.raises(ValueError, match="no nodes"):
        pictures.draw_receptive_field(torch.empty(2, 0, dtype=torch.long), 2)
    for bad in (1.5, -1, True):
        with pytest.raises(ValueError, match="'token'"):
            pictures.draw_receptive_field(T.causal(4), 2, token=bad)


def test_bipartite_layout_is_in_index_order_and_deterministic():
    g = T.to_networkx(T.cross(6, 9), bipartite=True)
    pos = pictures._layout(g, True)
    assert all((pos[v] == p).all() for v, p in pictures._layout(g, True).items())  # no randomness
    for side, n in (("k", 9), ("q", 6)):
        ys = [pos[(side, i)][1] for i in range(n)]
        assert ys == sorted(ys, reverse=True)  # index 0 at the top, like the matrix
        assert len({pos[(side, i)][0] for i in range(n)}) == 1
    assert pos[("k", 0)][0] < pos[("q", 0)][0]


def _title(fig):
    return fig._suptitle.get_text()


def test_draw_topology_sizes_lengths_and_bipartite():
    plain = torch.tensor([[0, 1], [1, 2]])
    assert "density 0.06" in _title(pictures.draw_topology(plain, num_src=6, num_dst=6))
    batch = T.causal([3, 2])
    assert "density 0.36" in _title(pictures.draw_topology(batch))  # one sequence of 5
    assert "density 0.69" in _title(pictures.draw_topology(batch, lengths=[3, 2]))  # 9 / 13
    assert "density 1.00" in _title(pictures.draw_topology(T.cross(3, 5)))
    fig = pictures.draw_topology(T.cross(4, 4), bipartite=True)
    labels = {t.get_text() for t in fig.axes[1].texts}
    assert {"k0", "k3", "q0", "q3"} <= labels and "0" not in labels
    assert "0" in {t.get_text() for t in pictures.draw_topology(T.cross(4, 4)).axes[1].texts}


def test_topology_stats_causal_by_local_positions_of_a_batched_cross_graph():
    # 2 sequences of 3 queries on 2 keys each: queries 0-2 and 3-5, keys 0-1 and 2-3
    ok = torch.tensor([[0, 1, 2, 3], [0, 1, 3, 4]])  # local key j -> local query j
    assert statistics.topology_stats(ok, [3, 3], src_lengths=[2, 2]).causal
    # key 3 (second key of sequence 1) -> query 3 (first query of sequence 1): global 3 <= 3 but
    # local 1 > 0, not causal
    bad = torch.tensor([[0, 1, 2, 3, 3], [0, 1, 3, 4, 3]])
    assert not statistics.topology_stats(bad, [3, 3], src_lengths=[2, 2]).causal


def test_degree_std_is_the_population_std():
    s = statistics.topology_stats(T.causal(4))  # in-degrees 1, 2, 3, 4
    assert s.in_degree.mean == pytest.approx(2.5)
    assert s.in_degree.std == pytest.approx(math.sqrt(1.25))  # numpy.std, not the sample std 1.29
