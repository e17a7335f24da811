"""GraphTransformerConfig: invalid values are refused when a model is built, naming the field."""

import pytest
import torch

from gnn_transformer import GraphEncoderModel, GraphLM, GraphTransformerConfig
from gnn_transformer.topology import causal

BASE = dict(vocab_size=20, d_model=16, nhead=4, num_layers=1, backend="pyg")


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("vocab_size", -3),
        ("vocab_size", 2.5),
        ("vocab_size", True),
        ("d_model", 0),
        ("nhead", 4.0),
        ("max_positions", 0),
        ("dim_feedforward", 0),
        ("dim_feedforward", -1),
        ("num_layers", -1),
        ("output_dim", 0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("bias", "no"),
        ("norm_first", "no"),
        ("tie_weights", 1),
        ("layer_norm_eps", -1.0),
        ("layer_norm_eps", 0.0),
        ("layer_norm_eps", float("inf")),
        ("layer_norm_eps", float("nan")),
        ("position", "xpos"),
        ("attention", "bogus"),
        ("activation", "bogus"),
        ("kv_share_every", 0),
        ("backend", "bogus"),
    ],
)
def test_invalid_field_is_refused(field, value):
    config = GraphTransformerConfig(**{**BASE, field: value})
    for cls in (GraphEncoderModel, GraphLM):
        with pytest.raises(ValueError, match=f"'{field}'.*{value!r}"):
            cls(config)


def test_input_dim_must_be_positive():
    with pytest.raises(ValueError, match="'input_dim'.*0"):
        GraphEncoderModel(GraphTransformerConfig(input_dim=0, d_model=8, nhead=2))


def test_dim_feedforward_default_and_explicit():
    assert GraphLM(GraphTransformerConfig(**BASE)).encoder.layers[0].linear1.out_features == 64
    model = GraphLM(GraphTransformerConfig(**BASE, dim_feedforward=24))
    assert model.encoder.layers[0].linear1.out_features == 24


def test_graph_lm_output_dim():
    with pytest.raises(ValueError, match="'output_dim'.*output_dim=7, vocab_size=20"):
        GraphLM(GraphTransformerConfig(**BASE, output_dim=7))
    model = GraphLM(GraphTransformerConfig(**BASE, output_dim=20))
    assert model(torch.tensor([1, 2, 3]), causal([3]), pos=torch.arange(3)).shape == (3, 20)
    encoder = GraphEncoderModel(GraphTransformerConfig(**BASE, output_dim=7))
    assert encoder(torch.tensor([1, 2, 3]), causal([3]), pos=torch.arange(3)).shape == (3, 7)


def test_linear_attention_with_alibi_is_refused_at_construction():
    with pytest.raises(ValueError, match="'position'.*'alibi'.*attention='linear'"):
        GraphLM(GraphTransformerConfig(**BASE, attention="linear", position="alibi"))
    GraphLM(GraphTransformerConfig(**BASE, attention="linear", position="rope"))


def test_bool_and_integer_valued_floats_accepted():
    model = GraphLM(
        GraphTransformerConfig(**BASE, bias=False, norm_first=False, tie_weights=False, layer_norm_eps=1, dropout=0)
    )
    assert model.encoder.layers[0].linear1.bias is None and model.head.weight is not model.embed.weight


def test_tied_head_is_the_token_embedding_and_trains_as_one():
    """``tie_weights`` (the default) shares one parameter between the token embedding and the
    head: one entry in ``parameters()``, and a training step moves both alike."""
    model = GraphLM(GraphTransformerConfig(**BASE, dropout=0.0))
    assert model.head.weight is model.embed.weight
    assert sum(p is model.embed.weight for p in model.parameters()) == 1
    ids = torch.randint(0, 20, (6,))
    loss = model(ids, causal(6), pos=torch.arange(6))[:-1].log_softmax(-1).gather(1, ids[1:, None]).mean().neg()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    torch.testing.assert_close(model.head.weight, model.embed.weight, rtol=0, atol=0)
    untied = GraphLM(GraphTransformerConfig(**BASE, tie_weights=False))
    assert untied.head.weight is not untied.embed.weight
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in model.parameters()) + 20 * 16


def test_embedding_dropout_acts_on_the_input_embeddings():
    """``drop`` (the config's dropout) acts on the token plus position embeddings: in training mode
    with ``p`` set it changes the output, in evaluation mode it is the identity."""
    model = GraphLM(GraphTransformerConfig(**BASE, dropout=0.0, position="learned", max_positions=8)).eval()
    ids, ei, pos = torch.randint(0, 20, (6,)), causal(6), torch.arange(6)
    clean = model(ids, ei, pos=pos)
    model.drop.p = 0.5
    model.drop.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(ids, ei, pos=pos), clean)
    model.drop.eval()
    torch.testing.assert_close(model(ids, ei, pos=pos), clean)
