"""Topology specs: named attention patterns as TOML data (the ``graphs/`` catalogue).

A spec names a builder and its parameters; :func:`load` builds it for a sequence length (or a
batch of lengths). Specs are data, read with ``tomllib``: nothing in them is executed, and every
key is checked (unknown keys, wrong types, missing or out-of-range values raise ``ValueError``
naming the file and the key).

Format::

    # Longformer (Beltagy et al., 2020, arXiv:2004.05150): window 512 (radius 256), global [CLS].
    name = "longformer"                  # optional, defaults to the file name
    description = "sliding window + global tokens"
    source = "Beltagy et al., 2020, arXiv:2004.05150"
    builder = "global_tokens"            # a name of BUILDERS, or "union" / "intersection"

    [params]                             # the builder's keyword arguments (not n)
    num_global = 1
    window = 256

    [small]                              # optional: the same pattern at toy scale (pictures)
    n = 16
    params = { window = 2 }

``builder = "union"`` (or ``"intersection"``) takes ``[[parts]]`` instead of ``params``, each part a
table with ``builder`` and ``params`` (parts may nest, at most ``MAX_DEPTH`` (32) levels deep).
A spec file is UTF-8 text (TOML's encoding).

Integer parameters are bounded: sizes, windows, blocks and counts by ``INT_MAX`` (``2**31 - 1``),
seeds by ``SEED_MAX`` (``2**63 - 1``, a ``torch.Generator`` seed; the builders take the same
seeds), ``[small] n`` by ``SMALL_N_MAX`` (4096: toy scale). A graph of more edges than the edge
budget (:func:`~gnn_transformer.topology.max_edges`) is refused before it is built, naming the file.

A spec string is a file path when it ends in ``.toml`` or contains a path separator (``/`` or
``\\``), and a catalogue name otherwise: a file in the current directory never shadows a name
(see :func:`is_path`).

Per-head graphs (a head is an edge type; see :mod:`.heads`)::

    builder = "per_head"                 # one graph per query head, stacked with topology.per_head
    [[heads]]                            # head 0: a part (builder + params, or union / intersection)
    builder = "causal"
    [[heads]]                            # heads 1..3: the same part, 3 consecutive heads
    builder = "streaming"
    params = { num_sinks = 4, window = 256 }
    repeat = 3

The per-head builders ``dilated_per_head`` (``dilations``: an array of ints, one per head) and
``duo_attention`` (``streaming_heads``: an array of head indices) are names of ``BUILDERS`` as well
(``Builder.per_head``); a per-head spec builds ``(edge_index, edge_head)``. Per-head graphs are
top-level specs or layers of a ``per_layer`` spec, not parts of a union or of a head.

Per-layer graphs::

    builder = "per_layer"                # layer l attends along layers[l % len(layers)] (a cycle)
    [[layers]]
    builder = "sliding_window"
    params = { window = 64 }
    repeat = 2                           # two consecutive layers of the cycle
    [[layers]]
    builder = "full"                     # then full attention: every third layer is global

A layer is a part or a per-head graph (``per_head`` with its ``[[heads]]``, ``dilated_per_head``,
``duo_attention``); its per-head layers all have one number of heads. A per-layer spec builds a
:class:`LayerPattern`: a callable ``layer -> graph``, which stacks and models take as their graphs
(:func:`gnn_transformer.layers.resolve_layer_graphs`).

Graphs chosen from the data: any spec may name a selector of
:func:`gnn_transformer.topology.dynamic.selector`, ``select = "topk:num_keys=64"`` or a table
``[select]`` with ``name`` and the selector's parameters. The spec's graph is then the allowed
graph, which :func:`build_spec` returns; models built for the spec choose each layer's graph within
it (``Spec.select``).

``[small]`` may hold ``n``, ``params`` and ``select`` (toy-scale replacements). In a composite spec
(union, intersection, per-head, per-layer) ``[small] params`` apply to every part whose builder
takes the key (a key no part takes is an error), and may not change the number of heads.

This module builds specs (:func:`load`, :func:`build_spec`) and is where their names are imported
from; the other jobs live beside it: the builders a spec may name and the schema of their
parameters in :mod:`.spec_params`, reading and checking a file into a :class:`Spec` in
:mod:`.spec_files`, the catalogue and the name-or-path rule in :mod:`.spec_catalogue`, and the
graphs of a per-layer spec in :mod:`.layer_pattern`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import SEED_MAX, Lengths, as_lengths, check_edges
from .heads import per_head
from .layer_pattern import LayerPattern
from .spec_catalogue import CATALOGUE_DIR, catalogue, is_path, resolve
from .spec_files import HEAD_KEYS, LAYER_KEYS, MAX_DEPTH, PART_KEYS, SMALL_N_MAX, TOP_KEYS, Spec, read_spec, with_small
from .spec_params import BUILDERS, COMBINATORS, INT_MAX, MAX_REPEAT, STRUCTURES, Builder, Param, check_params

__all__ = [
    "load",
    "read_spec",
    "build_spec",
    "Spec",
    "LayerPattern",
    "catalogue",
    "is_path",
    "resolve",
    "CATALOGUE_DIR",
    "BUILDERS",
    "Builder",
    "Param",
    "check_params",
    "COMBINATORS",
    "STRUCTURES",
    "TOP_KEYS",
    "PART_KEYS",
    "HEAD_KEYS",
    "LAYER_KEYS",
    "INT_MAX",
    "SEED_MAX",
    "SMALL_N_MAX",
    "MAX_DEPTH",
    "MAX_REPEAT",
]


def _check_edges_per_head(graphs: list, n: Lengths) -> None:
    check_edges("per_head", sum(int(g.size(1)) for g in graphs), n=as_lengths(n))


def _build(part: dict, n: Lengths) -> Any:
    b = part["builder"]
    if b in COMBINATORS:
        return COMBINATORS[b](*[_build(p, n) for p in part["parts"]])
    if b in STRUCTURES:
        graphs = []
        for p in part[STRUCTURES[b]]:
            graphs += [_build(p, n)] * p["repeat"]  # repeated heads or layers: one graph object
        if b == "per_layer":
            return LayerPattern(tuple(graphs))
        _check_edges_per_head(graphs, n)
        return per_head(graphs)
    return BUILDERS[b].fn(n, **part["params"])


def build_spec(spec: Spec, n: Lengths, *, small: bool = False) -> Any:
    """Build a validated spec for ``n`` (an int or a list of lengths); ``small`` uses its
    ``[small]`` parameters (toy scale, for pictures). A ``ValueError`` of the builder (e.g. a
    ``random`` spec's ``k`` larger than a sequence) names the spec's file.

    Returns:
        an ``EdgeIndex``; ``(edge_index, edge_head)`` for a per-head spec; a :class:`LayerPattern`
        for a per-layer spec. A spec's ``select`` does not change what is built (the allowed graph).
    """
    part = with_small(spec.part, spec.small_params) if small and spec.small_params else spec.part
    try:
        return _build(part, n)
    except ValueError as e:
        raise ValueError(f"{spec.path or spec.name}: cannot build for n={n!r}: {e}") from None


def load(path: str | Path, n: Lengths | None = None, *, small: bool = False) -> Any:
    """Build the topology of a spec file (or catalogue name) for ``n``: an ``EdgeIndex``, a pair
    ``(edge_index, edge_head)`` (per-head specs) or a :class:`LayerPattern` (per-layer specs), as
    :func:`build_spec`.

    Args:
        path: a ``.toml`` spec, or a catalogue name such as ``"bigbird"``.
        n: sequence length or list of lengths; may be omitted with ``small=True`` (the spec's
            ``[small] n``).
        small: use the spec's toy-scale ``[small]`` parameters.

    Example:
        >>> load("causal", 3).tolist()
        [[0, 0, 1, 0, 1, 2], [0, 1, 1, 2, 2, 2]]
    """
    if not isinstance(small, bool):
        raise ValueError(f"Expected 'small' to be a bool (got {small!r})")
    spec = read_spec(path)
    if n is None:
        if not (small and spec.small_n):
            raise ValueError(f"Expected 'n' for {spec.name!r} (only small=True specs with [small] n may omit it)")
        n = spec.small_n
    return build_spec(spec, n, small=small)
