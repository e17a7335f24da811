"""Pictures of attention graphs and hidden states: ``matplotlib.figure.Figure`` objects, built
without pyplot (no global state, any backend), for the caller to save.

- :func:`plot_attention_heatmaps`: the weights of one attention graph as a query x key matrix per
  head, non-edges grey.
- :func:`plot_attention_arcs`: the same graph drawn on the token sequence, one arc per edge
  ``j -> i`` with width proportional to its weight, node size to the attention received.
- :func:`plot_sink_scores`: sink score per layer and head.
- :func:`plot_activation_magnitudes`: largest and median ``|h|`` per layer (log scale).
- :func:`plot_norm_comparison`: the two curves above for several variants of a model side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Arc
from matplotlib.ticker import MaxNLocator

from .capture import AttentionGraph
from .measures import received_attention
from .summary import LayerSummary


def _crop(graph: AttentionGraph, max_tokens: int):
    """Edges among the first ``max_tokens`` keys and queries: (src, dst, weights [E, H], n_src, n_dst)."""
    ei = graph.edge_index
    n_src, n_dst = min(graph.num_src, max_tokens), min(graph.num_dst, max_tokens)
    keep = (ei[0] < n_src) & (ei[1] < n_dst)
    return ei[0][keep], ei[1][keep], graph.weights[keep].float(), n_src, n_dst


def _tick_labels(ax, labels: Sequence[str] | None, n_src: int, n_dst: int) -> None:
    if labels is None or max(n_src, n_dst) > 40:
        return
    ax.set_xticks(range(n_src), [str(t) for t in labels[:n_src]], rotation=90, fontsize=7)
    ax.set_yticks(range(n_dst), [str(t) for t in labels[:n_dst]], fontsize=7)


def plot_attention_heatmaps(
    graph: AttentionGraph,
    labels: Sequence[str] | None = None,
    *,
    max_tokens: int = 64,
    max_heads: int = 8,
    title: str | None = None,
) -> Figure:
    """One panel per head: ``alpha[i, j]`` with queries as rows and keys as columns; pairs that
    are not edges of the graph are grey (they are not zero attention, they are absent)."""
    src, dst, w, n_src, n_dst = _crop(graph, max_tokens)
    heads = min(graph.num_heads, max_heads)
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = None
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        mat = np.full((n_dst, n_src), np.nan)
        mat[dst.numpy(), src.numpy()] = 0.0  # edges: 0 then their (summed) weight; others nan
        np.add.at(mat, (dst.numpy(), src.numpy()), w[:, h].numpy())
        image = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        _tick_labels(ax, labels, n_src, n_dst)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle(title or graph.name, fontsize=10)
    return fig


def plot_attention_arcs(
    graph: AttentionGraph,
    head: int | None = None,
    labels: Sequence[str] | None = None,
    *,
    max_tokens: int = 48,
    min_weight: float = 0.02,
    title: str | None = None,
) -> Figure:
    """The attention graph drawn on the token sequence (self-attention).

    Tokens sit on a line; each edge ``j -> i`` is an arc from key ``j`` to query ``i``, above the
    line when ``j < i`` and below when ``j > i``, with width and opacity proportional to
    :math:`\\alpha_{ji}` (edges under ``min_weight`` are left out; self-loops are not drawn).
    Node area is proportional to the attention the token receives. ``head=None``: mean over heads.
    """
    ei = graph.node_edge_index()
    n = min(graph.num_src, max_tokens)
    keep = (ei[0] < n) & (ei[1] < n)
    src, dst, w = ei[0][keep], ei[1][keep], graph.weights[keep].float()
    weight = w.mean(dim=1) if head is None else w[:, head]  # [E]
    drawn = [(j, i, a) for j, i, a in zip(src.tolist(), dst.tolist(), weight.tolist()) if j != i and a >= min_weight]
    up = max((abs(i - j) for j, i, _ in drawn if j < i), default=0) * 0.45
    down = max((abs(i - j) for j, i, _ in drawn if j > i), default=0) * 0.45
    label_room = 0.1 * max(n, 2) + 0.6 if labels is not None else 0.5
    height = up + down + label_room + 0.5
    fig = Figure(figsize=(max(6.0, 0.35 * n), min(1.0 + 0.3 * height, 6.0)), layout="constrained")
    ax = fig.subplots()
    for j, i, a in drawn:
        center, width = (i + j) / 2.0, abs(i - j)
        theta = (0, 180) if j < i else (180, 360)
        ax.add_patch(
            Arc(
                (center, 0.0),
                width,
                width * 0.9,
                theta1=theta[0],
                theta2=theta[1],
                linewidth=0.3 + 4.0 * a,
                alpha=min(1.0, 0.15 + 0.85 * a),
                color="tab:blue" if j < i else "tab:orange",
            )
        )
    received = received_attention(graph.edge_index, graph.weights.float(), graph.num_src)
    received = received.mean(dim=1) if head is None else received[:, head]  # [N_src]
    recv = np.zeros(n)
    recv[: min(n, received.numel())] = received[:n].numpy()
    ax.scatter(
        range(n),
        np.zeros(n),
        s=20 + 400 * recv / max(float(recv.max()), 1e-9),
        c="tab:red",
        zorder=3,
        edgecolors="black",
        linewidths=0.5,
    )
    if labels is not None:
        for k in range(min(n, len(labels))):
            ax.text(k, -down - 0.45, str(labels[k]), rotation=90, ha="center", va="top", fontsize=7)
    ax.set_xlim(-1, n)
    ax.set_ylim(-down - label_room, up + 0.5)
    ax.axis("off")
    which = "mean over heads" if head is None else f"head {head}"
    ax.set_title(title or f"{graph.name} ({which}): arc width = attention weight", fontsize=9)
    return fig


def plot_sink_scores(rows: Sequence[LayerSummary], title: str = "sink score") -> Figure:
    """Sink score (share of attention on each sequence's first token) per layer and head."""
    rows = [r for r in rows if r.sink]
    heads = max((len(r.sink) for r in rows), default=0)
    mat = np.full((heads, len(rows)), np.nan)
    for k, r in enumerate(rows):
        mat[: len(r.sink), k] = r.sink
    fig = Figure(figsize=(max(4.0, 0.6 * len(rows) + 2), 0.4 * heads + 1.8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(mat, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    for k, r in enumerate(rows):
        for h in range(len(r.sink)):  # a NaN score (non-finite weights) reads "nan"
            ax.text(
                k,
                h,
                f"{mat[h, k]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if mat[h, k] < 0.6 else "black",  # False for NaN: black on the blank cell
            )
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(heads), [f"head {h}" for h in range(heads)], fontsize=7)
    fig.colorbar(image, ax=ax).set_label("share on first token", fontsize=7)
    ax.set_title(title, fontsize=10)
    return fig


def plot_activation_magnitudes(rows: Sequence[LayerSummary], title: str = "hidden-state magnitudes") -> Figure:
    """Top-3 and median ``|h|`` of each layer's output, log scale (as in Sun et al., 2024)."""
    measured = [(r.name, r.activations) for r in rows if r.activations is not None]
    fig = Figure(figsize=(max(4.5, 0.5 * len(measured) + 2), 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(measured))
    for rank, marker in zip(range(3), ("o", "s", "^")):
        vals = [abs(stats.top[rank][0]) if len(stats.top) > rank else np.nan for _, stats in measured]
        ax.plot(x, vals, marker=marker, label=f"top {rank + 1}")
    ax.plot(x, [stats.median_abs for _, stats in measured], marker="x", color="gray", label="median")
    ax.set_yscale("log")
    ax.set_xticks(x, [name for name, _ in measured], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("|h|")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return fig


def plot_norm_comparison(variants: Mapping[str, Sequence[LayerSummary]]) -> Figure:
    """Mean sink score and max/median ``|h|`` across layers for several variants of one model
    (e.g. ``{"pre-norm": rows, "post-norm": rows}``)."""
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for label, rows in variants.items():
        att = [r for r in rows if r.sink]
        left.plot(range(len(att)), [r.mean_sink for r in att], marker="o", label=label)
        ratios = [r.activations.ratio for r in rows if r.activations is not None]
        right.plot(range(len(ratios)), ratios, marker="o", label=label)
    left.set_xlabel("layer")
    left.set_ylabel("mean sink score")
    left.set_ylim(0, 1)
    right.set_xlabel("hidden state (0 = input)")
    right.set_ylabel("max |h| / median |h|")
    right.set_yscale("log")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return fig
