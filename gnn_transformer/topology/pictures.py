"""Pictures of token graphs (matplotlib, Agg, PNG): the adjacency matrix beside the graph
drawing, and the receptive field over layers.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through ``pyplot``,
so no global state or display backend is touched. Every function returns the ``Figure`` and
saves it when given ``path``.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from torch import Tensor

from ._common import Lengths
from .exports import to_networkx
from .masks import _check_edge_index, to_dense_mask
from .statistics import _graph_sizes, hop_distances, topology_stats


def _save(fig: Figure, path: str | Path | None, dpi: int) -> Figure:
    FigureCanvasAgg(fig)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


def _layout(g: nx.DiGraph, bipartite: bool) -> dict:
    if bipartite:  # keys in a left column, queries in a right one, both top to bottom in index order
        keys = sorted(j for t, j in g.nodes if t == "k")
        queries = sorted(i for t, i in g.nodes if t == "q")
        rows = max(len(keys), len(queries), 2)

        def column(x: float, count: int, k: int) -> np.ndarray:  # the shorter column is centred
            return np.array([x, 1.0 - 2.0 * (k + (rows - count) / 2) / (rows - 1)])

        pos = {("k", j): column(-1.0, len(keys), j) for j in keys}
        pos.update({("q", i): column(1.0, len(queries), i) for i in queries})
        return pos
    return nx.circular_layout(g) if g.number_of_nodes() > 2 else nx.spring_layout(g, seed=0)


def draw_topology(
    edge_index: Tensor,
    *,
    title: str | None = None,
    path: str | Path | None = None,
    num_src: int | None = None,
    num_dst: int | None = None,
    lengths: Lengths | None = None,
    src_lengths: Lengths | None = None,
    bipartite: bool | None = None,
    figsize: tuple[float, float] = (8.0, 4.0),
    dpi: int = 100,
) -> Figure:
    """Adjacency matrix (row = query ``i``, column = key ``j``, dark = edge ``j -> i``) beside a
    drawing of the graph (arrows ``j -> i``; self-loops shown only in the matrix). A bipartite
    (cross-attention) graph is drawn as keys ``k0, k1, …`` in a left column and queries ``q0, q1, …``
    in a right one, top to bottom in index order like the matrix.

    Args:
        edge_index: the token graph (small: tens of nodes).
        title: figure title; edge count and density are appended.
        path: save a PNG there.
        num_src, num_dst: node counts (default: the ``EdgeIndex`` sparse size; for a plain tensor
            the lengths, else one node set of ``max + 1`` over both rows).
        lengths, src_lengths: sequence lengths of a batch, for the density of the title (relative
            to full attention within the sequences), as in :func:`~.statistics.topology_stats`.
        bipartite: draw sources and targets as different tokens (cross attention). Default:
            ``num_src != num_dst``; pass ``True`` for a cross graph with as many keys as queries.
        figsize, dpi: figure size in inches and resolution.
    """
    src, dst = _check_edge_index(edge_index)
    stats = topology_stats(
        edge_index, lengths, src_lengths=src_lengths, num_src=num_src, num_dst=num_dst, bipartite=bipartite
    )
    num_src, num_dst = stats.num_src, stats.num_dst
    bipartite = num_src != num_dst if bipartite is None else bipartite
    mask = to_dense_mask(edge_index, num_src, num_dst).cpu().numpy()
    fig = Figure(figsize=figsize)
    ax_m, ax_g = fig.subplots(1, 2)
    ax_m.imshow(mask, cmap=ListedColormap(["#f4f4f4", "#2b5d9b"]), vmin=0, vmax=1, interpolation="nearest")
    ax_m.set_xlabel("key j (source)")
    ax_m.set_ylabel("query i (target)")
    ax_m.set_title("mask[i, j]: edge j → i", fontsize=9)
    step = max(1, max(num_src, num_dst) // 8)
    ax_m.set_xticks(range(0, num_src, step))
    ax_m.set_yticks(range(0, num_dst, step))
    g = to_networkx(edge_index, num_src, num_dst, bipartite=bipartite)
    g.remove_edges_from(list(nx.selfloop_edges(g)))
    labels = {v: f"{v[0]}{v[1]}" for v in g.nodes} if bipartite else None
    nx.draw_networkx(
        g,
        pos=_layout(g, bipartite),
        ax=ax_g,
        node_size=110,
        font_size=6,
        node_color="#9ec3e6",
        edge_color="#555555",
        width=0.5,
        arrowsize=6,
        labels=labels,
        connectionstyle="arc3,rad=0.1",
    )
    ax_g.set_axis_off()
    ax_g.set_title("graph (arrows j → i)", fontsize=9)
    info = f"{int(src.numel())} edges, density {stats.density:.2f}"
    fig.suptitle(f"{title} — {info}" if title else info, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def draw_receptive_field(
    edge_index: Tensor,
    num_layers: int,
    *,
    token: int | None = None,
    title: str | None = None,
    path: str | Path | None = None,
    figsize: tuple[float, float] = (8.0, 4.0),
    dpi: int = 100,
) -> Figure:
    """Receptive field over layers: left, for each query ``i`` and key ``j``, the number of layers
    after which ``j`` reaches ``i`` (blank: not within ``num_layers``); right, the receptive-field
    size of ``token`` (default: the last) and the mean over tokens, per layer.
    """
    src, dst = _check_edge_index(edge_index)
    num_src, num_dst, _ = _graph_sizes(edge_index, src, dst, None, None, None, None, None)
    if num_src != num_dst:
        raise ValueError(f"Expected a self-attention graph (got sparse size {(num_src, num_dst)})")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"Expected 'num_layers' to be an int >= 1 (got {num_layers!r})")
    n = num_dst
    if n == 0:
        raise ValueError("Expected a graph with nodes (got 'edge_index' with no nodes)")
    token = n - 1 if token is None else token
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < n:
        raise ValueError(f"Expected 'token' to be an int in [0, {n}) (got {token!r})")
    dist = hop_distances(edge_index, n, cutoff=num_layers)
    hops = np.full((n, n), np.nan)
    for i, row in dist.items():
        for j, d in row.items():
            hops[i, j] = d
    fig = Figure(figsize=figsize)
    ax_m, ax_c = fig.subplots(1, 2)
    cmap = colormaps["viridis_r"].resampled(num_layers + 1)  # one colour per layer count
    im = ax_m.imshow(hops, cmap=cmap, vmin=-0.5, vmax=num_layers + 0.5, interpolation="nearest")
    fig.colorbar(im, ax=ax_m, fraction=0.046, pad=0.04, ticks=range(num_layers + 1), label="layers until j reaches i")
    ax_m.set_xlabel("key j")
    ax_m.set_ylabel("query i")
    layers = np.arange(num_layers + 1)
    sizes = np.array([[np.sum(hops[i] <= L) for i in range(n)] for L in layers])  # [L+1, N]
    ax_c.plot(layers, sizes[:, token], marker="o", label=f"token {token}")
    ax_c.plot(layers, sizes.mean(axis=1), marker=".", linestyle="--", label="mean")
    ax_c.axhline(n, color="grey", linewidth=0.5)
    ax_c.set_xlabel("layers")
    ax_c.set_ylabel("tokens reached")
    ax_c.legend(fontsize=8)
    fig.suptitle(title or f"receptive field over {num_layers} layers", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def draw_per_head(
    edge_index: Tensor,
    edge_head: Tensor,
    num_heads: int,
    *,
    title: str | None = None,
    path: str | Path | None = None,
    num_src: int | None = None,
    num_dst: int | None = None,
    head_names: list[str] | None = None,
    columns: int = 4,
    dpi: int = 100,
) -> Figure:
    """One adjacency matrix per head of a per-head graph (row = query ``i``, column = key ``j``,
    dark = edge ``j -> i`` of that head), each titled with its head and edge count.

    Args:
        edge_index, edge_head: the per-head graph (small: tens of nodes).
        num_heads: the number of heads ``H`` (heads without edges are drawn empty).
        title: figure title.
        path: save a PNG there.
        num_src, num_dst: node counts (default: the ``EdgeIndex`` sparse size, else ``max + 1``).
        head_names: a label per head (default ``head h``).
        columns: matrices per row of the figure.
        dpi: resolution.
    """
    masks = to_dense_mask(edge_index, num_src, num_dst, edge_head=edge_head, num_heads=num_heads).cpu().numpy()
    if head_names is not None and len(head_names) != num_heads:
        raise ValueError(f"Expected 'head_names' to have {num_heads} entries, one per head (got {len(head_names)})")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"Expected 'columns' to be a positive int (got {columns!r})")
    columns = min(columns, num_heads)
    rows = -(-num_heads // columns)
    fig = Figure(figsize=(2.6 * columns, 2.6 * rows + (0.4 if title else 0.0)))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    cmap = ListedColormap(["#f4f4f4", "#2b5d9b"])
    for h, ax in enumerate(axes):
        if h >= num_heads:
            ax.set_axis_off()
            continue
        ax.imshow(masks[h], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        name = head_names[h] if head_names is not None else f"head {h}"
        ax.set_title(f"{name}: {int(masks[h].sum())} edges", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, dpi)
