"""Viewer pages of a model's attention: per layer and head, the attention weights on the edges of
the token graph, tokens as labels, sinks and hubs marked.

Marks (the measures of :mod:`gnn_transformer.analysis.measures`, per head):

- **sink**: a key that draws on average more than ``sink_threshold`` of the attention of the
  queries that see it (:func:`~gnn_transformer.analysis.find_sinks`);
- **hub**: a key whose :func:`~gnn_transformer.analysis.attention_pagerank` is at least
  ``hub_ratio`` times the uniform ``1 / N``: the walk that follows attention from queries to keys
  keeps coming back to it.

On a per-head graph (an ``edge_head``) each head's view holds that head's edges only, and the mean
of heads one edge per pair ``j -> i`` with the mean over heads of its weights (0 in a head without
it).

Size: the edges a page holds are, for every layer, those of each head's view and of the mean of
heads: a graph shared by every head counts once per head and once more for the mean, a per-head
graph its edges and as many again for the mean (at most that many distinct pairs). A page of more
than :data:`~.page.MAX_GRAPH_EDGES` edges is refused with a ``ValueError``; :func:`model_page`
refuses it before the model runs (a graph of more edges already while it is built; a selector's
graphs, known only after the run, are counted before the page is made).

Example:
    >>> import torch
    >>> from gnn_transformer.analysis import AttentionGraph
    >>> from gnn_transformer.topology import causal
    >>> g = AttentionGraph("attn", 0, causal(3).as_tensor(), torch.tensor([[1.0], [.9], [.1], [.8], [.1], [.1]]), 3, 3)
    >>> page = attention_page([g], ["a", "b", "c"])
    >>> [v.label for v in page.layers[0].views], page.layers[0].views[0].sinks
    (['head 0'], [0])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import topology
from ..analysis import AttentionGraph, attention_entropy, attention_pagerank, find_sinks, sink_scores
from .page import (
    DEFAULT_MAX_EDGES,
    MAX_GRAPH_EDGES,
    Layer,
    Page,
    View,
    check_tokens,
    to_html,
    within_graph_limit,
    write_html,
)


def _check_ratio(name: str, value: float, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ValueError(f"Expected '{name}' to be a number >= {low} (got {value!r})")


def _layer_edges(num_edges: int, num_heads: int, per_head: bool, mean_of_heads: bool) -> int:
    """Edges the views of one layer hold: each head's (a graph shared by every head: all of it per
    head) and the mean of heads' (at most the graph's)."""
    heads = num_edges if per_head else num_edges * num_heads
    return heads + (num_edges if mean_of_heads and num_heads > 1 else 0)


def _check_page_edges(what: str, layers: list[tuple[int, int, bool]], mean_of_heads: bool) -> None:
    """Refuse a page whose layers ``(edges, heads, per_head)`` hold more than ``MAX_GRAPH_EDGES`` edges."""
    total = sum(_layer_edges(e, h, per_head, mean_of_heads) for e, h, per_head in layers)
    if total > MAX_GRAPH_EDGES:
        heads = sorted({h for _, h, _ in layers})
        mean = " and one for their mean" if mean_of_heads and max(heads) > 1 else ""
        raise ValueError(
            f"{what} is too large to view (at most {MAX_GRAPH_EDGES} edges): its {len(layers)} attention "
            f"layer{'s' * (len(layers) != 1)} of {'/'.join(map(str, heads))} heads (a view per head{mean}), "
            f"on graphs of up to {max(e for e, _, _ in layers)} edges, would hold {total} edges"
        )


def _graph_edges(graph: Any) -> tuple[int, bool]:
    """``(edges, per_head)`` of one layer's built graph: an ``edge_index``, a per-head pair or a
    ``BlockGraph``."""
    if isinstance(graph, topology.BlockGraph):
        return graph.num_edges(), graph.per_head
    edge_index = graph[0] if isinstance(graph, tuple) else graph
    return (edge_index.size(1) if isinstance(edge_index, Tensor) else 0), isinstance(graph, tuple)


def _head_view(
    label: str,
    edge_index: torch.Tensor,
    w: torch.Tensor,
    labels: Sequence[str],
    n: int,
    sink_threshold: float,
    hub_ratio: float,
) -> View:
    """The view of one head's weights ``w`` ``[E]``."""
    w2 = w.unsqueeze(-1).double()  # [E, 1]
    sinks = find_sinks(edge_index, w2, n, threshold=sink_threshold)[:, 0].nonzero().flatten().tolist()
    rank = attention_pagerank(edge_index, w2, n)[:, 0]  # [N]
    hubs = (rank >= hub_ratio / n).nonzero().flatten().tolist()
    top = int(rank.argmax())
    reads = torch.bincount(edge_index[1], minlength=n) > 0  # [N] queries with a key
    entropy = float(attention_entropy(edge_index, w2, n)[reads, 0].mean()) if bool(reads.any()) else 0.0
    stats = (
        f"{edge_index.size(1)} edges; sink score {float(sink_scores(edge_index, w2, num_src=n)[0]):.2f} "
        f"(share of attention on token 0); mean entropy {entropy:.2f} nats per query with a key; "
        f"top PageRank {labels[top]!r} ({float(rank[top]):.2f})"
    )
    return View(label, edge_index[0].tolist(), edge_index[1].tolist(), w.float().tolist(), sinks, hubs, stats)


def _check_graph(k: int, g: AttentionGraph, n: int) -> None:
    """Refuse a graph that is not self-attention on the ``n`` tokens, a bad ``edge_head``, or
    non-finite weights."""
    if not bool(torch.isfinite(g.weights).all()):
        bad = int((~torch.isfinite(g.weights)).sum())
        raise ValueError(
            f"Graph {k} {g.name!r} has {bad} NaN or infinite attention weights (the model's inputs or "
            "weights are not finite there): there is no attention to draw"
        )
    if g.cross or g.num_src != n or g.num_dst != n:
        raise ValueError(
            f"Expected self-attention graphs of the {n} tokens of 'labels' (graph {k} "
            f"{g.name!r} has {g.num_src} keys and {g.num_dst} queries"
            f"{', cross-attention' if g.cross else ''})"
        )
    if g.edge_head is not None:
        e, h = g.edge_head, g.num_heads
        if (
            e.dim() != 1
            or e.numel() != g.edge_index.size(1)
            or (e.numel() and not 0 <= int(e.min()) <= int(e.max()) < h)
        ):
            raise ValueError(
                f"Expected the 'edge_head' of graph {k} {g.name!r} to hold one head in [0, {h}) per edge "
                f"(got shape {list(e.shape)} for {g.edge_index.size(1)} edges)"
            )


def _heads(g: AttentionGraph) -> list[tuple[Tensor, Tensor]]:
    """``(edge_index [2, E_h], weights [E_h])`` of each head: on a per-head graph, its own edges."""
    edge_index = g.edge_index.long().cpu()  # [2, E]
    weights = g.weights.detach().cpu()  # [E, H]
    if g.edge_head is None:
        return [(edge_index, weights[:, h]) for h in range(g.num_heads)]
    edge_head = g.edge_head.long().cpu()  # [E]
    return [(edge_index[:, edge_head == h], weights[edge_head == h, h]) for h in range(g.num_heads)]


def _mean_of_heads(g: AttentionGraph, n: int) -> tuple[Tensor, Tensor]:
    """``(edge_index [2, P], weights [P])`` of the mean over heads: on a per-head graph one edge per
    pair ``j -> i`` (sorted by target, then source), a head without it counting 0."""
    edge_index = g.edge_index.long().cpu()  # [2, E]
    weights = g.weights.detach().cpu()  # [E, H]
    if g.edge_head is None:
        return edge_index, weights.mean(dim=1)
    own = weights.gather(1, g.edge_head.long().cpu()[:, None])[:, 0].double()  # [E] weight in its head
    pairs, inverse = torch.unique(edge_index[1] * n + edge_index[0], return_inverse=True)  # [P]
    total = torch.zeros(pairs.numel(), dtype=torch.float64).index_add_(0, inverse, own)  # [P]
    return torch.stack([pairs % n, pairs // n]), total / g.num_heads


def attention_page(
    graphs: Sequence[AttentionGraph],
    labels: Sequence[str],
    *,
    title: str = "attention",
    mean_of_heads: bool = True,
    sink_threshold: float = 0.5,
    hub_ratio: float = 3.0,
    notes: Sequence[str] = (),
) -> Page:
    """The viewer page of recorded self-attention graphs of one sequence (one layer entry per graph).

    Args:
        graphs: :class:`~gnn_transformer.analysis.AttentionGraph` of one sequence, in layer order
            (a :class:`~gnn_transformer.analysis.Trace`'s ``self_attention()``).
        labels: one label per token.
        title: the page's heading.
        mean_of_heads: add a view of the mean weight over heads to every layer.
        sink_threshold, hub_ratio: the marks (see the module docstring).
        notes: lines shown under the title.

    Raises:
        ValueError: a page of more than ``MAX_GRAPH_EDGES`` edges (see the module docstring).
    """
    _check_ratio("sink_threshold", sink_threshold, 0.0)
    _check_ratio("hub_ratio", hub_ratio, 0.0)
    n = len(labels)
    check_tokens(n, "'labels'")
    if not graphs:
        raise ValueError("Expected at least one attention graph in 'graphs' (got none)")
    for k, g in enumerate(graphs):
        _check_graph(k, g, n)
    sizes = [(g.edge_index.size(1), g.num_heads, g.edge_head is not None) for g in graphs]
    _check_page_edges(f"The attention page {title!r} ({n} tokens)", sizes, mean_of_heads)
    layers = []
    for k, g in enumerate(graphs):
        views = [
            _head_view(f"head {h}", edge_index, w, labels, n, sink_threshold, hub_ratio)
            for h, (edge_index, w) in enumerate(_heads(g))
        ]
        if mean_of_heads and g.num_heads > 1:
            edge_index, w = _mean_of_heads(g, n)
            views.append(_head_view("mean of heads", edge_index, w, labels, n, sink_threshold, hub_ratio))
        layers.append(Layer(f"layer {k}: {g.name}", views))
    marks = (
        f"Sink: a key that draws on average more than {sink_threshold:g} of the attention of the queries "
        f"that see it. Hub: a key whose attention PageRank is at least {hub_ratio:g} times the uniform "
        f"1/{n}."
    )
    return Page(
        title,
        "model",
        [str(t) for t in labels],
        layers,
        receptive_layers=len(layers),
        num_tokens=n,
        notes=[*notes, marks],
    )


def _check_model_page_edges(loaded: Any, spec: str, n: int, kwargs: dict[str, Any]) -> None:
    """Build the graph of ``spec`` on ``n`` tokens within ``MAX_GRAPH_EDGES`` edges and refuse a page
    that would hold more (a selector's graphs, known only after the run, are not counted here)."""
    from ..experiments.analyze_run import attention_modules, build_graph

    what = f"The graph {spec!r} of {loaded.name} on {n} tokens"
    with within_graph_limit(what):
        built, select = build_graph(loaded, spec, [n])
    if select is not None:
        return
    modules = attention_modules(loaded.model)
    graphs = built if isinstance(built, list) else [built] * len(modules)
    sizes = [_graph_edges(g) for g in graphs]  # (edges, per_head) per attention layer
    layers = [(edges, m.num_heads, per_head) for m, (edges, per_head) in zip(modules, sizes)]
    if layers:
        _check_page_edges(what, layers, kwargs.get("mean_of_heads", True))


def model_page(
    loaded: Any,
    tokens: Sequence[int],
    *,
    graph: str | None = None,
    backend: str | None = None,
    title: str | None = None,
    **kwargs: Any,
) -> Page:
    """Run a loaded model once on one sequence and make the viewer page of its attention.

    Args:
        loaded: a :class:`~gnn_transformer.experiments.analyze_run.LoadedModel`
            (``load_checkpoint_model`` or ``load_hf_model``).
        tokens: the token ids of the sequence (at least 2).
        graph: the token graph (default: the model's own; see
            :func:`~gnn_transformer.experiments.analyze_run.analyze`).
        backend: attention backend while recording.
        title: the page's heading (default: the model's name).
        kwargs: of :func:`attention_page`.

    Raises:
        ValueError: before the model runs, a graph or a page of more than ``MAX_GRAPH_EDGES``
            edges (see the module docstring; a selector's graphs are counted once selected).
    """
    from ..experiments.analyze_run import analyze, check_sequences, token_labels

    tokens = list(tokens)
    check_tokens(len(tokens), "'tokens'")
    check_sequences(loaded, [tokens], "'tokens'")
    _check_model_page_edges(loaded, loaded.graph if graph is None else graph, len(tokens), kwargs)
    result = analyze(loaded, [tokens], graph=graph, backend=backend)
    graphs = result.traces["model"].self_attention()
    title = title or f"{loaded.name}, {result.graph} graph"
    return attention_page(graphs, token_labels(tokens, loaded.tokenizer), title=title, **kwargs)


def model_html(loaded: Any, tokens: Sequence[int], *, max_edges: int = DEFAULT_MAX_EDGES, **kwargs: Any) -> str:
    """The self-contained HTML page of :func:`model_page` (blocks beyond ``max_edges`` edges per view)."""
    return to_html(model_page(loaded, tokens, **kwargs), max_edges=max_edges)


def write_model_html(path: str | Path, loaded: Any, tokens: Sequence[int], **kwargs: Any) -> Path:
    """Write :func:`model_html` to ``path`` (never half written); returns ``path``."""
    return write_html(model_html(loaded, tokens, **kwargs), path)
