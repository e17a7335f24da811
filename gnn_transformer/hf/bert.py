r"""BERT on token graphs: :class:`GraphBertModel` and :func:`bert_state_dict`.

``BertModel`` (or any model with a BERT ``base_model``, whose task head is dropped) becomes word,
position and token-type embeddings, post-norm encoder layers (exact GELU) of
:mod:`gnn_transformer.layers` and the optional pooler; the token graph defaults to
``topology.full``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention import check_ids
from ..layers import GraphTransformerEncoder, GraphTransformerEncoderLayer, get_activation
from ._common import (GraphModelOutput, Topology, attention_weights, check_config, check_model, check_positions,
                      check_topology, dense_attentions, edges, flatten_inputs, resolve_topology, scatter_back)


class GraphBertEmbeddings(nn.Module):
    """BERT's embeddings on nodes: word + position + token type, then LayerNorm and dropout."""

    def __init__(self, config) -> None:
        super().__init__()
        # as Hugging Face: the row of pad_token_id gets no gradient
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=getattr(config, "pad_token_id", None))
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, pos: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        check_ids(input_ids, self.word_embeddings.num_embeddings, "input_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_ids(token_type_ids, self.token_type_embeddings.num_embeddings, "token_type_ids")
        h = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(pos))  # [N, C]
        return self.dropout(self.LayerNorm(h))


class GraphBertModel(nn.Module):
    r"""BERT on token graphs (post-norm encoder layers). Build with :meth:`from_hf` or :func:`from_hf`.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
    output_attentions=False, topology=None)`` -> :class:`GraphModelOutput` with
    ``last_hidden_state`` ``[B, T, C]`` (and ``pooler_output`` ``[B, C]``; with
    ``output_attentions``, ``edge_attentions``: per layer the graph and its weights ``[E, H]``, and
    ``attentions``: per layer ``[B, H, T, T]``, for small inputs, as Hugging Face's with zeros at
    padding); :meth:`forward_graph` is the graph-native path on nodes.

    ``pooler_output`` pools each sequence's first real token (zeros for a row of padding only).
    Hugging Face pools column 0: the same with right padding (BERT's convention), but in a
    left-padded row Hugging Face pools a padding position, which the graph never computes.
    """

    def __init__(self, config, *, add_pooling_layer: bool = True, topology: Topology | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        check_config(config, "bert", type(self))
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("Expected a BERT encoder config (got is_decoder / add_cross_attention)")
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"Expected position_embedding_type 'absolute' (got {position_type!r})")
        self.config = config
        self.topology = None if topology is None else check_topology(topology)
        self.embeddings = GraphBertEmbeddings(config)
        layer = GraphTransformerEncoderLayer(
            config.hidden_size, config.num_attention_heads, config.intermediate_size,
            dropout=config.hidden_dropout_prob, activation=get_activation(config.hidden_act),
            layer_norm_eps=config.layer_norm_eps, norm_first=False, backend=backend)
        layer.self_attn.dropout = config.attention_probs_dropout_prob
        layer.dropout.p = 0.0  # BertIntermediate has no dropout between activation and output.dense
        self.encoder = GraphTransformerEncoder(layer, config.num_hidden_layers)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None

    def forward_graph(self, input_ids: Tensor, edge_index: Tensor, *, pos: Tensor,
                      token_type_ids: Tensor | None = None, edge_bias: Tensor | None = None,
                      output_attentions: bool = False):
        """Token ids ``[N]``, graph ``[2, E]``, positions ``[N]`` -> hidden states ``[N, C]`` (and the
        attention weights ``[E, H]`` of every layer with ``output_attentions``)."""
        n = self.config.max_position_embeddings
        check_positions(pos, n, f"(check 'pos': max_position_embeddings={n})")
        h = self.embeddings(input_ids, pos, token_type_ids)
        if not output_attentions:
            return self.encoder(h, edge_index, edge_bias=edge_bias)
        with attention_weights(self.encoder) as weights:
            h = self.encoder(h, edge_index, edge_bias=edge_bias)
        return h, list(weights)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None, *,
                output_attentions: bool = False, topology: Topology | None = None) -> GraphModelOutput:
        mask, pos, lengths = flatten_inputs(input_ids, attention_mask, position_ids,
                                      self.embeddings.position_embeddings.num_embeddings)
        if token_type_ids is not None and (not isinstance(token_type_ids, Tensor)
                                           or token_type_ids.shape != input_ids.shape):
            got = (list(token_type_ids.shape) if isinstance(token_type_ids, Tensor)
                   else type(token_type_ids).__name__)
            raise ValueError(f"Expected 'token_type_ids' of the shape of 'input_ids', "
                             f"{list(input_ids.shape)} (got {got})")
        topology = resolve_topology(topology, self.topology, "full")
        edge_index = edges(topology, lengths, input_ids.device)
        types = None if token_type_ids is None else token_type_ids[mask]
        h = self.forward_graph(input_ids[mask], edge_index, pos=pos, token_type_ids=types,
                               output_attentions=output_attentions)
        h, weights = h if output_attentions else (h, None)
        out = GraphModelOutput(last_hidden_state=scatter_back(h, mask))
        if weights is not None:
            out.edge_attentions = tuple((edge_index, alpha) for alpha in weights)
            out.attentions = dense_attentions(out.edge_attentions, mask)
        if self.pooler is not None:  # tanh(W h) of each sequence's first real token; 0 if none
            counts = torch.tensor(lengths, dtype=torch.long, device=h.device)
            first = torch.where(counts > 0, counts.cumsum(0) - counts, h.size(0))  # node index
            first_h = torch.cat([h, h.new_zeros(1, h.size(1))])[first]  # row N: a zero vector
            out.pooler_output = torch.tanh(self.pooler(first_h)) * (counts > 0).unsqueeze(-1)
        return out

    @classmethod
    def from_hf(cls, model, *, topology: Topology | None = None, backend: str = "auto"):
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


def bert_state_dict(hf: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """A ``BertModel`` state dict in the parameter names of :class:`GraphBertModel`."""
    out = {k: v for k, v in hf.items() if k.startswith("embeddings.") and "position_ids" not in k
           and "token_type_ids" not in k}
    if "pooler.dense.weight" in hf:
        out["pooler.weight"], out["pooler.bias"] = hf["pooler.dense.weight"], hf["pooler.dense.bias"]
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"self_attn.in_proj_{kind}"] = torch.cat(
                [hf[src + f"attention.self.{name}.{kind}"] for name in ("query", "key", "value")])
            out[dst + f"self_attn.out_proj.{kind}"] = hf[src + f"attention.output.dense.{kind}"]
            out[dst + f"norm1.{kind}"] = hf[src + f"attention.output.LayerNorm.{kind}"]
            out[dst + f"linear1.{kind}"] = hf[src + f"intermediate.dense.{kind}"]
            out[dst + f"linear2.{kind}"] = hf[src + f"output.dense.{kind}"]
            out[dst + f"norm2.{kind}"] = hf[src + f"output.LayerNorm.{kind}"]
    return out


def bert_hf_state_dict(graph: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """The inverse of :func:`bert_state_dict`: a :class:`GraphBertModel` state dict in the names of
    ``BertModel``."""
    out = {k: v for k, v in graph.items() if k.startswith("embeddings.")}
    if "pooler.weight" in graph:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = graph["pooler.weight"], graph["pooler.bias"]
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            query, key, value = graph[src + f"self_attn.in_proj_{kind}"].chunk(3)
            for name, part in (("query", query), ("key", key), ("value", value)):
                out[dst + f"attention.self.{name}.{kind}"] = part
            out[dst + f"attention.output.dense.{kind}"] = graph[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"attention.output.LayerNorm.{kind}"] = graph[src + f"norm1.{kind}"]
            out[dst + f"intermediate.dense.{kind}"] = graph[src + f"linear1.{kind}"]
            out[dst + f"output.dense.{kind}"] = graph[src + f"linear2.{kind}"]
            out[dst + f"output.LayerNorm.{kind}"] = graph[src + f"norm2.{kind}"]
    return out


__all__ = ["GraphBertModel", "GraphBertEmbeddings", "bert_state_dict", "bert_hf_state_dict"]
