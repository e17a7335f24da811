"""Shared plumbing of the topology builders: lengths, batch offsets, and the final sort.

Every builder returns a ``torch_geometric.EdgeIndex`` of shape ``[2, E]`` with row 0 the source
``j`` (key/value) and row 1 the target ``i`` (query), sorted by target (``sort_order="col"``), with
``sparse_size=(N_src, N_dst)`` and no duplicated edge.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

Lengths = int | Sequence[int]


def as_lengths(n: Lengths, name: str = "n") -> list[int]:
    """Normalize ``n`` (one length or a list of lengths) to a list of non-negative ints."""
    if isinstance(n, bool):
        raise ValueError(f"Expected '{name}' to be an int or a list of ints (got {n!r})")
    if isinstance(n, int):
        lengths = [n]
    elif isinstance(n, Tensor):
        if n.dim() > 1 or n.is_floating_point():
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
    src = src.to(torch.long).reshape(-1)
    dst = dst.to(torch.long).reshape(-1)
    key = dst * max(num_src, 1) + src
    perm = torch.argsort(key, stable=True)
    edge_index = torch.stack([src[perm], dst[perm]], dim=0)
    return EdgeIndex(edge_index, sparse_size=(num_src, num_dst), sort_order="col")


def coalesce_edges(src: Tensor, dst: Tensor, num_src: int, num_dst: int | None = None) -> EdgeIndex:
    """Like :func:`finalize`, but removes duplicated edges first."""
    num_dst = num_src if num_dst is None else num_dst
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
