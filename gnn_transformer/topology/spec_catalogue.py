"""The ``graphs/`` catalogue of named specs, and the rule that tells a catalogue name from a file path."""

from __future__ import annotations

from pathlib import Path

# The catalogue: graphs/ at the top of a source checkout, gnn_transformer/graphs/ in an installed wheel.
_INSTALLED = Path(__file__).resolve().parents[1] / "graphs"
CATALOGUE_DIR = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parents[2] / "graphs"


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
        raise ValueError(
            f"Unknown topology name 'path'={path!r} (catalogue: {sorted(named)}; "
            "a file path ends in .toml or contains a path separator)"
        )
    if not Path(path).is_file():
        raise ValueError(f"No spec file at 'path'={str(path)!r}")
    return Path(path)
