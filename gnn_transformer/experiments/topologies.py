"""Topologies named on the command line: ``"name"``, ``"name:key=value,key=value"``, with an
optional selector ``"...+selector:key=value"``.

``name`` is a builder of :mod:`gnn_transformer.topology` (a key of ``topology.BUILDERS``:
``full``, ``sliding_window``, ``bigbird``, ``random``, ``dilated_per_head``, ...), called as
``builder(lengths, **kwargs)``, or the name or path of a TOML spec of the ``graphs/`` catalogue,
read with :func:`gnn_transformer.topology.read_spec`. A bare name that is both (``"bigbird"``) is
the catalogue spec, with the parameters of its paper; with arguments it is the builder.

A list argument is written with ``;`` between its items: ``dilated_per_head:window=4,
dilations=1;2;4;8`` (one item: ``dilations=4`` or ``4;``; none: ``streaming_heads=;``).

A spec that ends in ``.toml`` or contains a path separator (``/`` or ``\\``) is a file path, taken
whole (a ``:`` in it is part of the path); any other spec is a name, never a file of the current
directory (:func:`gnn_transformer.topology.specs.is_path`, the rule of ``topology.load``). Builder
arguments are checked like a spec file's ``params`` (types and bounds), and an error while building
names the spec or its file.

**Selectors.** ``SPEC+SELECTOR`` makes the graph of ``SPEC`` the allowed graph within which every
layer of a model chooses its own per-head graph from its queries and keys:
``causal+topk:num_keys=8``, ``graphs/x.toml+block_topk:block_size=64,num_blocks=2``. ``SELECTOR``
is a spec of :func:`gnn_transformer.topology.dynamic.selector` (``topk``, ``block_topk``, ``lsh``,
``routing``); the split is at the last ``+`` followed by a selector name. It replaces a TOML
spec's own ``select``.

What a spec builds (:class:`Topology`): a graph for every head (an ``EdgeIndex``), a per-head graph
``(edge_index, edge_head)`` (``num_heads`` set), or a per-layer
:class:`~gnn_transformer.topology.specs.LayerPattern` (``per_layer``).

Example:
    >>> name, kwargs = parse_spec("bigbird:window=1,num_random=2")
    >>> name, kwargs
    ('bigbird', {'window': 1, 'num_random': 2})
    >>> build = topology_fn("sliding_window:window=1")
    >>> build([3]).tolist()
    [[0, 1, 0, 1, 2, 1, 2], [0, 0, 1, 1, 1, 2, 2]]
    >>> t = resolve_topology("dilated_per_head:window=1,dilations=1;2")
    >>> t.kind, t.num_heads
    ('per_head', 2)
    >>> t = resolve_topology("causal+topk:num_keys=2")
    >>> t.select, t.kind
    ('topk:num_keys=2', 'shared')
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch_geometric import EdgeIndex

from .. import topology
from ..topology.dynamic import SELECTORS, selector
from ..topology.specs import LayerPattern, Spec, check_params, is_path

_SELECT = re.compile(r"\+(?=(?:" + "|".join(SELECTORS) + r")(?::|$))")


def _value(text: str) -> Any:
    if ";" in text:  # a list: items between ';', empty items dropped
        return [_value(item.strip()) for item in text.split(";") if item.strip()]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_select(spec: str) -> tuple[str, str | None]:
    """``"graph+selector"`` -> ``("graph", "selector")``; ``(spec, None)`` without a selector.

    Example:
        >>> split_select("causal+topk:num_keys=8")
        ('causal', 'topk:num_keys=8')
    """
    if not isinstance(spec, str):
        raise ValueError(f"Expected a topology spec like 'sliding_window:window=2' (got {spec!r})")
    found = list(_SELECT.finditer(spec))
    if not found:
        return spec, None
    at = found[-1].start()
    return spec[:at], spec[at + 1 :].strip()


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,..."`` into the name and typed keyword arguments; a file path
    (``*.toml``, or containing a path separator) is returned whole, without arguments. A selector
    suffix (``+topk:...``) is not part of either (see :func:`split_select`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Expected a topology spec like 'sliding_window:window=2' (got {spec!r})")
    spec = split_select(spec.strip())[0].strip()
    if not spec:
        raise ValueError("Expected a topology spec before the selector, like 'causal+topk:num_keys=8'")
    if is_path(spec):
        return spec, {}
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"Expected 'key=value' in topology spec {spec!r} (got {item!r})")
        if key in kwargs:
            raise ValueError(f"Expected each key once in topology spec {spec!r} (got {key!r} twice)")
        kwargs[key] = _value(value.strip())
    return name.strip(), kwargs


def builder_names() -> list[str]:
    """Names of the token-graph builders (``gnn_transformer.topology.BUILDERS``)."""
    return sorted(topology.BUILDERS)


def spec_names() -> list[str]:
    """Names of the TOML specs of the ``graphs/`` catalogue."""
    return sorted(topology.catalogue())


def _is_spec(name: str) -> bool:
    return is_path(name) or name in spec_names()


@dataclass(frozen=True)
class Topology:
    """A command-line spec, resolved: how to build its graph and what a model does with it."""

    spec: str  # the spec as given
    build: Callable[[list[int]], Any]  # lengths -> EdgeIndex, (edge_index, edge_head) or LayerPattern
    num_heads: int | None = None  # heads of its per-head graphs (every per-head layer); None: every head
    per_layer: bool = False  # build returns a LayerPattern
    select: str | dict | None = None  # a selector: each layer chooses its graph within the built one
    source: Spec | None = None  # the TOML spec, when the spec names one

    @property
    def kind(self) -> str:
        """``"per_layer"``, ``"per_head"`` or ``"shared"`` (one graph for every head and layer)."""
        return "per_layer" if self.per_layer else "per_head" if self.num_heads is not None else "shared"

    def check_heads(self, nhead: int) -> None:
        """Refuse a model of another number of heads than the spec's per-head graphs."""
        if self.num_heads is not None and self.num_heads != nhead:
            raise ValueError(
                f"Expected 'nhead' to equal the {self.num_heads} heads of the per-head topology "
                f"{self.spec!r} (got nhead={nhead})"
            )


def resolve_topology(spec: str, *, small: bool = False) -> Topology:
    """The :class:`Topology` of a command-line spec (see the module docstring).

    ``small``: catalogue specs use their toy-scale ``[small]`` parameters (and selector) (a window
    of 3 rather than 4095), so that short test sequences still see the pattern.
    """
    name, kwargs = parse_spec(spec)
    chosen = split_select(spec.strip())[1]
    where = f"topology spec {spec!r}"
    select: str | dict[str, Any] | None  # the selector of the graph, from the spec or its file
    if chosen is not None:
        try:
            selector(chosen, num_heads=1, head_dim=1)  # validated here, built per layer by the models
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if name in topology.BUILDERS and (kwargs or name not in spec_names()):
        builder = topology.BUILDERS[name].fn
        try:
            inspect.signature(builder).bind([1], **kwargs)
        except TypeError as err:
            raise ValueError(
                f"Bad arguments {kwargs} for topology {name!r}: {err}. Signature: {name}{inspect.signature(builder)}"
            ) from None
        lists = {k for k, p in topology.BUILDERS[name].params.items() if p.kind is list}
        kwargs = {k: [v] if k in lists and not isinstance(v, list) else v for k, v in kwargs.items()}
        kwargs = check_params(name, kwargs, where)  # the types and bounds of spec files

        def build(lengths: list[int]) -> Any:
            try:
                return builder(lengths, **kwargs)
            except ValueError as err:
                raise ValueError(f"{where}: cannot build for n={lengths!r}: {err}") from None

        source = None
        heads = Spec(name=name, builder=name, params=kwargs).num_heads
        per_layer, select = False, chosen
    elif _is_spec(name):
        if kwargs:
            raise ValueError(f"Topology spec {name!r} takes no arguments (got {kwargs})")
        source = topology.read_spec(name)  # validated once, built per batch (errors name the file)

        def build(lengths: list[int]) -> Any:
            return topology.build_spec(source, lengths, small=small)

        heads, per_layer = source.num_heads, source.per_layer
        select = chosen if chosen is not None else source.selector(small)
    else:
        known = sorted(set(builder_names()) | set(spec_names()))
        raise ValueError(
            f"Unknown topology {name!r}: expected a builder or spec among {known}, or a path to a .toml spec"
        )
    if select is not None and heads is not None:
        raise ValueError(
            f"{where}: a selector chooses per-head graphs within a graph for every head, not "
            f"within a per-head graph ({heads} heads)"
        )
    return Topology(spec, build, heads, per_layer, select, source)


def topology_fn(spec: str, *, small: bool = False) -> Callable[[list[int]], Any]:
    """``lengths -> graph`` for a spec (see the module docstring): an ``EdgeIndex`` for a graph of
    every head, ``(edge_index, edge_head)`` for a per-head one, a ``LayerPattern`` for a per-layer
    one; a selector is not applied (the graph built is the allowed one: :func:`resolve_topology`).

    ``small``: catalogue specs use their toy-scale ``[small]`` parameters (a window of 3 rather
    than 4095), so that short test sequences still see the pattern.
    """
    return resolve_topology(spec, small=small).build


def label(spec: str) -> str:
    """A short display name: ``"sliding_window:window=2"`` -> ``"sliding_window(window=2)"``; a
    selector stays as given (``"causal+topk:num_keys=8"``)."""
    name, kwargs = parse_spec(spec)
    chosen = split_select(spec.strip())[1]
    text = name
    if kwargs:
        text = (
            f"{name}("
            + ", ".join(f"{k}={';'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in kwargs.items())
            + ")"
        )
    return text if chosen is None else f"{text}+{chosen}"


def _plain(graph: Any) -> Any:
    """A graph's tensors as plain tensors (the cache of :func:`per_length`)."""
    if isinstance(graph, LayerPattern):
        return LayerPattern(tuple(_plain(g) for g in graph.graphs))
    if isinstance(graph, tuple):
        return tuple(_plain(t) for t in graph)
    return graph.as_tensor() if isinstance(graph, EdgeIndex) else graph


def _slots(pattern: LayerPattern) -> list[int]:
    """For each layer of one cycle, the first layer that holds the same graph object."""
    return [
        next(k for k in range(layer + 1) if pattern.graphs[k] is pattern.graphs[layer])
        for layer in range(pattern.period)
    ]


def batch_graph(graphs: list[Any], lengths: list[int]) -> Any:
    """The disjoint union of one graph per sequence (each on its own ``lengths[b]`` nodes), of any
    kind: edge sets offset and concatenated (sorted by target), per-head graphs sorted by (head,
    target), per-layer patterns layer by layer (layers that share a graph still do)."""
    first = graphs[0]
    if isinstance(first, LayerPattern):
        slots = _slots(first)
        union = {s: batch_graph([g.graphs[s] for g in graphs], lengths) for s in sorted(set(slots))}
        return LayerPattern(tuple(union[s] for s in slots))
    total = sum(lengths)
    offsets = torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()
    if isinstance(first, tuple):
        edges = torch.cat([g[0] + o for g, o in zip(graphs, offsets)], dim=1)  # [2, E]
        heads = torch.cat([g[1] for g in graphs])  # [E]
        order = torch.argsort(heads * max(total, 1) + edges[1], stable=True)  # (head, target), sources kept
        return EdgeIndex(edges[:, order], sparse_size=(total, total)), heads[order]
    edges = torch.cat([g + o for g, o in zip(graphs, offsets)], dim=1)
    return EdgeIndex(edges, sparse_size=(total, total), sort_order="col")


def per_length(build: Callable[[list[int]], Any]) -> Callable[[list[int]], Any]:
    """Cache the graph of each sequence length and assemble batches from the cache.

    The batch graph is the disjoint union of the cached graphs of its lengths (:func:`batch_graph`;
    a graph of every head, a per-head graph or a per-layer pattern). Seeded random topologies then
    draw one pattern per length, fixed for the whole run, as BigBird fixes its random blocks.
    """
    cache: dict[int, Any] = {}

    def assemble(lengths: list[int]) -> Any:
        lengths = list(lengths)
        if not lengths:
            return build(lengths)
        for n in lengths:
            if n not in cache:
                graph = build([n])
                cache[n] = _share(_plain(graph), graph)
        return batch_graph([cache[n] for n in lengths], lengths)

    return assemble


def _share(plain: Any, graph: Any) -> Any:
    """``plain`` with the sharing of ``graph``'s repeated layers (one object per distinct layer)."""
    if not isinstance(graph, LayerPattern):
        return plain
    return LayerPattern(tuple(plain.graphs[s] for s in _slots(graph)))


def graph_to(graph: Any, device: Any) -> Any:
    """A graph of any kind (an edge_index, a pair, a ``LayerPattern``) on ``device``."""
    if isinstance(graph, (EdgeIndex, torch.Tensor, LayerPattern)):
        return graph.to(device)
    return tuple(t.to(device) for t in graph)


def graph_edges(graph: Any, num_layers: int = 1, num_heads: int = 1) -> float:
    """Edges of a graph of any kind that one head sees: of a per-head graph, its edges over
    ``num_heads``; of a per-layer pattern, the mean over layers ``0 .. num_layers - 1``."""
    if isinstance(graph, LayerPattern):
        return sum(graph_edges(graph(layer), 1, num_heads) for layer in range(num_layers)) / max(num_layers, 1)
    if isinstance(graph, tuple):
        return int(graph[0].size(1)) / num_heads
    return int(graph.size(1))
