"""One row per layer: the measures of :mod:`.measures` applied to a recorded :class:`.Trace`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .capture import AttentionGraph, Trace
from .measures import (
    ActivationStats,
    activation_stats,
    attention_entropy,
    attention_pagerank,
    degree_per_head,
    massive_activations,
    received_attention,
    sink_scores,
)


@dataclass(frozen=True)
class LayerSummary:
    """Measures of one layer (its first self-attention graph and its output hidden state, from the
    same call: the last one when the model ran several times under one :func:`.record`).

    Attributes:
        name: the layer's name (``"input"`` for the hidden state entering the first layer).
        sink: sink score per head (:func:`.sink_scores`); empty without self-attention.
        top_key: the key receiving the most attention, summed over heads (``None`` without
            attention), and ``top_key_share`` its share of all attention of the layer.
        pagerank_top: the node with the largest :func:`.attention_pagerank` (mean over heads),
            ``pagerank_max`` its value.
        entropy: mean attention entropy, nats, over the queries (per head) that read a key.
        activations: magnitude profile of the layer's output (``None`` when not recorded).
        massive: massive activations of the output as ``(token, dim, value)``.
    """

    name: str
    sink: tuple[float, ...] = ()
    top_key: int | None = None
    top_key_share: float = 0.0
    pagerank_top: int | None = None
    pagerank_max: float = 0.0
    entropy: float = 0.0
    activations: ActivationStats | None = None
    massive: tuple[tuple[int, int, float], ...] = ()

    @property
    def mean_sink(self) -> float:
        return sum(self.sink) / len(self.sink) if self.sink else 0.0


def _attention_fields(graph: AttentionGraph, batch: Tensor | None) -> dict:
    ei, w = graph.edge_index, graph.weights
    received = received_attention(ei, w, graph.num_src).sum(dim=1)  # [N_src]
    total = float(received.sum())
    top = int(received.argmax()) if received.numel() else None
    rank = None if graph.cross else attention_pagerank(graph.node_edge_index(), w, graph.num_src).mean(dim=1)
    use_batch = batch if batch is not None and batch.numel() == graph.num_src else None
    return dict(
        sink=tuple(float(s) for s in sink_scores(ei, w, use_batch, num_src=graph.num_src)),
        top_key=top,
        top_key_share=float(received[top]) / total if top is not None and total > 0 else 0.0,
        pagerank_top=int(rank.argmax()) if rank is not None and rank.numel() else None,
        pagerank_max=float(rank.max()) if rank is not None and rank.numel() else 0.0,
        entropy=_mean_entropy(graph),
    )


def _mean_entropy(graph: AttentionGraph) -> float:
    """Mean attention entropy over the (query, head) pairs that read at least one key."""
    ei, w = graph.edge_index, graph.weights
    reads = degree_per_head(ei[1], w, graph.num_dst, graph.edge_head) > 0  # [N_dst, H]
    if not bool(reads.any()):
        return 0.0
    return float(attention_entropy(ei, w, graph.num_dst)[reads].mean())


def _activation_fields(hidden: Tensor | None, min_magnitude: float, min_ratio: float) -> dict:
    if hidden is None or hidden.numel() == 0:
        return {}
    return dict(
        activations=activation_stats(hidden),
        massive=tuple(massive_activations(hidden, min_magnitude=min_magnitude, min_ratio=min_ratio)),
    )


def summarize(
    trace: Trace, batch: Tensor | None = None, *, min_magnitude: float = 100.0, min_ratio: float = 1000.0
) -> list[LayerSummary]:
    """Per-layer measures of a trace: an ``"input"`` row (hidden state entering the first layer),
    then one row per layer. A trace without layers gets one row per self-attention graph.

    When the model ran several times under one :func:`.record` (a decoding loop: the prompt, then
    one call per new token), the layers keep the hidden states of the last call only
    (:class:`.LayerState`), so every row describes that last call: its attention graph (the new
    queries over the whole cache) and its hidden states. For the prompt's attention, summarize
    a trace recorded around the prompt call alone (or use :func:`.extract`).

    Args:
        trace: from :func:`.record` / :func:`.extract`.
        batch: sequence id of every node (sink scores use each sequence's first token).
        min_magnitude, min_ratio: thresholds of :func:`.massive_activations`.
    """
    rows: list[LayerSummary] = []
    if not trace.layers:
        for graph in trace.self_attention():
            rows.append(LayerSummary(graph.name, **_attention_fields(graph, batch)))
        return rows
    first = trace.layers[0].input
    if first is not None:
        rows.append(LayerSummary("input", **_activation_fields(first, min_magnitude, min_ratio)))
    for k, layer in enumerate(trace.layers):
        graphs = [g for g in trace.self_attention() if g.layer == k]
        # each call of the layer records one graph per module: the first of the last call's graphs,
        # the call whose hidden states the layer holds
        last_call = graphs[-len({g.name for g in graphs}) :] if graphs else []
        fields = _attention_fields(last_call[0], batch) if last_call else {}
        fields.update(_activation_fields(layer.output, min_magnitude, min_ratio))
        rows.append(LayerSummary(layer.name, **fields))
    return rows


def format_table(rows: list[LayerSummary]) -> str:
    """A plain-text table of :func:`summarize` rows (one line per layer)."""
    header = (
        f"{'layer':<24} {'sink (mean/max head)':>20} {'top key':>8} {'share':>6} "
        f"{'pagerank':>9} {'entropy':>7} {'max|h|':>9} {'median|h|':>9} {'ratio':>8} "
        f"{'at (tok,dim)':>12} {'massive':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        sink = f"{r.mean_sink:.3f}/{max(r.sink):.3f}" if r.sink else "-"
        top = str(r.top_key) if r.top_key is not None else "-"
        share = f"{r.top_key_share:.2f}" if r.top_key is not None else "-"
        rank = f"{r.pagerank_top}:{r.pagerank_max:.2f}" if r.pagerank_top is not None else "-"
        ent = f"{r.entropy:.2f}" if r.sink else "-"
        a = r.activations
        if a is not None:
            act = (
                f"{a.max_abs:>9.3g} {a.median_abs:>9.3g} {a.ratio:>8.3g} "
                f"{f'({a.token},{a.dim})':>12} {len(r.massive):>7}"
            )
        else:
            act = f"{'-':>9} {'-':>9} {'-':>8} {'-':>12} {'-':>7}"
        lines.append(f"{r.name[:24]:<24} {sink:>20} {top:>8} {share:>6} {rank:>9} {ent:>7} {act}")
    return "\n".join(lines)
