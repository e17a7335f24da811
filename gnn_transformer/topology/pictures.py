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

from .analysis import hop_distances, summarize
from .exports import to_networkx
from .masks import _check_edge_index, _default_sizes, to_dense_mask


def _save(fig: Figure, path: str | Path | None, dpi: int) -> Figure:
    FigureCanvasAgg(fig)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


def _layout(g: nx.DiGraph, bipartite: bool) -> dict:
    if bipartite:
        keys = [v for v, d in g.nodes(data=True) if d.get("bipartite") == 0]
        return nx.bipartite_layout(g, keys, align="vertical")
    return nx.circular_layout(g) if g.number_of_nodes() > 2 else nx.spring_layout(g, seed=0)


def draw_topology(edge_index: Tensor, *, title: str | None = None, path: str | Path | None = None,
                  num_src: int | None = None, num_dst: int | None = None,
                  figsize: tuple[float, float] = (8.0, 4.0), dpi: int = 100) -> Figure:
    """Adjacency matrix (row = query ``i``, column = key ``j``, dark = edge ``j -> i``) beside a
    drawing of the graph (arrows ``j -> i``; self-loops shown only in the matrix).

    Args:
        edge_index: the token graph (small: tens of nodes).
        title: figure title; edge count and density are appended.
        path: save a PNG there.
        num_src, num_dst: node counts (default: the ``EdgeIndex`` sparse size).
        figsize, dpi: figure size in inches and resolution.
    """
    src, dst = _check_edge_index(edge_index)
    num_src, num_dst = _default_sizes(edge_index, src, dst, num_src, num_dst)
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
    bipartite = num_src != num_dst
    g = to_networkx(edge_index, num_src, num_dst, bipartite=bipartite)
    g.remove_edges_from(list(nx.selfloop_edges(g)))
    nx.draw_networkx(g, pos=_layout(g, bipartite), ax=ax_g, node_size=110, font_size=6,
                     node_color="#9ec3e6", edge_color="#555555", width=0.5, arrowsize=6,
                     with_labels=not bipartite, connectionstyle="arc3,rad=0.1")
    ax_g.set_axis_off()
    ax_g.set_title("graph (arrows j → i)", fontsize=9)
    stats = summarize(edge_index) if not bipartite else None
    info = f"{int(src.numel())} edges" + (f", density {stats.density:.2f}" if stats else "")
    fig.suptitle(f"{title} — {info}" if title else info, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def draw_receptive_field(edge_index: Tensor, num_layers: int, *, token: int | None = None,
                         title: str | None = None, path: str | Path | None = None,
                         figsize: tuple[float, float] = (8.0, 4.0), dpi: int = 100) -> Figure:
    """Receptive field over layers: left, for each query ``i`` and key ``j``, the number of layers
    after which ``j`` reaches ``i`` (blank: not within ``num_layers``); right, the receptive-field
    size of ``token`` (default: the last) and the mean over tokens, per layer.
    """
    src, dst = _check_edge_index(edge_index)
    num_src, num_dst = _default_sizes(edge_index, src, dst, None, None)
    if num_src != num_dst:
        raise ValueError(f"Expected a self-attention graph (got sparse size {(num_src, num_dst)})")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"Expected 'num_layers' to be an int >= 1 (got {num_layers!r})")
    n = num_dst
    token = n - 1 if token is None else token
    if not 0 <= token < max(n, 1):
        raise ValueError(f"Expected 'token' in [0, {n}) (got {token})")
    dist = hop_distances(edge_index, n, cutoff=num_layers)
    hops = np.full((n, n), np.nan)
    for i, row in dist.items():
        for j, d in row.items():
            hops[i, j] = d
    fig = Figure(figsize=figsize)
    ax_m, ax_c = fig.subplots(1, 2)
    cmap = colormaps["viridis_r"].resampled(num_layers + 1)  # one colour per layer count
    im = ax_m.imshow(hops, cmap=cmap, vmin=-0.5, vmax=num_layers + 0.5, interpolation="nearest")
    fig.colorbar(im, ax=ax_m, fraction=0.046, pad=0.04, ticks=range(num_layers + 1),
                 label="layers until j reaches i")
    ax_m.set_xlabel("key j")
    ax_m.set_ylabel("query i")
    layers = np.arange(num_layers + 1)
    sizes = np.array([[np.sum(hops[i] <= L) for i in range(n)] for L in layers])  # [L+1, N]
    ax_c.plot(layers, sizes[:, token] if n else layers * 0, marker="o", label=f"token {token}")
    ax_c.plot(layers, sizes.mean(axis=1) if n else layers * 0, marker=".", linestyle="--", label="mean")
    ax_c.axhline(n, color="grey", linewidth=0.5)
    ax_c.set_xlabel("layers")
    ax_c.set_ylabel("tokens reached")
    ax_c.legend(fontsize=8)
    fig.suptitle(title or f"receptive field over {num_layers} layers", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)
