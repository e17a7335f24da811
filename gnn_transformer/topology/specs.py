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
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ._common import SEED_MAX, Lengths, as_lengths, check_edges
from .basic import causal, full
from .bigbird import bigbird
from .combinators import intersection, union
from .heads import dilated_per_head, duo_attention, per_head, streaming
from .document import document
from .expander import expander
from .global_tokens import global_tokens
from .prefix_lm import prefix_lm
from .random_graphs import random
from .sparse_transformer import fixed, strided
from .star import star
from .windows import dilated, sliding_window

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The catalogue: graphs/ at the top of a source checkout, gnn_transformer/graphs/ in an installed wheel.
_INSTALLED = Path(__file__).resolve().parents[1] / "graphs"
CATALOGUE_DIR = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parents[2] / "graphs"


@dataclass(frozen=True)
class Param:
    """One builder parameter: type, bounds, default (``REQUIRED`` if none)."""
    kind: type
    minimum: int | None = None
    maximum: int | None = None
    default: Any = None
    required: bool = False
    choices: tuple = ()
    item: type | None = None  # kind list: the type of its items (bounded by minimum / maximum)
    min_items: int = 0  # kind list: the fewest items


INT_MAX = 2**31 - 1     # sizes, windows, blocks, counts: far beyond any sequence, no int overflow
SMALL_N_MAX = 4096      # [small] n: toy scale (pictures, quick checks), not a real length
MAX_DEPTH = 32          # levels of nested [[parts]]
MAX_REPEAT = 4096       # repeat of one of [[heads]] / [[layers]], and heads or layers in all


def _int(minimum: int | None = 0, default: Any = None, required: bool = False, maximum: int | None = INT_MAX) -> Param:
    return Param(int, minimum, maximum, default, required)


def _ints(minimum: int = 0, min_items: int = 0) -> Param:
    return Param(list, minimum, INT_MAX, required=True, item=int, min_items=min_items)


def _seed() -> Param:
    return _int(0, 0, maximum=SEED_MAX)


def _bool(default: bool) -> Param:
    return Param(bool, default=default)


def _choice(*choices: str) -> Param:
    return Param(str, default=choices[0], choices=choices)


@dataclass(frozen=True)
class Builder:
    """A builder callable ``fn(n, **params)`` with the schema of its parameters."""
    fn: Any
    params: dict[str, Param] = field(default_factory=dict)
    per_head: bool = False  # builds (edge_index, edge_head): a whole spec or a layer, never a part


BUILDERS: dict[str, Builder] = {
    "full": Builder(full),
    "causal": Builder(causal),
    "sliding_window": Builder(sliding_window, {"window": _int(required=True), "causal": _bool(False)}),
    "dilated": Builder(dilated, {"window": _int(required=True), "dilation": _int(1, 1),
                                 "causal": _bool(False)}),
    "strided": Builder(strided, {"stride": _int(1, required=True), "causal": _bool(True)}),
    "fixed": Builder(fixed, {"block": _int(1, required=True), "num_summary": _int(0, 1),
                             "causal": _bool(True)}),
    "global_tokens": Builder(global_tokens, {"num_global": _int(0, 1), "window": _int(0)}),
    "bigbird": Builder(bigbird, {"block": _int(1, 1), "window": _int(0, 1), "num_global": _int(0, 1),
                                 "num_random": _int(0, 1), "seed": _seed(),
                                 "global_at": _choice("start", "ends")}),
    "random": Builder(random, {"k": _int(0, required=True), "seed": _seed()}),
    "star": Builder(star, {"ring": _bool(True)}),
    "expander": Builder(expander, {"degree": _int(0, required=True), "seed": _seed(),
                                   "self_loops": _bool(False)}),
    "document": Builder(document, {"doc_lengths": _int(1, required=True), "causal": _bool(False)}),
    "prefix_lm": Builder(prefix_lm, {"prefix": _int(0, required=True)}),
    "streaming": Builder(streaming, {"num_sinks": _int(required=True), "window": _int(required=True)}),
    "dilated_per_head": Builder(dilated_per_head, {"window": _int(required=True), "dilations": _ints(1, 1),
                                                   "causal": _bool(False)}, per_head=True),
    "duo_attention": Builder(duo_attention, {"streaming_heads": _ints(0), "num_heads": _int(1, required=True),
                                             "num_sinks": _int(required=True), "window": _int(required=True)},
                             per_head=True),
}
COMBINATORS = {"union": union, "intersection": intersection}
STRUCTURES = {"per_head": "heads", "per_layer": "layers"}  # builder -> its array of tables
TOP_KEYS = {"name", "description", "source", "builder", "params", "parts", "heads", "layers", "small", "select"}
PART_KEYS = {"builder", "params", "parts"}
HEAD_KEYS = PART_KEYS | {"repeat"}
LAYER_KEYS = PART_KEYS | {"heads", "repeat"}


class _Where:
    """File and key path, for error messages."""

    def __init__(self, file: str, key: str = ""):
        self.file, self.key = file, key

    def __truediv__(self, key: str | int) -> _Where:
        k = f"{self.key}[{key}]" if isinstance(key, int) else (f"{self.key}.{key}" if self.key else key)
        return _Where(self.file, k)

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.file}: key '{self.key}': {message}" if self.key else f"{self.file}: {message}")


def _check_table(value: Any, where: _Where) -> dict:
    if not isinstance(value, dict):
        raise where.error(f"expected a table (got {type(value).__name__} {value!r})")
    return value


def _check_repeat(part: dict, where: _Where) -> int:
    repeat = part.get("repeat", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
        raise (where / "repeat").error(f"expected an integer >= 1 and <= {MAX_REPEAT} (got {repeat!r})")
    return repeat


def _check_array(part: dict, key: str, name: str, where: _Where) -> list:
    items = part.get(key)
    if not isinstance(items, list) or not items:
        raise (where / key).error(f"{name!r} needs a non-empty array of tables [[{key}]]")
    return items


def _check_part(part: dict, where: _Where, allowed: set[str], depth: int = 0, context: str = "top") -> dict:
    """Validate ``builder`` + ``params`` (or ``parts``, ``depth`` levels below the top; or ``heads``
    / ``layers``); return the normalized part. ``context``: ``"top"`` (a whole spec), ``"part"`` (of
    a union or intersection), ``"head"`` (of a per-head spec), ``"layer"`` (of a per-layer spec)."""
    unknown = sorted(set(part) - allowed)
    if unknown:
        raise (where / unknown[0]).error(f"unknown key (allowed: {sorted(allowed)})")
    if "builder" not in part:
        raise (where / "builder").error("missing")
    name = part["builder"]
    if not isinstance(name, str):
        raise (where / "builder").error(f"expected a string (got {name!r})")
    repeat = {"repeat": _check_repeat(part, where)} if context in ("head", "layer") else {}
    for key, takers in (("parts", tuple(COMBINATORS)), ("heads", ("per_head",)), ("layers", ("per_layer",))):
        if key in part and name not in takers:
            raise (where / key).error(f"only {' and '.join(map(repr, takers))} take [[{key}]] (builder is {name!r})")
    if name in COMBINATORS or name in STRUCTURES:
        if "params" in part:
            key = STRUCTURES.get(name, "parts")
            raise (where / "params").error(f"'{name}' takes [[{key}]], not params")
    if name in COMBINATORS:
        parts = _check_array(part, "parts", name, where)
        if depth >= MAX_DEPTH:
            raise (where / "parts").error(f"parts nested {depth + 1} levels deep, more than {MAX_DEPTH}")
        return {"builder": name, **repeat, "parts": [
            _check_part(_check_table(p, where / "parts" / k), where / "parts" / k, PART_KEYS, depth + 1, "part")
            for k, p in enumerate(parts)]}
    per_head_ok = context in ("top", "layer")
    if name == "per_head":
        if not per_head_ok:
            raise (where / "builder").error(f"a per-head graph is a whole spec or a layer, not one of [[{context}s]]")
        heads = [_check_part(_check_table(h, where / "heads" / k), where / "heads" / k, HEAD_KEYS, depth + 1, "head")
                 for k, h in enumerate(_check_array(part, "heads", name, where))]
        if sum(h["repeat"] for h in heads) > MAX_REPEAT:
            raise (where / "heads").error(f"{sum(h['repeat'] for h in heads)} heads in all, more than {MAX_REPEAT}")
        return {"builder": name, **repeat, "heads": heads}
    if name == "per_layer":
        if context != "top":
            raise (where / "builder").error("'per_layer' is a whole spec, not a part, head or layer")
        layers = [_check_part(_check_table(g, where / "layers" / k), where / "layers" / k, LAYER_KEYS, depth + 1,
                              "layer") for k, g in enumerate(_check_array(part, "layers", name, where))]
        if sum(g["repeat"] for g in layers) > MAX_REPEAT:
            raise (where / "layers").error(f"{sum(g['repeat'] for g in layers)} layers in a cycle, more than "
                                           f"{MAX_REPEAT}")
        layer_heads = {k: _num_heads(g) for k, g in enumerate(layers) if _num_heads(g) is not None}
        if len(set(layer_heads.values())) > 1:
            raise (where / "layers").error("per-head layers of one spec need one number of heads (got "
                                           + ", ".join(f"{h} in layers[{k}]" for k, h in layer_heads.items())
                                           + ")")
        return {"builder": name, "layers": layers}
    if name not in BUILDERS:
        known = sorted(BUILDERS) + sorted(COMBINATORS) + sorted(STRUCTURES)
        raise (where / "builder").error(f"unknown builder {name!r} (known: {known})")
    if BUILDERS[name].per_head and not per_head_ok:
        raise (where / "builder").error(f"{name!r} builds a per-head graph: a whole spec or a layer, not one of "
                                        f"[[{context}s]]")
    params = _check_table(part.get("params", {}), where / "params")
    return {"builder": name, **repeat, "params": _check_params(name, params, where / "params")}


def _num_heads(part: dict) -> int | None:
    """Heads of a normalized part's per-head graph (``None``: a graph for every head)."""
    if part["builder"] == "per_head":
        return sum(h["repeat"] for h in part["heads"])
    if part["builder"] == "per_layer":
        return next(filter(None, map(_num_heads, part["layers"])), None)
    if part["builder"] == "dilated_per_head":
        return len(part["params"]["dilations"])
    if part["builder"] == "duo_attention":
        return part["params"]["num_heads"]
    return None


def _check_value(name: str, key: str, p: Param, value: Any, where: _Where) -> None:
    if p.kind is list:
        if not isinstance(value, list):
            raise where.error(f"expected an array of integers (got {type(value).__name__} {value!r})")
        if len(value) < p.min_items:
            raise where.error(f"expected at least {p.min_items} item{'s' * (p.min_items != 1)} (got {value!r})")
        if len(value) > MAX_REPEAT:
            raise where.error(f"expected at most {MAX_REPEAT} items (got {len(value)})")
        for k, item in enumerate(value):
            _check_value(name, key, Param(int, p.minimum, p.maximum), item, where / k)
        return
    if p.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise where.error(f"expected an integer (got {type(value).__name__} {value!r})")
    if p.kind is bool and not isinstance(value, bool):
        raise where.error(f"expected true or false (got {type(value).__name__} {value!r})")
    if p.kind is str and (not isinstance(value, str) or value not in p.choices):
        raise where.error(f"expected one of {list(p.choices)} (got {value!r})")
    if p.kind is int and p.minimum is not None and value < p.minimum:
        raise where.error(f"expected >= {p.minimum} (got {value})")
    if p.kind is int and p.maximum is not None and value > p.maximum:
        raise where.error(f"expected <= {p.maximum} (got {value})")


def _check_params(name: str, params: dict, where: _Where, partial: bool = False) -> dict:
    schema = BUILDERS[name].params
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in schema:
            raise (where / key).error(f"unknown parameter of {name!r} (allowed: {sorted(schema)})")
        p = schema[key]
        if value is None and p.default is None and not p.required:
            out[key] = None  # an optional parameter left unset ('window=none' in a command-line spec)
            continue
        _check_value(name, key, p, value, where / key)
        out[key] = list(value) if p.kind is list else value
    if not partial:
        for key, p in schema.items():
            if p.required and key not in out:
                raise (where / key).error(f"missing (required by builder {name!r})")
        if name == "duo_attention":
            heads = out["streaming_heads"]
            if any(h >= out["num_heads"] for h in heads) or len(set(heads)) != len(heads):
                raise (where / "streaming_heads").error(f"expected distinct heads < num_heads = {out['num_heads']} "
                                                        f"(got {heads})")
    return out


def check_params(builder: str, params: dict, source: str) -> dict:
    """Validate a builder's keyword arguments as a spec file's ``params`` are validated (types,
    bounds, required keys); a ``ValueError`` names ``source`` (e.g. the command-line spec) and the key.

    Example:
        >>> check_params("bigbird", {"seed": -1}, "topology spec 'bigbird:seed=-1'")
        Traceback (most recent call last):
        ...
        ValueError: topology spec 'bigbird:seed=-1': key 'seed': expected >= 0 (got -1)
    """
    if builder not in BUILDERS:
        raise ValueError(f"{source}: unknown builder {builder!r} (known: {sorted(BUILDERS)})")
    return _check_params(builder, params, _Where(source))


@dataclass(frozen=True)
class Spec:
    """A validated topology spec."""
    name: str
    builder: str
    params: dict = field(default_factory=dict)
    parts: list = field(default_factory=list)
    description: str = ""
    source: str = ""
    small_n: int | None = None
    small_params: dict = field(default_factory=dict)
    path: Path | None = None
    heads: list = field(default_factory=list)  # per_head: the [[heads]] (each with its "repeat")
    layers: list = field(default_factory=list)  # per_layer: the [[layers]] (each with its "repeat")
    select: str | dict | None = None  # a selector spec: models choose each layer's graph within this one
    small_select: str | dict | None = None  # [small] select

    @property
    def part(self) -> dict:
        """The spec as one normalized part (``builder`` with ``params``, ``parts``, ``heads`` or ``layers``)."""
        key = {**{c: "parts" for c in COMBINATORS}, **STRUCTURES}.get(self.builder, "params")
        return {"builder": self.builder, key: getattr(self, key)}

    @property
    def num_heads(self) -> int | None:
        """Query heads of a per-head spec (of every per-head layer of a per-layer spec); ``None`` when
        every head sees every edge."""
        return _num_heads(self.part)

    @property
    def per_layer(self) -> bool:
        """Whether the spec builds a :class:`LayerPattern` (``builder = "per_layer"``)."""
        return self.builder == "per_layer"

    def selector(self, small: bool = False) -> str | dict | None:
        """The selector spec (``small``: the ``[small]`` one where given), or ``None``."""
        return self.small_select if small and self.small_select is not None else self.select


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


def catalogue() -> dict[str, Path]:
    """Named specs of the ``graphs/`` catalogue: ``{name: path}``."""
    if not CATALOGUE_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(CATALOGUE_DIR.glob("*.toml"))}


def is_path(spec: str | Path) -> bool:
    """Whether a spec names a file: a ``Path``, or a string ending in ``.toml`` or containing a path
    separator (``/`` or ``\\``). Any other string is a catalogue name, even if a file of that name
    exists in the current directory (write ``./name`` for it)."""
    return isinstance(spec, Path) or spec.endswith(".toml") or "/" in spec or "\\" in spec


def resolve(path: str | Path) -> Path:
    """A spec file path, or a bare catalogue name like ``"bigbird"`` (see :func:`is_path`)."""
    if not isinstance(path, (str, Path)):
        raise ValueError(f"Expected 'path' to be a str or Path (got {type(path).__name__} {path!r})")
    if not is_path(path):
        named = catalogue()
        if path in named:
            return named[path]
        raise ValueError(f"Unknown topology name 'path'={path!r} (catalogue: {sorted(named)}; "
                         "a file path ends in .toml or contains a path separator)")
    if not Path(path).is_file():
        raise ValueError(f"No spec file at 'path'={str(path)!r}")
    return Path(path)


def read_spec(path: str | Path) -> Spec:
    """Parse and validate a spec file (or catalogue name) without building it."""
    file = resolve(path)
    where = _Where(str(file))
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise where.error(f"not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise where.error(f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "TOML files are UTF-8") from None
    except RecursionError:  # tomllib recurses once per level of inline arrays and tables
        raise where.error(f"nested too deeply to parse (parts may nest {MAX_DEPTH} levels)") from None
    part = _check_part(data, where, TOP_KEYS)
    for key in ("name", "description", "source"):
        if key in data and not isinstance(data[key], str):
            raise (where / key).error(f"expected a string (got {data[key]!r})")
    select = _check_select(data["select"], where / "select") if "select" in data else None
    if select is not None and _num_heads(part) is not None:
        raise (where / "select").error(f"a selector chooses per-head graphs within a graph for every head, not "
                                       f"within a per-head graph ({_num_heads(part)} heads)")
    small_n, small_params, small_select = None, {}, None
    if "small" in data:
        small = _check_table(data["small"], where / "small")
        unknown = sorted(set(small) - {"n", "params", "select"})
        if unknown:
            raise (where / "small" / unknown[0]).error("unknown key (allowed: ['n', 'params', 'select'])")
        small_n = small.get("n")
        if small_n is not None and (isinstance(small_n, bool) or not isinstance(small_n, int)
                                    or not 1 <= small_n <= SMALL_N_MAX):
            raise (where / "small" / "n").error(f"expected an integer >= 1 and <= {SMALL_N_MAX} (got {small_n!r})")
        raw = _check_table(small.get("params", {}), where / "small" / "params")
        small_params = _check_small_params(part, raw, where / "small" / "params") if raw else {}
        if "select" in small:
            if select is None:
                raise (where / "small" / "select").error("a [small] select needs a top-level 'select'")
            small_select = _check_select(small["select"], where / "small" / "select")
    return Spec(name=data.get("name", file.stem), builder=part["builder"], params=part.get("params", {}),
                parts=part.get("parts", []), description=data.get("description", ""),
                source=data.get("source", ""), small_n=small_n, small_params=small_params, path=file,
                heads=part.get("heads", []), layers=part.get("layers", []), select=select,
                small_select=small_select)


def _check_select(value: Any, where: _Where) -> str | dict:
    """A selector spec of :func:`gnn_transformer.topology.dynamic.selector`, validated."""
    from .dynamic import selector

    if not isinstance(value, (str, dict)):
        raise where.error(f"expected a selector like 'topk:num_keys=64' or a table with 'name' (got "
                          f"{type(value).__name__} {value!r})")
    try:
        selector(value, num_heads=1, head_dim=1)
    except ValueError as e:
        raise where.error(str(e)) from None
    return dict(value) if isinstance(value, dict) else value


def _plain_parts(part: dict) -> list[dict]:
    """The builder parts (not union, intersection, per_head or per_layer) of a normalized part."""
    if part["builder"] in COMBINATORS:
        return [p for q in part["parts"] for p in _plain_parts(q)]
    if part["builder"] in STRUCTURES:
        return [p for q in part[STRUCTURES[part["builder"]]] for p in _plain_parts(q)]
    return [part]


def _with_small(part: dict, params: dict) -> dict:
    """``part`` with ``[small] params`` given to every builder part that takes the key."""
    b = part["builder"]
    if b in COMBINATORS or b in STRUCTURES:
        key = STRUCTURES.get(b, "parts")
        return {**part, key: [_with_small(p, params) for p in part[key]]}
    schema = BUILDERS[b].params
    return {**part, "params": {**part["params"], **{k: v for k, v in params.items() if k in schema}}}


def _check_small_params(part: dict, raw: dict, where: _Where) -> dict:
    """``[small] params``: each key taken by some builder part, valid for each; the heads unchanged."""
    plain = _plain_parts(part)
    for key, value in raw.items():
        takers = [p["builder"] for p in plain if key in BUILDERS[p["builder"]].params]
        if not takers:
            raise (where / key).error(f"no part of the spec takes this parameter (builders: "
                                      f"{sorted({p['builder'] for p in plain})})")
        for b in takers:
            _check_params(b, {key: value}, where, partial=True)
    small = _with_small(part, raw)
    for p in _plain_parts(small):
        _check_params(p["builder"], p["params"], where)  # the checks across parameters (duo_attention)
    if _num_heads(small) != _num_heads(part):
        raise where.error(f"[small] params may not change the number of heads ({_num_heads(part)} -> "
                          f"{_num_heads(small)})")
    return dict(raw)


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
    part = _with_small(spec.part, spec.small_params) if small and spec.small_params else spec.part
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
    spec = read_spec(path)
    if n is None:
        if not (small and spec.small_n):
            raise ValueError(f"Expected 'n' for {spec.name!r} (only small=True specs with [small] n may omit it)")
        n = spec.small_n
    return build_spec(spec, n, small=small)
