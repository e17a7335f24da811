"""Attention-graph analytics: recording, measures against dense computations, planted sinks and
massive activations, pre-norm versus post-norm, networkx export."""

import dataclasses
import math

import networkx as nx
import pytest
import torch
from torch import nn

from gnn_transformer import GraphMultiheadAttention, dense, from_padded, to_padded, topology
from gnn_transformer.analysis import (
    activation_stats,
    attention_entropy,
    attention_hits,
    attention_pagerank,
    compare_norm_placement,
    extract,
    find_layers,
    find_sinks,
    massive_activations,
    norm_placement,
    received_attention,
    record,
    sink_scores,
    summarize,
)
from gnn_transformer.analysis.summary import format_table
from gnn_transformer.topology import batch_vector, causal, erdos_renyi, full, to_dense_mask

from .conftest import TOL, perturbed, tiny_lm_checkpoint

C, H = 16, 2


# ---------------------------------------------------------------- a tiny model to plant things in
class Block(nn.Module):
    """Pre-norm (or post-norm) self-attention + ReLU feed-forward on a token graph."""

    def __init__(self, norm_first: bool = True):
        super().__init__()
        self.norm_first = norm_first
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.self_attn = GraphMultiheadAttention(C, H, backend="pyg")
        self.linear1, self.linear2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def ff(self, x):
        return self.linear2(torch.relu(self.linear1(x)))

    def forward(self, x, edge_index):
        if self.norm_first:
            x = x + self.self_attn(self.norm1(x), edge_index)
            return x + self.ff(self.norm2(x))
        x = self.norm1(x + self.self_attn(x, edge_index))
        return self.norm2(x + self.ff(x))


class Stack(nn.Module):
    def __init__(self, num_layers: int = 4, norm_first: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(Block(norm_first) for _ in range(num_layers))

    def forward(self, x, edge_index):
        for layer in self.layers:
            x = layer(x, edge_index)
        return x


def _plant_sink(attn: GraphMultiheadAttention, strength: float = 10.0) -> None:
    """Every query reads feature 1 (constant), every key feature 0 (set only at the first token):
    the score of key 0 is ``strength`` in every head, all other scores are 0."""
    d = attn.head_dim
    with torch.no_grad():
        attn.in_proj_weight.zero_()
        attn.in_proj_bias.zero_()
        for h in range(attn.num_heads):
            attn.in_proj_weight[h * d, 1] = math.sqrt(strength * math.sqrt(d))  # query
            attn.in_proj_weight[C + h * d, 0] = math.sqrt(strength * math.sqrt(d))  # key
        attn.in_proj_weight[2 * C :] = torch.eye(C)  # values: identity


def _sink_inputs(lengths):
    x = torch.randn(sum(lengths), C) * 0.1
    x[:, 0] = 0.0
    x[:, 1] = 1.0
    batch = batch_vector(lengths)
    first = torch.ones_like(batch, dtype=torch.bool)
    first[1:] = batch[1:] != batch[:-1]
    x[first, 0] = 1.0  # the "beginning of sequence" marker
    return x, batch


def _random_graph(lengths, seed=0):
    blocks, offset = [], 0
    for k, n in enumerate(lengths):
        blocks.append(erdos_renyi(n, p=0.5, seed=seed + k, min_in_degree=1).as_tensor() + offset)
        offset += n
    return torch.cat(blocks, dim=1)


def _graph(kind, lengths):
    return {"full": full, "causal": causal}[kind](lengths) if kind != "random" else _random_graph(lengths)


# ---------------------------------------------------------------- recording
def test_record_leaves_no_state_and_returns_what_was_asked():
    attn = GraphMultiheadAttention(C, H, backend="pyg")
    x, ei = torch.randn(5, C), causal(5)
    before = set(attn.__dict__)
    hooks = (len(attn._forward_hooks), len(attn._forward_pre_hooks))
    with record(attn) as trace:
        out = attn(x, ei)  # weights not requested: a plain tensor comes back
        out2, alpha = attn(x, ei, return_attention_weights=True)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, out2)
    assert set(attn.__dict__) == before and "attend" not in attn.__dict__
    assert (len(attn._forward_hooks), len(attn._forward_pre_hooks)) == hooks
    assert len(trace.attention) == 2
    torch.testing.assert_close(trace.attention[0].weights, alpha)
    assert trace.attention[0].edge_index.tolist() == ei.tolist()
    assert not trace.attention[0].cross


def test_record_restores_on_error_and_rejects_models_without_attention():
    model = Stack(2)
    with pytest.raises(RuntimeError, match="boom"):
        with record(model):
            raise RuntimeError("boom")
    assert all("attend" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="GraphMultiheadAttention"):
        with record(nn.Linear(2, 2)):
            pass


def test_hidden_states_and_layers_follow_the_stack():
    model = Stack(3).eval()
    x, ei = torch.randn(6, C), causal(6)
    trace = extract(model, x, ei)
    assert [n for n, _ in find_layers(model)] == ["layers.0", "layers.1", "layers.2"]
    assert [g.layer for g in trace.attention] == [0, 1, 2]
    states = trace.hidden_states
    assert len(states) == 4
    torch.testing.assert_close(states[0], x)
    torch.testing.assert_close(states[-1], trace.output)
    h = x
    for k, layer in enumerate(model.layers):
        h = layer(h, ei)
        torch.testing.assert_close(states[k + 1], h)


def test_cross_attention_is_recorded_as_bipartite():
    attn = GraphMultiheadAttention(C, H, backend="pyg")
    mem, tgt = torch.randn(4, C), torch.randn(3, C)
    ei = torch.tensor([[0, 1, 2, 3, 1, 3], [0, 0, 0, 1, 2, 2]])  # query 1 sees only key 3
    trace = extract(attn, (mem, tgt), ei)
    g = trace.attention[0]
    assert g.cross and (g.num_src, g.num_dst) == (4, 3)
    graph = g.to_networkx(0)
    assert set(graph.nodes) == {("key", j) for j in range(4)} | {("query", i) for i in range(3)}
    assert graph[("key", 3)][("query", 1)]["weight"] == pytest.approx(1.0)
    assert trace.self_attention() == []


def test_networkx_export_per_head():
    attn = GraphMultiheadAttention(C, H, backend="pyg")
    x, ei = torch.randn(4, C), causal(4)
    trace = extract(attn, x, ei)
    graphs = trace.to_networkx(labels=list("abcd"))
    assert set(graphs) == {(0, 0), (0, 1)}
    g = graphs[(0, 1)]
    assert isinstance(g, nx.DiGraph) and g.number_of_edges() == 10
    alpha = trace.attention[0].weights
    for e, (j, i) in enumerate(ei.t().tolist()):
        assert g[j][i]["weight"] == pytest.approx(float(alpha[e, 1]))
    assert g.nodes[2]["token"] == "c"
    for i in range(4):  # each query's incoming weights sum to 1
        assert sum(d["weight"] for _, _, d in g.in_edges(i, data=True)) == pytest.approx(1.0)


def test_encoder_decoder_records_self_and_cross_attention_per_layer():
    from gnn_transformer import GraphTransformer

    model = GraphTransformer(C, H, 2, 2, 32, dropout=0.0, backend="pyg").eval()
    src, tgt = torch.randn(5, C), torch.randn(4, C)
    mem_ei = torch.stack([torch.arange(5).repeat(4), torch.arange(4).repeat_interleave(5)])
    trace = extract(model, src, tgt, full(5), causal(4), mem_ei)
    assert [layer.name for layer in trace.layers] == [
        "encoder.layers.0",
        "encoder.layers.1",
        "decoder.layers.0",
        "decoder.layers.1",
    ]
    assert [(g.name, g.layer, g.cross) for g in trace.attention] == [
        ("encoder.layers.0.self_attn", 0, False),
        ("encoder.layers.1.self_attn", 1, False),
        ("decoder.layers.0.self_attn", 2, False),
        ("decoder.layers.0.multihead_attn", 2, True),
        ("decoder.layers.1.self_attn", 3, False),
        ("decoder.layers.1.multihead_attn", 3, True),
    ]
    g = trace.attention[3]
    assert (g.num_src, g.num_dst) == (5, 4)
    torch.testing.assert_close(g.dense().sum(dim=-1), torch.ones(H, 4))
    rows = summarize(trace)
    assert [r.name for r in rows][1:] == [layer.name for layer in trace.layers]
    assert all(len(r.sink) == H for r in rows[1:])


@pytest.mark.parametrize("backend", ["fused", "tiled"])
def test_recording_through_the_kernels_gives_the_same_weights(backend):
    model = Stack(2).eval()
    x, ei = torch.randn(9, C), causal([5, 4])
    with torch.no_grad(), record(model, backend="pyg") as ref:
        out_ref = model(x, ei)
    with torch.no_grad(), record(model, backend=backend) as trace:
        out = model(x, ei)
    torch.testing.assert_close(out, out_ref, **TOL[torch.float32])
    for a, b in zip(trace.attention, ref.attention):
        torch.testing.assert_close(a.weights, b.weights, **TOL[torch.float32])


def test_decoding_steps_are_recorded_with_the_cache_layout():
    from gnn_transformer.decoding import generate
    from gnn_transformer.model import GraphLM, GraphTransformerConfig

    lm = GraphLM(GraphTransformerConfig(vocab_size=11, d_model=C, nhead=H, num_layers=2, backend="pyg")).eval()
    with record(lm) as trace:
        out = generate(lm, torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3)
    assert len(trace.attention) == 2 * 3  # the prompt, then two one-token steps, per layer
    last = trace.attention[-2]  # layer 0 of the last step: query node 5 over cached nodes 0..5
    assert (last.num_src, last.num_dst, last.query_offset) == (6, 1, 5)
    assert last.node_edge_index().tolist() == [list(range(6)), [5] * 6]
    full_trace = extract(lm, out[0, :6], causal(6), pos=torch.arange(6))
    ref = full_trace.attention[0]
    into_5 = ref.edge_index[1] == 5
    torch.testing.assert_close(last.weights, ref.weights[into_5], **TOL[torch.float32])
    g = last.to_networkx(0)
    assert set(g.predecessors(5)) == set(range(6)) and g.number_of_nodes() == 6


# ---------------------------------------------------------------- measures vs dense computations
@pytest.mark.parametrize("kind", ["full", "causal", "random"])
@pytest.mark.parametrize("lengths", [[6], [5, 3, 4]])
def test_measures_match_dense_attention(kind, lengths):
    attn = GraphMultiheadAttention(C, H, backend="pyg", dtype=torch.float64).eval()
    x = torch.randn(sum(lengths), C, dtype=torch.float64) * 2
    ei = _graph(kind, lengths)
    n = sum(lengths)
    trace = extract(attn, x, ei)
    g = trace.attention[0]
    mask = to_dense_mask(ei, n, n, lengths=lengths)  # [B, T, T]
    _, w = dense.multihead_attention(attn, to_padded(x, lengths), to_padded(x, lengths), mask)
    # w: [B, H, T_q, T_k]; padded rows and columns are zero
    tol = TOL[torch.float64]
    received = from_padded(w.sum(dim=2).transpose(1, 2), lengths)  # [N, H]
    torch.testing.assert_close(received_attention(g.edge_index, g.weights, n), received, **tol)
    valid = to_dense_mask(ei, n, n, lengths=lengths).any(dim=-1)  # [B, T] queries with keys
    sink = w[:, :, :, 0].sum(dim=(0, 2)) / valid.sum()  # [H]
    batch = batch_vector(lengths)
    torch.testing.assert_close(sink_scores(g.edge_index, g.weights, batch), sink, **tol)
    ent = -torch.special.xlogy(w, w).sum(dim=-1)  # [B, H, T]
    torch.testing.assert_close(
        attention_entropy(g.edge_index, g.weights, n), from_padded(ent.transpose(1, 2), lengths), **tol
    )
    # the dense matrix of the recorded graph, block by block
    full_mat = g.dense()  # [H, N, N]
    offset = 0
    for b, t in enumerate(lengths):
        torch.testing.assert_close(full_mat[:, offset : offset + t, offset : offset + t], w[b, :, :t, :t], **tol)
        offset += t


def _dense_pagerank(p: torch.Tensor, damping: float = 0.85, iters: int = 2000) -> torch.Tensor:
    """Power iteration on a row-stochastic (or empty-row) query -> key matrix ``[N, N]``."""
    n = p.size(0)
    rows = p.sum(dim=1, keepdim=True)
    p = torch.where(rows > 0, p / rows.clamp(min=1e-300), torch.full_like(p, 1.0 / n))
    rank = torch.full((n,), 1.0 / n, dtype=p.dtype)
    for _ in range(iters):
        rank = (1 - damping) / n + damping * rank @ p
    return rank / rank.sum()


@pytest.mark.parametrize("kind", ["full", "causal", "random"])
def test_pagerank_matches_dense_power_iteration_and_networkx(kind):
    attn = GraphMultiheadAttention(C, H, backend="pyg", dtype=torch.float64).eval()
    n = 7
    x = torch.randn(n, C, dtype=torch.float64) * 2
    ei = _graph(kind, [n])
    g = extract(attn, x, ei).attention[0]
    rank = attention_pagerank(g.edge_index, g.weights, n)  # [N, H]
    torch.testing.assert_close(rank.sum(dim=0), torch.ones(H, dtype=torch.float64))
    mats = g.dense()  # [H, N_q, N_k], row-stochastic
    for h in range(H):
        torch.testing.assert_close(rank[:, h], _dense_pagerank(mats[h]), atol=1e-9, rtol=1e-7)
        ref = nx.pagerank(g.to_networkx(h).reverse(), weight="weight", tol=1e-12, max_iter=1000)
        torch.testing.assert_close(
            rank[:, h], torch.tensor([ref[k] for k in range(n)], dtype=torch.float64), atol=1e-8, rtol=1e-6
        )


def test_pagerank_spreads_dangling_mass_like_networkx():
    ei = torch.tensor([[0, 0, 1], [1, 2, 2]])  # node 0 has no keys (dangling), as a query
    w = torch.tensor([[1.0], [0.3], [0.7]], dtype=torch.float64)
    rank = attention_pagerank(ei, w, 3)[:, 0]
    g = nx.DiGraph()
    g.add_nodes_from(range(3))
    g.add_weighted_edges_from([(1, 0, 1.0), (2, 0, 0.3), (2, 1, 0.7)])  # query -> key
    ref = nx.pagerank(g, tol=1e-12, max_iter=1000)
    torch.testing.assert_close(
        rank, torch.tensor([ref[k] for k in range(3)], dtype=torch.float64), atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize("kind", ["full", "causal"])
def test_hits_matches_networkx(kind):
    attn = GraphMultiheadAttention(C, H, backend="pyg", dtype=torch.float64).eval()
    n = 6
    g = extract(attn, torch.randn(n, C, dtype=torch.float64), _graph(kind, [n])).attention[0]
    hubs, auth = attention_hits(g.edge_index, g.weights, n)
    for h in range(H):
        ref_h, ref_a = nx.hits(g.to_networkx(h), max_iter=10000, tol=1e-12)
        torch.testing.assert_close(
            hubs[:, h], torch.tensor([ref_h[k] for k in range(n)], dtype=torch.float64), atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(
            auth[:, h], torch.tensor([ref_a[k] for k in range(n)], dtype=torch.float64), atol=1e-6, rtol=1e-5
        )


def test_uniform_attention_has_no_sink():
    n = 5
    ei = full(n)
    w = torch.full((n * n, H), 1.0 / n)
    torch.testing.assert_close(sink_scores(ei, w), torch.full((H,), 1.0 / n))
    assert not find_sinks(ei, w, n).any()
    torch.testing.assert_close(attention_pagerank(ei, w, n), torch.full((n, H), 1.0 / n))


def test_measure_arguments_are_checked():
    with pytest.raises(ValueError, match="edge_index"):
        received_attention(torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="one row per edge"):
        sink_scores(causal(3), torch.zeros(5, 1))
    with pytest.raises(ValueError, match="damping"):
        attention_pagerank(causal(3), torch.ones(6, 1), damping=1.0)


# ---------------------------------------------------------------- planted phenomena
@pytest.mark.parametrize("kind", ["full", "causal"])
@pytest.mark.parametrize("lengths", [[8], [6, 4, 7]])
def test_planted_sink_is_found(kind, lengths):
    attn = GraphMultiheadAttention(C, H, backend="pyg").eval()
    _plant_sink(attn)
    x, batch = _sink_inputs(lengths)
    ei = _graph(kind, lengths)
    n = sum(lengths)
    g = extract(attn, x, ei).attention[0]
    first = torch.nonzero(torch.cat([torch.tensor([True]), batch[1:] != batch[:-1]])).flatten()
    assert (sink_scores(g.edge_index, g.weights, batch) > 0.95).all()
    sinks = find_sinks(g.edge_index, g.weights, n)  # [N, H]
    assert torch.equal(sinks.any(dim=1).nonzero().flatten(), first)
    received = received_attention(g.edge_index, g.weights, n)
    for b, start in enumerate(first.tolist()):  # each sequence's first token draws the most
        in_seq = (batch == b).nonzero().flatten()
        assert (received[in_seq].argmax(dim=0) + in_seq[0] == start).all()
    rank = attention_pagerank(g.edge_index, g.weights, n)
    hubs, _ = attention_hits(g.edge_index, g.weights, n)
    if len(lengths) == 1:
        assert (rank.argmax(dim=0) == 0).all() and (hubs.argmax(dim=0) == 0).all()
        assert (rank[0] > 0.5).all()
    else:
        assert set(rank.topk(len(lengths), dim=0).indices.flatten().tolist()) == set(first.tolist())


def test_planted_sink_in_a_stack_is_found_in_its_layer():
    model = Stack(3).eval()
    with torch.no_grad():  # layer 0 adds nothing: layer 1 sees the input (its marker) unchanged
        model.layers[0].self_attn.out_proj.weight.zero_()
        model.layers[0].self_attn.out_proj.bias.zero_()
        model.layers[0].linear2.weight.zero_()
        model.layers[0].linear2.bias.zero_()
    _plant_sink(model.layers[1].self_attn, strength=12.0)
    x, _ = _sink_inputs([8])
    rows = summarize(extract(model, x, full(8)))
    assert [r.name for r in rows] == ["input", "layers.0", "layers.1", "layers.2"]
    assert rows[0].sink == () and all(len(r.sink) == H for r in rows[1:])
    sink = {r.name: r.mean_sink for r in rows[1:]}
    assert sink["layers.1"] > 0.95
    assert sink["layers.0"] < 0.5 and sink["layers.2"] < 0.5
    assert rows[2].top_key == 0 and rows[2].pagerank_top == 0 and rows[2].top_key_share > 0.9


def _plant_massive(block: Block, dim: int, magnitude: float = 5e4) -> None:
    """A feed-forward unit that fires only where normalized feature 0 is large (the first token)
    and writes ``magnitude`` into residual dimension ``dim``."""
    with torch.no_grad():
        block.linear1.weight[0].zero_()
        block.linear1.weight[0, 0] = 1.0
        block.linear1.bias[0] = -3.0  # fires where norm2(x)[:, 0] > 3: only the marked token
        block.linear2.weight[:, 0].zero_()
        block.linear2.weight[dim, 0] = magnitude


def _massive_inputs(n=10):
    x = torch.randn(n, C)
    x[:, 0] = 0.0
    x[0, 0] = 20.0  # normalized, token 0's feature 0 is ~sqrt(C - 1) ~ 3.9; others ~0
    return x


def test_planted_massive_activation_is_found_in_its_layer_and_dimension():
    model = Stack(4).eval()
    _plant_massive(model.layers[2], dim=5)
    x = _massive_inputs()
    rows = summarize(extract(model, x, causal(10)))
    names = [r.name for r in rows]
    assert names == ["input", "layers.0", "layers.1", "layers.2", "layers.3"]
    found = {r.name: r.massive for r in rows}
    assert found["input"] == found["layers.0"] == found["layers.1"] == ()
    for name in ("layers.2", "layers.3"):  # pre-norm: the residual stream carries it on
        assert [(t, d) for t, d, _ in found[name]] == [(0, 5)]
        assert found[name][0][2] > 1e4
    stats = rows[3].activations
    assert (stats.token, stats.dim) == (0, 5) and stats.ratio > 1000
    table = format_table(rows)
    assert "layers.2" in table and len(table.splitlines()) == len(rows) + 2


def test_pre_norm_versus_post_norm_on_the_same_weights():
    model = Stack(4).eval()
    _plant_massive(model.layers[2], dim=5)
    x = _massive_inputs()
    traces = compare_norm_placement(model, x, causal(10))
    assert set(traces) == {"pre-norm", "post-norm"}
    assert all(layer.norm_first for layer in model.layers)  # restored
    pre, post = summarize(traces["pre-norm"]), summarize(traces["post-norm"])
    assert pre[3].massive and not any(r.massive for r in post[1:])
    # post-norm: every layer output is normalized, |h| <= sqrt(C - 1) up to the affine part
    assert all(r.activations.max_abs < 2 * math.sqrt(C) for r in post[1:])
    # the same weights: the first layer's attention input differs only by the norm placement
    with norm_placement(model, False):
        assert not any(layer.norm_first for layer in model.layers)
    with pytest.raises(ValueError, match="norm_first"):
        with norm_placement(GraphMultiheadAttention(C, H), True):
            pass


def test_activation_measures_on_plain_tensors():
    h = torch.randn(6, 32) * 0.1
    h[3, 7] = -400.0
    h[1, 2] = 150.0  # large but below 1000x the median? median ~0.07: still massive
    found = massive_activations(h)
    assert [(t, d) for t, d, _ in found] == [(3, 7), (1, 2)]
    assert massive_activations(h, min_magnitude=200.0) == [(3, 7, -400.0)]
    s = activation_stats(h, k=2)
    assert (s.token, s.dim, s.max_abs) == (3, 7, 400.0)
    assert s.top[1][1:] == (1, 2) and s.ratio == pytest.approx(400.0 / float(h.abs().quantile(0.5)))
    assert massive_activations(torch.ones(3, 3) * 500.0) == []  # large but not against the median


# ---------------------------------------------------------------- the analyze command
def _parse(argv):
    from gnn_transformer import cli

    return cli, cli.build_parser().parse_args(["analyze", *argv])


def test_analyze_runs_on_a_saved_checkpoint(tmp_path, capsys):
    import json

    path, _ = tiny_lm_checkpoint(tmp_path)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3 4 5 6\n7 8 9\n")
    out = tmp_path / "out"
    cli, args = _parse(["--checkpoint", str(path), "--tokens", str(tokens), "--out", str(out), "--compare-norm"])
    assert cli.analyze.run(args) == 0
    printed = capsys.readouterr().out
    assert "encoder.layers.0" in printed and "encoder.layers.1" in printed
    assert "[pre-norm]" in printed and "[post-norm]" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["graph"] == "causal" and summary["lengths"] == [6, 3]
    assert set(summary["variants"]) == {"model", "pre-norm", "post-norm"}
    rows = summary["variants"]["model"]
    assert [r["name"] for r in rows] == ["input", "encoder.layers.0", "encoder.layers.1"]
    assert all(len(r["sink"]) == 2 for r in rows[1:])
    for name in (
        "sink_scores.png",
        "activations.png",
        "norm_comparison.png",
        "attention_encoder_layers_0_self_attn.png",
        "arcs_encoder_layers_1_self_attn.png",
    ):
        assert (out / name).stat().st_size > 1000, name


def test_analyze_of_a_nan_model_warns_and_writes_strict_json(tmp_path, capsys):
    """A NaN in the embedding makes the layers' attention and states NaN: the run says which
    layers, the table shows nan (not a sink score of 0), and summary.json stays valid JSON."""
    import json

    path, _ = tiny_lm_checkpoint(tmp_path, nan=True)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3 4\n")
    out = tmp_path / "out"
    cli, args = _parse(["--checkpoint", str(path), "--tokens", str(tokens), "--out", str(out), "--no-plots"])
    assert cli.analyze.run(args) == 0
    captured = capsys.readouterr()
    assert (
        "warning: NaN or infinite attention weights or hidden states in input, encoder.layers.0, encoder.layers.1"
        in captured.err
    )
    assert "nan/nan" in captured.out
    text = (out / "summary.json").read_text()
    assert "NaN" not in text
    rows = json.loads(text)["variants"]["model"]
    assert rows[1]["sink"] == [None, None] and rows[1]["activations"]["median_abs"] is None


def test_analyze_checkpoint_variants_and_errors(tmp_path, capsys):
    import json

    path, model = tiny_lm_checkpoint(tmp_path, wrapped=False, norm_first=False)
    config = tmp_path / "elsewhere.json"
    config.write_text(json.dumps({"model_config": json.loads((path.parent / "config.json").read_text())}))
    (path.parent / "config.json").unlink()
    tokens = tmp_path / "ids.txt"
    tokens.write_text("3 1 4 1 5\n")
    cli, args = _parse(
        [
            "--checkpoint",
            str(path),
            "--config",
            str(config),
            "--tokens",
            str(tokens),
            "--out",
            str(tmp_path / "o"),
            "--graph",
            "full",
            "--no-plots",
        ]
    )
    assert cli.analyze.run(args) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["summary.json"]
    # the recorded weights are those of the model itself
    from gnn_transformer.experiments import analyze_run

    loaded = analyze_run.load_checkpoint_model(path, config)
    result = analyze_run.analyze(loaded, [[3, 1, 4, 1, 5]], graph="full")
    g = result.traces["model"].attention[0]
    h0 = model.embed_nodes(torch.tensor([3, 1, 4, 1, 5]), torch.arange(5))
    _, alpha = model.encoder.layers[0].self_attn(h0, full(5), return_attention_weights=True)
    torch.testing.assert_close(g.weights, alpha)
    # errors are reported, not raised
    capsys.readouterr()
    cli, args = _parse(["--checkpoint", str(path), "--tokens", str(tokens), "--out", str(tmp_path / "p")])
    assert cli.analyze.run(args) == 2  # no config next to the checkpoint any more
    assert "config" in capsys.readouterr().err
    small = tmp_path / "small.json"  # a config that does not fit the weights
    small.write_text(json.dumps({"vocab_size": 13, "d_model": 8, "nhead": 2, "num_layers": 1}))
    cli, args = _parse(["--checkpoint", str(path), "--config", str(small), "--tokens", str(tokens)])
    assert cli.analyze.run(args) == 2
    assert "does not fit" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("1 two 3\n")
    cli, args = _parse(["--checkpoint", str(path), "--config", str(config), "--tokens", str(bad)])
    assert cli.analyze.run(args) == 2
    assert "line 1" in capsys.readouterr().err


def test_analyze_on_a_catalogue_topology_and_unknown_graph(tmp_path, capsys):
    import json

    path, _ = tiny_lm_checkpoint(tmp_path)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3 4 5 6 7 8 9 10\n")
    cli, args = _parse(
        [
            "--checkpoint",
            str(path),
            "--tokens",
            str(tokens),
            "--out",
            str(tmp_path / "o"),
            "--graph",
            "sliding_window",
            "--no-plots",
        ]
    )
    assert cli.analyze.run(args) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["graph"] == "sliding_window"
    cli, args = _parse(["--checkpoint", str(path), "--tokens", str(tokens), "--graph", "nope"])
    assert cli.analyze.run(args) == 2
    assert "nope" in capsys.readouterr().err


def _save_tiny_hf(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
    directory = tmp_path / kind
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=len(words),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            attn_implementation="eager",
        )
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=len(words), n_embd=16, n_layer=2, n_head=2, n_positions=32, attn_implementation="eager"
        )
        model = transformers.GPT2LMHeadModel(cfg)
    model.eval().save_pretrained(directory)
    try:  # transformers >= 5 takes the vocabulary itself
        tokenizer = transformers.BertTokenizer(vocab={w: k for k, w in enumerate(words)})
    except TypeError:
        vocab = tmp_path / f"{kind}_vocab.txt"
        vocab.write_text("\n".join(words) + "\n")
        tokenizer = transformers.BertTokenizer(vocab_file=str(vocab))
    tokenizer.save_pretrained(directory)
    return directory, model


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_analyze_runs_on_a_saved_hugging_face_model(tmp_path, capsys, kind):
    import json

    directory, hf_model = _save_tiny_hf(tmp_path, kind)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\na dog ran\n")
    out = tmp_path / "out"
    cli, args = _parse(["--hf-dir", str(directory), "--text", str(text), "--out", str(out)])
    assert cli.analyze.run(args) == 0
    printed = capsys.readouterr().out
    assert ("BERT" if kind == "bert" else "GPT-2") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["graph"] == ("full" if kind == "bert" else "causal")
    assert summary["tokens"][:2] == ["[CLS]", "the"]
    assert summary["lengths"] == [8, 5]
    assert [r["name"] for r in summary["variants"]["model"]] == ["input", "encoder.layers.0", "encoder.layers.1"]
    assert (out / "attention_encoder_layers_1_self_attn.png").is_file()
    # the recorded weights are Hugging Face's attention probabilities
    from gnn_transformer.experiments import analyze_run

    loaded = analyze_run.load_hf_model(directory)
    result = analyze_run.analyze(loaded, [[2, 5, 6, 7, 3]])
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        ref = hf_model(ids, output_attentions=True)
    g = result.traces["model"].attention[1]
    torch.testing.assert_close(g.dense(), ref.attentions[1][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_analyze_runs_a_hugging_face_model_on_its_own_graphs(tmp_path, capsys, family):
    """A model with sliding windows (Mistral's on every layer, Gemma 2's on every other) is
    analysed on its own graphs by default ('native'), as Hugging Face computes it: the recorded
    weights are its attention probabilities (on causal graphs everywhere they were not)."""
    transformers = pytest.importorskip("transformers")
    from gnn_transformer.experiments import analyze_run
    from gnn_transformer.viz import model_view

    torch.manual_seed(0)
    common = dict(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        sliding_window=3,
        attn_implementation="eager",
    )
    if family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        config = transformers.Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8)
        model = transformers.Gemma2ForCausalLM(config)
    directory = tmp_path / family
    model.eval().save_pretrained(directory)
    loaded = analyze_run.load_hf_model(directory, backend="pyg")
    assert loaded.graph == "native"
    ids = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31]
    result = analyze_run.analyze(loaded, [ids])
    assert result.graph == "native"
    with torch.no_grad():
        ref = model(torch.tensor([ids]), output_attentions=True)
    torch.testing.assert_close(result.traces["model"].output, ref.logits[0], atol=1e-4, rtol=1e-4)
    for layer, weights in enumerate(ref.attentions):
        got = result.traces["model"].attention[layer].dense()
        torch.testing.assert_close(got, weights[0], atol=1e-5, rtol=1e-5)
    edges = [g.edge_index.size(1) for g in result.traces["model"].attention]
    windowed = sum(min(i, 2) + 1 for i in range(10))  # sliding_window=3: the token and 2 before it
    assert edges == ([windowed, windowed] if family == "mistral" else [windowed, 55])
    causal = analyze_run.analyze(loaded, [ids], graph="causal")  # asked for: every layer causal
    assert [g.edge_index.size(1) for g in causal.traces["model"].attention] == [55, 55]
    page = model_view.model_page(loaded, ids)  # the viewer draws the same graphs
    assert "native graph" in page.title
    assert [len(layer.views[-1].src) for layer in page.layers] == edges


def test_analyze_reports_a_missing_tokenizer_and_directory(tmp_path, capsys):
    path, _ = tiny_lm_checkpoint(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("the cat\n")
    cli, args = _parse(["--checkpoint", str(path), "--text", str(text)])
    assert cli.analyze.run(args) == 2
    assert "tokenizer" in capsys.readouterr().err
    cli, args = _parse(["--hf-dir", str(tmp_path / "missing"), "--tokens", str(text)])
    assert cli.analyze.run(args) == 2
    assert "--hf-dir" in capsys.readouterr().err


def test_analyze_runs_on_a_train_run_checkpoint(tmp_path, monkeypatch, capsys):
    """`gnn-transformer train` writes model.pt with its run config; analyze rebuilds the model,
    draws examples of the task, and runs on the topology the model was trained on."""
    from gnn_transformer import cli

    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--task",
                "recall",
                "--topology",
                "sliding_window:window=2",
                "--out",
                str(run),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--d-model",
                "16",
                "--ff",
                "32",
                "--heads",
                "2",
                "--no-progress",
                "--backend",
                "pyg",
                "--warmup",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "analysis"
    assert (
        cli.main(["analyze", "--checkpoint", str(run / "model.pt"), "--samples", "3", "--out", str(out), "--no-plots"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "recall model" in printed and "3 sequence(s)" in printed
    assert "sliding_window:window=2 graph" in printed
    assert (out / "summary.json").is_file()
    # the recorded graph is the run's: a window of radius 2 gives exactly min(L, 5)-ish keys
    from gnn_transformer.experiments import analyze_run
    from gnn_transformer.experiments.analyze_run import analyze, load_checkpoint_model
    from gnn_transformer.topology import sliding_window

    loaded = load_checkpoint_model(run / "model.pt")
    seqs = loaded.examples(2)
    assert len(seqs) == 2 and all(len(s) > 0 for s in seqs)
    result = analyze(loaded, seqs)
    recorded = result.traces["model"].attention[0].edge_index
    expected = sliding_window([len(s) for s in seqs], 2)
    assert torch.equal(recorded.cpu(), expected.as_tensor())
    assert cli.main(["analyze", "--checkpoint", str(run / "model.pt"), "--samples", "0", "--out", str(out)]) == 2
    assert "'--samples'" in capsys.readouterr().err
    # more samples than memory holds: refused before any is drawn
    too_many = ["analyze", "--checkpoint", str(run / "model.pt"), "--samples", str(10**13), "--out", str(out)]
    assert cli.main(too_many) == 2
    assert f"--samples: Expected 'samples' small enough to fit in memory (got {10**13})" in capsys.readouterr().err
    # drawn, but their recording would not fit: refused before the model runs
    monkeypatch.setattr(analyze_run, "host_memory_budget", lambda: 1)
    assert cli.main(["analyze", "--checkpoint", str(run / "model.pt"), "--samples", "3", "--out", str(out)]) == 2
    assert (
        "--samples: Expected 'sequences' small enough to analyze in memory (got 3 sequences" in capsys.readouterr().err
    )


# ---------------------------------------------------------------- per-head, per-layer and selected graphs
def _double_lm(**overrides):
    from gnn_transformer.experiments import analyze_run
    from gnn_transformer.model import GraphLM, GraphTransformerConfig

    torch.manual_seed(0)
    cfg = GraphTransformerConfig(
        **{
            **dict(
                vocab_size=13, d_model=16, nhead=2, num_layers=2, position="learned", max_positions=32, backend="pyg"
            ),
            **overrides,
        }
    )
    model = perturbed(GraphLM(cfg).double())

    def forward(ids, graph, pos):
        return analyze_run.call_with_graph(model, ids, graph, pos=pos)

    return model, analyze_run.LoadedModel(model, forward, "causal", vocab_size=13, max_length=32)


SEQS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 1, 4, 1, 5, 9]]


def test_analyze_records_each_heads_weights_over_its_own_edges():
    from gnn_transformer.experiments import analyze_run
    from gnn_transformer.topology import dilated_per_head

    model, loaded = _double_lm()
    spec = "dilated_per_head:window=1,dilations=1;3,causal=true"
    result = analyze_run.analyze(loaded, SEQS, graph=spec)
    edge_index, edge_head = dilated_per_head([11, 6], 1, [1, 3], causal=True)
    ids = torch.tensor([t for s in SEQS for t in s])
    pos = torch.cat([torch.arange(11), torch.arange(6)])
    with torch.no_grad():
        expected = model(ids, edge_index, pos=pos, edge_head=edge_head)
        h0 = model.embed_nodes(ids, pos)
        layer = model.encoder.layers[0]
        _, alpha = layer.self_attn(
            layer.norm1(h0), edge_index, edge_head=edge_head, return_attention_weights=True
        )  # [E] each edge's own head
    trace = result.traces["model"]
    torch.testing.assert_close(trace.output, expected, **TOL[torch.float64])  # the same model output
    graphs = trace.self_attention()
    assert len(graphs) == 2 and all(g.weights.shape == (edge_head.numel(), 2) for g in graphs)
    for g in graphs:
        assert torch.equal(g.edge_index, edge_index.as_tensor())
        own = torch.nn.functional.one_hot(edge_head, 2).bool()
        assert torch.all(g.weights[~own] == 0)  # no weight in another head's column
        for h in range(2):  # each head's weights sum to one over its own edges into each query
            sums = torch.zeros(17, dtype=torch.float64).index_add_(0, edge_index[1].as_tensor(), g.weights[:, h])
            torch.testing.assert_close(sums, torch.ones(17, dtype=torch.float64), **TOL[torch.float64])
    torch.testing.assert_close(graphs[0].weights[own], alpha, **TOL[torch.float64])
    dense_head = graphs[0].dense()  # [H, N, N]: head 1 reads i - 3, i (and no i - 1)
    assert dense_head[1, 5, 4] == 0 and dense_head[1, 5, 2] > 0 and dense_head[0, 5, 4] > 0
    assert "attend" not in model.encoder.layers[0].self_attn.__dict__  # nothing left on the model


def test_analyze_runs_each_layer_on_its_own_graph(tmp_path, capsys):
    import json

    from gnn_transformer.experiments import analyze_run
    from gnn_transformer.topology import causal as causal_graph
    from gnn_transformer.topology import sliding_window

    spec = tmp_path / "two_layers.toml"
    spec.write_text(
        'name = "two_layers"\ndescription = "a window, then causal"\nsource = "test"\n'
        'builder = "per_layer"\n\n[[layers]]\nbuilder = "sliding_window"\n'
        'params = { window = 1, causal = true }\n\n[[layers]]\nbuilder = "causal"\n'
    )
    model, loaded = _double_lm()
    result = analyze_run.analyze(loaded, SEQS, graph=str(spec))
    graphs = result.traces["model"].self_attention()
    assert torch.equal(graphs[0].edge_index, sliding_window([11, 6], 1, causal=True).as_tensor())
    assert torch.equal(graphs[1].edge_index, causal_graph([11, 6]).as_tensor())
    ids = torch.tensor([t for s in SEQS for t in s])
    pos = torch.cat([torch.arange(11), torch.arange(6)])
    with torch.no_grad():
        expected = model(ids, [sliding_window([11, 6], 1, causal=True), causal_graph([11, 6])], pos=pos)
    torch.testing.assert_close(result.traces["model"].output, expected, **TOL[torch.float64])
    # the command, with the catalogue's per-layer and per-head specs
    path, _ = tiny_lm_checkpoint(tmp_path)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3 4 5 6 7 8\n")
    for graph in (str(spec), "gemma3", "modernbert"):
        out = tmp_path / graph.replace("/", "_")
        cli, args = _parse(
            ["--checkpoint", str(path), "--tokens", str(tokens), "--out", str(out), "--graph", graph, "--no-plots"]
        )
        assert cli.analyze.run(args) == 0, capsys.readouterr().err
        rows = json.loads((out / "summary.json").read_text())["variants"]["model"]
        assert [r["name"] for r in rows] == ["input", "encoder.layers.0", "encoder.layers.1"]


def test_analyze_records_the_graph_each_layer_selects():
    from gnn_transformer.experiments import analyze_run
    from gnn_transformer.model import GraphLM

    model, loaded = _double_lm()
    result = analyze_run.analyze(loaded, SEQS, graph="causal+topk:num_keys=2")
    assert all(m.select is None for m in analyze_run.attention_modules(model))  # restored
    selecting = GraphLM(dataclasses.replace(model.config, select="topk:num_keys=2")).double().eval()
    selecting.load_state_dict(model.state_dict())
    ids = torch.tensor([t for s in SEQS for t in s])
    pos = torch.cat([torch.arange(11), torch.arange(6)])
    with torch.no_grad():
        expected = selecting(ids, causal([11, 6]), pos=pos)
    torch.testing.assert_close(result.traces["model"].output, expected, **TOL[torch.float64])
    for g in result.traces["model"].self_attention():
        kept = g.weights.ne(0)  # [E, H]: the edges each head kept
        per_query = torch.zeros(17, 2, dtype=torch.long).index_add_(0, g.edge_index[1], kept.long())
        within = torch.cat([torch.arange(11), torch.arange(6)]) + 1  # causal keys of each query
        assert torch.equal(per_query, within.clamp(max=2)[:, None].expand(17, 2))
        assert bool((g.edge_index[0] <= g.edge_index[1]).all())  # within the causal graph


@pytest.mark.parametrize(
    "graph", ["causal", "sliding_window:window=1", "dilated_per_head:window=1,dilations=1;3,causal=true", "gemma3"]
)
def test_recording_bytes_are_what_analyze_keeps(graph):
    """The estimate checked before a run equals the attention weights and hidden states the
    run records (a float64 model: 8 bytes each)."""
    from gnn_transformer.experiments import analyze_run

    _, loaded = _double_lm()
    trace = analyze_run.analyze(loaded, SEQS, graph=graph).traces["model"]
    kept = sum(g.weights.numel() * g.weights.element_size() for g in trace.attention)
    kept += sum(s.numel() * s.element_size() for s in trace.hidden_states)
    built, select = analyze_run.build_graph(loaded, graph, [len(s) for s in SEQS])
    assert analyze_run.recording_bytes(loaded, built, select, 17) == kept
    assert analyze_run.recording_bytes(loaded, built, select, 17, variants=3) == 3 * kept
    # a selector's graphs are chosen during the run: only the hidden states are counted
    trace = analyze_run.analyze(loaded, SEQS, graph="causal+topk:num_keys=2").traces["model"]
    states = sum(s.numel() * s.element_size() for s in trace.hidden_states)
    built, select = analyze_run.build_graph(loaded, "causal+topk:num_keys=2", [len(s) for s in SEQS])
    assert analyze_run.recording_bytes(loaded, built, select, 17) == states


def test_analyze_refuses_a_recording_that_cannot_fit(tmp_path, monkeypatch, capsys):
    from gnn_transformer.experiments import analyze_run

    _, loaded = _double_lm()
    built, _ = analyze_run.build_graph(loaded, "causal", [11, 6])
    need = analyze_run.recording_bytes(loaded, built, None, 17)
    monkeypatch.setattr(analyze_run, "host_memory_budget", lambda: need)
    analyze_run.analyze(loaded, SEQS)  # exactly at the budget: runs
    with pytest.raises(ValueError, match=r"Expected 'sequences' small enough .* \(got 2 sequences, 17 tokens\)"):
        analyze_run.analyze(loaded, SEQS, compare_norm=True)  # three runs' recordings
    monkeypatch.setattr(analyze_run, "host_memory_budget", lambda: need - 1)
    with pytest.raises(ValueError, match="more than half of this machine's memory"):
        analyze_run.analyze(loaded, SEQS)
    # the command names the option that gave the sequences, and writes nothing
    path, _ = tiny_lm_checkpoint(tmp_path)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3 4 5 6 7 8\n")
    monkeypatch.setattr(analyze_run, "host_memory_budget", lambda: 1)
    cli, args = _parse(["--checkpoint", str(path), "--tokens", str(tokens), "--out", str(tmp_path / "o")])
    assert cli.analyze.run(args) == 2
    err = capsys.readouterr().err
    assert "--tokens: Expected 'sequences' small enough to analyze in memory (got 1 sequence, 8 tokens)" in err
    assert not (tmp_path / "o").exists()


def test_analyze_refuses_a_per_head_graph_of_other_heads(tmp_path, capsys):
    path, _ = tiny_lm_checkpoint(tmp_path)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3 4 5 6 7 8\n")
    cli, args = _parse(
        ["--checkpoint", str(path), "--tokens", str(tokens), "--out", str(tmp_path / "o"), "--graph", "duo_attention"]
    )
    assert cli.analyze.run(args) == 2
    err = capsys.readouterr().err
    assert "'graph'" in err and "'duo_attention', with 8" in err and "2 heads" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- checkpoints of 'train --task lm' / listops
def test_analyze_runs_on_a_train_lm_run(tmp_path, capsys):
    import json

    from gnn_transformer import cli

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind.\n" * 4)
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--task",
                "lm",
                "--text",
                str(text),
                "--context",
                "16",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--d-model",
                "16",
                "--ff",
                "32",
                "--heads",
                "2",
                "--backend",
                "pyg",
                "--warmup",
                "1",
                "--sample-chars",
                "0",
                "--topology",
                "sliding_window:window=3",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "analysis"
    assert cli.main(["analyze", "--checkpoint", str(run / "model.pt"), "--samples", "2", "--out", str(out)]) == 0
    assert "lm model (model.pt): 2 sequence(s), 32 tokens" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lengths"] == [16, 16] and summary["graph"] == "sliding_window:window=3"
    assert all(len(t) == 1 for t in summary["tokens"])  # characters
    assert (out / "attention_encoder_layers_0_self_attn.png").is_file()
    # the run's window, cut to its causal part as in training
    from gnn_transformer.experiments.analyze_run import analyze, load_checkpoint_model
    from gnn_transformer.topology import sliding_window

    loaded = load_checkpoint_model(run / "model.pt")
    recorded = analyze(loaded, [[1, 2, 3, 4, 5]]).traces["model"].attention[0].edge_index
    assert torch.equal(recorded, sliding_window(5, 3, causal=True).as_tensor())
    lines = tmp_path / "lines.txt"
    lines.write_text("To be\nthe mind\n")
    assert (
        cli.main(
            ["analyze", "--checkpoint", str(run / "model.pt"), "--text", str(lines), "--out", str(out), "--no-plots"]
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["tokens"] == list("To be")
    lines.write_text("To be Ω\n")
    assert cli.main(["analyze", "--checkpoint", str(run / "model.pt"), "--text", str(lines), "--out", str(out)]) == 2
    assert "'--text'" in (err := capsys.readouterr().err) and "'Ω' (U+03A9) at character 6" in err


def test_analyze_runs_on_a_train_listops_run(tmp_path, capsys):
    import json

    from gnn_transformer import cli

    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--task",
                "listops",
                "--listops-lengths",
                "5-20",
                "--listops-depth",
                "3",
                "--listops-args",
                "3",
                "--listops-train",
                "20",
                "--eval-size",
                "2",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--d-model",
                "16",
                "--ff",
                "32",
                "--heads",
                "2",
                "--backend",
                "pyg",
                "--warmup",
                "1",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "analysis"
    assert (
        cli.main(
            [
                "analyze",
                "--checkpoint",
                str(run / "model.pt"),
                "--samples",
                "2",
                "--out",
                str(out),
                "--graph",
                "sliding_window:window=2",
            ]
        )
        == 0
    )
    assert "listops model (model.pt): 2 sequence(s)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"][0] == "[CLS]" and all(5 < n <= 21 for n in summary["lengths"])
    expressions = tmp_path / "expressions.txt"
    expressions.write_text("[MAX 4 3 [MIN 2 3 ] 1 0 ]\n[SM 1 2 ]\n")
    assert (
        cli.main(
            [
                "analyze",
                "--checkpoint",
                str(run / "model.pt"),
                "--text",
                str(expressions),
                "--out",
                str(out),
                "--no-plots",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lengths"] == [11, 5] and summary["tokens"][:3] == ["[CLS]", "[MAX", "4"]
    tokens = tmp_path / "ids.txt"
    tokens.write_text("1 2 3\n")
    assert (
        cli.main(
            [
                "perplexity",
                "--checkpoint",
                str(run / "model.pt"),
                "--tokens",
                str(tokens),
                "--out",
                str(tmp_path / "p"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "causal language model" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["pyg", "fused", "auto"])
def test_record_keeps_a_per_head_graph_once_with_its_heads(backend):
    """A per-head call is recorded once (not again for the (head, token) graph attend runs inside),
    with its edge_head and each edge's weight in its head's column."""
    from gnn_transformer.analysis.capture import record

    torch.manual_seed(0)
    attn = GraphMultiheadAttention(16, 4, num_kv_heads=2, backend=backend).double()
    x = torch.randn(10, 16, dtype=torch.float64)
    edge_index, edge_head = topology.duo_attention(10, [1, 3], 4, num_sinks=2, window=2)
    with record(attn) as trace:
        out = attn(x, edge_index, edge_head=edge_head)
    assert len(trace.attention) == 1
    g = trace.attention[0]
    assert torch.equal(g.edge_head, edge_head) and torch.equal(g.edge_index, torch.as_tensor(edge_index))
    ref_out, alpha = attn(x, edge_index, edge_head=edge_head, return_attention_weights=True)  # alpha [E]
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    expected = torch.zeros(alpha.numel(), 4, dtype=torch.float64)
    expected[torch.arange(alpha.numel()), edge_head] = alpha
    torch.testing.assert_close(g.weights, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(g.dense().sum(-1), torch.ones(4, 10, dtype=torch.float64), atol=1e-12, rtol=0)


def test_networkx_export_without_a_head_is_the_mean_of_heads():
    attn = GraphMultiheadAttention(C, H, backend="pyg")
    x, ei = torch.randn(4, C), causal(4)
    g = extract(attn, x, ei).attention[0]
    mean = g.to_networkx()  # head=None: the mean over heads
    alpha = g.weights.mean(dim=1)
    assert mean.number_of_edges() == ei.size(1)
    for e, (j, i) in enumerate(ei.t().tolist()):
        assert mean[j][i]["weight"] == pytest.approx(float(alpha[e]), abs=1e-6)
    for i in range(4):  # each query's weights still sum to 1
        assert sum(mean[j][i]["weight"] for j in mean.predecessors(i)) == pytest.approx(1.0, abs=1e-5)
