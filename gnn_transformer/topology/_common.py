"""Shared plumbing of the topology builders: lengths, batch offsets, and the final sort.

Every builder returns a ``torch_geometric.EdgeIndex`` of shape ``[2, E]`` with row 0 the source
``j`` (key/value) and row 1 the target ``i`` (query), sorted by target (``sort_order="col"``), with
``sparse_size=(N_src, N_dst)`` and no duplicated edge.

Sizes are checked before anything is allocated: a builder first counts the edges its graph would
have (exactly, or a tight upper bound, in Python integers) and refuses a graph of more than the
edge budget, :data:`DEFAULT_MAX_EDGES` unless raised (or lowered) with :func:`max_edges`:
``2**32`` edges (64 GiB as an int64 ``edge_index``), or on a machine with less memory than
``48 * 2**32`` bytes (192 GiB) the edges its memory can build at 48 bytes each.
Windows, blocks and similar sizes are clamped to the sequence lengths before any tensor
arithmetic, so no size near ``2**63`` overflows ``int64``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

Lengths = int | Sequence[int]

EDGE_CEILING = 2**32  # 64 GiB as an int64 edge_index: causal(65536) fits, full(10**6) does not
# bytes of memory per edge while a builder runs: its int64 pair (16) and up to two more copies
# (arange, cat and sort hold 2-3 times the final edge_index at their peak)
EDGE_BUILD_BYTES = 48


def _machine_edges() -> int:
    """The edges a builder can make in this machine's physical memory (:data:`EDGE_BUILD_BYTES`
    each); :data:`EDGE_CEILING` where the memory cannot be read."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows)
        return EDGE_CEILING
    return memory // EDGE_BUILD_BYTES if memory > 0 else EDGE_CEILING


# the default edge budget: 2**32 edges, or fewer on a machine whose memory cannot build them
DEFAULT_MAX_EDGES = min(EDGE_CEILING, _machine_edges())
SEED_MAX = 2**63 - 1  # seeds of torch.Generator.manual_seed and random.Random
INT64_MAX = 2**63 - 1
_MAX_EDGES: ContextVar[int | None] = ContextVar("max_edges", default=DEFAULT_MAX_EDGES)


@contextmanager
def max_edges(limit: int | None) -> Iterator[None]:
    """Edge budget of the topology builders inside the ``with`` block (``None``: no limit).

    Every builder counts the edges of its graph before allocating anything and raises a
    ``ValueError`` when they (or its tokens) exceed the budget: :data:`DEFAULT_MAX_EDGES`
    (``2**32``, 64 GiB as an int64 ``edge_index``, or less on a machine with less than 192 GiB of
    memory: its memory over 48 bytes an edge) outside any ``with max_edges(...)`` block. The
    previous budget is back when the block ends (the setting is a ``ContextVar``: threads and tasks
    each keep their own).

    Args:
        limit: the most edges (and tokens) a builder may produce, ``>= 0``; ``None`` for no limit.

    Example:
        >>> from gnn_transformer import topology as T
        >>> with T.max_edges(5):
        ...     T.causal(3).size(1)
        Traceback (most recent call last):
        ...
        ValueError: causal: n=3 would need 6 edges, more than the edge budget max_edges=5 (...)
        >>> with T.max_edges(6):
        ...     T.causal(3).size(1)
        6
    """
    if limit is not None:
        check_int("limit", limit, 0)
    token = _MAX_EDGES.set(limit)
    try:
        yield
    finally:
        _MAX_EDGES.reset(token)


def edge_budget() -> int | None:
    """The edge budget in force (:func:`max_edges`; ``None``: no limit)."""
    return _MAX_EDGES.get()


def _describe(lengths: list[int]) -> str:
    """``n`` for a message: the length, a short list, or the first lengths and the totals."""
    if len(lengths) == 1:
        return str(lengths[0])
    if len(lengths) <= 4:
        return str(lengths)
    return f"[{lengths[0]}, {lengths[1]}, ..., {lengths[-1]}] ({len(lengths)} sequences, {sum(lengths)} tokens)"


def check_cells(what: str, shape: Sequence[int]) -> None:
    """Refuse a dense tensor of ``shape`` (a mask, a padded batch) with more cells than the edge
    budget (:func:`max_edges`) before it is allocated: a ``ValueError`` naming ``what``."""
    limit = edge_budget()
    cells = 1
    for size in shape:
        cells *= int(size)
    if limit is not None and cells > limit:
        raise ValueError(
            f"{what}: a dense {list(shape)} would have {cells} cells, more than the edge budget "
            f"max_edges={limit}; to build it anyway, call it inside "
            f"'with gnn_transformer.topology.max_edges({cells}):' (None: no limit)"
        )


def describe_sizes(**sizes: list[int]) -> str:
    """``n=5`` or ``n=[3, 4]``: a builder's sizes for a message."""
    return ", ".join(f"{name}={_describe(v)}" for name, v in sizes.items())


def check_edges(builder: str, edges: int, **sizes: list[int]) -> None:
    """Refuse a graph of more edges, or more tokens, than the edge budget (see :func:`max_edges`),
    naming the builder, its sizes (``n=...``) and the edges it would need."""
    limit = _MAX_EDGES.get()
    if limit is None:
        return
    tokens = sum(sum(v) for v in sizes.values())  # per-token arrays, even without edges
    if edges > limit or tokens > limit:
        what = describe_sizes(**sizes)
        need = f"would need {edges} edges" if edges > limit else f"has {tokens} tokens ({edges} edges)"
        raise ValueError(
            f"{builder}: {what} {need}, more than the edge budget max_edges={limit} "
            f"({16 * max(edges, tokens) / 2**30:.3g} GiB as an int64 edge_index); to build it anyway, "
            f"call it inside 'with gnn_transformer.topology.max_edges({max(edges, tokens)}):' (None: no limit)"
        )


def as_lengths(n: Lengths | Tensor, name: str = "n") -> list[int]:
    """Normalize ``n`` (one length, a list of lengths or a 1-D integer tensor of them) to a list of
    non-negative ints."""
    if isinstance(n, bool):
        raise ValueError(f"Expected '{name}' to be an int or a list of ints (got {n!r})")
    if isinstance(n, int):
        lengths = [n]
    elif isinstance(n, Tensor):
        if n.dim() > 1 or n.is_floating_point() or n.is_complex() or n.dtype == torch.bool:
            raise ValueError(f"Expected '{name}' to be a 1-D integer tensor of lengths (got {n!r})")
        lengths = [int(v) for v in n.reshape(-1).tolist()]
    elif isinstance(n, Sequence) and not isinstance(n, (str, bytes)):
        lengths = []
        for v in n:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"Expected '{name}' to hold ints (got {v!r} in {list(n)!r})")
            lengths.append(v)
    else:
        raise ValueError(f"Expected '{name}' to be an int or a list of ints (got {n!r})")
    for v in lengths:
        if v < 0:
            raise ValueError(f"Expected '{name}' to be non-negative (got {v} in {lengths})")
    return lengths


def batch_vector(n: Lengths) -> Tensor:
    """PyG-style ``batch`` vector ``[N]`` (sequence id of each node) for ``n``."""
    lengths = torch.tensor(as_lengths(n), dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def ptr_vector(n: Lengths) -> Tensor:
    """PyG-style ``ptr`` vector ``[B + 1]`` (offsets of each sequence) for ``n``."""
    lengths = torch.tensor(as_lengths(n), dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def local_positions(n: Lengths) -> tuple[Tensor, Tensor, Tensor]:
    """For every node of the disjoint union: (position in its sequence, its sequence's offset, its length)."""
    lengths = torch.tensor(as_lengths(n), dtype=torch.long)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # [N]
    node = torch.arange(int(lengths.sum()))
    offset = ptr[seq]
    return node - offset, offset, lengths[seq]


def finalize(src: Tensor, dst: Tensor, num_src: int, num_dst: int | None = None) -> EdgeIndex:
    """Sort edges by target (then source), drop nothing, and wrap them as an ``EdgeIndex``."""
    num_dst = num_src if num_dst is None else num_dst
    check_keys(num_src, num_dst)
    src = src.to(torch.long).reshape(-1)
    dst = dst.to(torch.long).reshape(-1)
    key = dst * max(num_src, 1) + src
    perm = torch.argsort(key, stable=True)
    edge_index = torch.stack([src[perm], dst[perm]], dim=0)
    return EdgeIndex(edge_index, sparse_size=(num_src, num_dst), sort_order="col")


def coalesce_edges(src: Tensor, dst: Tensor, num_src: int, num_dst: int | None = None) -> EdgeIndex:
    """Like :func:`finalize`, but removes duplicated edges first."""
    num_dst = num_src if num_dst is None else num_dst
    check_keys(num_src, num_dst)
    key = dst.to(torch.long).reshape(-1) * max(num_src, 1) + src.to(torch.long).reshape(-1)
    key = torch.unique(key)  # sorted: by target, then source
    s = max(num_src, 1)
    edge_index = torch.stack([key % s, key // s], dim=0)
    return EdgeIndex(edge_index, sparse_size=(num_src, num_dst), sort_order="col")


def check_int(name: str, value: object, minimum: int | None = 0, maximum: int | None = None) -> int:
    """Validate an integer argument, naming it and the bad value in the ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Expected '{name}' to be an int (got {value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"Expected '{name}' >= {minimum} (got {value})")
    if maximum is not None and value > maximum:
        raise ValueError(f"Expected '{name}' <= {maximum} (got {value})")
    return value


def check_seed(name: str, value: object) -> int:
    """Validate a seed: an int in ``[0, SEED_MAX]`` (``2**63 - 1``), the rule of spec files and the
    command line too."""
    return check_int(name, value, 0, SEED_MAX)


def check_keys(num_src: int, num_dst: int) -> None:
    """Refuse node counts whose edge keys ``dst * num_src + src`` would overflow int64."""
    if max(num_src, 1) * max(num_dst, 1) > INT64_MAX:
        raise ValueError(
            f"Expected a graph of at most 2**63 - 1 node pairs (got {num_src} sources x {num_dst} targets)"
        )


def window_edges(L: int, window: int, causal: bool = False) -> int:
    """Edges of a sliding window of radius ``window`` on one sequence of ``L`` tokens."""
    w = min(window, max(L - 1, 0))
    return (w + 1) * L - w * (w + 1) // 2 if causal else (2 * w + 1) * L - w * (w + 1)


def check_bool(name: str, value: object) -> bool:
    """Validate a boolean argument."""
    if not isinstance(value, bool):
        raise ValueError(f"Expected '{name}' to be a bool (got {value!r})")
    return value


def expand_ranges(start: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """For row ``r`` with ``count[r]`` items: ``(owner, value)`` where ``value`` runs ``start[r] ...
    start[r] + count[r] - 1``; the vectorized replacement of a loop over rows."""
    count = count.clamp(min=0)
    owner = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    first = torch.repeat_interleave(count.cumsum(0) - count, count)
    value = torch.repeat_interleave(start, count) + (torch.arange(owner.numel(), device=count.device) - first)
    return owner, value


def full_pairs(n: int) -> tuple[Tensor, Tensor]:
    """``(src, dst)`` of all ``n * n`` pairs of one sequence, sorted by target."""
    dst = torch.arange(n).repeat_interleave(n)
    src = torch.arange(n).repeat(n)
    return src, dst


def wrap_sorted(src: Tensor, dst: Tensor, num_src: int, num_dst: int | None = None) -> EdgeIndex:
    """Wrap edges that are already sorted by target, then source, and free of duplicates (as
    :func:`expand_ranges` produces them) as an ``EdgeIndex``, skipping :func:`finalize`'s sort."""
    num_dst = num_src if num_dst is None else num_dst
    edge_index = torch.stack([src.to(torch.long).reshape(-1), dst.to(torch.long).reshape(-1)], dim=0)
    return EdgeIndex(edge_index, sparse_size=(num_src, num_dst), sort_order="col")
