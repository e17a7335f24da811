"""Graph tasks: attention runs on the edges of the input graph (or on all node pairs).

- ``karate``: node classification on Zachary's karate club (PyG's ``KarateClub``, bundled, no
  download): 4 communities, one labelled node each, the other 30 nodes to predict.
- ``shortest_path``: synthetic graphs drawn with networkx (Watts-Strogatz rings with shortcuts);
  one node is the source, every node predicts its hop distance to it (clipped to
  ``max_distance``). Trained on small graphs, tested on same-size and larger ones.

Topologies: ``"graph"`` attends along the input edges plus self-loops (a message travels one hop
per layer, as in a GNN); ``"full"`` lets every node of a graph attend to every node of the same
graph (positions then come only from the optional Laplacian eigenvector encodings).
Options from PyG's transforms: :class:`~torch_geometric.transforms.AddLaplacianEigenvectorPE`
(``pe_dim`` eigenvectors, random sign flips while training as in Dwivedi et al.) and
:class:`~torch_geometric.transforms.VirtualNode` (one extra node linked both ways to every node).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch_geometric.transforms as T
from torch import Tensor
from torch_geometric.data import Batch, Data
from torch_geometric.utils import add_self_loops, from_networkx

from ..topology import full
from .tasks import IGNORE, check_set_fits

GRAPH_TOPOLOGIES = ("graph", "full")


@dataclass
class GraphBatch:
    """A PyG batch of graphs and the labels to score (``IGNORE`` elsewhere)."""

    data: Batch
    labels: Tensor


def _transforms(pe_dim: int, virtual_node: bool) -> T.Compose:
    steps = []
    if pe_dim:
        steps.append(T.AddLaplacianEigenvectorPE(pe_dim, attr_name="pe", is_undirected=True))
    if virtual_node:
        steps.append(T.VirtualNode())
    return T.Compose(steps)


def _mark_virtual(data: Data, num_real: int) -> Data:
    """Label ``IGNORE`` on the nodes a ``VirtualNode`` transform appended."""
    if data.num_nodes > num_real:
        data.y = data.y.clone()
        data.y[num_real:] = IGNORE
    return data


def token_graph(data: Batch | Data, topology: str) -> Tensor:
    """Edges the attention runs on: the input graph with self-loops, or all pairs per graph."""
    if topology == "graph":
        edge_index, _ = add_self_loops(data.edge_index, num_nodes=data.num_nodes)
        return edge_index
    if topology == "full":
        ptr = getattr(data, "ptr", None)
        lengths = (ptr[1:] - ptr[:-1]).tolist() if ptr is not None else [data.num_nodes]
        return full(lengths)
    raise ValueError(f"Expected a graph-task topology in {GRAPH_TOPOLOGIES} (got {topology!r})")


class GraphWorkload:
    """Shared plumbing: run a :class:`~.models.NodeModel` on a :class:`GraphBatch`."""

    topology: str
    pe_dim: int
    in_features: int
    num_classes: int

    def logits(self, model, batch: GraphBatch, device) -> tuple[Tensor, Tensor]:
        data = batch.data.to(device)
        pe = getattr(data, "pe", None) if self.pe_dim else None
        if pe is not None and model.training:  # eigenvectors have no sign: flip at random
            sign = torch.randint(0, 2, (1, pe.size(1)), device=pe.device) * 2 - 1
            pe = pe * sign
        edge_index = token_graph(data, self.topology).to(device)
        return model(data.x, edge_index, pe), batch.labels.to(device)

    def batch_tokens(self, batch: GraphBatch) -> int:
        return int(batch.data.num_nodes)


class KarateWorkload(GraphWorkload):
    """Semi-supervised node classification on the karate club (train on 4 labelled nodes)."""

    def __init__(self, topology: str = "graph", pe_dim: int = 4, virtual_node: bool = False) -> None:
        from torch_geometric.datasets import KarateClub

        if topology not in GRAPH_TOPOLOGIES:
            raise ValueError(f"Expected 'topology' in {GRAPH_TOPOLOGIES} (got {topology!r})")
        data = KarateClub()[0]
        num_real = data.num_nodes
        if not 0 <= pe_dim < num_real:
            raise ValueError(
                f"Expected 'pe_dim' in [0, {num_real}) for the karate club's {num_real} nodes (got {pe_dim})"
            )
        self.topology, self.pe_dim = topology, pe_dim
        test_mask = ~data.train_mask
        data = _transforms(pe_dim, virtual_node)(data)
        pad = data.num_nodes - num_real
        train_mask = torch.cat([data.train_mask[:num_real], torch.zeros(pad, dtype=torch.bool)])
        test_mask = torch.cat([test_mask, torch.zeros(pad, dtype=torch.bool)])
        batch = Batch.from_data_list([data])
        self.in_features, self.num_classes = data.num_features, int(data.y[:num_real].max()) + 1
        self._train = GraphBatch(batch, torch.where(train_mask, batch.y, IGNORE))
        self._test = GraphBatch(batch, torch.where(test_mask, batch.y, IGNORE))

    def train_batch(self, generator: torch.Generator) -> GraphBatch:
        return self._train

    def eval_sets(self) -> dict[str, list[GraphBatch]]:
        return {"test": [self._test]}


def shortest_path_graph(n: int, max_distance: int, seed: int, pe_dim: int = 0, virtual_node: bool = False) -> Data:
    """One instance: a connected Watts-Strogatz graph on ``n`` nodes, source node 0.

    Features ``x`` ``[n, 2]``: (is source, 1). Label ``y``: hop distance to the source, clipped to
    ``max_distance``.
    """
    graph = nx.connected_watts_strogatz_graph(n, 2, 0.2, seed=seed)
    rng = torch.Generator().manual_seed(seed)
    source = int(torch.randint(0, n, (1,), generator=rng))
    dist = nx.single_source_shortest_path_length(graph, source)
    data = from_networkx(graph)
    data.x = torch.zeros(n, 2)
    data.x[source, 0] = 1.0
    data.x[:, 1] = 1.0
    data.y = torch.tensor([min(dist[v], max_distance) for v in range(n)], dtype=torch.long)
    data = _transforms(pe_dim, virtual_node)(data)
    return _mark_virtual(data, n)


class ShortestPathWorkload(GraphWorkload):
    """Hop distance to a marked source on synthetic graphs (train small, test larger)."""

    def __init__(
        self,
        topology: str = "graph",
        pe_dim: int = 4,
        virtual_node: bool = False,
        batch_size: int = 16,
        train_sizes: tuple[int, int] = (10, 20),
        test_sizes: tuple[int, int] = (21, 40),
        max_distance: int = 6,
        eval_size: int = 64,
        eval_seed: int = 12345,
    ) -> None:
        if topology not in GRAPH_TOPOLOGIES:
            raise ValueError(f"Expected 'topology' in {GRAPH_TOPOLOGIES} (got {topology!r})")
        if not 0 <= pe_dim < min(train_sizes[0], test_sizes[0]):
            raise ValueError(
                f"Expected 'pe_dim' >= 0 and below the smallest graph size (got "
                f"{pe_dim}, sizes {tuple(train_sizes)} and {tuple(test_sizes)})"
            )
        if test_sizes[0] <= train_sizes[1]:
            raise ValueError(
                f"Expected 'test_sizes' {tuple(test_sizes)} above 'train_sizes' "
                f"{tuple(train_sizes)}: the longer test measures generalization to "
                "larger graphs than any seen in training"
            )
        self.topology, self.pe_dim, self.virtual_node = topology, pe_dim, virtual_node
        self.batch_size, self.train_sizes, self.test_sizes = batch_size, train_sizes, test_sizes
        self.max_distance = max_distance
        self.in_features, self.num_classes = 2, max_distance + 1
        # per node of the two sets: features and encodings (float32), label, batch entry and the
        # Watts-Strogatz graph's two edges each way (int64)
        check_set_fits("eval_size", eval_size, test_sizes[1] + 1, 4 * (2 + pe_dim) + 8 * (2 + 2 * 2 * 2), sets=2)
        self._eval = {
            "test": self._fixed(eval_size, train_sizes, eval_seed),
            "longer": self._fixed(eval_size, test_sizes, eval_seed + 10**6),
        }

    def _draw(self, count: int, sizes: tuple[int, int], generator: torch.Generator) -> GraphBatch:
        graphs = []
        for _ in range(count):
            n = int(torch.randint(sizes[0], sizes[1] + 1, (1,), generator=generator))
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            graphs.append(shortest_path_graph(n, self.max_distance, seed, self.pe_dim, self.virtual_node))
        batch = Batch.from_data_list(graphs)
        return GraphBatch(batch, batch.y)

    def _fixed(self, count: int, sizes: tuple[int, int], seed: int) -> list[GraphBatch]:
        g = torch.Generator().manual_seed(seed)
        return [self._draw(min(32, count - i), sizes, g) for i in range(0, count, 32)]

    def train_batch(self, generator: torch.Generator) -> GraphBatch:
        return self._draw(self.batch_size, self.train_sizes, generator)

    def eval_sets(self) -> dict[str, list[GraphBatch]]:
        return self._eval
