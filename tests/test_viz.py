"""The viewer's pages without a browser: what each view draws against the graph it comes from, the
reduction to blocks against a dense reference, the model's weights against the recorded attention,
and the command's refusals (exit code 2, nothing written)."""

import json
import re

import pytest
import torch

from gnn_transformer import topology, viz
from gnn_transformer.cli import main
from gnn_transformer.experiments.topologies import resolve_topology
from gnn_transformer.topology.specs import LayerPattern
from tests.conftest import tiny_lm_checkpoint


def _edges(edge_index):
    t = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    return sorted(zip(t[0].tolist(), t[1].tolist()))


def _drawn(view):
    return sorted(zip(view.src, view.dst))


def _page_data(text):
    """The JSON a page carries, read back from its HTML."""
    found = re.search(r'<script id="viewer-data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(found[1])


# ---------------------------------------------------------------- topology pages
@pytest.mark.parametrize(
    "spec,n",
    [
        ("sliding_window:window=2", 10),
        ("bigbird:window=1,num_random=2", 12),
        ("dilated_per_head:window=1,dilations=1;2;3", 9),
        ("duo_attention", 16),
        ("gemma3", 16),
    ],
)
def test_every_view_draws_exactly_its_graph(spec, n):
    page = viz.topology_page(spec, n)
    topo = resolve_topology(spec, small=True)
    graph = topo.build([n])
    graphs = list(graph.graphs) if isinstance(graph, LayerPattern) else [graph]
    assert len(page.layers) == len(graphs) and page.num_tokens == n and len(page.nodes) == n
    for layer, g in zip(page.layers, graphs):
        if isinstance(g, tuple):
            edge_index, edge_head = g
            assert [v.label for v in layer.views] == [f"head {h}" for h in range(topo.num_heads)]
            for h, view in enumerate(layer.views):
                assert _drawn(view) == _edges(edge_index[:, edge_head == h])
        else:
            assert [v.label for v in layer.views] == ["every head"]
            assert _drawn(layer.views[0]) == _edges(g)
        assert all(v.weights is None for v in layer.views)


def test_html_is_self_contained_and_carries_the_page():
    page = viz.topology_page("bigbird:window=1,num_random=2", 16)
    text = viz.to_html(page)
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"<(link|img|iframe)\b|\bsrc\s*=|https?://(?!www\.w3\.org/2000/svg)", text)
    assert "default-src 'none'" in text  # the page itself forbids any fetch
    data = _page_data(text)
    assert data["nodes"] == page.nodes and data["kind"] == "topology" and data["receptive_layers"] == 3
    assert data["layers"][0]["views"][0]["src"] == page.layers[0].views[0].src


def test_labels_cannot_close_the_script():
    g = topology.causal(3).as_tensor()
    weights = torch.tensor([[1.0], [0.5], [0.5], [0.2], [0.3], [0.5]])
    from gnn_transformer.analysis import AttentionGraph

    page = viz.attention_page([AttentionGraph("a", 0, g, weights, 3, 3)], ["</script><b>", "<!--", "x"])
    text = viz.to_html(page)
    assert text.count("</script>") == 2  # the data's and the viewer's
    assert _page_data(text)["nodes"][:2] == ["</script><b>", "<!--"]


def test_receptive_field_range_follows_a_per_layer_cycle():
    assert viz.topology_page("gemma3", 16).receptive_layers == 6  # a cycle of 6 layers
    assert viz.topology_page("causal", 8, layers=5).receptive_layers == 5


# ---------------------------------------------------------------- reduction to blocks
def test_a_large_topology_is_drawn_on_blocks_as_the_dense_mask_says():
    n, limit = 60, 200
    edge_index = topology.bigbird(n, window=2, num_global=1, num_random=3, seed=1)
    page = viz.reduce_page(viz.graph_page(edge_index, n), limit)
    b = page.block
    assert b > 1 and page.notes[0].startswith("Aggregated") and str(limit) in page.notes[0]
    view = page.layers[0].views[0]
    assert view.num_edges <= limit
    nb = -(-n // b)
    mask = topology.to_dense_mask(edge_index, n, n).double()  # [N, N], row i the query
    padded = torch.zeros(nb * b, nb * b, dtype=torch.float64)
    padded[:n, :n] = mask
    counts = padded.reshape(nb, b, nb, b).sum(dim=(1, 3))  # [B, B] token edges per block pair
    sizes = torch.tensor([min(b, n - k * b) for k in range(nb)], dtype=torch.float64)
    share = counts / (sizes[:, None] * sizes[None, :])
    assert _drawn(view) == sorted((j, i) for i, j in counts.nonzero().tolist())  # row i the query block
    got = torch.zeros(nb, nb, dtype=torch.float64)
    got[view.dst, view.src] = torch.tensor(view.weights, dtype=torch.float64)
    torch.testing.assert_close(got, share, rtol=0, atol=1e-12)


def test_a_large_attention_graph_is_drawn_on_blocks_with_the_mean_attention_per_query():
    from gnn_transformer.analysis import AttentionGraph

    n, limit = 30, 40
    ei = topology.full(n).as_tensor()
    scores = torch.randn(n, n, dtype=torch.float64).softmax(dim=-1)  # [N_q, N_k], rows sum to 1
    g = AttentionGraph("attn", 0, ei, scores[ei[1], ei[0]][:, None], n, n)
    page = viz.reduce_page(viz.attention_page([g], [str(i) for i in range(n)]), limit)
    b, view = page.block, page.layers[0].views[0]
    nb = -(-n // b)
    padded = torch.zeros(nb * b, nb * b, dtype=torch.float64)
    padded[:n, :n] = scores
    sizes = torch.tensor([min(b, n - k * b) for k in range(nb)], dtype=torch.float64)
    want = padded.reshape(nb, b, nb, b).sum(dim=(1, 3)) / sizes[:, None]  # [B_q, B_k] mean over the block's queries
    got = torch.zeros(nb, nb, dtype=torch.float64)
    got[view.dst, view.src] = torch.tensor(view.weights, dtype=torch.float64)
    assert view.num_edges <= limit < n * n
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # weights drawn in float32
    torch.testing.assert_close(got.sum(dim=1), torch.ones(nb, dtype=torch.float64), rtol=0, atol=1e-6)


def test_a_page_within_the_limit_is_drawn_token_by_token():
    page = viz.topology_page("sliding_window:window=1", 20)
    assert viz.reduce_page(page, page.max_view_edges) is page


# ---------------------------------------------------------------- model pages
def test_model_page_draws_the_attention_of_every_layer_and_head(tmp_path):
    from gnn_transformer.analysis import find_sinks
    from gnn_transformer.experiments.analyze_run import load_checkpoint_model

    path, model = tiny_lm_checkpoint(tmp_path)
    loaded = load_checkpoint_model(path)
    tokens = [3, 1, 4, 1, 5, 9]
    page = viz.model_page(loaded, tokens)
    assert page.kind == "model" and page.nodes == [str(t) for t in tokens] and len(page.layers) == 2
    # dense reference: layer 0's attention on the model's own (pre-normed) embeddings, causal mask
    from gnn_transformer import dense

    layer0 = model.encoder.layers[0]
    h0 = layer0.norm1(model.embed_nodes(torch.tensor(tokens), torch.arange(6)))  # [N, C] pre-norm
    causal = torch.ones(6, 6, dtype=torch.bool).tril()  # [N_q, N_k]
    with torch.no_grad():
        _, reference = dense.multihead_attention(layer0.self_attn, h0[None], h0[None], causal)  # [1, H, N, N]
    for layer in page.layers:
        assert [v.label for v in layer.views] == ["head 0", "head 1", "mean of heads"]
        for view in layer.views:
            assert _drawn(view) == _edges(topology.causal(6))
            sums = torch.zeros(6).index_add_(0, torch.tensor(view.dst), torch.tensor(view.weights))
            torch.testing.assert_close(sums, torch.ones(6), rtol=0, atol=1e-5)  # each query's weights sum to 1
    for h, view in enumerate(page.layers[0].views):
        got = torch.zeros(6, 6)
        got[view.dst, view.src] = torch.tensor(view.weights)
        want = reference[0].mean(dim=0) if view.label == "mean of heads" else reference[0, h]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for layer in page.layers:
        view = layer.views[0]
        ei = torch.tensor([view.src, view.dst])
        expected = find_sinks(ei, torch.tensor(view.weights, dtype=torch.float64)[:, None], 6)[:, 0]
        assert view.sinks == expected.nonzero().flatten().tolist()


def test_attention_page_marks_a_planted_sink_and_hub():
    from gnn_transformer.analysis import AttentionGraph

    n = 6
    ei = topology.causal(n).as_tensor()
    w = torch.where(ei[0] == 0, 0.9, 0.1 / ei[1].clamp(min=1).float())  # token 0 takes 0.9 of every query
    w[ei[1] == 0] = 1.0
    page = viz.attention_page([AttentionGraph("attn", 0, ei, w[:, None], n, n)], list("abcdef"))
    view = page.layers[0].views[0]
    assert view.sinks == [0] and view.hubs == [0]
    assert [v.label for v in page.layers[0].views] == ["head 0"]  # no mean view for a single head


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("n,message", [(0, "at least 2 tokens"), (1, "one-token")])
def test_too_few_tokens_are_refused(n, message):
    with pytest.raises(ValueError, match=message):
        viz.graph_page(torch.empty(2, 0, dtype=torch.long), n)


def test_a_graph_without_edges_is_refused():
    with pytest.raises(ValueError, match="has no edges"):
        viz.to_html(viz.graph_page(torch.empty(2, 0, dtype=torch.long), 4))


def test_too_many_tokens_or_edges_are_refused_with_the_limit():
    with pytest.raises(ValueError, match=f"at most {viz.MAX_TOKENS} tokens"):
        viz.topology_page("causal", viz.MAX_TOKENS + 1)
    with pytest.raises(ValueError, match=rf"too large to view \(at most {viz.MAX_GRAPH_EDGES} edges\)"):
        viz.topology_page("full", 2100)
    with pytest.raises(ValueError, match="'max_edges'"):
        viz.reduce_page(viz.topology_page("causal", 4), 0)


def test_write_html_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "page.html"
    out.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        viz.write_html("<html>" + "\ud800", out)  # fails while writing
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]
    viz.write_html("<html></html>", out)
    assert out.read_text() == "<html></html>"


# ---------------------------------------------------------------- the command
def test_view_writes_a_topology_page(tmp_path, capsys):
    out = tmp_path / "bb.html"
    assert main(["view", "bigbird", "-n", "32", "-o", str(out)]) == 0
    assert "bigbird (small) on n = 32" in capsys.readouterr().out
    data = _page_data(out.read_text())
    graph = resolve_topology("bigbird", small=True).build([32])
    assert sorted(zip(data["layers"][0]["views"][0]["src"], data["layers"][0]["views"][0]["dst"])) == _edges(graph)


def test_view_says_when_it_draws_blocks(tmp_path, capsys):
    out = tmp_path / "full.html"
    assert main(["view", "full", "-n", "100", "--max-edges", "500", "-o", str(out)]) == 0
    assert "drawn on blocks of" in capsys.readouterr().out
    assert _page_data(out.read_text())["notes"][0].startswith("Aggregated")


def test_view_writes_a_model_page(tmp_path, capsys):
    path, _ = tiny_lm_checkpoint(tmp_path)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3 4 5\n6 7\n")
    out = tmp_path / "m.html"
    assert main(["view", "--checkpoint", str(path), "--tokens", str(tokens), "-o", str(out)]) == 0
    data = _page_data(out.read_text())
    assert data["kind"] == "model" and data["nodes"] == ["1", "2", "3", "4", "5"]  # the first sequence
    assert len(data["layers"]) == 2 and data["weighted"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["full", "-n", "1"], "one-token"),
        (["full", "-n", "2100"], "too large to view"),
        (["causal", "-n", "5000"], "at most 4096 tokens"),
        (["nope"], "Unknown topology 'nope'"),
        ([], "exactly one of SPEC"),
        (["causal", "--prompt", "hi"], "--prompt applies to a model"),
    ],
)
def test_view_refuses_bad_topology_input(tmp_path, capsys, argv, message):
    out = tmp_path / "out.html"
    assert main(["view", *argv, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_view_refuses_a_checkpoint_that_does_not_load(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3\n")
    out = tmp_path / "out.html"
    out.write_text("previous page")
    assert main(["view", "--checkpoint", str(bad), "--tokens", str(tokens), "-o", str(out)]) == 2
    assert "Could not read the checkpoint" in capsys.readouterr().err
    assert out.read_text() == "previous page"
    assert main(["view", "--checkpoint", str(tmp_path / "missing.pt"), "--tokens", str(tokens), "-o", str(out)]) == 2
    assert "No checkpoint" in capsys.readouterr().err
    path, _ = tiny_lm_checkpoint(tmp_path)
    one = tmp_path / "one.txt"
    one.write_text("4\n")
    assert main(["view", "--checkpoint", str(path), "--tokens", str(one), "-o", str(out)]) == 2
    assert "one-token" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ids.txt", "model.pt", "one.txt", "out.html"]


# ---------------------------------------------------------------- per-head graphs, limits, labels
def _per_head_graph(n=5):
    """Two heads on their own edges: head 0 causal with all its attention on token 0, head 1 a causal
    window of one step with uniform attention (weights ``[E, 2]``, 0 in the other head's column)."""
    from gnn_transformer.analysis import AttentionGraph

    c = topology.causal(n).as_tensor()
    w1 = topology.sliding_window(n, 1).as_tensor()
    w1 = w1[:, w1[0] <= w1[1]]
    edge_index = torch.cat([c, w1], dim=1)  # [2, E]
    edge_head = torch.cat([torch.zeros(c.size(1)), torch.ones(w1.size(1))]).long()  # [E]
    weights = torch.zeros(edge_index.size(1), 2, dtype=torch.float64)  # [E, H]
    weights[: c.size(1), 0] = (c[0] == 0).double()
    weights[c.size(1) :, 1] = 1.0 / torch.bincount(w1[1], minlength=n)[w1[1]].double()
    return AttentionGraph("attn", 0, edge_index, weights, n, n, edge_head=edge_head), [c, w1]


def test_each_head_of_a_per_head_graph_draws_its_own_edges():
    g, heads = _per_head_graph()
    views = viz.attention_page([g], list("abcde")).layers[0].views
    assert [v.label for v in views] == ["head 0", "head 1", "mean of heads"]
    for h, (view, edges) in enumerate(zip(views, heads)):
        own = g.edge_head == h
        assert _drawn(view) == _edges(edges) and view.stats.startswith(f"{edges.size(1)} edges;")
        want = dict(zip(zip(g.edge_index[0, own].tolist(), g.edge_index[1, own].tolist()), g.weights[own, h].tolist()))
        assert dict(zip(zip(view.src, view.dst), view.weights)) == pytest.approx(want, abs=1e-7)
    assert views[0].sinks == [0]  # every query of head 0 reads token 0 only


def test_the_mean_of_heads_of_a_per_head_graph_has_one_edge_per_pair():
    g, heads = _per_head_graph()
    n = g.num_dst
    view = viz.attention_page([g], list("abcde")).layers[0].views[-1]
    union = sorted(set(_edges(heads[0])) | set(_edges(heads[1])))
    assert view.label == "mean of heads" and _drawn(view) == union and view.stats.startswith(f"{len(union)} edges;")
    want = g.dense().mean(dim=0)  # [N_q, N_k], a head without the edge counts 0
    got = torch.zeros(n, n, dtype=torch.float64)
    got[view.dst, view.src] = torch.tensor(view.weights, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)  # weights drawn in float32
    entropy = float(-torch.special.xlogy(want, want).sum(dim=1).mean())
    assert f"mean entropy {entropy:.2f} nats" in view.stats


def test_a_model_page_on_a_per_head_graph_draws_each_head_on_its_edges(tmp_path):
    from gnn_transformer.experiments.analyze_run import build_graph, load_checkpoint_model

    spec, tokens = "dilated_per_head:window=1,dilations=1;2", [3, 1, 4, 1, 5, 9, 2, 6]
    loaded = load_checkpoint_model(tiny_lm_checkpoint(tmp_path)[0])
    page = viz.model_page(loaded, tokens, graph=spec)
    (edge_index, edge_head), _ = build_graph(loaded, spec, [len(tokens)])
    for layer in page.layers:
        for h in range(2):
            view = layer.views[h]
            assert _drawn(view) == _edges(edge_index[:, edge_head == h])
            sums = torch.zeros(len(tokens)).index_add_(0, torch.tensor(view.dst), torch.tensor(view.weights))
            torch.testing.assert_close(sums, torch.ones(len(tokens)), rtol=0, atol=1e-5)
        assert _drawn(layer.views[2]) == sorted(set(_edges(edge_index)))


def test_a_model_page_beyond_the_edge_limit_is_refused_before_the_model_runs(tmp_path, monkeypatch):
    from gnn_transformer.experiments.analyze_run import load_checkpoint_model
    from gnn_transformer.viz import model_view

    loaded = load_checkpoint_model(tiny_lm_checkpoint(tmp_path)[0])
    tokens = [1, 2, 3, 4, 5, 6]  # causal: 21 edges; 2 layers x (2 heads + their mean) = 126 on the page
    run = loaded.forward
    monkeypatch.setattr(model_view, "MAX_GRAPH_EDGES", 125)
    loaded.forward = lambda *args: pytest.fail("the model ran")
    with pytest.raises(ValueError, match=r"too large to view \(at most 125 edges\).* 126 edges"):
        viz.model_page(loaded, tokens)
    monkeypatch.setattr(model_view, "MAX_GRAPH_EDGES", 20)  # the graph itself is over the limit
    with pytest.raises(ValueError, match=r"too large to view \(at most 20 edges\).*21 edges"):
        viz.model_page(loaded, tokens)
    monkeypatch.setattr(model_view, "MAX_GRAPH_EDGES", 126)
    loaded.forward = run
    page = viz.model_page(loaded, tokens)
    assert sum(v.num_edges for layer in page.layers for v in layer.views) == 126


def test_an_attention_page_beyond_the_edge_limit_is_refused(monkeypatch):
    from gnn_transformer.viz import model_view

    g, _ = _per_head_graph()  # 15 + 9 edges: 24 in the head views, at most 24 in the mean
    monkeypatch.setattr(model_view, "MAX_GRAPH_EDGES", 47)
    with pytest.raises(ValueError, match=r"too large to view \(at most 47 edges\).* 48 edges"):
        viz.attention_page([g], list("abcde"))
    assert len(viz.attention_page([g], list("abcde"), mean_of_heads=False).layers[0].views) == 2


def test_view_refuses_a_model_page_beyond_the_edge_limit(tmp_path, capsys, monkeypatch):
    from gnn_transformer.viz import model_view

    path, _ = tiny_lm_checkpoint(tmp_path)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3 4 5 6\n")
    out = tmp_path / "m.html"
    monkeypatch.setattr(model_view, "MAX_GRAPH_EDGES", 100)
    assert main(["view", "--checkpoint", str(path), "--tokens", str(tokens), "--graph", "full", "-o", str(out)]) == 2
    assert "too large to view (at most 100 edges)" in capsys.readouterr().err
    assert not out.exists()


def test_a_model_page_on_blocks_labels_them_by_position_and_keeps_their_tokens():
    from gnn_transformer.analysis import AttentionGraph

    n = 12
    labels = [str(t) for t in [5, 3, 9, 9, 2, 7, 1, 1, 4, 8, 6, 7]]  # token ids: strings that look like positions
    ei = topology.causal(n).as_tensor()
    w = 1.0 / (ei[1] + 1).double()
    page = viz.reduce_page(viz.attention_page([AttentionGraph("attn", 0, ei, w[:, None], n, n)], labels), 20)
    b = page.block
    assert b > 1
    starts = range(0, n, b)
    assert page.nodes == [f"{s}..{min(s + b, n) - 1}" for s in starts]
    assert page.node_tokens == [" ".join(labels[s : s + b]) for s in starts]
    assert _page_data(viz.to_html(page))["node_tokens"] == page.node_tokens
    topo = viz.reduce_page(viz.topology_page("full", 12), 20)
    assert topo.nodes == [f"{s}..{min(s + topo.block, 12) - 1}" for s in range(0, 12, topo.block)]
    assert topo.node_tokens == []


def test_short_labels_are_cut_by_code_points():
    import shutil
    import subprocess
    from pathlib import Path

    node = shutil.which("node")
    if node is None:
        pytest.skip("needs node (Node.js) to run viewer.js's short()")
    js = (Path(viz.__file__).parent / "viewer.js").read_text(encoding="utf-8")
    start = js.index("function short(")
    depth, end = 0, start
    for end in range(js.index("{", start), len(js)):  # the function's text, to its closing brace
        depth += {"{": 1, "}": -1}.get(js[end], 0)
        if depth == 0:
            break
    script = js[start : end + 1] + (
        '\nconsole.log(JSON.stringify([short("\\u{1F600}".repeat(20), 14), short("\\u{1F600}".repeat(8), 14),'
        ' short("abcdef", 4)]));'
    )
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True, timeout=60).stdout
    long, fits, ascii_ = json.loads(out)
    assert long == "\U0001f600" * 13 + "\u2026" and fits == "\U0001f600" * 8 and ascii_ == "abc\u2026"


def test_mean_entropy_of_a_view_averages_the_queries_that_read_a_key():
    """Query 2 reads no key: the stats line's mean entropy is over queries 0, 1 and 3 (as the
    analysis summary's), not pulled down by a 0 for query 2."""
    import math

    from gnn_transformer.analysis import AttentionGraph

    edge_index = torch.tensor([[0, 0, 1, 0, 1], [0, 1, 1, 3, 3]])
    weights = torch.tensor([[1.0], [0.5], [0.5], [0.5], [0.5]])
    g = AttentionGraph("g", 0, edge_index, weights, 4, 4)
    view = viz.attention_page([g], list("abcd")).layers[0].views[0]
    assert f"mean entropy {2 * math.log(2) / 3:.2f} nats per query with a key" in view.stats


def test_a_catalogue_page_at_toy_scale_says_its_small_parameters():
    notes = viz.topology_page("gemma3").notes
    assert "per layer: 5 causal window 1024 : 1 causal global" in notes
    assert any("toy scale" in note and "window = 3" in note for note in notes)
    assert not any("toy scale" in note for note in viz.topology_page("gemma3", 16, paper_scale=True).notes)


def test_view_of_a_model_with_nan_weights_names_the_layer(tmp_path, capsys):
    path, _ = tiny_lm_checkpoint(tmp_path, nan=True)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3 4\n")
    out = tmp_path / "page.html"
    assert main(["view", "--checkpoint", str(path), "--tokens", str(tokens), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Graph 0 'encoder.layers.0.self_attn' has" in err and "NaN or infinite attention weights" in err
    assert not out.exists()


def test_blocks_of_a_length_that_the_block_size_does_not_divide():
    # the last block holds fewer tokens: weights are divided by the real sizes of the target
    # (attention) or of both blocks (topology), not by the block size
    from gnn_transformer.analysis import AttentionGraph

    n, limit = 31, 40
    ei = topology.full(n).as_tensor()
    scores = torch.randn(n, n, dtype=torch.float64).softmax(dim=-1)  # [N_q, N_k], rows sum to 1
    g = AttentionGraph("attn", 0, ei, scores[ei[1], ei[0]][:, None], n, n)
    page = viz.reduce_page(viz.attention_page([g], [str(i) for i in range(n)]), limit)
    b, view = page.block, page.layers[0].views[0]
    assert n % b != 0
    nb = -(-n // b)
    padded = torch.zeros(nb * b, nb * b, dtype=torch.float64)
    padded[:n, :n] = scores
    sizes = torch.tensor([min(b, n - k * b) for k in range(nb)], dtype=torch.float64)
    want = padded.reshape(nb, b, nb, b).sum(dim=(1, 3)) / sizes[:, None]  # mean over the target block's queries
    got = torch.zeros(nb, nb, dtype=torch.float64)
    got[view.dst, view.src] = torch.tensor(view.weights, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(nb, dtype=torch.float64), rtol=0, atol=1e-6)
    # a topology: the share of the |I| * |J| possible token edges, 1 everywhere on a full graph
    page = viz.reduce_page(viz.graph_page(topology.full(n), n), limit)
    b, view = page.block, page.layers[0].views[0]
    assert n % b != 0
    assert view.weights == pytest.approx([1.0] * len(view.weights), abs=1e-12)
