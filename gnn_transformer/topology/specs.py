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
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch_geometric import EdgeIndex

from ._common import SEED_MAX, Lengths
from .basic import causal, full
from .bigbird import bigbird
from .combinators import intersection, union
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


INT_MAX = 2**31 - 1     # sizes, windows, blocks, counts: far beyond any sequence, no int overflow
SMALL_N_MAX = 4096      # [small] n: toy scale (pictures, quick checks), not a real length
MAX_DEPTH = 32          # levels of nested [[parts]]


def _int(minimum: int | None = 0, default: Any = None, required: bool = False, maximum: int | None = INT_MAX) -> Param:
    return Param(int, minimum, maximum, default, required)


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
}
COMBINATORS = {"union": union, "intersection": intersection}
TOP_KEYS = {"name", "description", "source", "builder", "params", "parts", "small"}
PART_KEYS = {"builder", "params", "parts"}


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


def _check_part(part: dict, where: _Where, allowed: set[str], depth: int = 0) -> dict:
    """Validate ``builder`` + ``params`` (or ``parts``, ``depth`` levels below the top); return the
    normalized part."""
    unknown = sorted(set(part) - allowed)
    if unknown:
        raise (where / unknown[0]).error(f"unknown key (allowed: {sorted(allowed)})")
    if "builder" not in part:
        raise (where / "builder").error("missing")
    name = part["builder"]
    if not isinstance(name, str):
        raise (where / "builder").error(f"expected a string (got {name!r})")
    if name in COMBINATORS:
        if "params" in part:
            raise (where / "params").error(f"'{name}' takes [[parts]], not params")
        parts = part.get("parts")
        if not isinstance(parts, list) or not parts:
            raise (where / "parts").error(f"'{name}' needs a non-empty array of tables [[parts]]")
        if depth >= MAX_DEPTH:
            raise (where / "parts").error(f"parts nested {depth + 1} levels deep, more than {MAX_DEPTH}")
        return {"builder": name, "parts": [
            _check_part(_check_table(p, where / "parts" / k), where / "parts" / k, PART_KEYS, depth + 1)
            for k, p in enumerate(parts)]}
    if name not in BUILDERS:
        raise (where / "builder").error(f"unknown builder {name!r} (known: {sorted(BUILDERS) + sorted(COMBINATORS)})")
    if "parts" in part:
        raise (where / "parts").error(f"only 'union' and 'intersection' take parts (builder is {name!r})")
    params = _check_table(part.get("params", {}), where / "params")
    return {"builder": name, "params": _check_params(name, params, where / "params")}


def _check_params(name: str, params: dict, where: _Where, partial: bool = False) -> dict:
    schema = BUILDERS[name].params
    out = {}
    for key, value in params.items():
        if key not in schema:
            raise (where / key).error(f"unknown parameter of {name!r} (allowed: {sorted(schema)})")
        p = schema[key]
        if value is None and p.default is None and not p.required:
            out[key] = None  # an optional parameter left unset ('window=none' in a command-line spec)
            continue
        if p.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise (where / key).error(f"expected an integer (got {type(value).__name__} {value!r})")
        if p.kind is bool and not isinstance(value, bool):
            raise (where / key).error(f"expected true or false (got {type(value).__name__} {value!r})")
        if p.kind is str and (not isinstance(value, str) or value not in p.choices):
            raise (where / key).error(f"expected one of {list(p.choices)} (got {value!r})")
        if p.kind is int and p.minimum is not None and value < p.minimum:
            raise (where / key).error(f"expected >= {p.minimum} (got {value})")
        if p.kind is int and p.maximum is not None and value > p.maximum:
            raise (where / key).error(f"expected <= {p.maximum} (got {value})")
        out[key] = value
    if not partial:
        for key, p in schema.items():
            if p.required and key not in out:
                raise (where / key).error(f"missing (required by builder {name!r})")
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
    small_n, small_params = None, {}
    if "small" in data:
        small = _check_table(data["small"], where / "small")
        unknown = sorted(set(small) - {"n", "params"})
        if unknown:
            raise (where / "small" / unknown[0]).error("unknown key (allowed: ['n', 'params'])")
        small_n = small.get("n")
        if small_n is not None and (isinstance(small_n, bool) or not isinstance(small_n, int)
                                    or not 1 <= small_n <= SMALL_N_MAX):
            raise (where / "small" / "n").error(f"expected an integer >= 1 and <= {SMALL_N_MAX} (got {small_n!r})")
        raw = _check_table(small.get("params", {}), where / "small" / "params")
        if raw and part["builder"] in COMBINATORS:
            raise (where / "small" / "params").error("not supported for union / intersection specs")
        small_params = _check_params(part["builder"], raw, where / "small" / "params", partial=True) if raw else {}
    return Spec(name=data.get("name", file.stem), builder=part["builder"], params=part.get("params", {}),
                parts=part.get("parts", []), description=data.get("description", ""),
                source=data.get("source", ""), small_n=small_n, small_params=small_params, path=file)


def _build(part: dict, n: Lengths) -> EdgeIndex:
    if part["builder"] in COMBINATORS:
        return COMBINATORS[part["builder"]](*[_build(p, n) for p in part["parts"]])
    return BUILDERS[part["builder"]].fn(n, **part["params"])


def build_spec(spec: Spec, n: Lengths, *, small: bool = False) -> EdgeIndex:
    """Build a validated spec for ``n`` (an int or a list of lengths); ``small`` uses its
    ``[small]`` parameters (toy scale, for pictures). A ``ValueError`` of the builder (e.g. a
    ``random`` spec's ``k`` larger than a sequence) names the spec's file."""
    params = {**spec.params, **spec.small_params} if small else spec.params
    try:
        return _build({"builder": spec.builder, "params": params, "parts": spec.parts}, n)
    except ValueError as e:
        raise ValueError(f"{spec.path or spec.name}: cannot build for n={n!r}: {e}") from None


def load(path: str | Path, n: Lengths | None = None, *, small: bool = False) -> EdgeIndex:
    """Build the topology of a spec file (or catalogue name) for ``n``.

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
