"""Argument checks of the analysis measures, the per-layer summary of a decoding loop, and the
options of ``gnn-transformer analyze``."""

import math

import numpy as np
import pytest
import torch

from gnn_transformer.analysis import (
    activation_stats,
    attention_entropy,
    attention_hits,
    attention_pagerank,
    find_sinks,
    massive_activations,
    received_attention,
    record,
    sink_scores,
    summarize,
)
from gnn_transformer.topology import causal

W = torch.tensor([[1.0], [0.5], [0.5], [0.2], [0.3], [0.5]])  # causal(3)


@pytest.mark.parametrize(
    "measure, name",
    [
        (lambda n: received_attention(causal(3), W, n), "num_src"),
        (lambda n: find_sinks(causal(3), W, n), "num_src"),
        (lambda n: sink_scores(causal(3), W, num_src=n), "num_src"),
        (lambda n: attention_entropy(causal(3), W, n), "num_dst"),
        (lambda n: attention_pagerank(causal(3), W, n), "num_nodes"),
        (lambda n: attention_hits(causal(3), W, n), "num_nodes"),
    ],
)
def test_node_counts_below_the_indices_are_refused(measure, name):
    for bad in (2, 1, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"'{name}'.*got {bad!r}"):
            measure(bad)
    measure(4)  # a trailing node without edges is fine


def test_edge_index_must_hold_non_negative_integers():
    with pytest.raises(ValueError, match="'edge_index'.*non-negative.*-1"):
        received_attention(torch.tensor([[-1, 0], [0, 1]]), torch.ones(2, 1))
    with pytest.raises(ValueError, match="'edge_index'.*integers.*float32"):
        received_attention(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.ones(2, 1))
    with pytest.raises(ValueError, match="'edge_index'.*integers.*bool"):
        attention_entropy(torch.tensor([[False, True], [True, True]]), torch.ones(2, 1))


def test_sink_scores_checks_the_batch():
    with pytest.raises(ValueError, match="'batch'.*sources up to index 2, got 2 entries"):
        sink_scores(causal(3), W, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="'batch'.*one entry per node \\(4, got 3\\)"):
        sink_scores(causal(3), W, torch.tensor([0, 0, 0]), num_src=4)
    with pytest.raises(ValueError, match="sorted 'batch'.*\\[0, 1, 0, 1\\]"):
        sink_scores(causal([2, 2]), torch.ones(6, 1), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="'batch'.*integer.*float32"):
        sink_scores(causal(3), W, torch.tensor([0.0, 0.0, 0.0]))
    # a sorted batch with trailing keys without edges is fine
    torch.testing.assert_close(sink_scores(causal(3), W, torch.tensor([0, 0, 0, 1])), torch.tensor([1.7 / 3]))


def test_centrality_refuses_integer_weights():
    ones = torch.ones(6, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="floating-point 'weights'.*int64"):
        attention_pagerank(causal(3), ones)
    with pytest.raises(ValueError, match="floating-point 'weights'.*int64"):
        attention_hits(causal(3), ones)
    assert attention_pagerank(causal(3), ones.double()).dtype == torch.float64


def test_activation_median_is_the_true_median_and_k_is_checked():
    h = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    assert activation_stats(h).median_abs == 2.5
    x = torch.randn(6, 7)
    assert activation_stats(x).median_abs == pytest.approx(float(np.median(x.abs().numpy())))
    assert activation_stats(torch.tensor([[1.0, 5.0, 2.0]])).median_abs == 2.0
    assert massive_activations(h, min_magnitude=0.0, min_ratio=1.5) == [(1, 1, 4.0)]  # 4 > 3.75, 3 < 3.75
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"'k'.*got {bad!r}"):
            activation_stats(h, k=bad)
    for name in ("min_magnitude", "min_ratio"):
        with pytest.raises(ValueError, match=f"'{name}'.*-5"):
            massive_activations(h, **{name: -5.0})


def test_summary_rows_of_a_decoding_loop_use_the_last_call():
    from gnn_transformer.decoding import generate
    from gnn_transformer.model import GraphLM, GraphTransformerConfig

    torch.manual_seed(0)
    lm = GraphLM(GraphTransformerConfig(vocab_size=20, d_model=16, nhead=2, num_layers=2, backend="pyg")).eval()
    with torch.no_grad(), record(lm) as trace:
        generate(lm, torch.tensor([[1, 2, 3]]), 3)
    rows = summarize(trace)
    for k, row in enumerate(rows[1:]):
        graph = [g for g in trace.self_attention() if g.layer == k][-1]  # the last step's
        assert (graph.num_src, graph.num_dst) == (5, 1)
        expected = sink_scores(graph.edge_index, graph.weights, num_src=graph.num_src)
        assert row.sink == pytest.approx(tuple(float(v) for v in expected))
        received = received_attention(graph.edge_index, graph.weights, graph.num_src).sum(dim=1)
        assert row.top_key_share == pytest.approx(float(received.max() / received.sum()))
        assert row.activations == activation_stats(trace.layers[k].output)  # the same call's
        assert trace.layers[k].output.size(0) == graph.num_dst


def _args(argv):
    from gnn_transformer import cli

    return cli, cli.build_parser().parse_args(["analyze", *argv])


@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-tokens", "0"),
        ("--max-tokens", "-3"),
        ("--massive-ratio", "-5"),
        ("--massive-magnitude", "-1"),
        ("--massive-ratio", "nan"),
    ],
)
def test_analyze_options_are_checked_up_front(tmp_path, capsys, option, value):
    cli, args = _args(
        [
            "--checkpoint",
            str(tmp_path / "missing.pt"),
            "--tokens",
            "x.txt",
            "--out",
            str(tmp_path / "out"),
            option,
            value,
        ]
    )
    assert cli.analyze.run(args) == 2
    captured = capsys.readouterr()
    assert option in captured.err and value in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


def _per_head_causal(n=4):
    """Both heads causal on ``n`` tokens, recorded as a per-head graph: each edge once per head,
    its weight in its head's column. Head 0 puts everything on token 0; head 1 is uniform."""
    from gnn_transformer.topology import per_head

    edge_index, edge_head = per_head([causal(n), causal(n)])
    src, dst = edge_index[0], edge_index[1]
    weights = torch.zeros(edge_index.size(1), 2)
    head0 = edge_head == 0
    weights[head0, 0] = (src[head0] == 0).float()
    weights[~head0, 1] = 1.0 / (dst[~head0] + 1).float()
    return edge_index, edge_head, weights


def test_per_head_graph_counts_each_key_s_queries_in_its_own_head():
    edge_index, edge_head, weights = _per_head_causal(5)
    mean = received_attention(edge_index, weights, normalize=True, edge_head=edge_head)
    assert mean[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # token 0 takes all of head 0's attention
    uniform = [sum(1 / (i + 1) for i in range(j, 5)) / (5 - j) for j in range(5)]  # over the 5 - j readers
    torch.testing.assert_close(mean[:, 1], torch.tensor(uniform))
    sinks = find_sinks(edge_index, weights, edge_head=edge_head)
    assert sinks[:, 0].tolist() == [True, False, False, False, False] and not bool(sinks[:, 1].any())
    # without edge_head every head's copy of an edge counts: the sink halves and is missed
    assert received_attention(edge_index, weights, normalize=True)[0, 0] == 0.5
    assert not bool(find_sinks(edge_index, weights)[:, 0].any())


def test_edge_head_is_checked():
    edge_index, edge_head, weights = _per_head_causal()
    with pytest.raises(ValueError, match="'edge_head'.*E=20.*\\[19\\]"):
        find_sinks(edge_index, weights, edge_head=edge_head[:-1])
    with pytest.raises(ValueError, match="'edge_head'.*float32"):
        received_attention(edge_index, weights, normalize=True, edge_head=edge_head.float())
    with pytest.raises(ValueError, match="'edge_head' in \\[0, 2\\).*\\[0, 2\\]"):
        find_sinks(edge_index, weights, edge_head=edge_head * 2)


def test_summary_entropy_averages_the_queries_that_read_a_key():
    """A per-head graph whose head 1 leaves queries 0 and 1 without keys: those (query, head)
    pairs are not averaged in as 0 nats."""
    from gnn_transformer.analysis import AttentionGraph
    from gnn_transformer.analysis.summary import _mean_entropy

    edge_index = torch.tensor([[0, 0, 1, 0, 1, 1, 2], [0, 1, 1, 2, 2, 2, 2]])
    edge_head = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    weights = torch.tensor([[1.0, 0], [0.5, 0], [0.5, 0], [0.5, 0], [0.5, 0], [0, 0.5], [0, 0.5]])
    graph = AttentionGraph("g", 0, edge_index, weights, 3, 3, edge_head=edge_head)
    # head 0: queries 0, 1, 2 with 0, log 2, log 2 nats; head 1: query 2 with log 2
    assert _mean_entropy(graph) == pytest.approx(3 * math.log(2) / 4)


def test_non_finite_weights_and_states_are_reported_as_such():
    nan = torch.full((6, 1), float("nan"))
    assert torch.isnan(sink_scores(causal(3), nan)).all()  # not 0.0 ("no sink")
    assert sink_scores(causal(3), torch.zeros(6, 1)).tolist() == [0.0]  # no attention at all
    h = torch.tensor([[1.0, float("nan")], [3.0, 4.0]])
    stats = activation_stats(h)
    assert np.isnan(stats.median_abs) and np.isnan(np.median(h.abs().numpy()))
    assert np.isnan(stats.ratio) and np.isnan(stats.max_abs)
    stats = activation_stats(torch.full((2, 2), float("nan")))
    assert np.isnan(stats.ratio)  # was 1.0


def test_find_sinks_leaves_out_keys_seen_by_a_single_query():
    # causal(3) edges (key, query): (0,0) (0,1) (1,1) (0,2) (1,2) (2,2); the last token attends
    # only to itself: key 2 draws all the attention of its single query, which says nothing about sinks
    weights = torch.tensor([[1.0], [0.5], [0.5], [0.0], [0.0], [1.0]])
    torch.testing.assert_close(received_attention(causal(3), weights, normalize=True)[2], torch.tensor([1.0]))
    assert find_sinks(causal(3), weights).flatten().tolist() == [False, False, False]
    # a key seen by two queries that both put everything on it is a sink
    weights = torch.tensor([[1.0], [1.0], [0.0], [1.0], [0.0], [0.0]])
    assert find_sinks(causal(3), weights).flatten().tolist() == [True, False, False]


def test_massive_activation_thresholds_are_strict():
    # |h| > min_magnitude and |h| > min_ratio * median, both strict (Sun et al., 2024)
    h = torch.ones(10, 10)
    h[3, 7] = -1000.0  # median |h| is 1: exactly min_ratio * median
    assert massive_activations(h, min_magnitude=100.0, min_ratio=1000.0) == []
    assert massive_activations(h, min_magnitude=100.0, min_ratio=999.0) == [(3, 7, -1000.0)]
    assert massive_activations(h, min_magnitude=1000.0, min_ratio=10.0) == []
    assert massive_activations(h, min_magnitude=999.0, min_ratio=10.0) == [(3, 7, -1000.0)]
