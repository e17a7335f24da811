r"""BERT on token graphs: :class:`GraphBertModel` and :func:`bert_state_dict`.

``BertModel`` (or any model with a BERT ``base_model``, whose task head is dropped) becomes word,
position and token-type embeddings, post-norm encoder layers (exact GELU) of
:mod:`gnn_transformer.layers` and the optional pooler; the token graph defaults to
``topology.full``.

Notation: ``N`` nodes, ``E`` edges, ``C`` hidden size, ``H`` heads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention import check_ids
from ..layers import GraphTransformerEncoder, GraphTransformerEncoderLayer, get_activation
from ._common import (
    GraphModelOutput,
    Renaming,
    Topologies,
    attention_weights,
    check_config,
    check_model,
    check_positions,
    check_topologies,
    default_topology,
    dense_attentions,
    flatten_inputs,
    hf_state_dict,
    layer_edges,
    renamed_state_dict,
    resolve_topologies,
    scatter_back,
)


class GraphBertEmbeddings(nn.Module):
    """BERT's embeddings on nodes: word + position + token type, then LayerNorm and dropout."""

    def __init__(self, config) -> None:
        super().__init__()
        # as Hugging Face: the row of pad_token_id gets no gradient
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=getattr(config, "pad_token_id", None)
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, pos: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        check_ids(input_ids, self.word_embeddings.num_embeddings, "input_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_ids(token_type_ids, self.token_type_embeddings.num_embeddings, "token_type_ids")
        h = (
            self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + self.position_embeddings(pos)
        )  # [N, C]
        return self.dropout(self.LayerNorm(h))


class GraphBertModel(nn.Module):
    r"""BERT on token graphs (post-norm encoder layers). Build with :meth:`from_hf` or :func:`from_hf`.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
    output_attentions=False, topology=None)`` -> :class:`GraphModelOutput` with
    ``last_hidden_state`` ``[B, T, C]`` (and ``pooler_output`` ``[B, C]``; with
    ``output_attentions``, ``edge_attentions``: per layer the graph and its weights ``[E, H]``
    (``[E]`` on a per-head graph), and ``attentions``: per layer ``[B, H, T, T]``, for small inputs,
    as Hugging Face's with zeros at padding); :meth:`forward_graph` is the graph-native path on nodes.

    ``topology`` (constructor: the model's default; ``forward``: this call's) replaces the full
    graph: a callable ``lengths -> edge_index`` or ``lengths -> (edge_index, edge_head)`` (a
    per-head graph for the model's heads) for every layer, or a sequence of one such callable (or
    ``None``: full attention) per layer.

    ``pooler_output`` pools each sequence's first real token (zeros for a row of padding only).
    Hugging Face pools column 0: the same with right padding (BERT's convention), but in a
    left-padded row Hugging Face pools a padding position, which the graph never computes.
    """

    def __init__(
        self, config, *, add_pooling_layer: bool = True, topology: Topologies | None = None, backend: str = "auto"
    ) -> None:
        super().__init__()
        check_config(config, "bert", type(self))
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("Expected a BERT encoder config (got is_decoder / add_cross_attention)")
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"Expected position_embedding_type 'absolute' (got {position_type!r})")
        self.config = config
        self.topology = None if topology is None else check_topologies(topology, config.num_hidden_layers)
        self.embeddings = GraphBertEmbeddings(config)
        layer = GraphTransformerEncoderLayer(
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            dropout=config.hidden_dropout_prob,
            activation=get_activation(config.hidden_act),
            layer_norm_eps=config.layer_norm_eps,
            norm_first=False,
            backend=backend,
        )
        layer.self_attn.dropout = config.attention_probs_dropout_prob
        layer.dropout.p = 0.0  # BertIntermediate has no dropout between activation and output.dense
        self.encoder = GraphTransformerEncoder(layer, config.num_hidden_layers)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None

    def forward_graph(
        self,
        input_ids: Tensor,
        edge_index,
        *,
        pos: Tensor,
        token_type_ids: Tensor | None = None,
        edge_bias=None,
        edge_head: Tensor | None = None,
        output_attentions: bool = False,
    ):
        """Token ids ``[N]``, the graph of every layer (one ``edge_index`` ``[2, E]``, with
        ``edge_head`` ``[E]`` for a per-head one, or one graph per layer:
        :func:`gnn_transformer.layers.resolve_layer_graphs`), positions ``[N]`` -> hidden states
        ``[N, C]`` (and the attention weights ``[E, H]``, ``[E]`` on a per-head graph, of every layer
        with ``output_attentions``)."""
        n = self.config.max_position_embeddings
        check_positions(pos, n, f"(check 'pos': max_position_embeddings={n})")
        h = self.embeddings(input_ids, pos, token_type_ids)
        if not output_attentions:
            return self.encoder(h, edge_index, edge_bias=edge_bias, edge_head=edge_head)
        with attention_weights(self.encoder) as weights:
            h = self.encoder(h, edge_index, edge_bias=edge_bias, edge_head=edge_head)
        return h, list(weights)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        output_attentions: bool = False,
        topology: Topologies | None = None,
    ) -> GraphModelOutput:
        mask, pos, lengths = flatten_inputs(
            input_ids, attention_mask, position_ids, self.embeddings.position_embeddings.num_embeddings
        )
        if token_type_ids is not None and (
            not isinstance(token_type_ids, Tensor) or token_type_ids.shape != input_ids.shape
        ):
            got = list(token_type_ids.shape) if isinstance(token_type_ids, Tensor) else type(token_type_ids).__name__
            raise ValueError(
                f"Expected 'token_type_ids' of the shape of 'input_ids', {list(input_ids.shape)} (got {got})"
            )
        num_layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        topology = resolve_topologies(topology, self.topology, num_layers)
        graphs = layer_edges(topology, [default_topology("full")] * num_layers, lengths, input_ids.device, heads)
        types = None if token_type_ids is None else token_type_ids[mask]
        h = self.forward_graph(
            input_ids[mask], graphs, pos=pos, token_type_ids=types, output_attentions=output_attentions
        )
        h, weights = h if output_attentions else (h, None)
        out = GraphModelOutput(last_hidden_state=scatter_back(h, mask))
        if weights is not None:
            out.edge_attentions = tuple(zip(graphs, weights))
            out.attentions = dense_attentions(out.edge_attentions, mask, heads)
        if self.pooler is not None:  # tanh(W h) of each sequence's first real token; 0 if none
            counts = torch.tensor(lengths, dtype=torch.long, device=h.device)
            first = torch.where(counts > 0, counts.cumsum(0) - counts, h.size(0))  # node index
            first_h = torch.cat([h, h.new_zeros(1, h.size(1))])[first]  # row N: a zero vector
            out.pooler_output = torch.tanh(self.pooler(first_h)) * (counts > 0).unsqueeze(-1)
        return out

    @classmethod
    def from_hf(cls, model, *, topology: Topologies | None = None, backend: str = "auto"):
        """A graph model with the weights of a Hugging Face BERT model (``BertModel`` or a model
        whose ``base_model`` is one: its task head, e.g. ``classifier`` or ``cls``, is not
        imported; the pooler is, when the base model has one)."""
        check_model(model, "bert", cls)
        base = getattr(model, "base_model", model)
        config = base.config
        pooler = getattr(base, "pooler", None)
        graph = cls(config, add_pooling_layer=pooler is not None, topology=topology, backend=backend)
        source = next(base.parameters())
        graph.to(device=source.device, dtype=source.dtype)
        graph.load_state_dict(bert_state_dict(base.state_dict(), config.num_hidden_layers))
        return graph.train(base.training)


def bert_renaming(num_layers: int, pooler: bool = True) -> Renaming:
    """Every :class:`GraphBertModel` parameter and the ``BertModel`` keys it comes from (query, key
    and value concatenated into ``in_proj``)."""
    table: Renaming = [
        (f"embeddings.{name}", (f"embeddings.{name}",), False)
        for name in (
            "word_embeddings.weight",
            "position_embeddings.weight",
            "token_type_embeddings.weight",
            "LayerNorm.weight",
            "LayerNorm.bias",
        )
    ]
    if pooler:
        table += [(f"pooler.{kind}", (f"pooler.dense.{kind}",), False) for kind in ("weight", "bias")]
    names = {
        "self_attn.out_proj": "attention.output.dense",
        "norm1": "attention.output.LayerNorm",
        "linear1": "intermediate.dense",
        "linear2": "output.dense",
        "norm2": "output.LayerNorm",
    }
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            table.append(
                (
                    dst + f"self_attn.in_proj_{kind}",
                    tuple(src + f"attention.self.{name}.{kind}" for name in ("query", "key", "value")),
                    False,
                )
            )
            table += [(dst + f"{graph}.{kind}", (src + f"{hf}.{kind}",), False) for graph, hf in names.items()]
    return table


def bert_state_dict(hf: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """A ``BertModel`` state dict in the parameter names of :class:`GraphBertModel`."""
    return renamed_state_dict(hf, bert_renaming(num_layers, "pooler.dense.weight" in hf))


def bert_hf_state_dict(graph: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """The inverse of :func:`bert_state_dict`: a :class:`GraphBertModel` state dict in the names of
    ``BertModel``."""
    return hf_state_dict(graph, bert_renaming(num_layers, "pooler.weight" in graph))


__all__ = ["GraphBertModel", "GraphBertEmbeddings", "bert_state_dict", "bert_hf_state_dict"]
