"""Selectors by name: ``"topk:num_keys=64"`` or a table ``{"name": "topk", "num_keys": 64}``."""

from __future__ import annotations

import re
from collections.abc import Mapping


from .selectors import BlockTopK, LSH, Routing, TopK


SELECTORS = ("topk", "block_topk", "lsh", "routing")
_CLASSES: dict[str, type] = {"topk": TopK, "block_topk": BlockTopK, "lsh": LSH, "routing": Routing}
_PARAMETERS: dict[str, dict[str, type]] = {  # the parameters a spec may give, with their types
    "topk": {"num_keys": int, "causal": bool},
    "block_topk": {"block_size": int, "num_blocks": int, "causal": bool},
    "lsh": {"num_buckets": int, "num_hashes": int, "chunk_size": int, "seed": int, "causal": bool},
    "routing": {"num_clusters": int, "decay": float, "seed": int, "causal": bool},
}
_REQUIRED = {
    "topk": ("num_keys",),
    "block_topk": ("block_size", "num_blocks"),
    "lsh": ("num_buckets",),
    "routing": ("num_clusters",),
}
_INT = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_WANT = {bool: "a boolean (true or false)", int: "an integer", float: "a real number"}


def _parse(spec: object) -> tuple[str, dict[str, object], bool]:
    """``(name, parameters, from_text)`` of a spec string or mapping, the parameters not yet typed."""
    if isinstance(spec, str):
        name, _, rest = spec.partition(":")
        params: dict[str, object] = {}
        for item in rest.split(",") if rest.strip() else []:
            key, eq, text = (part.strip() for part in item.partition("="))
            if not eq or not key or not text:
                raise ValueError(f"selector spec {spec!r}: expected 'key=value' items after 'name:' (got {item!r})")
            if key in params:
                raise ValueError(
                    f"selector spec {spec!r}: parameter '{key}' given twice (got {key}={params[key]} and {key}={text})"
                )
            params[key] = text
        return name.strip(), params, True
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(
                f"selector spec {spec!r}: expected a 'name' key, one of {SELECTORS} (got keys {list(spec)})"
            )
        return spec["name"], {key: v for key, v in spec.items() if key != "name"}, False
    raise ValueError(
        f"Expected 'spec' to be a string such as 'topk:num_keys=64' or a mapping such as "
        f"{{'name': 'topk', 'num_keys': 64}} (got {spec!r})"
    )


def _typed(spec: object, key: str, value: object, kind: type, from_text: bool) -> object:
    """``value`` as a ``kind`` (parsed from text, or checked), else a ``ValueError``."""
    if from_text:
        assert isinstance(value, str)
        if kind is bool and value in ("true", "false"):
            return value == "true"
        if kind is int and _INT.fullmatch(value):
            return int(value)
        if kind is float and _REAL.fullmatch(value):
            return float(value)
    elif kind is bool and isinstance(value, bool):
        return value
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"selector spec {spec!r}: expected '{key}' to be {_WANT[kind]} (got {key}={value!r})")


def selector(
    spec: str | Mapping[str, object], *, num_heads: int | None = None, head_dim: int | None = None
) -> TopK | BlockTopK | LSH | Routing:
    r"""A selector object by name, from a spec string or a mapping (a TOML table, a model config).

    The string form is ``"name"`` or ``"name:key=value,key=value"``: integers in decimal, booleans
    ``true`` / ``false``, reals (``decay``) in decimal or exponent notation; nothing is evaluated.
    The mapping form is ``{"name": name, key: value, ...}`` with values of those types (an ``int``
    is not a ``bool``). Names (:data:`SELECTORS`) and their parameters:

    ============== ============================================================= ==============
    name           parameters (required first)                                   object
    ============== ============================================================= ==============
    ``topk``       ``num_keys``; ``causal``                                      :class:`TopK`
    ``block_topk`` ``block_size``, ``num_blocks``; ``causal``                    :class:`BlockTopK`
    ``lsh``        ``num_buckets``; ``num_hashes``, ``chunk_size``, ``seed``,    :class:`LSH`
                   ``causal``
    ``routing``    ``num_clusters``; ``decay``, ``seed``, ``causal``             :class:`Routing`
    ============== ============================================================= ==============

    Args:
        spec: the selector, as above.
        num_heads: query heads of the layer; required for ``routing`` (its centroids are per
            head), ignored by the others.
        head_dim: head dimension of the layer; required for ``routing``, ignored by the others.

    Returns:
        The selector (a new :class:`Routing` module, with fresh centroids, for ``routing``).

    Raises:
        ValueError: an unknown name or parameter, a missing parameter, a value of the wrong type
            or out of range, naming the spec, the key and the value.

    Example:
        >>> selector("block_topk:block_size=64,num_blocks=8,causal=true")
        BlockTopK(block_size=64, num_blocks=8, causal=True)
        >>> selector({"name": "topk", "num_keys": 16})
        TopK(num_keys=16, causal=False)
        >>> selector("routing:num_clusters=4", num_heads=2, head_dim=8)
        Routing(num_heads=2, head_dim=8, num_clusters=4, decay=0.999, seed=0)
    """
    name, raw, from_text = _parse(spec)
    if name not in SELECTORS:
        raise ValueError(f"selector spec {spec!r}: expected 'name' to be one of {SELECTORS} (got {name!r})")
    types = _PARAMETERS[name]
    params = {}
    for key, value in raw.items():
        if key not in types:
            raise ValueError(
                f"selector spec {spec!r}: unknown parameter '{key}' of {name} (got {key}={value!r}); "
                f"its parameters: {', '.join(types)}"
            )
        params[key] = _typed(spec, key, value, types[key], from_text)
    missing = [key for key in _REQUIRED[name] if key not in params]
    if missing:
        raise ValueError(
            f"selector spec {spec!r}: missing parameter '{missing[0]}' of {name} (required: "
            f"{', '.join(_REQUIRED[name])})"
        )
    if name == "routing":
        if num_heads is None or head_dim is None:
            raise ValueError(
                f"selector spec {spec!r}: routing needs the layer's 'num_heads' and 'head_dim' for its "
                f"centroids (got num_heads={num_heads!r}, head_dim={head_dim!r})"
            )
        params = {"num_heads": num_heads, "head_dim": head_dim, **params}
    try:
        return _CLASSES[name](**params)
    except ValueError as error:
        raise ValueError(f"selector spec {spec!r}: {error}") from error
