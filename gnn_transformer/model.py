r"""Whole models on token graphs.

- :class:`GraphTransformer` mirrors :class:`torch.nn.Transformer` (encoder-decoder with final norms,
  same constructor and parameter names: ``load_state_dict(nn.Transformer(...).state_dict())`` works).
- :class:`GraphEncoderModel` (one :class:`GraphTransformerConfig`): token ids or node features in,
  one vector per node out, through embeddings, positions, a stack of encoder layers and a head.
  Whether it is an encoder (BERT-like) or a decoder-only LM (GPT-like) is decided by the graph it
  is given (full or causal), not by the model.
- :class:`GraphLM`: a :class:`GraphEncoderModel` whose head predicts the next token, with tied
  embeddings; works with :func:`gnn_transformer.decoding.generate`.

Models take ``edge_index`` (and node positions ``pos``) from the caller: one graph (with
``edge_head`` for a per-head graph) or one per layer (a sequence, or a callable from layer index to
graph; :func:`gnn_transformer.layers.resolve_layer_graphs`). Building token graphs is the job of
:mod:`gnn_transformer.topology`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .attention import BACKENDS, GraphMultiheadAttention, check_bool, check_dropout, check_positive_int, embed_ids
from .layers import (
    GraphTransformerDecoder,
    GraphTransformerDecoderLayer,
    GraphTransformerEncoder,
    GraphTransformerEncoderLayer,
    EdgeSet,
    LayerBiases,
    LayerGraphs,
    check_layer_norm_eps,
    dropped,
    resolve_layer_biases,
    resolve_layer_graphs,
)
from .position import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding, alibi_edge_bias, alibi_slopes
from .topology import dynamic
from .variants import attention_class


def _named_graphs(
    graphs: LayerGraphs, edge_bias: LayerBiases, stack: nn.Module, prefix: str, edge_head: Tensor | None
) -> LayerGraphs:
    """``graphs`` and ``edge_bias`` checked under the model's argument names (``prefix_edge_index``,
    ``prefix_edge_bias``) for a stack with ``num_layers``: one graph as given, per-layer graphs
    resolved (a callable is called once per layer)."""
    num_layers = getattr(stack, "num_layers", None)
    if not isinstance(num_layers, int):  # a custom stack: it resolves (or refuses) what it is given
        return graphs
    resolved = resolve_layer_graphs(graphs, num_layers, f"{prefix}_edge_index", edge_head=edge_head)
    resolve_layer_biases(edge_bias, resolved, f"{prefix}_edge_bias")
    return graphs if isinstance(graphs, Tensor) or kernels.is_block_structure(graphs) else resolved


class GraphTransformer(nn.Module):
    r"""Encoder-decoder transformer on token graphs (``torch.nn.Transformer``).

    Args: as ``torch.nn.Transformer`` (``d_model=512, nhead=8, num_encoder_layers=6,
    num_decoder_layers=6, dim_feedforward=2048, dropout=0.1, activation=F.relu, custom_encoder=None,
    custom_decoder=None, layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True``);
    ``batch_first`` has no effect (node features have no batch dimension). Keyword-only ``backend``
    is passed to every attention layer.

    Example:
        >>> import torch
        >>> model = GraphTransformer(8, 2, 1, 1, 16, dropout=0.0, backend="pyg")
        >>> src_ei = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1]])        # 2 source tokens, full
        >>> tgt_ei = torch.tensor([[0, 0, 1], [0, 1, 1]])              # 2 target tokens, causal
        >>> mem_ei = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1]])        # source -> target
        >>> model(torch.randn(2, 8), torch.randn(2, 8), src_ei, tgt_ei, mem_ei).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        custom_encoder: nn.Module | None = None,
        custom_decoder: nn.Module | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_layer_norm_eps(layer_norm_eps)
        for name, value in (("batch_first", batch_first), ("norm_first", norm_first), ("bias", bias)):
            check_bool(name, value)
        for name, custom in (("custom_encoder", custom_encoder), ("custom_decoder", custom_decoder)):
            if custom is not None and not isinstance(custom, nn.Module):
                raise TypeError(f"Expected '{name}' to be None or an nn.Module (got {type(custom).__name__})")
        factory = {"device": device, "dtype": dtype}
        self.encoder: nn.Module
        self.decoder: nn.Module
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            encoder_layer = GraphTransformerEncoderLayer(
                d_model,
                nhead,
                dim_feedforward,
                dropout,
                activation,
                layer_norm_eps,
                batch_first,
                norm_first,
                bias,
                backend=backend,
                **factory,
            )
            norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
            self.encoder = GraphTransformerEncoder(encoder_layer, num_encoder_layers, norm)
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            decoder_layer = GraphTransformerDecoderLayer(
                d_model,
                nhead,
                dim_feedforward,
                dropout,
                activation,
                layer_norm_eps,
                batch_first,
                norm_first,
                bias,
                backend=backend,
                **factory,
            )
            norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
            self.decoder = GraphTransformerDecoder(decoder_layer, num_decoder_layers, norm)
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        for p in self.parameters():  # as nn.Transformer._reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_edge_index: LayerGraphs,
        tgt_edge_index: LayerGraphs,
        memory_edge_index: LayerGraphs,
        *,
        src_edge_bias: LayerBiases = None,
        tgt_edge_bias: LayerBiases = None,
        memory_edge_bias: LayerBiases = None,
        src_edge_head: Tensor | None = None,
        tgt_edge_head: Tensor | None = None,
        memory_edge_head: Tensor | None = None,
    ) -> Tensor:
        r"""Encode the source tokens, decode the target tokens.

        Every graph is one ``edge_index`` ``[2, E]`` (with its ``*_edge_head`` ``[E]`` for a
        per-head graph) or one graph per layer of its stack: a sequence, or a callable from layer
        index to graph, whose graphs are ``edge_index`` or ``(edge_index, edge_head)``
        (:func:`~gnn_transformer.layers.resolve_layer_graphs`).

        Args:
            src: source node features ``[N_src, C]``; tgt: target node features ``[N_tgt, C]``.
            src_edge_index: encoder self-attention graph (``src_mask`` + ``src_key_padding_mask``).
            tgt_edge_index: decoder self-attention graph (``tgt_mask`` + ``tgt_key_padding_mask``).
            memory_edge_index: bipartite source -> target graph (``memory_mask`` +
                ``memory_key_padding_mask``).
            src_edge_bias, tgt_edge_bias, memory_edge_bias: optional ``[E, H]`` score biases
                (``[E]`` too on a per-head graph), or one per layer
                (:func:`~gnn_transformer.layers.resolve_layer_biases`).
            src_edge_head, tgt_edge_head, memory_edge_head: ``[E]`` query head of each edge of a
                single ``*_edge_index`` (a per-head graph).

        Returns:
            ``[N_tgt, C]``.
        """
        src_edge_index = _named_graphs(src_edge_index, src_edge_bias, self.encoder, "src", src_edge_head)
        tgt_edge_index = _named_graphs(tgt_edge_index, tgt_edge_bias, self.decoder, "tgt", tgt_edge_head)
        memory_edge_index = _named_graphs(memory_edge_index, memory_edge_bias, self.decoder, "memory", memory_edge_head)
        # per-head keywords only when given: custom stacks that do not take them run on shared graphs
        src_heads = {} if src_edge_head is None else {"edge_head": src_edge_head}
        tgt_heads = {
            k: v for k, v in (("edge_head", tgt_edge_head), ("memory_edge_head", memory_edge_head)) if v is not None
        }
        memory = self.encoder(src, src_edge_index, edge_bias=src_edge_bias, **src_heads)
        return self.decoder(
            tgt,
            tgt_edge_index,
            memory,
            memory_edge_index,
            edge_bias=tgt_edge_bias,
            memory_edge_bias=memory_edge_bias,
            **tgt_heads,
        )


@dataclass
class GraphTransformerConfig:
    """Configuration of :class:`GraphEncoderModel` / :class:`GraphLM`."""

    vocab_size: int | None = None  # token ids in (None: float node features of size input_dim)
    input_dim: int | None = None  # node feature size when vocab_size is None
    output_dim: int | None = None  # head output size (None: hidden states; GraphLM: None or vocab_size)
    d_model: int = 128  # model width C
    nhead: int = 4  # attention heads H
    num_layers: int = 4  # encoder layers
    dim_feedforward: int | None = None  # feed-forward width (None: 4 * d_model)
    dropout: float = 0.0  # dropout everywhere (attention weights, residuals, embeddings)
    activation: str = "gelu"  # "relu", "gelu", "gelu_new", "silu"
    norm_first: bool = True  # pre-norm (GPT-2) or post-norm (BERT, original transformer)
    layer_norm_eps: float = 1e-5
    bias: bool = True  # biases in linear layers and layer norms
    position: str = "learned"  # "none", "learned", "sinusoidal", "rope" or "alibi"
    max_positions: int = 1024  # size of the learned position table
    rope_base: float = 10000.0  # RoPE frequency base
    num_kv_heads: int | None = None  # grouped-query attention (1: multi-query); None = nhead
    attention: str = "softmax"  # "softmax", "sigmoid", "linear" or "mlp" (MLP projections)
    kv_share_every: int = 1  # cross-layer KV sharing: only every k-th layer projects keys/values
    tie_weights: bool = True  # GraphLM: output head shares the token embedding
    backend: str = "auto"  # attention backend: one of attention.BACKENDS
    # graphs chosen from the data: a selector of topology.dynamic.selector ("topk:num_keys=64" or
    # {"name": "block_topk", "block_size": 64, "num_blocks": 8, "causal": True}); every layer picks
    # its per-head graph from its own queries and keys within the graph it is given. None: no choice
    select: str | dict[str, Any] | None = None


POSITIONS = ("none", "learned", "sinusoidal", "rope", "alibi")


def _check_config(c: GraphTransformerConfig) -> None:
    """``ValueError`` naming the first field of ``c`` with an invalid value."""
    if c.position not in POSITIONS:
        raise ValueError(f"Expected 'position' to be one of {POSITIONS} (got {c.position!r})")
    if c.select is not None:
        if c.position == "alibi":
            raise ValueError(
                f"Expected a 'position' other than 'alibi' with select={c.select!r} (ALiBi is an "
                "edge bias of the given graph; a selecting layer attends along its own choice)"
            )
        check_positive_int("nhead", c.nhead)
        dynamic.selector(c.select, num_heads=c.nhead, head_dim=max(c.d_model // c.nhead, 1))  # validates
    if (c.vocab_size is None) == (c.input_dim is None):
        raise ValueError(
            "Expected exactly one of 'vocab_size' and 'input_dim' (got "
            f"vocab_size={c.vocab_size!r}, input_dim={c.input_dim!r})"
        )
    for name in ("vocab_size", "input_dim", "output_dim", "dim_feedforward"):
        if getattr(c, name) is not None:
            check_positive_int(name, getattr(c, name))
    for name in ("d_model", "nhead", "max_positions"):
        check_positive_int(name, getattr(c, name))
    if isinstance(c.num_layers, bool) or not isinstance(c.num_layers, int) or c.num_layers < 0:
        raise ValueError(f"Expected 'num_layers' to be a non-negative int (got {c.num_layers!r})")
    check_dropout(c.dropout)
    for name in ("norm_first", "bias", "tie_weights"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"Expected '{name}' to be a bool (got {getattr(c, name)!r})")
    eps = c.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"Expected 'layer_norm_eps' to be a positive finite number (got {eps!r})")
    if c.attention == "linear" and c.position == "alibi":
        raise ValueError(
            "Expected a 'position' other than 'alibi' with attention='linear' (linear "
            "attention has no scores to add ALiBi's biases to; got position='alibi')"
        )
    if c.backend not in BACKENDS:
        raise ValueError(f"Expected 'backend' to be one of {BACKENDS} (got {c.backend!r})")
    score = getattr(attention_class(c.attention), "score_function", "softmax")
    if score != "softmax" and c.backend not in ("auto", "pyg"):
        raise ValueError(
            f"Expected 'backend' 'auto' or 'pyg' with attention={c.attention!r} (the "
            f"kernels compute softmax attention only; got backend={c.backend!r})"
        )
    if c.position == "sinusoidal" and c.d_model % 2:
        raise ValueError(f"Expected an even 'd_model' with position='sinusoidal' (got d_model={c.d_model})")


def _attention_factory(c: GraphTransformerConfig) -> Callable[..., GraphMultiheadAttention]:
    """The attention class of ``c``, with its selector when ``c.select`` is set (each layer's a copy:
    routing centroids are per layer)."""
    cls = attention_class(c.attention)
    if c.select is None:
        return cls
    return partial(cls, select=dynamic.selector(c.select, num_heads=c.nhead, head_dim=c.d_model // c.nhead))


def _alibi_biases(
    graphs: Sequence[tuple[EdgeSet, Tensor | None]],
    edge_bias: Sequence[Tensor | None],
    pos_src: Tensor,
    pos_dst: Tensor,
    slopes: Tensor,
) -> list[Tensor]:
    """ALiBi's bias on each layer's graph (``[E, H]``; ``[E]``, each edge's head's, on a per-head
    graph; once per distinct graph) plus that layer's ``edge_bias``."""
    alibi: dict[tuple[int, int], Tensor] = {}  # by graph: the graphs stay alive in `graphs`
    out = []
    for (edge_index, edge_head), bias in zip(graphs, edge_bias):
        if not isinstance(edge_index, Tensor):
            raise ValueError(
                "position='alibi' biases each edge by its distance: an implicit graph (a BlockGraph) "
                "has no edges to bias; pass the materialized graph, edge_index.edges()"
            )
        key = (id(edge_index), id(edge_head))
        if key not in alibi:
            if edge_head is None:
                alibi[key] = alibi_edge_bias(edge_index, pos_src, pos_dst, slopes)  # [E, H]
            else:  # the attention checks the heads; a clamped one gets a bias it never uses
                distance = alibi_edge_bias(edge_index, pos_src, pos_dst, slopes.new_ones(1))[:, 0]  # [E]
                alibi[key] = distance * slopes[edge_head.long().clamp(0, slopes.numel() - 1)]  # [E]
        value = alibi[key]
        if bias is not None:
            full = [edge_index.size(1), slopes.numel()]  # [E, H]
            shapes = [full] if edge_head is None else [full[:1], full]
            if list(bias.shape) not in shapes:
                want = " or ".join(map(str, shapes))
                raise ValueError(f"Expected 'edge_bias' to have shape {want} (got {list(bias.shape)})")
            value = bias + (value.unsqueeze(-1) if bias.dim() > value.dim() else value)  # [E, H] or [E]
        out.append(value)
    return out


class GraphEncoderModel(nn.Module):
    r"""Embeddings + positions + a stack of :class:`GraphTransformerEncoderLayer` + final norm + head.

    ``forward(x, edge_index, *, pos=None, edge_bias=None, cache=None, edge_head=None)
    -> [N, output_dim or C]``: ``x`` is token ids ``[N]`` (``vocab_size`` set) or node features
    ``[N, input_dim]``; ``edge_index`` one graph (``edge_head`` ``[E]`` for a per-head graph) or one
    per layer (a sequence, or a callable from layer index to graph:
    :func:`~gnn_transformer.layers.resolve_layer_graphs`); ``pos`` ``[N]`` node positions (needed
    unless ``position="none"``); ``edge_bias`` ``[E, H]`` (``[E]`` on a per-head graph) extra
    score biases, or one per layer (added to ALiBi's, which is computed on each layer's graph);
    ``cache`` a :class:`~gnn_transformer.decoding.KVCache` for incremental decoding (each layer's
    graph then runs from all cached plus new nodes to the new ones).

    Example:
        >>> import torch
        >>> cfg = GraphTransformerConfig(vocab_size=11, d_model=8, nhead=2, num_layers=1,
        ...                              backend="pyg")
        >>> model = GraphEncoderModel(cfg)
        >>> ei = torch.tensor([[0, 0, 1], [0, 1, 1]])
        >>> model(torch.tensor([3, 5]), ei, pos=torch.arange(2)).shape
        torch.Size([2, 8])
    """

    alibi_slopes: Tensor  # [H], a buffer registered with position="alibi" only

    def __init__(self, config: GraphTransformerConfig) -> None:
        super().__init__()
        c = config
        _check_config(c)
        self.config = c
        self.embed: nn.Embedding | nn.Linear
        if c.vocab_size is not None:
            self.embed = nn.Embedding(c.vocab_size, c.d_model)
        else:
            assert c.input_dim is not None  # _check_config: exactly one of vocab_size and input_dim
            self.embed = nn.Linear(c.input_dim, c.d_model, bias=c.bias)
        self.pos_embed: LearnedPositionalEmbedding | SinusoidalPositionalEmbedding | None
        if c.position == "learned":
            self.pos_embed = LearnedPositionalEmbedding(c.max_positions, c.d_model)
        elif c.position == "sinusoidal":
            self.pos_embed = SinusoidalPositionalEmbedding(c.d_model)
        else:
            self.pos_embed = None
        if c.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(c.nhead), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        layer = GraphTransformerEncoderLayer(
            c.d_model,
            c.nhead,
            4 * c.d_model if c.dim_feedforward is None else c.dim_feedforward,
            c.dropout,
            c.activation,
            c.layer_norm_eps,
            norm_first=c.norm_first,
            bias=c.bias,
            num_kv_heads=c.num_kv_heads,
            rope=c.position == "rope",
            rope_base=c.rope_base,
            attention=_attention_factory(c),
            backend=c.backend,
        )
        final_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias) if c.norm_first else None
        self.encoder = GraphTransformerEncoder(layer, c.num_layers, final_norm, kv_share_every=c.kv_share_every)
        self.head = self._make_head()

    def _make_head(self) -> nn.Module | None:
        c = self.config
        return None if c.output_dim is None else nn.Linear(c.d_model, c.output_dim, bias=c.bias)

    def embed_nodes(self, x: Tensor, pos: Tensor | None) -> Tensor:
        """Input embeddings ``[N, C]``: token (or feature) embedding plus absolute position."""
        c = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"Expected 'x' to be a tensor (got {type(x).__name__})")
        if c.vocab_size is not None and (x.dim() != 1 or x.is_floating_point()):
            raise ValueError(f"Expected 'x' to be token ids [N] (got {x.dtype} of shape {list(x.shape)})")
        if c.input_dim is not None and (x.dim() != 2 or x.size(1) != c.input_dim):
            raise ValueError(f"Expected 'x' to have shape [N, {c.input_dim}] (got {list(x.shape)})")
        if isinstance(self.embed, nn.Embedding):  # vocab_size: token ids
            h = embed_ids(self.embed, x, "x")  # [N, C]
        else:
            h = self.embed(x)  # [N, C]
        if c.position != "none" and (not isinstance(pos, Tensor) or pos.shape != (x.size(0),)):
            got = list(pos.shape) if isinstance(pos, Tensor) else pos
            raise ValueError(
                f"Expected 'pos' with one position per node, shape [{x.size(0)}] (got {got}); position={c.position!r}"
            )
        if isinstance(self.pos_embed, SinusoidalPositionalEmbedding):  # position="sinusoidal"
            h = h + self.pos_embed(pos, h.dtype)
        elif self.pos_embed is not None:  # position="learned"
            h = h + self.pos_embed(pos)
        return dropped(self.drop, h)

    def forward(
        self,
        x: Tensor,
        edge_index: LayerGraphs,
        *,
        pos: Tensor | None = None,
        edge_bias: LayerBiases = None,
        cache=None,
        edge_head: Tensor | None = None,
    ) -> Tensor:
        h = self.embed_nodes(x, pos)
        # a KVCache registers the step's nodes (add_nodes) before the model runs; ALiBi reads their
        # positions first, the layers' KVCache.update checks the count of every layer's keys
        cached_pos = getattr(cache, "pos", None)  # (h2o's caches keep their own positions)
        if (cached_pos is not None or (cache is not None and self.config.position == "alibi")) and (
            cached_pos is None or cached_pos.numel() < h.size(0)
        ):
            raise ValueError(
                f"Expected the {h.size(0)} new nodes registered last in 'cache' (its add_nodes) "
                f"(got {0 if cached_pos is None else cached_pos.numel()} registered in all)"
            )
        if self.config.position == "alibi":
            assert pos is not None  # embed_nodes refuses a missing 'pos' unless position="none"
            graphs = resolve_layer_graphs(edge_index, self.config.num_layers, "edge_index", edge_head=edge_head)
            biases = resolve_layer_biases(edge_bias, graphs, "edge_bias")
            pos_src = pos if cache is None else cache.pos  # cache.pos: cached + new nodes
            edge_bias = _alibi_biases(graphs, biases, pos_src, pos, self.alibi_slopes.to(h.dtype))
            if not isinstance(edge_index, Tensor) and not kernels.is_block_structure(edge_index):
                # a callable is called once per layer and forward
                edge_index = graphs
        layer_pos = pos if self.config.position == "rope" else None  # the layers read positions only for RoPE
        h = self.encoder(h, edge_index, edge_bias=edge_bias, pos=layer_pos, cache=cache, edge_head=edge_head)
        return h if self.head is None else self.head(h)

    def forward_graph(
        self,
        x: Tensor,
        edge_index: LayerGraphs,
        *,
        pos: Tensor | None = None,
        cache=None,
        edge_head: Tensor | None = None,
    ) -> Tensor:
        """``forward`` under the name :func:`gnn_transformer.decoding.generate` calls."""
        return self(x, edge_index, pos=pos, cache=cache, edge_head=edge_head)


class GraphLM(GraphEncoderModel):
    """A language model on token graphs: :class:`GraphEncoderModel` with a next-token head.

    Given a causal graph it is a GPT-style decoder-only model (``forward`` returns logits
    ``[N, vocab_size]``); :func:`gnn_transformer.decoding.generate` samples from it with a key/value
    cache. ``tie_weights`` shares the head with the token embedding. The head's size is
    ``vocab_size`` (``output_dim`` must be ``None`` or equal to it).
    """

    def __init__(self, config: GraphTransformerConfig) -> None:
        if config.vocab_size is None:
            raise ValueError("Expected 'vocab_size' in the config of a GraphLM (got None)")
        if config.output_dim is not None and config.output_dim != config.vocab_size:
            raise ValueError(
                "Expected 'output_dim' None or equal to 'vocab_size' in the config of a "
                f"GraphLM (its head predicts tokens; got output_dim={config.output_dim!r},"
                f" vocab_size={config.vocab_size!r})"
            )
        super().__init__(config)

    def _make_head(self) -> nn.Module:
        c = self.config
        assert c.vocab_size is not None  # checked by __init__
        head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_weights:
            head.weight = self.embed.weight
        return head


__all__ = ["GraphTransformer", "GraphTransformerConfig", "GraphEncoderModel", "GraphLM"]
