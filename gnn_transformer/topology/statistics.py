"""Graph statistics of token graphs with networkx: size, density, degrees, and how information
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
from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths
from .exports import to_networkx
from .masks import _check_edge_index, _check_range, _default_sizes


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
    return DegreeStats(int(deg.min()), int(deg.max()), float(d.mean()), float(d.std(unbiased=False)))


def _sequence_of(lengths: list[int]) -> Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))


def _graph_sizes(
    edge_index: Tensor,
    src: Tensor,
    dst: Tensor,
    num_src: int | None,
    num_dst: int | None,
    q_len: list[int] | None,
    k_len: list[int] | None,
    bipartite: bool | None,
) -> tuple[int, int, bool]:
    """``(num_src, num_dst, bipartite)``: explicit sizes, else the ``EdgeIndex`` sparse size, else
    (a plain tensor) the lengths, else one node set of ``max + 1`` over both rows unless
    ``bipartite=True``. ``bipartite`` defaults to ``num_src != num_dst``."""
    if bipartite is not None and not isinstance(bipartite, bool):
        raise ValueError(f"Expected 'bipartite' to be None or a bool (got {bipartite!r})")
    if not isinstance(edge_index, EdgeIndex):  # no sparse size: the lengths, else one node set
        num_dst = sum(q_len) if num_dst is None and q_len is not None else num_dst
        num_src = sum(k_len) if num_src is None and k_len is not None else num_src
        if not bipartite:
            s_top, d_top = (int(v.max()) + 1 if v.numel() else 0 for v in (src, dst))
            if num_src is None and num_dst is None:
                num_src = num_dst = max(s_top, d_top)
            elif num_src is None:
                num_src = max(num_dst, s_top) if isinstance(num_dst, int) else num_dst
            elif num_dst is None:
                num_dst = max(num_src, d_top) if isinstance(num_src, int) else num_src
    num_src, num_dst = _default_sizes(edge_index, src, dst, num_src, num_dst)
    _check_range(src, dst, num_src, num_dst)
    if bipartite is False and num_src != num_dst:
        raise ValueError(
            f"Expected a self-attention graph for 'bipartite'=False (got num_src={num_src} != num_dst={num_dst})"
        )
    return num_src, num_dst, num_src != num_dst if bipartite is None else bipartite


def topology_stats(
    edge_index: Tensor,
    lengths: Lengths | None = None,
    *,
    src_lengths: Lengths | None = None,
    num_src: int | None = None,
    num_dst: int | None = None,
    bipartite: bool | None = None,
) -> TopologyStats:
    """Edges, density, degree statistics, self-loops, empty rows, causality.

    Args:
        edge_index: the token graph.
        lengths: sequence lengths of the batch (default: one sequence of all targets), for the
            density (relative to full attention within sequences) and the causality check.
        src_lengths: source lengths of a bipartite (cross) graph (default: the ``lengths`` of a
            self-attention graph; one sequence of all sources for a bipartite one, which needs
            ``src_lengths`` when ``lengths`` holds more than one sequence).
        num_src, num_dst: node counts (default: the ``EdgeIndex`` sparse size; for a plain tensor
            the lengths, else one node set of ``max + 1`` over both rows).
        bipartite: whether sources and targets are different tokens (cross attention: no
            self-loops). Default: ``num_src != num_dst``; pass ``True`` for a cross graph with as
            many keys as queries.

    Example:
        >>> from gnn_transformer.topology import causal
        >>> s = topology_stats(causal(4))
        >>> s.num_edges, s.density, s.in_degree.max, s.causal
        (10, 0.625, 4, True)
    """
    src, dst = _check_edge_index(edge_index)
    q_len = as_lengths(lengths, "lengths") if lengths is not None else None
    k_len = as_lengths(src_lengths, "src_lengths") if src_lengths is not None else None
    num_src, num_dst, bipartite = _graph_sizes(edge_index, src, dst, num_src, num_dst, q_len, k_len, bipartite)
    q_len = [num_dst] if q_len is None else q_len
    if k_len is None:
        if bipartite and len(q_len) > 1:
            raise ValueError(
                f"Expected 'src_lengths' for a bipartite (cross) graph with a batch of "
                f"'lengths' {q_len} (got src_lengths=None)"
            )
        k_len = [num_src] if bipartite else q_len
    if sum(q_len) != num_dst:
        raise ValueError(f"Expected 'lengths' to sum to the graph's targets ({num_dst}) (got {q_len})")
    if sum(k_len) != num_src or len(k_len) != len(q_len):
        raise ValueError(
            f"Expected 'src_lengths' to sum to the graph's sources ({num_src}), one per "
            f"sequence of 'lengths' {q_len} (got {k_len})"
        )
    full_edges = sum(a * b for a, b in zip(q_len, k_len))
    in_deg = torch.bincount(dst, minlength=num_dst)
    out_deg = torch.bincount(src, minlength=num_src)
    q_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(q_len, dtype=torch.long).cumsum(0)])
    k_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(k_len, dtype=torch.long).cumsum(0)])
    seq = _sequence_of(q_len)[dst] if dst.numel() else dst
    is_causal = bool(((src - k_ptr[seq]) <= (dst - q_ptr[seq])).all()) if dst.numel() else True
    return TopologyStats(
        num_src=num_src,
        num_dst=num_dst,
        num_edges=int(src.numel()),
        density=float(src.numel() / full_edges) if full_edges else 0.0,
        in_degree=_degree_stats(in_deg),
        out_degree=_degree_stats(out_deg),
        self_loops=0 if bipartite else int((src == dst).sum()),
        empty_rows=int((in_deg == 0).sum()),
        causal=is_causal,
    )


def _check_layers(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected '{name}' to be a non-negative int (got {value!r})")


def hop_distances(
    edge_index: Tensor, num_nodes: int | None = None, cutoff: int | None = None
) -> dict[int, dict[int, int]]:
    """``{i: {j: d}}``: fewest edges on a path ``j -> ... -> i`` (``d(i, i) = 0``, the residual),
    for the ``j`` reaching ``i`` within ``cutoff`` edges. Breadth-first search per node (networkx)."""
    if cutoff is not None:
        _check_layers(cutoff, "cutoff")
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
    _check_layers(num_layers, "num_layers")
    return {i: set(d) for i, d in hop_distances(edge_index, num_nodes, cutoff=num_layers).items()}


def receptive_field_sizes(edge_index: Tensor, max_layers: int, num_nodes: int | None = None) -> dict[int, list[int]]:
    """``{layers: [size of token i's receptive field, ...]}`` for ``layers = 0..max_layers``."""
    _check_layers(max_layers, "max_layers")
    dist = hop_distances(edge_index, num_nodes, cutoff=max_layers)
    n = len(dist)
    return {L: [sum(1 for d in dist[i].values() if d <= L) for i in range(n)] for L in range(max_layers + 1)}


def layers_to_match(edge_index: Tensor, lengths: Lengths | None = None, *, reference: str = "full") -> int | None:
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
