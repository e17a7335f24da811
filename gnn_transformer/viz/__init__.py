"""Interactive attention-graph viewer: one self-contained HTML page per topology or model run.

A page holds the adjacency matrix and a node-link drawing of the token graph side by side;
hovering a token highlights its incoming edges (the keys it reads) and its matrix row and column;
a slider shows the receptive field after 1 .. L layers; selectors pick the layer and the head. The
HTML file carries its data, JavaScript and CSS inline and loads nothing: it opens from a file on an
offline machine. ``gnn-transformer view`` writes one.

Words used here: a **page** (:class:`Page`) is one HTML file; a **layer** entry holds the
**views** of one layer, one per head; a **view** (:class:`View`) is one drawn graph; a **block** is
a run of consecutive tokens drawn as one node when a view has more edges than ``max_edges``.

- :mod:`.topology_view`: :func:`topology_page` / :func:`topology_html` from a spec or a built
  graph (a graph for every head, per-head and per-layer graphs);
- :mod:`.model_view`: :func:`model_page` / :func:`model_html` from a loaded model and a sequence,
  :func:`attention_page` from recorded attention graphs;
- :mod:`.page`: :func:`to_html`, :func:`write_html` (never half written), the reduction to blocks.

Example:
    >>> from gnn_transformer import viz
    >>> text = viz.topology_html("sliding_window:window=1", 8)
    >>> text.startswith("<!DOCTYPE html>") and "<script src" not in text
    True
"""

from .model_view import attention_page, model_html, model_page, write_model_html
from .page import DEFAULT_MAX_EDGES, MAX_GRAPH_EDGES, MAX_TOKENS, Layer, Page, View, reduce_page, to_html, write_html
from .topology_view import graph_page, topology_html, topology_page, write_topology_html

__all__ = [
    "Page",
    "Layer",
    "View",
    "to_html",
    "write_html",
    "reduce_page",
    "DEFAULT_MAX_EDGES",
    "MAX_TOKENS",
    "MAX_GRAPH_EDGES",
    "topology_page",
    "topology_html",
    "graph_page",
    "write_topology_html",
    "attention_page",
    "model_page",
    "model_html",
    "write_model_html",
]
