"""Graph analysis of token graphs with networkx: size, density, degrees, and how information
spreads over layers.

With residual connections a token keeps what it has, so after ``L`` layers token ``i`` has
received information from every ``j`` with a directed path ``j -> ... -> i`` of at most ``L``
edges (its *receptive field*). A sparse pattern "matches" full (or causal) attention after the
number of layers that makes every allowed pair reachable: the largest shortest-path distance over
those pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch import Tensor

from ._common import Lengths, as_lengths
from .exports import to_networkx
from .masks import _check_edge_index, _default_sizes


@dataclass(frozen=True)
class DegreeStats:
    """Degree statistics over the nodes of one side (targets for in-degree, sources for out)."""
    min: int
    max: int
    mean: float
    std: float


@dataclass(frozen=True)
class TopologyStats:
    """Size and shape of a token graph."""
    num_src: int
    num_dst: int
    num_edges: int
    density: float  # edges / edges of full attention within the sequences
    in_degree: DegreeStats  # keys per query
    out_degree: DegreeStats  # queries per key
    self_loops: int
    empty_rows: int  # queries with no key (zero attention output)
    causal: bool  # every edge j -> i has j <= i (local positions)


def _degree_stats(deg: Tensor) -> DegreeStats:
    if deg.numel() == 0:
        return DegreeStats(0, 0, 0.0, 0.0)
    d = deg.double()
    return DegreeStats(int(deg.min()), int(deg.max()), float(d.mean()),
                       float(d.std(unbiased=False)))


def _sequence_of(lengths: list[int]) -> Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))


def summarize(edge_index: Tensor, lengths: Lengths | None = None, *, src_lengths: Lengths | None = None) -> TopologyStats:
    """Edges, density, degree statistics, self-loops, empty rows, causality.

    Args:
        edge_index: the token graph.
        lengths: sequence lengths of the batch (default: one sequence of all targets), for the
            density (relative to full attention within sequences) and the causality check.
        src_lengths: source lengths of a bipartite (cross) graph.

    Example:
        >>> from gnn_transformer.topology import causal
        >>> s = summarize(causal(4))
        >>> s.num_edges, s.density, s.in_degree.max, s.causal
        (10, 0.625, 4, True)
    """
    src, dst = _check_edge_index(edge_index)
    num_src, num_dst = _default_sizes(edge_index, src, dst, None, None)
    q_len = as_lengths(lengths) if lengths is not None else [num_dst]
    k_len = as_lengths(src_lengths, "src_lengths") if src_lengths is not None else (
        q_len if lengths is not None or num_src == num_dst else [num_src])
    if sum(q_len) != num_dst or sum(k_len) != num_src:
        raise ValueError(f"Expected 'lengths' to sum to the graph's nodes ({num_dst}) (got {q_len})")
    full_edges = sum(a * b for a, b in zip(q_len, k_len))
    in_deg = torch.bincount(dst, minlength=num_dst)
    out_deg = torch.bincount(src, minlength=num_src)
    q_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(q_len, dtype=torch.long).cumsum(0)])
    k_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(k_len, dtype=torch.long).cumsum(0)])
    seq = _sequence_of(q_len)[dst] if dst.numel() else dst
    is_causal = bool(((src - k_ptr[seq]) <= (dst - q_ptr[seq])).all()) if dst.numel() else True
    return TopologyStats(
        num_src=num_src, num_dst=num_dst, num_edges=int(src.numel()),
        density=float(src.numel() / full_edges) if full_edges else 0.0,
        in_degree=_degree_stats(in_deg), out_degree=_degree_stats(out_deg),
        self_loops=int((src == dst).sum()) if num_src == num_dst else 0,
        empty_rows=int((in_deg == 0).sum()), causal=is_causal)


def hop_distances(edge_index: Tensor, num_nodes: int | None = None, cutoff: int | None = None) -> dict[int, dict[int, int]]:
    """``{i: {j: d}}``: fewest edges on a path ``j -> ... -> i`` (``d(i, i) = 0``, the residual),
    for the ``j`` reaching ``i`` within ``cutoff`` edges. Breadth-first search per node (networkx)."""
    g = to_networkx(edge_index, num_nodes, num_nodes, bipartite=False)
    rev = g.reverse(copy=False)  # paths into i = paths out of i in the reversed graph
    return {i: dict(nx.single_source_shortest_path_length(rev, i, cutoff=cutoff)) for i in rev.nodes}


def receptive_field(edge_index: Tensor, num_layers: int, num_nodes: int | None = None) -> dict[int, set[int]]:
    """Tokens each token has received information from after ``num_layers`` layers.

    Example:
        >>> from gnn_transformer.topology import sliding_window
        >>> receptive_field(sliding_window(5, 1, causal=True), 2)[4]
        {2, 3, 4}
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"Expected 'num_layers' to be a non-negative int (got {num_layers!r})")
    return {i: set(d) for i, d in hop_distances(edge_index, num_nodes, cutoff=num_layers).items()}


def receptive_field_sizes(edge_index: Tensor, max_layers: int, num_nodes: int | None = None) -> dict[int, list[int]]:
    """``{layers: [size of token i's receptive field, ...]}`` for ``layers = 0..max_layers``."""
    dist = hop_distances(edge_index, num_nodes, cutoff=max_layers)
    n = len(dist)
    return {L: [sum(1 for d in dist[i].values() if d <= L) for i in range(n)] for L in range(max_layers + 1)}


def layers_to_match(edge_index: Tensor, lengths: Lengths | None = None, *,
                    reference: str = "full") -> int | None:
    """Layers after which every token has received information from every token it would see
    under ``reference`` attention (``"full"`` or ``"causal"``) within its sequence; ``None`` if
    some such pair is never connected.

    Example:
        >>> from gnn_transformer.topology import sliding_window, star
        >>> layers_to_match(sliding_window(9, 2)), layers_to_match(star(9))
        (4, 2)
    """
    if reference not in ("full", "causal"):
        raise ValueError(f"Expected 'reference' to be 'full' or 'causal' (got {reference!r})")
    src, dst = _check_edge_index(edge_index)
    num_src, num_dst = _default_sizes(edge_index, src, dst, None, None)
    if num_src != num_dst:
        raise ValueError(f"Expected a self-attention graph (got sparse size {(num_src, num_dst)})")
    lens = as_lengths(lengths) if lengths is not None else [num_dst]
    if sum(lens) != num_dst:
        raise ValueError(f"Expected 'lengths' to sum to {num_dst} (got {lens})")
    dist = hop_distances(edge_index, num_dst)
    worst, start = 0, 0
    for L in lens:  # per sequence; the pairs themselves come from the BFS tables
        for i in range(start, start + L):
            wanted = range(start, i + 1) if reference == "causal" else range(start, start + L)
            row = dist[i]
            for j in wanted:
                if j not in row:
                    return None
                worst = max(worst, row[j])
        start += L
    return worst


def diameter(edge_index: Tensor, num_nodes: int | None = None) -> int | None:
    """Longest shortest path ``j -> i`` over all pairs; ``None`` if not strongly connected."""
    g = to_networkx(edge_index, num_nodes, num_nodes, bipartite=False)
    if g.number_of_nodes() == 0:
        return 0
    if not nx.is_strongly_connected(g):
        return None
    return nx.diameter(g)
