r"""Transformer encoder and decoder layers on token graphs, weight-compatible with ``torch.nn``.

:class:`GraphTransformerEncoderLayer` and :class:`GraphTransformerDecoderLayer` take the constructor
arguments of :class:`torch.nn.TransformerEncoderLayer` / :class:`~torch.nn.TransformerDecoderLayer`
and have the same parameter names (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``,
``norm1``, ``norm2``, ``norm3``), so ``load_state_dict`` works in both directions. Where ``torch.nn``
takes a padded batch and masks, these take node features and the edges of the token graph:

- self-attention: ``edge_index`` ``[2, E]`` on the ``N`` tokens (``j -> i``: ``i`` attends to ``j``);
- cross-attention (decoder): ``memory_edge_index`` from the ``N_mem`` encoder tokens (sources) to
  the ``N`` decoder tokens (targets), a bipartite graph;
- a per-head graph: ``edge_index`` with ``edge_head`` ``[E]`` (``memory_edge_head`` for the
  cross-attention), edge ``j -> i`` for query head ``edge_head[e]`` only.

The stacks take one graph for every layer, or one per layer: a sequence, or a callable from layer
index to graph (:func:`resolve_layer_graphs`); score biases follow (:func:`resolve_layer_biases`).

A padded batch with masks is one disjoint-union graph without the padding: the output at every
real token equals ``torch.nn``'s (``tests/test_layers.py``).

Notation: ``N`` tokens, ``E`` edges, ``C`` = ``d_model``, ``H`` heads, ``H_kv`` key/value heads,
``D`` head dimension.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .attention import GraphMultiheadAttention, check_bool, check_dropout, check_positive_int, check_real

KV = tuple[Tensor, Tensor]
# an edge set: edge_index [2, E], or an implicit graph (topology.BlockGraph: tiles, no edge list)
EdgeSet = Tensor | kernels.BlockStructure
# one layer's graph: an edge set, or a pair (edge set, edge_head [E] or None): a per-head graph
Graph = EdgeSet | tuple[EdgeSet, Tensor | None]
# the graphs of a stack: one edge set for every layer, one graph per layer, or layer index -> graph
LayerGraphs = EdgeSet | Sequence[Graph] | Callable[[int], Graph]
# the score biases of a stack: none, one [E, H] (or [E]) for every layer, or one (or None) per layer
LayerBiases = Tensor | Sequence[Tensor | None] | None


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (GPT-2's ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "silu": F.silu,
}


def get_activation(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """An activation function by name (``"relu"``, ``"gelu"``, ``"gelu_new"``, ...) or as given."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Expected 'activation' to be one of {sorted(ACTIVATIONS)} or a callable (got {activation!r})"
            )
        return ACTIVATIONS[activation]
    if not callable(activation):
        raise ValueError(f"Expected 'activation' to be a string or a callable (got {activation!r})")
    return activation


def check_layer_norm_eps(value: object, name: str = "layer_norm_eps") -> float:
    """``value`` if it is a positive finite number, else a ``ValueError`` naming ``name``."""
    return check_real(name, value, low=0.0, low_open=True)


def _check_args(
    d_model: int,
    nhead: int,
    dim_feedforward: int,
    dropout: float,
    activation,
    layer_norm_eps: float,
    batch_first: bool,
    norm_first: bool,
    bias: bool,
    attention,
) -> None:
    """``ValueError`` naming the first constructor argument of a layer with an invalid value."""
    for name, value in (("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
        check_positive_int(name, value)
    check_dropout(dropout)
    get_activation(activation)
    check_layer_norm_eps(layer_norm_eps)
    for name, value in (("batch_first", batch_first), ("norm_first", norm_first), ("bias", bias)):
        check_bool(name, value)
    if not callable(attention):
        raise ValueError(f"Expected 'attention' to be an attention class (got {attention!r})")


def dropped(dropout: nn.Module, x: Tensor) -> Tensor:
    """``dropout(x)``, or ``x`` itself without calling the module where it is a plain ``nn.Dropout``
    that is the identity (``p`` 0, or evaluation mode; forward hooks on it then do not run). Any
    other module put in its place (a subclass, ``nn.Identity``, a custom dropout) is called."""
    if type(dropout) is nn.Dropout and (dropout.p == 0 or not dropout.training):
        return x
    return dropout(x)


class _FeedForward(nn.Module):
    """Shared constructor pieces of both layers (the feed-forward block, norms, dropouts)."""

    linear1: nn.Linear
    dropout: nn.Dropout
    linear2: nn.Linear
    norm_first: bool
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm
    dropout1: nn.Dropout
    dropout2: nn.Dropout
    activation: Callable[[Tensor], Tensor]

    def _build_feedforward(
        self, d_model, dim_feedforward, dropout, activation, layer_norm_eps, bias, norm_first, num_norms, factory
    ) -> None:
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        for k in range(1, num_norms + 1):
            setattr(self, f"norm{k}", nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory))
            setattr(self, f"dropout{k}", nn.Dropout(dropout))
        self.activation = get_activation(activation)

    def _ff(self, x: Tensor) -> Tensor:
        return self.linear2(dropped(self.dropout, self.activation(self.linear1(x))))


class GraphTransformerEncoderLayer(_FeedForward):
    r"""Self-attention on a token graph followed by a feed-forward block (``nn.TransformerEncoderLayer``).

    Post-norm (``norm_first=False``): ``x = norm1(x + SA(x)); x = norm2(x + FF(x))``.
    Pre-norm (``norm_first=True``): ``x = x + SA(norm1(x)); x = x + FF(norm2(x))``.
    ``SA`` is :class:`~gnn_transformer.GraphMultiheadAttention` along ``edge_index``.

    Args:
        d_model, nhead, dim_feedforward (``2048``), dropout (``0.1``), activation (``F.relu``; a
            name or a callable), layer_norm_eps (``1e-5``), norm_first (``False``), bias (``True``):
            as in ``torch.nn.TransformerEncoderLayer``.
        batch_first: accepted for signature compatibility; node features have no batch dimension.
        num_kv_heads: key/value heads of the self-attention (grouped-query attention).
        rope: rotary position embedding in the self-attention (``forward`` then needs ``pos``).
        rope_base: base of the rotary frequencies.
        attention: the attention class (default :class:`GraphMultiheadAttention`; see
            :mod:`gnn_transformer.variants` for sigmoid, linear and MLP-projection attention), called
            as ``attention(d_model, nhead, dropout=, bias=, num_kv_heads=, backend=, rope=,
            rope_base=, device=, dtype=)``.
        backend: attention backend (``"auto"``, ``"pyg"``, ``"fused"``, ``"tiled"``).

    Example:
        >>> import torch
        >>> layer = GraphTransformerEncoderLayer(8, 2, 16, dropout=0.0, backend="pyg")
        >>> edge_index = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]])
        >>> layer(torch.randn(3, 8), edge_index).shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        num_kv_heads: int | None = None,
        rope: bool = False,
        rope_base: float = 10000.0,
        attention: Callable[..., GraphMultiheadAttention] = GraphMultiheadAttention,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_args(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            attention,
        )
        factory = {"device": device, "dtype": dtype}
        self.self_attn = attention(
            d_model,
            nhead,
            dropout=dropout,
            bias=bias,
            num_kv_heads=num_kv_heads,
            backend=backend,
            rope=rope,
            rope_base=rope_base,
            **factory,
        )
        self._build_feedforward(
            d_model, dim_feedforward, dropout, activation, layer_norm_eps, bias, norm_first, 2, factory
        )

    def self_kv(self, x: Tensor, *, pos: Tensor | None = None) -> KV:
        """The keys and values ``[N, H_kv, D]`` this layer's self-attention computes from ``x``."""
        return self.self_attn.key_value(self.norm1(x) if self.norm_first else x, pos=pos)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        *,
        edge_bias: Tensor | None = None,
        pos: Tensor | None = None,
        kv: KV | None = None,
        edge_head: Tensor | None = None,
    ) -> Tensor:
        r"""Apply the layer to node features.

        Args:
            x: node features ``[N, C]`` (query nodes only when ``kv`` is given).
            edge_index: self-attention graph ``[2, E]`` (``j -> i``); with ``kv`` its sources index
                the rows of ``kv``.
            edge_bias: ``[E, H]`` added to the attention scores (ALiBi, graph biases); with
                ``edge_head`` also ``[E]`` (each edge's bias for its head).
            pos: node positions ``[N]`` for RoPE.
            kv: keys and values of the sources, e.g. from an earlier layer (cross-layer sharing)
                or a cache (:mod:`gnn_transformer.decoding`).
            edge_head: ``[E]`` query head of each edge, values in ``[0, H)``: a per-head graph
                (``None``: every head sees every edge).

        Returns:
            ``[N, C]``.
        """
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), edge_index, edge_bias, pos, kv, edge_head)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, edge_index, edge_bias, pos, kv, edge_head))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, edge_index, edge_bias, pos, kv, edge_head) -> Tensor:
        out = self.self_attn(x, edge_index, edge_bias=edge_bias, pos=pos, kv=kv, edge_head=edge_head)
        return dropped(self.dropout1, out)

    def _ff_block(self, x: Tensor) -> Tensor:
        return dropped(self.dropout2, self._ff(x))


class GraphTransformerDecoderLayer(_FeedForward):
    r"""Self-attention, cross-attention to encoder tokens, feed-forward (``nn.TransformerDecoderLayer``).

    Post-norm: ``x = norm1(x + SA(x)); x = norm2(x + CA(x, memory)); x = norm3(x + FF(x))``.
    Pre-norm: ``x = x + SA(norm1(x)); x = x + CA(norm2(x), memory); x = x + FF(norm3(x))``.
    ``CA`` attends along ``memory_edge_index``, a bipartite graph from the encoder tokens (sources)
    to the decoder tokens (targets). Arguments as in :class:`GraphTransformerEncoderLayer`; RoPE,
    ``num_kv_heads`` and ``attention`` apply to the self-attention only.

    Example:
        >>> import torch
        >>> layer = GraphTransformerDecoderLayer(8, 2, 16, dropout=0.0, backend="pyg")
        >>> causal = torch.tensor([[0, 0, 1], [0, 1, 1]])           # 2 decoder tokens
        >>> cross = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]])  # 3 encoder tokens
        >>> layer(torch.randn(2, 8), causal, torch.randn(3, 8), cross).shape
        torch.Size([2, 8])
    """

    norm3: nn.LayerNorm
    dropout3: nn.Dropout

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        num_kv_heads: int | None = None,
        rope: bool = False,
        rope_base: float = 10000.0,
        attention: Callable[..., GraphMultiheadAttention] = GraphMultiheadAttention,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_args(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            attention,
        )
        factory = {"device": device, "dtype": dtype}
        self.self_attn = attention(
            d_model,
            nhead,
            dropout=dropout,
            bias=bias,
            num_kv_heads=num_kv_heads,
            backend=backend,
            rope=rope,
            rope_base=rope_base,
            **factory,
        )
        self.multihead_attn = GraphMultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, backend=backend, **factory
        )
        self._build_feedforward(
            d_model, dim_feedforward, dropout, activation, layer_norm_eps, bias, norm_first, 3, factory
        )

    def self_kv(self, x: Tensor, *, pos: Tensor | None = None) -> KV:
        """The keys and values ``[N, H_kv, D]`` this layer's self-attention computes from ``x``."""
        return self.self_attn.key_value(self.norm1(x) if self.norm_first else x, pos=pos)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        memory: Tensor,
        memory_edge_index: Tensor,
        *,
        edge_bias: Tensor | None = None,
        memory_edge_bias: Tensor | None = None,
        pos: Tensor | None = None,
        kv: KV | None = None,
        edge_head: Tensor | None = None,
        memory_edge_head: Tensor | None = None,
    ) -> Tensor:
        r"""Apply the layer.

        Args:
            x: decoder node features ``[N, C]``.
            edge_index: decoder self-attention graph ``[2, E]`` on the ``N`` decoder nodes.
            memory: encoder outputs ``[N_mem, C]``.
            memory_edge_index: cross-attention graph ``[2, E_mem]``, row 0 indexes ``memory``,
                row 1 the decoder nodes.
            edge_bias, memory_edge_bias: ``[E, H]`` / ``[E_mem, H]`` score biases (``[E]`` /
                ``[E_mem]`` too on a per-head graph).
            pos: decoder node positions ``[N]`` for RoPE.
            kv: precomputed self-attention keys and values (see the encoder layer).
            edge_head, memory_edge_head: ``[E]`` / ``[E_mem]`` query head of each edge of the
                self- / cross-attention graph (per-head graphs; ``None``: every head sees every edge).

        Returns:
            ``[N, C]``.
        """
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), edge_index, edge_bias, pos, kv, edge_head)
            x = x + self._mha_block(self.norm2(x), memory, memory_edge_index, memory_edge_bias, memory_edge_head)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, edge_index, edge_bias, pos, kv, edge_head))
            x = self.norm2(x + self._mha_block(x, memory, memory_edge_index, memory_edge_bias, memory_edge_head))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x, edge_index, edge_bias, pos, kv, edge_head) -> Tensor:
        out = self.self_attn(x, edge_index, edge_bias=edge_bias, pos=pos, kv=kv, edge_head=edge_head)
        return dropped(self.dropout1, out)

    def _mha_block(self, x, memory, memory_edge_index, memory_edge_bias, memory_edge_head) -> Tensor:
        out = self.multihead_attn(
            (memory, x), memory_edge_index, edge_bias=memory_edge_bias, edge_head=memory_edge_head
        )
        return dropped(self.dropout2, out)

    def _ff_block(self, x: Tensor) -> Tensor:
        return dropped(self.dropout3, self._ff(x))


def _describe(value: object) -> str:
    """A value as an error message shows it: a tensor's shape and dtype, a sequence's length, a
    number or string itself, else its type."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return type(value).__name__


def _check_graph(edge_index: object, edge_head: object, index_name: str, head_name: str) -> None:
    """The shapes of one graph: ``edge_index`` ``[2, E]`` (or an implicit graph, a ``BlockGraph``),
    ``edge_head`` ``None`` or integer ``[E]``."""
    if kernels.is_block_structure(edge_index):
        if edge_head is not None:
            raise ValueError(
                f"Expected no '{head_name}' with a BlockGraph in '{index_name}': a per-head "
                "BlockGraph carries the head of each tile itself"
            )
        return
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.size(0) != 2:
        hint = ""
        if isinstance(edge_index, Tensor) and edge_index.dim() == 1:
            hint = (
                "; a per-head graph for every layer is edge_index=..., edge_head=..., per-layer "
                "per-head graphs are pairs (edge_index, edge_head)"
            )
        raise ValueError(
            f"Expected '{index_name}' to be an edge_index of shape [2, E] (got {_describe(edge_index)}){hint}"
        )
    if edge_head is not None:
        num_edges = edge_index.size(1)
        if (
            not isinstance(edge_head, Tensor)
            or edge_head.dim() != 1
            or edge_head.size(0) != num_edges
            or edge_head.is_floating_point()
            or edge_head.is_complex()
            or edge_head.dtype == torch.bool
        ):
            raise ValueError(
                f"Expected '{head_name}' to be an integer edge_head of shape [{num_edges}], one "
                f"query head per edge of '{index_name}' (got {_describe(edge_head)})"
            )


def _layer_graph(label: str, graph: object) -> tuple[EdgeSet, Tensor | None]:
    """``(edge_index, edge_head)`` of one entry of per-layer graphs, shapes checked."""
    if isinstance(graph, Tensor) or kernels.is_block_structure(graph):
        _check_graph(graph, None, label, "")
        return graph, None
    if not isinstance(graph, (tuple, list)) or len(graph) != 2:
        raise ValueError(
            f"Expected '{label}' to be a graph: an edge_index [2, E] or a pair "
            f"(edge_index, edge_head) (got {_describe(graph)})"
        )
    edge_index, edge_head = graph
    _check_graph(edge_index, edge_head, f"{label}[0]", f"{label}[1]")
    return edge_index, edge_head


def resolve_layer_graphs(
    graphs: LayerGraphs, num_layers: int, name: str = "edge_index", *, edge_head: Tensor | None = None
) -> list[tuple[EdgeSet, Tensor | None]]:
    r"""The graph of every layer of a stack: ``num_layers`` pairs ``(edge_index, edge_head)``.

    ``graphs`` is either

    - one graph for every layer: an ``edge_index`` ``[2, E]`` (plain tensor or
      ``torch_geometric.EdgeIndex``), with ``edge_head`` ``[E]`` for a per-head graph, or an
      implicit graph (a :class:`~gnn_transformer.topology.BlockGraph`); every pair holds these same
      objects, so what the kernels cache per graph serves every layer;
    - a sequence of exactly ``num_layers`` graphs, layer ``l`` attending along ``graphs[l]``;
    - a callable ``layer_index -> graph``, called once per layer, in order.

    A graph of a sequence or a callable is an ``edge_index`` ``[2, E]`` or a pair
    ``(edge_index, edge_head)``: a per-head graph, edge ``j -> i`` for query head ``edge_head[e]``
    only (``edge_head`` ``None``: every head). Shapes are checked here; node and head ranges by the
    attention layers.

    Args:
        graphs: one ``edge_index``, a sequence of graphs or a callable, as above.
        num_layers: the number of layers ``L``.
        name: the argument's name in error messages (``"edge_index"``, ``"memory_edge_index"``);
            an entry is named ``name[l]`` (sequence) or ``name(l)`` (what the callable returned).
        edge_head: the query head of every edge of a single ``edge_index`` (``None``: every head
            sees every edge). Not with a sequence or a callable: their per-head graphs are pairs.
            Named in errors as ``name`` with ``edge_index`` replaced by ``edge_head``.

    Returns:
        ``[(edge_index, edge_head or None)] * L``, one pair per layer.

    Raises:
        ValueError: naming ``name`` and the value: a sequence of another length than ``L``, an
            entry that is no graph, an ``edge_head`` of the wrong shape, ``edge_head`` with
            per-layer graphs.

    Example:
        >>> from gnn_transformer.topology import causal, sliding_window
        >>> graphs = resolve_layer_graphs(
        ...     lambda l: causal(4) if l % 3 == 2 else sliding_window(4, 1, causal=True), 3)
        >>> [edge_index.size(1) for edge_index, _ in graphs]   # a window, a window, full causal
        [7, 7, 10]
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"Expected 'num_layers' to be a non-negative int (got {num_layers!r})")
    head_name = name.replace("edge_index", "edge_head")
    if isinstance(graphs, Tensor) or kernels.is_block_structure(graphs):
        _check_graph(graphs, edge_head, name, head_name)
        return [(graphs, edge_head)] * num_layers
    if edge_head is not None:
        raise ValueError(
            f"Expected '{head_name}' only with one graph in '{name}' (an edge_index tensor); "
            f"per-layer per-head graphs are pairs (edge_index, edge_head) in '{name}' (got "
            f"'{head_name}' and {_describe(graphs)} in '{name}')"
        )
    if callable(graphs):
        return [_layer_graph(f"{name}({index})", graphs(index)) for index in range(num_layers)]
    if isinstance(graphs, (str, bytes)) or not isinstance(graphs, Sequence):
        raise ValueError(
            f"Expected '{name}' to be an edge_index tensor [2, E], a sequence of one graph "
            f"per layer or a callable from layer index to graph (got {_describe(graphs)})"
        )
    if len(graphs) != num_layers:
        raise ValueError(
            f"Expected '{name}' to hold one graph per layer, {num_layers} (got a sequence of length {len(graphs)})"
        )
    return [_layer_graph(f"{name}[{index}]", graph) for index, graph in enumerate(graphs)]


def _no_implicit_bias(graphs: Sequence[tuple[EdgeSet, Tensor | None]], biases: list, name: str) -> None:
    for index, ((graph, _), bias) in enumerate(zip(graphs, biases)):
        if bias is not None and kernels.is_block_structure(graph):
            raise ValueError(
                f"Expected no '{name}' for layer {index}, whose graph is a BlockGraph (an implicit "
                "graph has no edge order to align a bias with): pass the materialized graph, "
                "graph.edges()"
            )


def resolve_layer_biases(
    edge_bias: LayerBiases, graphs: Sequence[tuple[EdgeSet, Tensor | None]], name: str = "edge_bias"
) -> list[Tensor | None]:
    r"""The score bias of every layer, for the graphs of :func:`resolve_layer_graphs`.

    ``edge_bias`` is ``None``, one tensor for every layer, or a sequence of one tensor (or
    ``None``) per layer, each ``[E_l, H]`` (or ``[E_l]`` on a per-head graph) in the column order
    of layer ``l``'s graph. One tensor biases column ``e`` of every layer's graph: it belongs to
    one graph shared by the layers, and is refused when the layers' graphs have different edge
    counts (give a sequence then, e.g. ALiBi computed on each layer's graph). Shapes and dtypes are
    checked by the attention layers.

    Args:
        edge_bias: ``None``, a tensor or a sequence of ``len(graphs)`` tensors or ``None``.
        graphs: the layers' ``(edge_index, edge_head)``.
        name: the argument's name in error messages.

    Returns:
        One bias (or ``None``) per layer.

    Example:
        >>> from gnn_transformer.topology import causal, sliding_window
        >>> graphs = resolve_layer_graphs([sliding_window(3, 0), causal(3)], 2)   # 3 and 6 edges
        >>> biases = resolve_layer_biases([None, torch.zeros(6, 2)], graphs)
        >>> [None if b is None else list(b.shape) for b in biases]
        [None, [6, 2]]
    """
    if edge_bias is None:
        return [None] * len(graphs)
    if isinstance(edge_bias, Tensor):
        _no_implicit_bias(graphs, [edge_bias] * len(graphs), name)
        counts = [edge_index.size(1) for edge_index, _ in graphs if isinstance(edge_index, Tensor)]
        if len(set(counts)) > 1:
            raise ValueError(
                f"Expected '{name}' to be a sequence of one bias per layer for per-layer graphs "
                f"with different edge counts {counts} (got one tensor of shape "
                f"{list(edge_bias.shape)}, which biases the columns of one graph)"
            )
        return [edge_bias] * len(graphs)
    if isinstance(edge_bias, (str, bytes)) or not isinstance(edge_bias, Sequence):
        raise ValueError(
            f"Expected '{name}' to be None, a tensor or a sequence of one per layer (got {_describe(edge_bias)})"
        )
    if len(edge_bias) != len(graphs):
        raise ValueError(
            f"Expected '{name}' to hold one bias per layer, {len(graphs)} (got a sequence of length {len(edge_bias)})"
        )
    _no_implicit_bias(graphs, list(edge_bias), name)
    for index, bias in enumerate(edge_bias):
        if bias is not None and not isinstance(bias, Tensor):
            raise ValueError(f"Expected '{name}[{index}]' to be a tensor or None (got {_describe(bias)})")
    return list(edge_bias)


def _clones(module: nn.Module, num_layers: int, name: str) -> nn.ModuleList:
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected '{name}' to be a layer (an nn.Module; got {type(module).__name__})")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"Expected 'num_layers' to be a non-negative int (got {num_layers!r})")
    return nn.ModuleList([copy.deepcopy(module) for _ in range(num_layers)])


def _check_norm(norm) -> None:
    if norm is not None and not isinstance(norm, nn.Module):
        raise TypeError(f"Expected 'norm' to be None or an nn.Module (got {type(norm).__name__})")


def _check_share(kv_share_every: int) -> int:
    if isinstance(kv_share_every, bool) or not isinstance(kv_share_every, int) or kv_share_every < 1:
        raise ValueError(f"Expected 'kv_share_every' to be a positive int (got {kv_share_every!r})")
    return kv_share_every


def _share_key_values(layers: nn.ModuleList, kv_share_every: int) -> None:
    """Remove the key/value projection of the layers that reuse an earlier layer's keys/values."""
    for index, layer in enumerate(layers):
        if index % kv_share_every != 0:
            attn = getattr(layer, "self_attn", None)
            if not isinstance(attn, GraphMultiheadAttention):
                raise ValueError(
                    "Expected a self-attention 'self_attn' of type GraphMultiheadAttention "
                    f"with kv_share_every={kv_share_every} (got {type(attn).__name__})"
                )
            attn.drop_key_value_projection()


@runtime_checkable
class _ProjectsKeyValues(Protocol):
    """A layer that computes its self-attention's keys and values (the layers of this module)."""

    def self_kv(self, x: Tensor, *, pos: Tensor | None = None) -> KV: ...


def _self_attention_kv(
    kv_share_every: int, index: int, layer: nn.Module, x: Tensor, pos: Tensor | None, kv: KV | None, cache
) -> KV | None:
    """The keys and values layer ``index`` of a stack attends to (``None``: computed inside)."""
    owner = index % kv_share_every == 0
    if owner and cache is None and kv_share_every == 1:
        return None  # the plain path: the layer projects its own keys and values
    if owner:
        if not isinstance(layer, _ProjectsKeyValues):
            raise TypeError(
                f"Expected layer {index} to have a method self_kv (the keys and values of its "
                f"self-attention) for a cache or kv_share_every={kv_share_every} (got "
                f"{type(layer).__name__})"
            )
        kv = layer.self_kv(x, pos=pos)
        if cache is not None:
            kv = cache.update(index, kv)  # cached keys/values of earlier steps, then the new ones
    return kv


class GraphTransformerEncoder(nn.Module):
    r"""A stack of ``num_layers`` copies of an encoder layer, then ``norm`` (``nn.TransformerEncoder``).

    Parameter names ``layers.0....``, ``norm`` as in ``torch.nn``.

    Args:
        encoder_layer: a :class:`GraphTransformerEncoderLayer` (copied ``num_layers`` times).
        num_layers: number of layers.
        norm: optional final normalization (e.g. ``nn.LayerNorm(d_model)``).
        enable_nested_tensor, mask_check: accepted for signature compatibility (no effect).
        kv_share_every: cross-layer KV sharing (Brandon et al. 2024, Cross-Layer Attention): layer
            ``l`` attends with the keys and values computed by layer ``l - l % kv_share_every``;
            the other layers have no key/value projection (their self-attention is built with
            ``project_kv=False``: fewer parameters, and only the computing layers' keys and values
            are cached while decoding). Default ``1`` (none).

    ``forward(x, edge_index, *, edge_bias=None, pos=None, cache=None, edge_head=None) -> [N, C]``
    takes one graph for every layer or one per layer (a sequence, or a callable from layer index to
    graph; :func:`resolve_layer_graphs`).

    Example:
        >>> import torch
        >>> from gnn_transformer.topology import causal, sliding_window
        >>> stack = GraphTransformerEncoder(GraphTransformerEncoderLayer(8, 2, 16, backend="pyg"), 3)
        >>> window, full = sliding_window(5, 1, causal=True), causal(5)
        >>> stack(torch.randn(5, 8), [window, window, full]).shape   # full attention in layer 2
        torch.Size([5, 8])
    """

    def __init__(
        self,
        encoder_layer: nn.Module,
        num_layers: int,
        norm: nn.Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
        *,
        kv_share_every: int = 1,
    ) -> None:
        super().__init__()
        _check_norm(norm)
        self.layers = _clones(encoder_layer, num_layers, "encoder_layer")
        self.num_layers = num_layers
        self.norm = norm
        self.kv_share_every = _check_share(kv_share_every)
        _share_key_values(self.layers, self.kv_share_every)

    def forward(
        self,
        x: Tensor,
        edge_index: LayerGraphs,
        *,
        edge_bias: LayerBiases = None,
        pos: Tensor | None = None,
        cache=None,
        edge_head: Tensor | None = None,
    ) -> Tensor:
        r"""Apply the layers in order, then ``norm``.

        Args:
            x: node features ``[N, C]``.
            edge_index: the self-attention graph of every layer: one ``edge_index`` ``[2, E]``
                (with ``edge_head`` for a per-head graph), a sequence of one graph per layer, or a
                callable ``layer_index -> graph``; a graph of a sequence or callable is an
                ``edge_index`` or a pair ``(edge_index, edge_head)`` (:func:`resolve_layer_graphs`).
                Layers that share keys and values (``kv_share_every``) may have different graphs.
            edge_bias: score biases: one ``[E, H]`` (``[E]`` on a per-head graph) for one graph, or
                one per layer (:func:`resolve_layer_biases`).
            pos: node positions ``[N]`` for RoPE.
            cache: a key/value cache (:class:`gnn_transformer.decoding.KVCache`) for incremental
                decoding: ``x`` holds the new nodes and each layer's graph goes from all cached
                plus new nodes (sources) to the new ones (targets).
            edge_head: ``[E]`` query head of each edge of a single ``edge_index``.

        Returns:
            ``[N, C]``.
        """
        graphs = resolve_layer_graphs(edge_index, self.num_layers, "edge_index", edge_head=edge_head)
        biases = resolve_layer_biases(edge_bias, graphs, "edge_bias")
        kv = None
        for index, (layer, (graph, head), bias) in enumerate(zip(self.layers, graphs, biases)):
            kv = _self_attention_kv(self.kv_share_every, index, layer, x, pos, kv, cache)
            x = layer(x, graph, edge_bias=bias, pos=pos, kv=kv, edge_head=head)
        return x if self.norm is None else self.norm(x)


class GraphTransformerDecoder(nn.Module):
    r"""A stack of ``num_layers`` copies of a decoder layer, then ``norm`` (``nn.TransformerDecoder``).

    ``forward(x, edge_index, memory, memory_edge_index, *, edge_bias=None, memory_edge_bias=None,
    pos=None, cache=None, edge_head=None, memory_edge_head=None) -> [N, C]``; graphs, biases,
    ``kv_share_every`` and ``cache`` as in :class:`GraphTransformerEncoder` (``kv_share_every`` and
    ``cache`` concern the self-attention), for both ``edge_index`` and ``memory_edge_index``.
    """

    def __init__(
        self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None, *, kv_share_every: int = 1
    ) -> None:
        super().__init__()
        _check_norm(norm)
        self.layers = _clones(decoder_layer, num_layers, "decoder_layer")
        self.num_layers = num_layers
        self.norm = norm
        self.kv_share_every = _check_share(kv_share_every)
        _share_key_values(self.layers, self.kv_share_every)

    def forward(
        self,
        x: Tensor,
        edge_index: LayerGraphs,
        memory: Tensor,
        memory_edge_index: LayerGraphs,
        *,
        edge_bias: LayerBiases = None,
        memory_edge_bias: LayerBiases = None,
        pos: Tensor | None = None,
        cache=None,
        edge_head: Tensor | None = None,
        memory_edge_head: Tensor | None = None,
    ) -> Tensor:
        r"""Apply the layers in order, then ``norm``.

        Args:
            x: decoder node features ``[N, C]``.
            edge_index: the self-attention graph of every layer (one graph, with ``edge_head`` for
                a per-head graph, or one per layer: :func:`resolve_layer_graphs`).
            memory: encoder outputs ``[N_mem, C]``.
            memory_edge_index: the cross-attention graph of every layer, ``memory`` to decoder
                nodes (one graph, with ``memory_edge_head``, or one per layer).
            edge_bias, memory_edge_bias: score biases, one for one graph or one per layer
                (:func:`resolve_layer_biases`).
            pos: decoder node positions ``[N]`` for RoPE.
            cache: a key/value cache of the self-attention (as in :class:`GraphTransformerEncoder`).
            edge_head, memory_edge_head: ``[E]`` / ``[E_mem]`` query head of each edge of a single
                ``edge_index`` / ``memory_edge_index``.

        Returns:
            ``[N, C]``.
        """
        graphs = resolve_layer_graphs(edge_index, self.num_layers, "edge_index", edge_head=edge_head)
        biases = resolve_layer_biases(edge_bias, graphs, "edge_bias")
        memory_graphs = resolve_layer_graphs(
            memory_edge_index, self.num_layers, "memory_edge_index", edge_head=memory_edge_head
        )
        memory_biases = resolve_layer_biases(memory_edge_bias, memory_graphs, "memory_edge_bias")
        kv = None
        for index, layer in enumerate(self.layers):
            (graph, head), (memory_graph, memory_head) = graphs[index], memory_graphs[index]
            kv = _self_attention_kv(self.kv_share_every, index, layer, x, pos, kv, cache)
            x = layer(
                x,
                graph,
                memory,
                memory_graph,
                edge_bias=biases[index],
                memory_edge_bias=memory_biases[index],
                pos=pos,
                kv=kv,
                edge_head=head,
                memory_edge_head=memory_head,
            )
        return x if self.norm is None else self.norm(x)


__all__ = [
    "GraphTransformerEncoderLayer",
    "GraphTransformerDecoderLayer",
    "GraphTransformerEncoder",
    "GraphTransformerDecoder",
    "resolve_layer_graphs",
    "resolve_layer_biases",
    "get_activation",
    "gelu_tanh",
]
