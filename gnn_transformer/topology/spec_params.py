"""The builders a topology spec may name, and the schema of their parameters (types, bounds,
defaults, required keys), with the checks a spec file's ``params`` pass (:func:`check_params`).

A ``ValueError`` names the file (or the command-line spec) and the key path (:class:`Where`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._common import SEED_MAX
from .basic import causal, full
from .bigbird import bigbird
from .combinators import intersection, union
from .document import document
from .expander import expander
from .global_tokens import global_tokens
from .heads import dilated_per_head, duo_attention, streaming
from .prefix_lm import prefix_lm
from .random_graphs import random
from .sparse_transformer import fixed, strided
from .star import star
from .windows import dilated, sliding_window


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


INT_MAX = 2**31 - 1  # sizes, windows, blocks, counts: far beyond any sequence, no int overflow
MAX_REPEAT = 4096  # items of an array parameter; repeat of one of [[heads]] / [[layers]]; heads or layers


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
    "dilated": Builder(dilated, {"window": _int(required=True), "dilation": _int(1, 1), "causal": _bool(False)}),
    "strided": Builder(strided, {"stride": _int(1, required=True), "causal": _bool(True)}),
    "fixed": Builder(fixed, {"block": _int(1, required=True), "num_summary": _int(0, 1), "causal": _bool(True)}),
    "global_tokens": Builder(global_tokens, {"num_global": _int(0, 1), "window": _int(0)}),
    "bigbird": Builder(
        bigbird,
        {
            "block": _int(1, 1),
            "window": _int(0, 1),
            "num_global": _int(0, 1),
            "num_random": _int(0, 1),
            "seed": _seed(),
            "global_at": _choice("start", "ends"),
        },
    ),
    "random": Builder(random, {"k": _int(0, required=True), "seed": _seed()}),
    "star": Builder(star, {"ring": _bool(True)}),
    "expander": Builder(expander, {"degree": _int(0, required=True), "seed": _seed(), "self_loops": _bool(False)}),
    "document": Builder(document, {"doc_lengths": _int(1, required=True), "causal": _bool(False)}),
    "prefix_lm": Builder(prefix_lm, {"prefix": _int(0, required=True)}),
    "streaming": Builder(streaming, {"num_sinks": _int(required=True), "window": _int(required=True)}),
    "dilated_per_head": Builder(
        dilated_per_head,
        {"window": _int(required=True), "dilations": _ints(1, 1), "causal": _bool(False)},
        per_head=True,
    ),
    "duo_attention": Builder(
        duo_attention,
        {
            "streaming_heads": _ints(0),
            "num_heads": _int(1, required=True),
            "num_sinks": _int(required=True),
            "window": _int(required=True),
        },
        per_head=True,
    ),
}
COMBINATORS = {"union": union, "intersection": intersection}
STRUCTURES = {"per_head": "heads", "per_layer": "layers"}  # builder -> its array of tables


class Where:
    """File and key path, for error messages: ``(where / "parts" / 0).error(message)``."""

    def __init__(self, file: str, key: str = ""):
        self.file, self.key = file, key

    def __truediv__(self, key: str | int) -> Where:
        k = f"{self.key}[{key}]" if isinstance(key, int) else (f"{self.key}.{key}" if self.key else key)
        return Where(self.file, k)

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.file}: key '{self.key}': {message}" if self.key else f"{self.file}: {message}")


def _check_value(name: str, key: str, p: Param, value: Any, where: Where) -> None:
    """``value`` has the type and bounds of ``p`` (an array: each item)."""
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


def validate_params(name: str, params: dict, where: Where, partial: bool = False) -> dict:
    """The parameters of builder ``name``, checked against its schema (``partial``: required keys may
    be missing)."""
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
                raise (where / "streaming_heads").error(
                    f"expected distinct heads < num_heads = {out['num_heads']} (got {heads})"
                )
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
    return validate_params(builder, params, Where(source))
