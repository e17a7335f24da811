"""Reading a spec file: TOML parsed with ``tomllib`` (nothing in it is executed) and every key checked
into a :class:`Spec` (:func:`read_spec`); the format is described in :mod:`.specs`.

A part is normalized to a dict: ``builder`` with ``params``, ``parts`` (union, intersection),
``heads`` (per_head) or ``layers`` (per_layer), and ``repeat`` for a head or a layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec_catalogue import resolve
from .spec_params import BUILDERS, COMBINATORS, MAX_REPEAT, STRUCTURES, Where, validate_params

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SMALL_N_MAX = 4096  # [small] n: toy scale (pictures, quick checks), not a real length
MAX_DEPTH = 32  # levels of nested [[parts]]
TOP_KEYS = {"name", "description", "source", "builder", "params", "parts", "heads", "layers", "small", "select"}
PART_KEYS = {"builder", "params", "parts"}
HEAD_KEYS = PART_KEYS | {"repeat"}
LAYER_KEYS = PART_KEYS | {"heads", "repeat"}


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
        return num_heads_of(self.part)

    @property
    def per_layer(self) -> bool:
        """Whether the spec builds a :class:`.LayerPattern` (``builder = "per_layer"``)."""
        return self.builder == "per_layer"

    def selector(self, small: bool = False) -> str | dict | None:
        """The selector spec (``small``: the ``[small]`` one where given), or ``None``."""
        return self.small_select if small and self.small_select is not None else self.select


def _check_table(value: Any, where: Where) -> dict:
    if not isinstance(value, dict):
        raise where.error(f"expected a table (got {type(value).__name__} {value!r})")
    return value


def _check_repeat(part: dict, where: Where) -> int:
    repeat = part.get("repeat", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
        raise (where / "repeat").error(f"expected an integer >= 1 and <= {MAX_REPEAT} (got {repeat!r})")
    return repeat


def _check_array(part: dict, key: str, name: str, where: Where) -> list:
    items = part.get(key)
    if not isinstance(items, list) or not items:
        raise (where / key).error(f"{name!r} needs a non-empty array of tables [[{key}]]")
    return items


def _check_part(part: dict, where: Where, allowed: set[str], depth: int = 0, context: str = "top") -> dict:
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
        return {
            "builder": name,
            **repeat,
            "parts": [
                _check_part(_check_table(p, where / "parts" / k), where / "parts" / k, PART_KEYS, depth + 1, "part")
                for k, p in enumerate(parts)
            ],
        }
    per_head_ok = context in ("top", "layer")
    if name == "per_head":
        if not per_head_ok:
            raise (where / "builder").error(f"a per-head graph is a whole spec or a layer, not one of [[{context}s]]")
        heads = [
            _check_part(_check_table(h, where / "heads" / k), where / "heads" / k, HEAD_KEYS, depth + 1, "head")
            for k, h in enumerate(_check_array(part, "heads", name, where))
        ]
        if sum(h["repeat"] for h in heads) > MAX_REPEAT:
            raise (where / "heads").error(f"{sum(h['repeat'] for h in heads)} heads in all, more than {MAX_REPEAT}")
        return {"builder": name, **repeat, "heads": heads}
    if name == "per_layer":
        if context != "top":
            raise (where / "builder").error("'per_layer' is a whole spec, not a part, head or layer")
        layers = [
            _check_part(_check_table(g, where / "layers" / k), where / "layers" / k, LAYER_KEYS, depth + 1, "layer")
            for k, g in enumerate(_check_array(part, "layers", name, where))
        ]
        if sum(g["repeat"] for g in layers) > MAX_REPEAT:
            raise (where / "layers").error(
                f"{sum(g['repeat'] for g in layers)} layers in a cycle, more than {MAX_REPEAT}"
            )
        layer_heads = {k: num_heads_of(g) for k, g in enumerate(layers) if num_heads_of(g) is not None}
        if len(set(layer_heads.values())) > 1:
            raise (where / "layers").error(
                "per-head layers of one spec need one number of heads (got "
                + ", ".join(f"{h} in layers[{k}]" for k, h in layer_heads.items())
                + ")"
            )
        return {"builder": name, "layers": layers}
    if name not in BUILDERS:
        known = sorted(BUILDERS) + sorted(COMBINATORS) + sorted(STRUCTURES)
        raise (where / "builder").error(f"unknown builder {name!r} (known: {known})")
    if BUILDERS[name].per_head and not per_head_ok:
        raise (where / "builder").error(
            f"{name!r} builds a per-head graph: a whole spec or a layer, not one of [[{context}s]]"
        )
    params = _check_table(part.get("params", {}), where / "params")
    return {"builder": name, **repeat, "params": validate_params(name, params, where / "params")}


def num_heads_of(part: dict) -> int | None:
    """Heads of a normalized part's per-head graph (``None``: a graph for every head)."""
    if part["builder"] == "per_head":
        return sum(h["repeat"] for h in part["heads"])
    if part["builder"] == "per_layer":
        return next(filter(None, map(num_heads_of, part["layers"])), None)
    if part["builder"] == "dilated_per_head":
        return len(part["params"]["dilations"])
    if part["builder"] == "duo_attention":
        return part["params"]["num_heads"]
    return None


def _check_select(value: Any, where: Where) -> str | dict:
    """A selector spec of :func:`gnn_transformer.topology.dynamic.selector`, validated."""
    from .dynamic import selector

    if not isinstance(value, (str, dict)):
        raise where.error(
            f"expected a selector like 'topk:num_keys=64' or a table with 'name' (got {type(value).__name__} {value!r})"
        )
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


def with_small(part: dict, params: dict) -> dict:
    """``part`` with ``[small] params`` given to every builder part that takes the key."""
    b = part["builder"]
    if b in COMBINATORS or b in STRUCTURES:
        key = STRUCTURES.get(b, "parts")
        return {**part, key: [with_small(p, params) for p in part[key]]}
    schema = BUILDERS[b].params
    return {**part, "params": {**part["params"], **{k: v for k, v in params.items() if k in schema}}}


def _check_small_params(part: dict, raw: dict, where: Where) -> dict:
    """``[small] params``: each key taken by some builder part, valid for each; the heads unchanged."""
    plain = _plain_parts(part)
    for key, value in raw.items():
        takers = [p["builder"] for p in plain if key in BUILDERS[p["builder"]].params]
        if not takers:
            raise (where / key).error(
                f"no part of the spec takes this parameter (builders: {sorted({p['builder'] for p in plain})})"
            )
        for b in takers:
            validate_params(b, {key: value}, where, partial=True)
    small = with_small(part, raw)
    for p in _plain_parts(small):
        validate_params(p["builder"], p["params"], where)  # the checks across parameters (duo_attention)
    if num_heads_of(small) != num_heads_of(part):
        raise where.error(
            f"[small] params may not change the number of heads ({num_heads_of(part)} -> {num_heads_of(small)})"
        )
    return dict(raw)


def read_spec(path: str | Path) -> Spec:
    """Parse and validate a spec file (or catalogue name) without building it."""
    file = resolve(path)
    where = Where(str(file))
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise where.error(f"not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise where.error(
            f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); TOML files are UTF-8"
        ) from None
    except RecursionError:  # tomllib recurses once per level of inline arrays and tables
        raise where.error(f"nested too deeply to parse (parts may nest {MAX_DEPTH} levels)") from None
    part = _check_part(data, where, TOP_KEYS)
    for key in ("name", "description", "source"):
        if key in data and not isinstance(data[key], str):
            raise (where / key).error(f"expected a string (got {data[key]!r})")
    select = _check_select(data["select"], where / "select") if "select" in data else None
    if select is not None and num_heads_of(part) is not None:
        raise (where / "select").error(
            f"a selector chooses per-head graphs within a graph for every head, not "
            f"within a per-head graph ({num_heads_of(part)} heads)"
        )
    small_n, small_params, small_select = None, {}, None
    if "small" in data:
        small = _check_table(data["small"], where / "small")
        unknown = sorted(set(small) - {"n", "params", "select"})
        if unknown:
            raise (where / "small" / unknown[0]).error("unknown key (allowed: ['n', 'params', 'select'])")
        small_n = small.get("n")
        if small_n is not None and (
            isinstance(small_n, bool) or not isinstance(small_n, int) or not 1 <= small_n <= SMALL_N_MAX
        ):
            raise (where / "small" / "n").error(f"expected an integer >= 1 and <= {SMALL_N_MAX} (got {small_n!r})")
        raw = _check_table(small.get("params", {}), where / "small" / "params")
        small_params = _check_small_params(part, raw, where / "small" / "params") if raw else {}
        if "select" in small:
            if select is None:
                raise (where / "small" / "select").error("a [small] select needs a top-level 'select'")
            small_select = _check_select(small["select"], where / "small" / "select")
    return Spec(
        name=data.get("name", file.stem),
        builder=part["builder"],
        params=part.get("params", {}),
        parts=part.get("parts", []),
        description=data.get("description", ""),
        source=data.get("source", ""),
        small_n=small_n,
        small_params=small_params,
        path=file,
        heads=part.get("heads", []),
        layers=part.get("layers", []),
        select=select,
        small_select=small_select,
    )
