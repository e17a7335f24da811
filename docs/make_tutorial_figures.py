"""Pictures of docs/tutorial.md: token graphs, masks as edge sets, attention weights on edges,
receptive fields.

Usage:
    python docs/make_tutorial_figures.py      # writes docs/img/tutorial_*.png

Runs in a few seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import torch
from matplotlib.figure import Figure

from gnn_transformer import GraphMultiheadAttention
from gnn_transformer import topology as T

OUT = Path(__file__).resolve().parent / "img"
DPI = 80


def token_graph(path: Path) -> None:
    """A causal token graph: adjacency matrix beside the drawing."""
    T.draw_topology(T.causal(6), title="causal attention on 6 tokens", path=path, dpi=DPI)


def masks_as_edges(path: Path) -> None:
    """Three masks, each an edge set: full, causal, sliding window, BigBird."""
    n = 12
    graphs = {
        "full": T.full(n),
        "causal": T.causal(n),
        "sliding_window(window=2)": T.sliding_window(n, 2),
        "bigbird(window=1)": T.bigbird(n, window=1, num_global=1, num_random=1),
    }
    fig = Figure(figsize=(10, 2.9), layout="constrained")
    for ax, (name, g) in zip(fig.subplots(1, len(graphs)), graphs.items()):
        ax.imshow(T.to_dense_mask(g).numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(f"{name}\n{g.size(1)} edges", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=DPI)


def attention_on_edges(path: Path) -> None:
    """Attention weights of one head drawn on the edges j -> i of a sliding-window graph."""
    torch.manual_seed(3)
    n = 7
    edge_index = T.sliding_window(n, 2).as_tensor()
    layer = GraphMultiheadAttention(16, 1, backend="pyg").eval()
    with torch.no_grad():
        _, alpha = layer(torch.randn(n, 16) * 2, edge_index, return_attention_weights=True)
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    pos = {i: (i, 0) for i in range(n)}
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.add_subplot()
    edges = [
        (j, i, a) for j, i, a in zip(edge_index[0].tolist(), edge_index[1].tolist(), alpha[:, 0].tolist()) if j != i
    ]
    for j, i, a in edges:
        g.add_edge(j, i)
        nx.draw_networkx_edges(
            g,
            pos,
            edgelist=[(j, i)],
            ax=ax,
            width=0.5 + 6 * a,
            alpha=0.3 + 0.7 * a,
            edge_color="#2b5d9b",
            arrowsize=10,
            connectionstyle=f"arc3,rad={0.35 if j < i else 0.35}",
        )
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color="#9ec3e6", node_size=420)
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=9)
    ax.set_title(
        "attention weights on the edges j → i (line width = weight; they sum to 1 at each query, self-loops not drawn)",
        fontsize=9,
    )
    ax.set_axis_off()
    fig.savefig(path, dpi=DPI)


def receptive_field(path: Path) -> None:
    T.draw_receptive_field(
        T.sliding_window(16, 1),
        4,
        title="sliding window radius 1: the receptive field grows by one hop per layer",
        path=path,
        dpi=DPI,
    )


def main() -> list[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    made = []
    for name, fn in (
        ("token_graph", token_graph),
        ("masks", masks_as_edges),
        ("attention_on_edges", attention_on_edges),
        ("receptive_field", receptive_field),
    ):
        path = OUT / f"tutorial_{name}.png"
        fn(path)
        made.append(path)
    return made


if __name__ == "__main__":
    for p in main():
        print(p)
