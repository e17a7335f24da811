"""Graph-structured inputs: attention along the edges of a given graph (a molecule, a citation
network, a syntax tree), optionally with self-loops and a virtual global node.

Accepts a ``networkx`` graph (undirected edges become both directions; a ``DiGraph`` edge
``u -> v`` lets ``v`` attend to ``u``), a PyG ``Data`` (its ``edge_index``, same convention), or a
list of them (a batch, disjoint union). Files in any format networkx reads are loaded by
:func:`read_graph`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

import networkx as nx
import torch
from torch import Tensor
from torch_geometric import EdgeIndex
from torch_geometric.data import Data
from torch_geometric.utils import from_networkx

from ._common import check_bool, coalesce_edges

GraphLike: TypeAlias = nx.Graph | Data

READERS: dict[str, Callable[[str], nx.Graph]] = {
    ".edgelist": lambda p: nx.read_edgelist(p, nodetype=int),
    ".adjlist": lambda p: nx.read_adjlist(p, nodetype=int),
    ".graphml": nx.read_graphml,
    ".gml": nx.read_gml,
}


def read_graph(path: str | Path) -> nx.Graph:
    """Read a graph file by extension: ``.edgelist``/``.adjlist`` (integer node ids), ``.graphml``,
    ``.gml``. A ``.edgelist`` or ``.adjlist`` starting with ``# directed`` is read as a ``DiGraph``."""
    path = Path(path)
    reader = READERS.get(path.suffix)
    if reader is None:
        raise ValueError(f"Expected 'path' with a suffix in {sorted(READERS)} (got {str(path)!r})")
    if not path.is_file():
        raise ValueError(f"No graph file at 'path'={str(path)!r}")
    if path.suffix in (".edgelist", ".adjlist"):
        with path.open() as f:
            directed = f.readline().strip().lower().startswith("# directed")
        read = nx.read_edgelist if path.suffix == ".edgelist" else nx.read_adjlist
        return read(path, nodetype=int, create_using=nx.DiGraph if directed else nx.Graph)
    return reader(str(path))


def _edges(graph: GraphLike) -> tuple[Tensor, Tensor, int]:
    """``(src, dst, num_nodes)`` of one graph; networkx nodes are numbered in ``graph.nodes`` order."""
    if isinstance(graph, Data):
        if graph.edge_index is None:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), int(graph.num_nodes or 0)
        ei = graph.edge_index.as_tensor() if isinstance(graph.edge_index, EdgeIndex) else graph.edge_index
        return ei[0].long(), ei[1].long(), int(graph.num_nodes)
    if isinstance(graph, nx.Graph):
        plain = nx.DiGraph() if graph.is_directed() else nx.Graph()
        plain.add_nodes_from(graph.nodes)  # drop attributes: only the structure matters here
        plain.add_edges_from(graph.edges)
        data = from_networkx(plain)  # undirected -> both directions
        return data.edge_index[0], data.edge_index[1], graph.number_of_nodes()
    raise ValueError(f"Expected 'graph' to be a networkx graph or a torch_geometric Data (got {type(graph).__name__})")


def from_graph(
    graph: GraphLike | Sequence[GraphLike], *, self_loops: bool = False, virtual_node: bool = False
) -> EdgeIndex:
    r"""Token graph of a graph-structured input: ``j -> i`` for each edge ``j -> i`` of ``graph``.

    Edges: ``E`` (directed edges, each undirected edge counted twice), ``+ N`` with
    ``self_loops``, ``+ 2N + 1`` with ``virtual_node`` (a node appended at the end of each graph
    that attends to and is attended by all its nodes and itself). Duplicated edges are merged.

    Args:
        graph: a networkx graph, a PyG ``Data``, or a list of them (a batch).
        self_loops: let every node attend to itself.
        virtual_node: append one global node per graph (index ``N_b`` of graph ``b``).

    Example:
        >>> import networkx as nx
        >>> from_graph(nx.path_graph(3)).tolist()
        [[1, 0, 2, 1], [0, 1, 1, 2]]
        >>> from_graph(nx.path_graph(2), virtual_node=True).size(1)
        7
    """
    check_bool("self_loops", self_loops)
    check_bool("virtual_node", virtual_node)
    graphs = list(graph) if isinstance(graph, (list, tuple)) else [graph]
    src, dst, offset = [], [], 0
    for g in graphs:  # one conversion per graph of the batch
        s, d, n = _edges(g)
        if s.numel() and (int(s.max()) >= n or int(d.max()) >= n or int(min(s.min(), d.min())) < 0):
            raise ValueError(f"Expected the edges of 'graph' in [0, {n}) (got an edge out of range)")
        nodes = torch.arange(n)
        if self_loops:
            s, d = torch.cat([s, nodes]), torch.cat([d, nodes])
        if virtual_node:
            v = torch.full((n + 1,), n)
            everyone = torch.arange(n + 1)
            s, d = torch.cat([s, v, everyone]), torch.cat([d, everyone, v])
            n += 1
        src.append(s + offset)
        dst.append(d + offset)
        offset += n
    empty = torch.zeros(0, dtype=torch.long)
    return coalesce_edges(torch.cat(src) if src else empty, torch.cat(dst) if dst else empty, offset)


def from_graph_predicate(
    graph: nx.Graph, *, self_loops: bool = False, virtual_node: bool = False
) -> Callable[[int, int], bool]:
    """Predicate twin of :func:`from_graph` for one networkx graph: ``(i, j) -> bool``."""
    nodes = list(graph.nodes)
    n = len(nodes)

    def pred(i: int, j: int) -> bool:
        if virtual_node and (i == n or j == n):
            return True
        if self_loops and i == j:
            return True
        return graph.has_edge(nodes[j], nodes[i])

    return pred
