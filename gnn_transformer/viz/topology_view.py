"""Viewer pages of token graphs: a topology spec or a built graph on one sequence.

A graph for every head is one view; a per-head graph ``(edge_index, edge_head)`` one view per head;
a per-layer :class:`~gnn_transformer.topology.LayerPattern` one layer entry per layer of its cycle.
The receptive-field slider composes the layers' graphs (union of heads), as a stack would.

Example:
    >>> from gnn_transformer.topology import sliding_window
    >>> page = topology_page(sliding_window(4, 1))
    >>> [(layer.label, [v.label for v in layer.views]) for layer in page.layers]
    [('every layer', ['every head'])]
    >>> page.layers[0].views[0].src, page.layers[0].views[0].dst
    ([0, 1, 0, 1, 2, 1, 2, 3, 2, 3], [0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from ..experiments.topologies import label, resolve_topology, split_select
from ..topology.specs import LayerPattern
from .page import DEFAULT_MAX_EDGES, Layer, Page, View, check_tokens, to_html, within_graph_limit, write_html

DEFAULT_LAYERS = 3  # receptive field after 1 .. 3 layers (a per-layer cycle: at least its length)


def _plain(edge_index: Any, name: str) -> Tensor:
    """A ``[2, E]`` long tensor of an ``EdgeIndex`` or tensor, checked."""
    t = edge_index.as_tensor() if isinstance(edge_index, EdgeIndex) else edge_index
    if not isinstance(t, Tensor) or t.dim() != 2 or t.size(0) != 2:
        shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"Expected '{name}' to be an edge_index of shape [2, E] (got {shape})")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"Expected '{name}' to hold integers (got {t.dtype})")
    return t.long().cpu()


def _num_nodes(graph: Any) -> int:
    """Tokens of a built graph: its ``sparse_size`` when it has one, else its largest index + 1."""
    if isinstance(graph, LayerPattern):
        return max(_num_nodes(g) for g in graph.graphs)
    edge_index = graph[0] if isinstance(graph, tuple) else graph
    if isinstance(edge_index, EdgeIndex) and edge_index.sparse_size(1) is not None:
        return int(edge_index.sparse_size(1))
    t = _plain(edge_index, "graph")
    return int(t.max()) + 1 if t.numel() else 0


def _stats(src: Tensor, dst: Tensor, n: int) -> str:
    """One line: edges, keys per query, queries without a key, causal or not."""
    keys = torch.bincount(dst, minlength=n)  # [N] in-degree
    causal = bool((src <= dst).all())
    return (
        f"{src.numel()} edges, keys per query {int(keys.min())}..{int(keys.max())} "
        f"(mean {src.numel() / n:.2f}), {int((keys == 0).sum())} queries with no key, "
        f"{'causal' if causal else 'not causal'}"
    )


def _view(label_: str, edge_index: Tensor, n: int) -> View:
    src, dst = edge_index[0], edge_index[1]
    if src.numel() and int(edge_index.max()) >= n:
        raise ValueError(f"Expected the edges of {label_!r} within the {n} tokens (got node {int(edge_index.max())})")
    return View(label_, src.tolist(), dst.tolist(), stats=_stats(src, dst, n))


def _views(graph: Any, n: int, num_heads: int | None) -> list[View]:
    """The views of one layer's graph: one for every head, or one per head of a per-head graph."""
    if isinstance(graph, tuple):
        if len(graph) != 2:
            raise ValueError(f"Expected a per-head graph as a pair (edge_index, edge_head) (got {len(graph)} items)")
        edge_index = _plain(graph[0], "edge_index")
        edge_head = graph[1]
        if not isinstance(edge_head, Tensor) or edge_head.dim() != 1 or edge_head.numel() != edge_index.size(1):
            got = list(edge_head.shape) if isinstance(edge_head, Tensor) else type(edge_head).__name__
            raise ValueError(f"Expected 'edge_head' of shape [{edge_index.size(1)}] (got {got})")
        edge_head = edge_head.long().cpu()
        heads = num_heads if num_heads is not None else (int(edge_head.max()) + 1 if edge_head.numel() else 1)
        if edge_head.numel() and not 0 <= int(edge_head.min()) <= int(edge_head.max()) < heads:
            raise ValueError(
                f"Expected 'edge_head' in [0, {heads}) (got {int(edge_head.min())}..{int(edge_head.max())})"
            )
        return [_view(f"head {h}", edge_index[:, edge_head == h], n) for h in range(heads)]
    return [_view("every head", _plain(graph, "graph"), n)]


def graph_page(
    graph: Any,
    n: int | None = None,
    *,
    title: str = "token graph",
    num_heads: int | None = None,
    layers: int | None = None,
    notes: list[str] | None = None,
) -> Page:
    """The viewer page of a built graph on one sequence of ``n`` tokens.

    Args:
        graph: an ``edge_index`` ``[2, E]`` (``EdgeIndex`` or tensor), a per-head graph
            ``(edge_index, edge_head)`` or a per-layer ``LayerPattern`` of either.
        n: tokens (default: the graph's ``sparse_size``, else its largest index + 1).
        title: the page's heading.
        num_heads: heads of a per-head graph (default: the largest ``edge_head`` + 1).
        layers: the receptive-field slider's range, ``>= 1`` (default 3, at least a per-layer
            cycle).
        notes: lines shown under the title.
    """
    n = _num_nodes(graph) if n is None else n
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"Expected 'n' to be an int (got {n!r})")
    check_tokens(n, f"'n' of {title!r}")
    if isinstance(graph, LayerPattern):
        entries = [
            Layer(f"layer {k} (of every {graph.period})", _views(g, n, num_heads)) for k, g in enumerate(graph.graphs)
        ]
    else:
        entries = [Layer("every layer", _views(graph, n, num_heads))]
    default = max(DEFAULT_LAYERS, len(entries))
    layers = default if layers is None else layers
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"Expected 'layers' to be an int >= 1 (got {layers!r})")
    return Page(
        title,
        "topology",
        [str(i) for i in range(n)],
        entries,
        receptive_layers=layers,
        num_tokens=n,
        notes=list(notes or []),
    )


def topology_page(
    spec: Any, n: int | None = None, *, paper_scale: bool = False, layers: int | None = None, title: str | None = None
) -> Page:
    """The viewer page of a topology on one sequence of ``n`` tokens.

    Args:
        spec: a spec as ``gnn-transformer show`` takes it (``"bigbird"``, a catalogue name, a
            builder with arguments ``"sliding_window:window=2"``, a ``.toml`` path; a selector suffix
            shows the allowed graph), or a built graph (see :func:`graph_page`).
        n: tokens (default: a catalogue spec's ``[small] n``, else 16; a built graph's size).
        paper_scale: build catalogue specs with their paper parameters, not their ``[small]`` ones.
        layers: the receptive-field slider's range (default 3, at least a per-layer cycle).
        title: the page's heading (default: the spec's name).
    """
    if not isinstance(spec, str):
        return graph_page(spec, n, title=title or "token graph", layers=layers)
    topo = resolve_topology(spec, small=not paper_scale)  # unknown names fail here
    source = topo.source
    n = n if n is not None else (source.small_n if source is not None and source.small_n else 16)
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"Expected 'n' to be an int (got {n!r})")
    check_tokens(n, f"'n' of {spec!r}")
    if title is None:
        small = source is not None and (source.small_params or source.small_select) and not paper_scale
        title = label(spec) if source is None else source.name + (" (small)" if small else "")
        if source is not None and split_select(spec)[1] is not None:
            title += f"+{split_select(spec)[1]}"
        title += f" on n = {n}"
    with within_graph_limit(f"{spec!r} on n = {n}"):
        graph = topo.build([n])
    notes = []
    if source is not None and source.description:
        notes.append(source.description)
    if source is not None and (source.small_params or source.small_select) and not paper_scale:
        shrunk = [f"{k} = {v}" for k, v in source.small_params.items()]
        if source.small_select:
            shrunk.append(f"select = {source.small_select}")
        notes.append(
            f"Drawn at toy scale, with the spec's [small] {', '.join(shrunk)} in place of the parameters "
            "above (paper_scale, --paper-scale on the command line, draws those)."
        )
    if topo.select is not None:
        notes.append(
            f"Each layer selects its per-head graph within this one with {topo.select!r}; shown: the allowed graph."
        )
    if source is not None and source.source:
        notes.append(f"Source: {source.source}")
    return graph_page(graph, n, title=title, num_heads=topo.num_heads, layers=layers, notes=notes)


def topology_html(
    spec: Any,
    n: int | None = None,
    *,
    paper_scale: bool = False,
    layers: int | None = None,
    title: str | None = None,
    max_edges: int = DEFAULT_MAX_EDGES,
) -> str:
    """The self-contained HTML page of :func:`topology_page` (blocks beyond ``max_edges`` edges per
    view)."""
    return to_html(topology_page(spec, n, paper_scale=paper_scale, layers=layers, title=title), max_edges=max_edges)


def write_topology_html(path: str | Path, spec: Any, n: int | None = None, **kwargs: Any) -> Path:
    """Write :func:`topology_html` to ``path`` (never half written); returns ``path``."""
    return write_html(topology_html(spec, n, **kwargs), path)
