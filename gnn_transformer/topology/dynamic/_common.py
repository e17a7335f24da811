"""Shared plumbing of the selectors: argument checks, sequences of a batch, token layout."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeGuard

import torch
from torch import Tensor

from .._common import Lengths, as_lengths, local_positions


Batch = Tensor | tuple[Tensor, Tensor]
BatchLengths = Lengths | tuple[Lengths, Lengths]


def _show(t: Tensor) -> str:
    """A tensor's values for a message: all of them when few, else the first ones and the shape."""
    values = t.reshape(-1)[:8].tolist()
    return str(values) if t.numel() <= 8 else f"{str(values)[:-1]}, ...] (shape {tuple(t.shape)})"


def check_qk(q: object, k: object) -> tuple[int, int]:
    """Check ``q`` ``[N_dst, H, D]`` and ``k`` ``[N_src, H_kv, D]``; return ``(H, g)``."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor):
            raise ValueError(f"Expected '{name}' to be a tensor (got {type(x).__name__})")
        if x.dim() != 3:
            raise ValueError(f"Expected '{name}' of shape [N, heads, head_dim] (got shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise ValueError(f"Expected '{name}' to be a floating-point tensor (got dtype {x.dtype})")
        if x.size(1) < 1 or x.size(2) < 1:
            raise ValueError(
                f"Expected '{name}' to have at least one head of head_dim >= 1 (got shape {tuple(x.shape)})"
            )
    assert isinstance(q, Tensor) and isinstance(k, Tensor)
    if k.dtype != q.dtype:
        raise ValueError(f"Expected 'k' to have the dtype of 'q' ({q.dtype}) (got {k.dtype})")
    if k.device != q.device:
        raise ValueError(f"Expected 'k' on the device of 'q' ({q.device}) (got {k.device})")
    if k.size(2) != q.size(2):
        raise ValueError(f"Expected 'k' to have the head_dim of 'q' ({q.size(2)}) (got shape {tuple(k.shape)})")
    if q.size(1) % k.size(1):
        raise ValueError(
            f"Expected the heads of 'q' ({q.size(1)}) to be a multiple of the heads of 'k' (got "
            f"shape {tuple(k.shape)}, {k.size(1)} heads)"
        )
    return q.size(1), q.size(1) // k.size(1)


def check_real(name: str, value: object, lo: float, hi: float, *, open_lo: bool = False) -> float:
    """Validate a finite real number in ``[lo, hi]`` (``(lo, hi]`` when ``open_lo``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value > hi
        or value < lo
        or (open_lo and value == lo)
    ):
        where = f"{'(' if open_lo else '['}{lo}, {hi}]"
        raise ValueError(f"Expected '{name}' to be a real number in {where} (got {value!r})")
    return float(value)


def _check_batch(name: str, batch: object, n: int, device: torch.device) -> Tensor:
    """Validate a PyG ``batch`` vector: 1-D integer, one entry per token, sorted, non-negative."""
    if (
        not isinstance(batch, Tensor)
        or batch.dim() != 1
        or batch.is_floating_point()
        or batch.is_complex()
        or batch.dtype == torch.bool
    ):
        raise ValueError(f"Expected '{name}' to be a 1-D integer tensor (got {batch!r})")
    if batch.numel() != n:
        raise ValueError(f"Expected '{name}' to have one entry per token ({n}) (got {batch.numel()} entries)")
    if batch.device != device:
        raise ValueError(f"Expected '{name}' on the device of 'q' ({device}) (got {batch.device})")
    if n and int(batch.min()) < 0:
        raise ValueError(f"Expected '{name}' >= 0 (got {_show(batch)})")
    if n > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError(f"Expected '{name}' to be sorted (got {_show(batch)})")
    return batch.long()


def _is_pair(x: object) -> TypeGuard[tuple[Any, ...] | list[Any]]:
    """``(lengths_q, lengths_k)`` rather than one list of lengths."""

    def many(v: object) -> bool:
        return (isinstance(v, Tensor) and v.dim() == 1) or (isinstance(v, Sequence) and not isinstance(v, str))

    return isinstance(x, (tuple, list)) and len(x) == 2 and all(many(v) for v in x)


def sequence_pairs(
    fn: str, q: Tensor, k: Tensor, batch: object, lengths: object, *, bipartite: bool = False
) -> tuple[list[int], list[int]]:
    """Lengths of the query sequences and of the key sequences (as many of each; sequence ``b`` of
    the queries reads sequence ``b`` of the keys)."""
    n_q, n_k = q.size(0), k.size(0)
    if not bipartite and n_q != n_k:
        raise ValueError(
            f"{fn} is self-attention only: expected 'q' and 'k' with as many tokens (got "
            f"q.size(0)={n_q}, k.size(0)={n_k})"
        )
    if batch is not None and lengths is not None:
        raise ValueError(f"Expected one of 'batch' and 'lengths', not both (got lengths={lengths!r})")
    if batch is not None:
        if isinstance(batch, (tuple, list)):
            if not bipartite or len(batch) != 2:
                raise ValueError(
                    f"Expected 'batch' to be {'a pair (batch_q, batch_k) or ' if bipartite else ''}"
                    f"one vector (got a {type(batch).__name__} of {len(batch)})"
                )
            bq = _check_batch("batch[0]", batch[0], n_q, q.device)
            bk = _check_batch("batch[1]", batch[1], n_k, q.device)
        else:
            bq = bk = _check_batch("batch", batch, n_q, q.device)
            if n_k != n_q:
                raise ValueError(
                    f"Expected a pair (batch_q, batch_k) as 'batch' for 'q' and 'k' of different "
                    f"lengths (got one vector, q.size(0)={n_q}, k.size(0)={n_k})"
                )
        ids = torch.unique(torch.cat([bq, bk]))  # sorted sequence ids, gaps removed
        lq = torch.bincount(torch.searchsorted(ids, bq), minlength=ids.numel()).tolist()
        lk = torch.bincount(torch.searchsorted(ids, bk), minlength=ids.numel()).tolist()
        return lq, lk
    if lengths is None:
        return [n_q], [n_k]
    if _is_pair(lengths):
        if not bipartite:
            raise ValueError(f"Expected 'lengths' to be one list of lengths for {fn} (got {lengths!r})")
        lq, lk = as_lengths(lengths[0], "lengths[0]"), as_lengths(lengths[1], "lengths[1]")
        if len(lq) != len(lk):
            raise ValueError(f"Expected 'lengths' (lengths_q, lengths_k) with as many sequences (got {lq} and {lk})")
    elif isinstance(lengths, (int, Sequence, Tensor)):
        lq = lk = as_lengths(lengths, "lengths")
    else:
        raise ValueError(f"Expected 'lengths' to be an int or a list of ints (got {lengths!r})")
    if sum(lq) != n_q or sum(lk) != n_k:
        raise ValueError(f"Expected 'lengths' to sum to q.size(0)={n_q} and k.size(0)={n_k} (got {lengths!r})")
    return lq, lk


def token_layout(lengths: list[int], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For every token: (sequence id, position in its sequence, its sequence's offset, its length)."""
    pos, offset, length = local_positions(lengths)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    return seq.to(device), pos.to(device), offset.to(device), length.to(device)


def edge_sizes(lq: list[int], lk: list[int]) -> dict[str, list[int]]:
    """Sizes for :func:`check_edges`' message."""
    return {"n": lq} if lq == lk else {"n_q": lq, "n_k": lk}


def detached_scores_dtype(x: Tensor) -> Tensor:
    """Detached, in the dtype scores are computed in: float64 for float64, float32 otherwise."""
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def no_edges(device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.empty(2, 0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long, device=device)
