"""A viewer page: what it draws (:class:`Page`, :class:`Layer`, :class:`View`), the reduction of
a view that has more edges than a browser draws at ease, and the one self-contained HTML file.

The HTML file holds the page as JSON, the viewer's JavaScript (``viewer.js``) and its CSS
(``viewer.css``) inline: it loads nothing, so it opens from a file on an offline machine.

Reduction: a page whose largest view has more than ``max_edges`` edges is drawn on blocks of ``b``
consecutive tokens (the smallest ``b`` that brings every view within the limit): an edge ``J -> I``
between blocks stands for the token edges ``j -> i`` with ``j`` in ``J`` and ``i`` in ``I``; its
weight is their share of the ``|I| * |J|`` possible ones (a topology) or the attention a query of
``I`` pays to ``J`` on average (a model: each block's incoming weights sum to 1, as a token's do).
A block is labelled with the positions of its first and last tokens (``"16..31"``); on a model page
its token strings are kept in :attr:`Page.node_tokens`. The page says so.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

ASSETS = Path(__file__).resolve().parent
DEFAULT_MAX_EDGES = 4096  # edges per view a browser draws and highlights at ease (SVG)
MAX_TOKENS = 4096  # tokens of the largest page: beyond, even one node per block of 64 is unreadable
MAX_GRAPH_EDGES = 2**22  # edges of the largest graph a page is built from, and of a model page's views in all


@contextmanager
def within_graph_limit(what: str) -> Iterator[None]:
    """Build a page's graph within ``MAX_GRAPH_EDGES`` edges: a builder refused by that edge budget
    is reported as ``what`` being too large to view."""
    from .. import topology

    try:
        with topology.max_edges(MAX_GRAPH_EDGES):
            yield
    except ValueError as err:
        if "edge budget" not in str(err):
            raise
        reason = str(err).split("; to build it anyway")[0]
        raise ValueError(f"{what} is too large to view (at most {MAX_GRAPH_EDGES} edges): {reason}") from None


@dataclass
class View:
    """One drawing: a directed graph ``src[e] -> dst[e]`` on the page's nodes.

    Attributes:
        label: the selector's name for it (``"head 0"``, ``"every head"``).
        src, dst: the edges, ``src`` the key ``j``, ``dst`` the query ``i``.
        weights: attention weight per edge (``None`` for a topology).
        sinks, hubs: nodes marked as attention sinks and hubs.
        stats: one line of statistics shown under the selector.
    """

    label: str
    src: list[int]
    dst: list[int]
    weights: list[float] | None = None
    sinks: list[int] = field(default_factory=list)
    hubs: list[int] = field(default_factory=list)
    stats: str = ""

    @property
    def num_edges(self) -> int:
        return len(self.src)


@dataclass
class Layer:
    """The views of one layer, one per head (or one ``"every head"`` view)."""

    label: str
    views: list[View]


@dataclass
class Page:
    """Everything one viewer page draws.

    Attributes:
        title: the page's heading.
        kind: ``"topology"`` or ``"model"``.
        nodes: label of every drawn node (a token, or a block of ``block`` tokens).
        layers: the layer selector's entries.
        receptive_layers: the receptive-field slider runs over ``0 .. receptive_layers`` layers;
            layer ``k`` of a stack uses the graphs of ``layers[k % len(layers)]`` (union of heads).
        num_tokens: tokens of the sequence.
        block: tokens per drawn node (1: every token is a node).
        notes: lines shown under the title (what was reduced, what the marks mean).
        node_tokens: the token strings of each node where its label does not show them (a model
            page drawn on blocks: a block's tokens, joined by spaces), else empty.
    """

    title: str
    kind: str
    nodes: list[str]
    layers: list[Layer]
    receptive_layers: int = 0
    num_tokens: int = 0
    block: int = 1
    notes: list[str] = field(default_factory=list)
    node_tokens: list[str] = field(default_factory=list)

    @property
    def weighted(self) -> bool:
        return any(v.weights is not None for layer in self.layers for v in layer.views)

    @property
    def max_view_edges(self) -> int:
        return max((v.num_edges for layer in self.layers for v in layer.views), default=0)


# ------------------------------------------------------------------ checks
def check_tokens(n: int, what: str = "the sequence") -> None:
    """Refuse a sequence a page cannot show: fewer than 2 tokens, or more than :data:`MAX_TOKENS`."""
    if n < 1:
        raise ValueError(f"Expected at least 2 tokens in {what} (got {n}): an empty graph has nothing to draw")
    if n == 1:
        raise ValueError(
            f"Expected at least 2 tokens in {what} (got 1): a one-token sequence has only the "
            "edge from the token to itself, nothing to view"
        )
    if n > MAX_TOKENS:
        raise ValueError(f"Expected at most {MAX_TOKENS} tokens in {what}, what a viewer page draws (got {n})")


def check_max_edges(max_edges: int) -> None:
    if isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 1:
        raise ValueError(f"Expected 'max_edges' to be an int >= 1 (got {max_edges!r})")


def check_page(page: Page) -> None:
    """Refuse a page without layers, views or edges, and edges outside its nodes."""
    if not page.layers or not all(layer.views for layer in page.layers):
        raise ValueError(
            f"Expected every layer of the page {page.title!r} to have a view (got "
            f"{[len(layer.views) for layer in page.layers]} views per layer)"
        )
    if page.max_view_edges == 0:
        raise ValueError(f"The graph of {page.title!r} has no edges: nothing to draw")
    n = len(page.nodes)
    if page.node_tokens and len(page.node_tokens) != n:
        raise ValueError(f"Expected no 'node_tokens' or one per node ({n}) (got {len(page.node_tokens)})")
    for layer in page.layers:
        for view in layer.views:
            if len(view.src) != len(view.dst) or (view.weights is not None and len(view.weights) != len(view.src)):
                raise ValueError(
                    f"Expected as many sources, targets and weights in view {view.label!r} "
                    f"(got {len(view.src)}, {len(view.dst)}, "
                    f"{None if view.weights is None else len(view.weights)})"
                )
            for name, nodes in (("src", view.src), ("dst", view.dst), ("sinks", view.sinks), ("hubs", view.hubs)):
                if nodes and not 0 <= min(nodes) <= max(nodes) < n:
                    raise ValueError(
                        f"Expected the '{name}' of view {view.label!r} in [0, {n}) (got {min(nodes)}..{max(nodes)})"
                    )


# ------------------------------------------------------------------ reduction to blocks
def _block_edges(
    src: Tensor, dst: Tensor, weights: Tensor | None, n: int, block: int, model: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The edges between blocks of ``block`` tokens and their weights (see the module docstring)."""
    nb = math.ceil(n / block)
    sizes = torch.full((nb,), block, dtype=torch.float64)  # [B] tokens per block
    sizes[-1] = n - block * (nb - 1)
    key = (dst // block) * nb + src // block  # [E] block pair
    pairs, inverse = torch.unique(key, return_inverse=True)  # [P]
    w = torch.ones_like(src, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    total = torch.zeros(pairs.numel(), dtype=torch.float64).index_add_(0, inverse, w)  # [P]
    b_src, b_dst = pairs % nb, pairs // nb
    if model:
        total = total / sizes[b_dst]  # mean over the queries of the target block
    else:
        total = total / (sizes[b_dst] * sizes[b_src])  # share of the possible edges
    return b_src, b_dst, total


def _block_for(views: list[tuple[Tensor, Tensor]], n: int, max_edges: int) -> int:
    """The smallest block size (from a geometric ladder) that brings every view within ``max_edges``."""
    ceiling = max(2, math.ceil(n / math.isqrt(max_edges)))  # at the ceiling, blocks^2 fit
    most = max(src.numel() for src, _ in views)
    block = min(ceiling, max(2, math.isqrt(most // max_edges)))  # a block pair holds at most block^2 edges
    while block < ceiling:
        nb = math.ceil(n / block)
        if all(torch.unique((dst // block) * nb + src // block).numel() <= max_edges for src, dst in views):
            return block
        block = max(block + 1, int(block * 1.25))
    return ceiling


def reduce_page(page: Page, max_edges: int = DEFAULT_MAX_EDGES) -> Page:
    """``page`` itself when every view has at most ``max_edges`` edges, else the page on blocks of
    tokens (see the module docstring), with a note that says so."""
    check_max_edges(max_edges)
    if page.max_view_edges <= max_edges or page.block != 1:
        return page
    n = len(page.nodes)
    tensors = [
        [
            (
                torch.tensor(v.src, dtype=torch.long),
                torch.tensor(v.dst, dtype=torch.long),
                None if v.weights is None else torch.tensor(v.weights, dtype=torch.float64),
                v,
            )
            for v in layer.views
        ]
        for layer in page.layers
    ]
    block = _block_for([(s, d) for views in tensors for s, d, _, _ in views], n, max_edges)
    layers = []
    for layer, views in zip(page.layers, tensors):
        reduced = []
        for src, dst, w, view in views:
            b_src, b_dst, b_w = _block_edges(src, dst, w, n, block, page.kind == "model")
            reduced.append(
                replace(
                    view,
                    src=b_src.tolist(),
                    dst=b_dst.tolist(),
                    weights=b_w.tolist(),
                    sinks=sorted({i // block for i in view.sinks}),
                    hubs=sorted({i // block for i in view.hubs}),
                    stats=f"{view.stats}; drawn: {b_src.numel()} block edges",
                )
            )
        layers.append(Layer(layer.label, reduced))
    starts = range(0, n, block)
    nodes = [f"{s}..{min(s + block, n) - 1}" for s in starts]  # positions, whatever the tokens' labels
    node_tokens = [" ".join(page.nodes[s : s + block]) for s in starts] if page.kind == "model" else []
    what = (
        "the share of token edges it stands for"
        if page.kind == "topology"
        else "the mean attention a query of the target block pays to the source block"
    )
    note = (
        f"Aggregated: the largest view has {page.max_view_edges} edges, more than the {max_edges} a page "
        f"draws at ease, so each node is a block of {block} consecutive tokens, labelled by the positions "
        f"of its first and last token (\"0..{block - 1}\"{'; its tokens show on hover' if node_tokens else ''}), "
        f"and an edge between blocks is drawn with {what}."
    )
    return replace(page, nodes=nodes, node_tokens=node_tokens, layers=layers, block=block, notes=[note, *page.notes])


# ------------------------------------------------------------------ HTML
def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def _json_for_script(page: Page) -> str:
    """The page as JSON that is safe inside a ``<script>`` element."""
    data = asdict(page)
    data["weighted"] = page.weighted
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c")  # no "</script>" or "<!--" inside; JSON.parse reads it back


def to_html(page: Page, *, max_edges: int = DEFAULT_MAX_EDGES) -> str:
    """The self-contained HTML of a viewer page (reduced to blocks beyond ``max_edges`` edges per
    view: :func:`reduce_page`). It loads nothing from elsewhere."""
    check_page(page)
    page = reduce_page(page, max_edges)
    title = html.escape(page.title)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">\n"
        f"<title>{title}</title>\n<style>\n{_asset('viewer.css')}</style>\n</head>\n<body>\n"
        f"<h1>{title}</h1>\n<div id=\"notes\"></div>\n<div id=\"controls\"></div>\n"
        "<div id=\"stats\"></div>\n<div id=\"panes\">\n"
        "<div class=\"pane\"><h2>adjacency matrix <span class=\"hint\">row i: the keys query i reads</span></h2>"
        "<svg id=\"matrix\"></svg></div>\n"
        "<div class=\"pane\"><h2>token graph <span class=\"hint\">edge j &rarr; i: query i reads key j</span></h2>"
        "<svg id=\"graph\"></svg></div>\n"
        "<div class=\"pane\" id=\"info\"></div>\n</div>\n"
        f"<script id=\"viewer-data\" type=\"application/json\">{_json_for_script(page)}</script>\n"
        f"<script>\n{_asset('viewer.js')}</script>\n</body>\n</html>\n"
    )


def write_html(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so that
    ``path`` is never left half written; returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Expected 'path' to be a file path (got the directory {str(path)!r})")
    if not path.parent.is_dir():
        raise ValueError(f"Expected the directory of 'path' {str(path)!r} to exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # a temporary file is private; the page is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
