"""Viewer pages of a model's attention: per layer and head, the attention weights on the edges of
the token graph, tokens as labels, sinks and hubs marked.

Marks (the measures of :mod:`gnn_transformer.analysis.measures`, per head):

- **sink**: a key that draws on average more than ``sink_threshold`` of the attention of the
  queries that see it (:func:`~gnn_transformer.analysis.find_sinks`);
- **hub**: a key whose :func:`~gnn_transformer.analysis.attention_pagerank` is at least
  ``hub_ratio`` times the uniform ``1 / N``: the walk that follows attention from queries to keys
  keeps coming back to it.

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

from ..analysis import AttentionGraph, attention_entropy, attention_pagerank, find_sinks, sink_scores
from .page import DEFAULT_MAX_EDGES, Layer, Page, View, check_tokens, to_html, write_html


def _check_ratio(name: str, value: float, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ValueError(f"Expected '{name}' to be a number >= {low} (got {value!r})")


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
    entropy = float(attention_entropy(edge_index, w2, n).mean())
    stats = (
        f"{edge_index.size(1)} edges; sink score {float(sink_scores(edge_index, w2, num_src=n)[0]):.2f} "
        f"(share of attention on token 0); mean entropy {entropy:.2f} nats per query; "
        f"top PageRank {labels[top]!r} ({float(rank[top]):.2f})"
    )
    return View(label, edge_index[0].tolist(), edge_index[1].tolist(), w.float().tolist(), sinks, hubs, stats)


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
    """
    _check_ratio("sink_threshold", sink_threshold, 0.0)
    _check_ratio("hub_ratio", hub_ratio, 0.0)
    n = len(labels)
    check_tokens(n, "'labels'")
    if not graphs:
        raise ValueError("Expected at least one attention graph in 'graphs' (got none)")
    layers = []
    for k, g in enumerate(graphs):
        if g.cross or g.num_src != n or g.num_dst != n:
            raise ValueError(
                f"Expected self-attention graphs of the {n} tokens of 'labels' (graph {k} "
                f"{g.name!r} has {g.num_src} keys and {g.num_dst} queries"
                f"{', cross-attention' if g.cross else ''})"
            )
        edge_index = g.edge_index.long().cpu()  # [2, E]
        weights = g.weights.detach().cpu()  # [E, H]
        views = [
            _head_view(f"head {h}", edge_index, weights[:, h], labels, n, sink_threshold, hub_ratio)
            for h in range(g.num_heads)
        ]
        if mean_of_heads and g.num_heads > 1:
            views.append(
                _head_view("mean of heads", edge_index, weights.mean(dim=1), labels, n, sink_threshold, hub_ratio)
            )
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
    """
    from ..experiments.analyze_run import analyze, token_labels

    tokens = list(tokens)
    check_tokens(len(tokens), "'tokens'")
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
