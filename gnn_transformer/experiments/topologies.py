"""Topologies named on the command line: ``"name"`` or ``"name:key=value,key=value"``.

``name`` is a builder of :mod:`gnn_transformer.topology` (a key of ``topology.BUILDERS``:
``full``, ``sliding_window``, ``bigbird``, ``random``, ...), called as ``builder(lengths, **kwargs)``,
or the name or path of a TOML spec of the ``graphs/`` catalogue, read with
:func:`gnn_transformer.topology.read_spec`. A bare name that is both (``"bigbird"``) is the
catalogue spec, with the parameters of its paper; with arguments it is the builder.

A spec that ends in ``.toml`` or contains a path separator (``/`` or ``\\``) is a file path, taken
whole (a ``:`` in it is part of the path); any other spec is a name, never a file of the current
directory (:func:`gnn_transformer.topology.specs.is_path`, the rule of ``topology.load``). Builder
arguments are checked like a spec file's ``params`` (types and bounds), and an error while building
names the spec or its file.

Example:
    >>> name, kwargs = parse_spec("bigbird:window=1,num_random=2")
    >>> name, kwargs
    ('bigbird', {'window': 1, 'num_random': 2})
    >>> build = topology_fn("sliding_window:window=1")
    >>> build([3]).tolist()
    [[0, 1, 0, 1, 2, 1, 2], [0, 0, 1, 1, 1, 2, 2]]
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from .. import topology
from ..topology.specs import check_params, is_path

def _value(text: str) -> Any:
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


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,..."`` into the name and typed keyword arguments; a file path
    (``*.toml``, or containing a path separator) is returned whole, without arguments."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Expected a topology spec like 'sliding_window:window=2' (got {spec!r})")
    if is_path(spec.strip()):
        return spec.strip(), {}
    name, _, rest = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"Expected 'key=value' in topology spec {spec!r} (got {item!r})")
        kwargs[key.strip()] = _value(value.strip())
    return name.strip(), kwargs


def builder_names() -> list[str]:
    """Names of the token-graph builders (``gnn_transformer.topology.BUILDERS``)."""
    return sorted(topology.BUILDERS)


def spec_names() -> list[str]:
    """Names of the TOML specs of the ``graphs/`` catalogue."""
    return sorted(topology.catalogue())


def _is_spec(name: str) -> bool:
    return is_path(name) or name in spec_names()


def topology_fn(spec: str, *, small: bool = False) -> Callable[[list[int]], Tensor]:
    """``lengths -> edge_index`` for a spec (see the module docstring).

    ``small``: catalogue specs use their toy-scale ``[small]`` parameters (a window of 3 rather
    than 4095), so that short test sequences still see the pattern.
    """
    name, kwargs = parse_spec(spec)
    if name in topology.BUILDERS and (kwargs or name not in spec_names()):
        builder = topology.BUILDERS[name].fn
        try:
            inspect.signature(builder).bind([1], **kwargs)
        except TypeError as err:
            raise ValueError(f"Bad arguments {kwargs} for topology {name!r}: {err}. "
                             f"Signature: {name}{inspect.signature(builder)}") from None
        where = f"topology spec {spec!r}"
        kwargs = check_params(name, kwargs, where)  # the types and bounds of spec files

        def build(lengths: list[int]) -> Tensor:
            try:
                return builder(lengths, **kwargs)
            except ValueError as err:
                raise ValueError(f"{where}: cannot build for n={lengths!r}: {err}") from None

        return build
    if _is_spec(name):
        if kwargs:
            raise ValueError(f"Topology spec {name!r} takes no arguments (got {kwargs})")
        spec = topology.read_spec(name)  # validated once, built per batch (errors name the file)
        return lambda lengths: topology.build_spec(spec, lengths, small=small)
    known = sorted(set(builder_names()) | set(spec_names()))
    raise ValueError(f"Unknown topology {name!r}: expected a builder or spec among {known}, "
                     "or a path to a .toml spec")


def label(spec: str) -> str:
    """A short display name: ``"sliding_window:window=2"`` -> ``"sliding_window(window=2)"``."""
    name, kwargs = parse_spec(spec)
    if not kwargs:
        return name
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"


def per_length(build: Callable[[list[int]], Tensor]) -> Callable[[list[int]], EdgeIndex]:
    """Cache the graph of each sequence length and assemble batches from the cache.

    The batch graph is the disjoint union of the cached graphs of its lengths (offset and
    concatenated, so still sorted by target). Seeded random topologies then draw one pattern per
    length, fixed for the whole run, as BigBird fixes its random blocks.
    """
    cache: dict[int, Tensor] = {}

    def batch_graph(lengths: list[int]) -> EdgeIndex:
        parts, offset = [], 0
        for n in lengths:
            if n not in cache:
                g = build([n])
                cache[n] = g.as_tensor() if isinstance(g, EdgeIndex) else g
            parts.append(cache[n] + offset)
            offset += n
        edges = torch.cat(parts, dim=1) if parts else torch.empty(2, 0, dtype=torch.long)
        return EdgeIndex(edges, sparse_size=(offset, offset), sort_order="col")

    return batch_graph
