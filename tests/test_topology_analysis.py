"""Graph analysis (networkx) and pictures (matplotlib Agg)."""
import math

import pytest
import torch
from matplotlib.figure import Figure

from gnn_transformer import topology as T
from gnn_transformer.topology import analysis, pictures


def test_summarize_causal_and_batch():
    s = analysis.summarize(T.causal(4))
    assert (s.num_src, s.num_dst, s.num_edges) == (4, 4, 10)
    assert s.density == pytest.approx(10 / 16)
    assert (s.in_degree.min, s.in_degree.max, s.in_degree.mean) == (1, 4, 2.5)
    assert (s.out_degree.min, s.out_degree.max) == (1, 4)
    assert s.self_loops == 4 and s.empty_rows == 0 and s.causal
    b = analysis.summarize(T.full([3, 2]), [3, 2])
    assert b.density == 1.0 and not b.causal and b.num_edges == 13
    assert analysis.summarize(T.full([3, 2])).density == pytest.approx(13 / 25)  # as one sequence
    g = analysis.summarize(T.global_tokens(5, 1))
    assert g.empty_rows == 0 and g.self_loops == 1 and g.in_degree.std > 0
    c = analysis.summarize(T.cross(2, 3))
    assert c.density == 1.0 and c.num_src == 3 and c.num_dst == 2
    e = analysis.summarize(T.from_dense_mask(torch.zeros(3, 3, dtype=torch.bool)))
    assert e.empty_rows == 3 and e.num_edges == 0


@pytest.mark.parametrize("L", [1, 2, 9, 17])
@pytest.mark.parametrize("w", [1, 2, 3])
def test_layers_to_match_sliding_window(L, w):
    """A window of radius w needs ceil((L - 1) / w) layers to span the sequence."""
    expected = math.ceil((L - 1) / w) if L > 1 else 0
    assert analysis.layers_to_match(T.sliding_window(L, w)) == expected
    assert analysis.layers_to_match(T.sliding_window(L, w, causal=True), reference="causal") == expected
    assert analysis.layers_to_match(T.sliding_window(L, w, causal=True)) is (None if L > 1 else 0)


@pytest.mark.parametrize("build, expected", [
    (lambda: T.full(8), 1), (lambda: T.star(9), 2), (lambda: T.global_tokens(9, 1), 2),
    (lambda: T.strided(16, 4), 2), (lambda: T.fixed(16, 4, 1, causal=False), 2),
    (lambda: T.document(8, 4), None), (lambda: T.full([3, 4]), 1),
])
def test_layers_to_match_known(build, expected):
    ei = build()
    lengths = [3, 4] if ei.sparse_size(0) == 7 else None
    ref = "causal" if analysis.summarize(ei).causal else "full"
    assert analysis.layers_to_match(ei, lengths, reference=ref) == expected


def test_receptive_field_grows_with_layers():
    ei = T.sliding_window(10, 1, causal=True)
    rf = analysis.receptive_field(ei, 3)
    assert rf[9] == {6, 7, 8, 9} and rf[0] == {0}
    assert analysis.receptive_field(ei, 0)[5] == {5}
    sizes = analysis.receptive_field_sizes(ei, 3)
    assert sizes[0] == [1] * 10 and sizes[3][9] == 4 and sizes[1][0] == 1
    assert analysis.diameter(T.star(10)) == 2
    assert analysis.diameter(T.causal(3)) is None
    with pytest.raises(ValueError, match="num_layers"):
        analysis.receptive_field(ei, -1)
    with pytest.raises(ValueError, match="reference"):
        analysis.layers_to_match(ei, reference="sparse")


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
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gnn_transformer") \
                    and not (node.module or "").startswith("gnn_transformer.topology"):
                pytest.fail(f"{f.name} imports {node.module}")
        assert "print(" not in f.read_text(), f"{f.name} prints"
