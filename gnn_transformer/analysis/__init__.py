"""Attention-graph analytics: record attention graphs and hidden states, measure sinks, hubs and
massive activations, compare pre-norm with post-norm, draw them.

- :mod:`.capture`: :func:`record` / :func:`extract` a :class:`Trace` from any model built on
  :class:`~gnn_transformer.GraphMultiheadAttention`; export to networkx.
- :mod:`.measures`: pure functions of ``(edge_index, weights)`` and hidden states.
- :mod:`.summary`: one row of measures per layer.
- :mod:`.plots`: matplotlib figures.
"""

from .capture import (
    AttentionGraph,
    LayerState,
    Trace,
    compare_norm_placement,
    extract,
    find_layers,
    norm_placement,
    record,
    weighted_digraph,
)
from .measures import (
    ActivationStats,
    activation_stats,
    attention_entropy,
    attention_hits,
    attention_pagerank,
    degree_per_head,
    find_sinks,
    first_tokens,
    massive_activations,
    received_attention,
    sink_scores,
)
from .summary import LayerSummary, format_table, summarize

__all__ = [
    "AttentionGraph",
    "LayerState",
    "Trace",
    "record",
    "extract",
    "find_layers",
    "norm_placement",
    "compare_norm_placement",
    "weighted_digraph",
    "ActivationStats",
    "activation_stats",
    "attention_entropy",
    "attention_hits",
    "attention_pagerank",
    "degree_per_head",
    "find_sinks",
    "first_tokens",
    "massive_activations",
    "received_attention",
    "sink_scores",
    "LayerSummary",
    "format_table",
    "summarize",
]
