"""Record the attention graphs and hidden states of any model built on GraphMultiheadAttention.

``record(model)`` is a context manager: while it is open, every attention computation of every
:class:`~gnn_transformer.GraphMultiheadAttention` inside ``model`` is recorded with its weights
``[E, H]`` and ``edge_index``, and every layer of a stack records its input and output node
features. On exit the model is exactly as before (no hook, no attribute left behind).

The attention layers are observed through ``attend``, the one method every backend goes through;
it is asked for the weights, which are recorded and handed on only if the caller wanted them.
Layers are, by default, the members of each ``nn.ModuleList`` that contain an attention module
(``encoder.layers``, ``decoder.layers``, a GPT's ``h``, ...).

Example:
    >>> import torch
    >>> from gnn_transformer import GraphMultiheadAttention
    >>> from gnn_transformer.topology import causal
    >>> attn = GraphMultiheadAttention(8, 2)
    >>> with record(attn) as trace:
    ...     out = attn(torch.randn(3, 8), causal(3))   # plain call: no weights requested
    >>> g = trace.attention[0]
    >>> g.weights.shape, g.edge_index.shape
    (torch.Size([6, 2]), torch.Size([2, 6]))
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn

from ..attention import GraphMultiheadAttention


@dataclass
class AttentionGraph:
    """One attention computation: a weighted directed graph ``j -> i``.

    Attributes:
        name: qualified name of the attention module in the model (``"layers.0.self_attn"``).
        layer: index into :attr:`Trace.layers` of the layer that holds the module, or ``None``.
        edge_index: ``[2, E]``, row 0 the key ``j``, row 1 the query ``i``.
        weights: ``[E, H]`` attention weights (each query's incoming weights sum to 1 in every
            head; on a per-head graph an edge's weight sits in its head's column, 0 elsewhere).
        num_src, num_dst: key and query node counts.
        cross: ``True`` for cross-attention (keys and queries are different node sets).
        edge_head: ``[E]`` the query head of each edge of a per-head graph, else ``None``.
    """

    name: str
    layer: int | None
    edge_index: Tensor
    weights: Tensor
    num_src: int
    num_dst: int
    cross: bool = False
    edge_head: Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.weights.size(1)

    @property
    def query_offset(self) -> int:
        """Node id of query 0 among the key nodes: ``N_src - N_dst`` for a self-attention step of
        incremental decoding (the new nodes are the last of the cache), else 0."""
        return 0 if self.cross else max(self.num_src - self.num_dst, 0)

    def node_edge_index(self) -> Tensor:
        """Self-attention edges with both rows indexing the same ``N_src`` nodes (queries shifted
        by :attr:`query_offset`); cross-attention edges unchanged."""
        if self.query_offset == 0:
            return self.edge_index
        return torch.stack([self.edge_index[0], self.edge_index[1] + self.query_offset])

    def dense(self) -> Tensor:
        """The weights as a dense ``[H, N_dst, N_src]`` matrix (rows queries, 0 where no edge)."""
        out = self.weights.new_zeros(self.num_dst, self.num_src, self.num_heads)
        ei = self.edge_index.to(self.weights.device)
        out.index_put_((ei[1], ei[0]), self.weights, accumulate=True)  # [N_dst, N_src, H]
        return out.permute(2, 0, 1)  # [H, N_dst, N_src]

    def to_networkx(self, head: int | None = None, labels: list[str] | None = None) -> nx.DiGraph:
        """A weighted ``networkx.DiGraph`` of one head (``head=None``: mean over heads).

        Edges ``j -> i`` carry ``weight`` = :math:`\\alpha_{ji}` (duplicated edges are summed).
        Self-attention nodes are ``0 .. N_src-1`` (a decoding step's queries are the last ones);
        cross-attention nodes are ``("key", j)`` and ``("query", i)``. ``labels`` (one per key
        node, and per query node for self-attention) are stored as the node attribute ``token``.
        """
        if head is not None and not -self.num_heads <= head < self.num_heads:
            raise ValueError(f"Expected 'head' in [0, {self.num_heads}) (got {head})")
        w = self.weights.mean(dim=1) if head is None else self.weights[:, head]  # [E]
        return weighted_digraph(
            self.node_edge_index(),
            w,
            self.num_src,
            self.num_dst if self.cross else self.num_src,
            cross=self.cross,
            labels=labels,
        )


@dataclass
class LayerState:
    """Node features entering and leaving one layer of a stack (``[N, C]`` each); when the model
    runs several times under one :func:`record` (a decoding loop), those of the last call."""

    name: str
    input: Tensor | None
    output: Tensor | None


@dataclass
class Trace:
    """Everything recorded during one or more forward passes under :func:`record`.

    Attributes:
        attention: the attention graphs, in the order they were computed.
        layers: the layers found in the model with their recorded input and output.
        output: the model's output when produced by :func:`extract`.
    """

    attention: list[AttentionGraph] = field(default_factory=list)
    layers: list[LayerState] = field(default_factory=list)
    output: Any = None

    @property
    def hidden_states(self) -> list[Tensor]:
        """``[input of the first layer, output of layer 0, output of layer 1, ...]``.

        Follows the layers in model order; for an encoder-decoder model the decoder's stack
        follows the encoder's (use :attr:`layers` to tell them apart).
        """
        if not self.layers:
            return []
        states = [self.layers[0].input] + [layer.output for layer in self.layers]
        return [s for s in states if s is not None]

    def self_attention(self) -> list[AttentionGraph]:
        """The self-attention graphs (cross-attention left out)."""
        return [g for g in self.attention if not g.cross]

    def to_networkx(self, labels: list[str] | None = None) -> dict[tuple[int, int], nx.DiGraph]:
        """Weighted DiGraphs keyed by ``(index into attention, head)``."""
        return {(k, h): g.to_networkx(h, labels) for k, g in enumerate(self.attention) for h in range(g.num_heads)}


def weighted_digraph(
    edge_index: Tensor,
    weights: Tensor,
    num_src: int,
    num_dst: int | None = None,
    *,
    cross: bool = False,
    labels: list[str] | None = None,
) -> nx.DiGraph:
    """A ``networkx.DiGraph`` with edges ``j -> i`` and attribute ``weight`` from ``[E]`` weights."""
    num_dst = num_src if num_dst is None else num_dst
    graph = nx.DiGraph()
    keys: list[Hashable]  # the node of each source
    queries: list[Hashable]  # the node of each target
    if cross:
        keys = [("key", j) for j in range(num_src)]
        queries = [("query", i) for i in range(num_dst)]
        graph.add_nodes_from(keys, bipartite=0)
        graph.add_nodes_from(queries, bipartite=1)
    else:
        keys = queries = list(range(num_src))
        graph.add_nodes_from(keys)
    if labels is not None:
        for node, label in zip(keys, labels):
            graph.nodes[node]["token"] = label
    ei = edge_index.as_tensor() if hasattr(edge_index, "as_tensor") else edge_index
    for j, i, w in zip(ei[0].tolist(), ei[1].tolist(), weights.detach().double().cpu().tolist()):
        u, v = keys[j], queries[i]
        if graph.has_edge(u, v):
            graph[u][v]["weight"] += w
        else:
            graph.add_edge(u, v, weight=w)
    return graph


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of the stacks of ``model``: members of an ``nn.ModuleList`` holding attention.

    Falls back to the modules that directly own an attention module when there is no such list.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        if any(name == f or name.startswith(f + ".") for f, _ in found):
            continue  # a list inside a layer already found
        for key, child in module.named_children():
            if isinstance(child, GraphMultiheadAttention):
                continue
            if any(isinstance(m, GraphMultiheadAttention) for m in child.modules()):
                found.append((f"{name}.{key}" if name else key, child))
    if found:
        return found
    owners: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        for key, child in module.named_children():
            if isinstance(child, GraphMultiheadAttention) and not isinstance(module, GraphMultiheadAttention):
                owners.setdefault(name, module)
    return [(n, m) for n, m in owners.items() if n]


def _first_tensor(values: Iterable[Any]) -> Tensor | None:
    for v in values:
        if isinstance(v, Tensor):
            return v
        if isinstance(v, (tuple, list)) and v and isinstance(v[0], Tensor):
            return v[0]
    return None


def _keep(t: Tensor | None, to_cpu: bool) -> Tensor | None:
    if t is None:
        return None
    t = t.detach()
    t = t.as_tensor() if hasattr(t, "as_tensor") else t
    return t.cpu() if to_cpu else t


@contextmanager
def record(
    model: nn.Module, *, layers: Iterable[nn.Module] | None = None, backend: str | None = None, cpu: bool = True
) -> Iterator[Trace]:
    """Record attention graphs and layer hidden states of ``model`` while the context is open.

    Args:
        model: any module containing :class:`~gnn_transformer.GraphMultiheadAttention` layers
            (or one itself).
        layers: the modules whose input and output are the hidden states (default
            :func:`find_layers`).
        backend: attention backend to force while recording (e.g. ``"pyg"``); default: each
            call's own.
        cpu: move recorded tensors to the CPU. Default ``True``.

    Yields:
        A :class:`Trace` that fills up as the model runs. Tensors are detached.
    """
    attn_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, GraphMultiheadAttention)]
    if not attn_modules:
        raise ValueError(
            f"Expected 'model' to contain a GraphMultiheadAttention (found none in {type(model).__name__})"
        )
    if layers is None:
        layer_list = find_layers(model)
    else:
        names = {id(m): n for n, m in model.named_modules()}
        layer_list = []
        for m in layers:
            if id(m) not in names:
                raise ValueError(
                    f"Expected every entry of 'layers' to be a submodule of 'model' (got {type(m).__name__})"
                )
            layer_list.append((names[id(m)], m))
    trace = Trace(layers=[LayerState(n, None, None) for n, _ in layer_list])

    def owner(name: str) -> int | None:
        for k, (layer_name, _) in enumerate(layer_list):
            if layer_name == "" or name == layer_name or name.startswith(layer_name + "."):
                return k
        return None

    handles = []
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for k, (_, layer) in enumerate(layer_list):

            def pre_hook(module, args, kwargs, k=k):
                trace.layers[k].input = _keep(_first_tensor([*args, *kwargs.values()]), cpu)

            def post_hook(module, args, kwargs, output, k=k):
                trace.layers[k].output = _keep(_first_tensor([output]), cpu)

            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook, with_kwargs=True))

        for name, module in attn_modules:
            mode: dict[str, bool] = {}

            def attn_pre_hook(module, args, kwargs, mode=mode):
                x = args[0] if args else kwargs.get("x")
                mode["cross"] = not isinstance(x, Tensor)

            handles.append(module.register_forward_pre_hook(attn_pre_hook, with_kwargs=True))
            original = module.attend
            signature = inspect.signature(original)

            def attend(*args, _original=original, _signature=signature, _name=name, _mode=mode, **kwargs):
                if _mode.get("inside"):  # attend calling itself (a per-head graph on (head, token)
                    return _original(*args, **kwargs)  # nodes, an implicit graph's edges): once
                bound = _signature.bind(*args, **kwargs)
                wanted = bound.arguments.get("need_weights", False)
                bound.arguments["need_weights"] = True
                if backend is not None:
                    bound.arguments["backend"] = backend
                _mode["inside"] = True
                try:
                    out, weights = _original(*bound.args, **bound.kwargs)
                finally:
                    _mode["inside"] = False
                query, key = bound.arguments["query"], bound.arguments["key"]
                num_src, num_dst = key.size(0), query.size(0)
                cross = _mode.pop("cross", num_src != num_dst)
                edge_index, edge_head = _edges(bound.arguments["edge_index"], bound.arguments.get("edge_head"))
                columns = weights
                if edge_head is not None:  # [E] -> [E, H]: each edge's weight in its head's column
                    columns = weights.new_zeros(weights.size(0), query.size(1))  # [E, H]
                    rows = torch.arange(weights.size(0), device=weights.device)
                    columns[rows, edge_head.to(weights.device)] = weights
                trace.attention.append(
                    AttentionGraph(
                        _name,
                        owner(_name),
                        _keep(edge_index, cpu).long(),
                        _keep(columns, cpu),
                        num_src,
                        num_dst,
                        cross,
                        None if edge_head is None else _keep(edge_head, cpu).long(),
                    )
                )
                return out, (weights if wanted else None)

            patched.append((module, module.__dict__.get("attend")))
            setattr(module, "attend", attend)  # this instance's attend, until the block ends
        yield trace
    finally:
        for h in handles:
            h.remove()
        for patched_module, previous in patched:
            if previous is None:
                delattr(patched_module, "attend")  # the class's attend again
            else:
                setattr(patched_module, "attend", previous)


def _edges(edge_index: Any, edge_head: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The recorded graph as ``(edge_index, edge_head)``: an implicit graph's materialized edges,
    in the order of the weights ``attend`` returns for it."""
    if isinstance(edge_index, Tensor):
        return edge_index, edge_head
    edges = edge_index.edges()
    return edges if isinstance(edges, tuple) else (edges, None)


def extract(model: nn.Module, *args, **kwargs) -> Trace:
    """Run ``model(*args, **kwargs)`` once without gradients under :func:`record`.

    The model's train/eval mode is left as it is: call ``model.eval()`` first to analyse inference.
    The output is kept in :attr:`Trace.output`.
    """
    with torch.no_grad(), record(model) as trace:
        trace.output = model(*args, **kwargs)
    return trace


@contextmanager
def norm_placement(model: nn.Module, norm_first: bool) -> Iterator[nn.Module]:
    """Temporarily set ``norm_first`` on every layer of ``model`` that has one (pre-norm when
    ``True``, post-norm when ``False``); the same weights run both ways. Restored on exit."""
    targets = [m for m in model.modules() if isinstance(getattr(m, "norm_first", None), bool)]
    if not targets:
        raise ValueError(
            f"Expected 'model' to have layers with a 'norm_first' attribute (found none in {type(model).__name__})"
        )
    before = [m.norm_first for m in targets]
    try:
        for m in targets:
            setattr(m, "norm_first", norm_first)  # a plain attribute of each layer, not a submodule
        yield model
    finally:
        for m, value in zip(targets, before):
            setattr(m, "norm_first", value)


def compare_norm_placement(model: nn.Module, *args, **kwargs) -> dict[str, Trace]:
    """Traces of the same model and input run pre-norm and post-norm.

    Returns:
        ``{"pre-norm": Trace, "post-norm": Trace}``.
    """
    out = {}
    for label, norm_first in (("pre-norm", True), ("post-norm", False)):
        with norm_placement(model, norm_first):
            out[label] = extract(model, *args, **kwargs)
    return out
