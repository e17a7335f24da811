"""Models that choose their graphs from the data: ``GraphTransformerConfig(select=...)``."""

from __future__ import annotations

import pytest
import torch

from gnn_transformer import topology
from gnn_transformer.model import GraphLM, GraphTransformerConfig
from tests.conftest import TOL


def _config(**fields):
    base = dict(vocab_size=13, d_model=16, nhead=4, num_layers=3, position="rope", dropout=0.0)
    return GraphTransformerConfig(**{**base, **fields})


def test_top_k_of_every_allowed_key_is_the_model_without_selection():
    torch.manual_seed(0)
    plain = GraphLM(_config()).double()
    chooser = GraphLM(_config(select="topk:num_keys=64")).double()
    chooser.load_state_dict(plain.state_dict())
    tokens, graph = torch.randint(0, 13, (12,)), topology.causal([5, 7])
    pos = torch.cat([torch.arange(5), torch.arange(7)])
    torch.testing.assert_close(chooser(tokens, graph, pos=pos), plain(tokens, graph, pos=pos), **TOL[torch.float64])


@pytest.mark.parametrize(
    "select", ["topk:num_keys=2", {"name": "block_topk", "block_size": 2, "num_blocks": 1, "causal": True}]
)
def test_every_layer_chooses_its_own_graph_within_the_given_one(select):
    torch.manual_seed(0)
    model = GraphLM(_config(select=select))
    graph = topology.causal([6, 4])
    allowed = set(map(tuple, graph.t().tolist()))
    chosen = []
    for layer in model.encoder.layers:
        inner = layer.self_attn.select

        def record(query, key, edge_index, inner=inner):
            result = inner(query, key, edge_index)
            chosen.append(result)
            return result

        layer.self_attn.select = record
    model(torch.randint(0, 13, (10,)), graph, pos=torch.cat([torch.arange(6), torch.arange(4)]))
    assert len(chosen) == 3
    for edge_index, edge_head in chosen:
        assert set(map(tuple, edge_index.t().tolist())) <= allowed
        if isinstance(select, str):  # at most 2 keys per query and head
            assert torch.bincount(edge_head * 10 + edge_index[1]).max() <= 2
    if isinstance(select, str):  # the layers' queries and keys differ, and so do their choices
        assert any(not torch.equal(chosen[0][0], c[0]) or not torch.equal(chosen[0][1], c[1]) for c in chosen[1:])


def test_routing_centroids_are_per_layer_state():
    model = GraphLM(_config(select="routing:num_clusters=2"))
    keys = [k for k in model.state_dict() if k.endswith("select.centroids")]
    assert len(keys) == 3 and model.state_dict()[keys[0]].shape == (4, 2, 4)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(select="topk:num_keys=2", position="alibi"), "'position' other than 'alibi' with select"),
        (dict(select="nearest:k=2"), "nearest"),
        (dict(select="topk:num_keys=0"), "num_keys"),
    ],
)
def test_bad_select(fields, match):
    with pytest.raises(ValueError, match=match):
        GraphLM(_config(**fields))
