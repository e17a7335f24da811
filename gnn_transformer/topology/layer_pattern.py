"""The graphs of a per-layer spec: :class:`LayerPattern`, a callable ``layer -> graph``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)
class LayerPattern:
    """The graphs of a per-layer spec: layer ``l`` attends along ``graphs[l % period]``.

    A callable ``layer -> graph`` (an ``EdgeIndex`` or a pair ``(edge_index, edge_head)``), which
    stacks and models take as their per-layer graphs. Repeated layers of the spec hold the same
    graph object, so what the kernels cache per graph serves all of them.

    Example:
        >>> from gnn_transformer.topology import full, sliding_window
        >>> pattern = LayerPattern((sliding_window(4, 1),) * 2 + (full(4),))
        >>> [pattern(layer).size(1) for layer in range(4)]
        [10, 10, 16, 10]
    """

    graphs: tuple

    @property
    def period(self) -> int:
        """Layers in one cycle."""
        return len(self.graphs)

    def graph(self, layer: int) -> Any:
        """The graph of layer ``layer >= 0``."""
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"Expected 'layer' to be a non-negative int (got {layer!r})")
        return self.graphs[layer % len(self.graphs)]

    def __call__(self, layer: int) -> Any:
        return self.graph(layer)

    def to(self, device: Any) -> LayerPattern:
        """The same pattern on ``device`` (layers that share a graph still do)."""
        moved: dict[int, Any] = {}
        for g in self.graphs:
            if id(g) not in moved:
                moved[id(g)] = tuple(t.to(device) for t in g) if isinstance(g, tuple) else g.to(device)
        return LayerPattern(tuple(moved[id(g)] for g in self.graphs))

    def distinct(self) -> list[tuple[list[int], Any]]:
        """The distinct graphs of one cycle, each with the layers (of ``0 .. period - 1``) that use it."""
        out: list[tuple[list[int], Any]] = []
        for layer, g in enumerate(self.graphs):
            for layers, seen in out:
                if _same_graph(g, seen):
                    layers.append(layer)
                    break
            else:
                out.append(([layer], g))
        return out


def _same_graph(a: Any, b: Any) -> bool:
    if a is b:
        return True
    a, b = (g if isinstance(g, tuple) else (g,) for g in (a, b))
    return len(a) == len(b) and all(x.shape == y.shape and bool((x == y).all()) for x, y in zip(a, b))
