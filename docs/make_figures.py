"""Pictures of docs/topology.md: every catalogue topology at toy scale (per-head specs one matrix
per head, per-layer specs one per distinct layer graph, selector specs their allowed graph), cross
attention, a graph-structured input, and a receptive field.

Usage:
    python docs/make_figures.py            # writes docs/img/topology_*.png

Each picture is the adjacency matrix (row = query i, column = key j) beside the graph drawing.
Runs in a few seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from gnn_transformer import topology as T

OUT = Path(__file__).resolve().parent / "img"
GRAPHS = Path(__file__).resolve().parents[1] / "graphs"
DPI = 64


def shrink(path: Path) -> None:
    """Re-save as a 32-colour palette PNG (the pictures are flat colours): a few times smaller."""
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=32, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main() -> list[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    written = []
    for name in T.catalogue():
        spec = T.read_spec(name)
        path = OUT / f"topology_{name}.png"
        graph = T.load(name, small=True)
        title = f"{name} (n = {spec.small_n})" + ("" if spec.select is None else ", the allowed graph")
        if spec.per_layer:  # one matrix per distinct layer graph of the cycle (a graph for every head)
            distinct = graph.distinct()
            graphs = [g[0] if isinstance(g, tuple) else g for _, g in distinct]
            heads = torch.cat([torch.full((g.size(1),), k) for k, g in enumerate(graphs)])
            edges = torch.cat([g.as_tensor() for g in graphs], dim=1)
            names = [f"layer{'s' * (len(ls) > 1)} {', '.join(map(str, ls))} of {graph.period}" for ls, _ in distinct]
            T.draw_per_head(edges, heads, len(graphs), title=title, path=path, head_names=names, dpi=DPI)
        elif spec.num_heads is not None:
            T.draw_per_head(*graph, spec.num_heads, title=title, path=path, dpi=DPI)
        else:
            T.draw_topology(graph, title=title, path=path, dpi=DPI)
        written.append(path)
    extras = {  # (graph, title, keyword arguments of draw_topology)
        "cross_window": (T.cross(6, 9, mode="window", window=1), "cross, window 1 (6 queries, 9 keys)", {}),
        "cross_monotonic": (T.cross(6, 9, mode="monotonic"), "cross, monotonic (6 queries, 9 keys)", {}),
        "from_graph": (
            T.from_graph(T.read_graph(GRAPHS / "data" / "binary_tree.edgelist"), self_loops=True, virtual_node=True),
            "binary tree + self-loops + virtual node",
            {},
        ),
        "batch": (
            T.sliding_window([6, 1, 5], 1, causal=True),
            "causal window 1, batch [6, 1, 5]",
            {"lengths": [6, 1, 5]},
        ),  # density within the sequences
    }
    for key, (ei, title, kwargs) in extras.items():
        path = OUT / f"topology_{key}.png"
        T.draw_topology(ei, title=title, path=path, dpi=DPI, **kwargs)
        written.append(path)
    path = OUT / "topology_receptive_field.png"
    T.draw_receptive_field(
        T.load("sliding_window", small=True), 4, title="causal window 3: receptive field", path=path, dpi=DPI
    )
    written.append(path)
    for name, (ei, eh), title, names in (
        (
            "duo",
            T.duo_attention(24, [1, 3], 4, num_sinks=2, window=3),
            "DuoAttention: heads 0, 2 retrieve (causal), heads 1, 3 stream (2 sinks + window 3)",
            ["head 0, retrieval", "head 1, streaming", "head 2, retrieval", "head 3, streaming"],
        ),
        (
            "dilated",
            T.dilated_per_head(24, 3, [1, 2, 3, 4], causal=True),
            "Longformer-style dilated windows, one dilation per head (radius 3, causal)",
            [f"head {h}, dilation {h + 1}" for h in range(4)],
        ),
    ):
        path = OUT / f"per_head_{name}.png"
        T.draw_per_head(ei, eh, 4, title=title, path=path, head_names=names, dpi=DPI)
        written.append(path)
    for p in written:
        shrink(p)
    return written


if __name__ == "__main__":
    for p in main():
        print(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p)
