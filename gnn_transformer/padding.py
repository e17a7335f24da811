"""Between padded batches ``[B, T, ...]`` and the node features of one disjoint-union graph.

A batch of variable-length sequences is one graph whose nodes are the real tokens, sequence after
sequence; padding positions are simply absent. ``lengths`` is a list (or 1-D tensor) of ``B``
sequence lengths.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .topology._common import check_cells


def _lengths_tensor(lengths: Sequence[int] | Tensor, batch_size: int | None, max_len: int | None, device) -> Tensor:
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"Expected 'lengths' to hold integers (got dtype {lengths.dtype})")
    elif not isinstance(lengths, Sequence) or isinstance(lengths, str):
        raise TypeError(f"Expected 'lengths' to be a list or 1-D tensor of ints (got {lengths!r})")
    elif any(isinstance(n, bool) or not isinstance(n, numbers.Integral) for n in lengths):
        raise ValueError(f"Expected 'lengths' to hold integers (got {list(lengths)!r})")
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device).reshape(-1)
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"Expected 'lengths' to be non-negative (got {lengths.tolist()})")
    if batch_size is not None and lengths.numel() != batch_size:
        raise ValueError(f"Expected {batch_size} entries in 'lengths', one per sequence (got {lengths.numel()})")
    if max_len is not None and lengths.numel() and int(lengths.max()) > max_len:
        raise ValueError(
            f"Found length {int(lengths.max())} in 'lengths' but the padded tensor has only {max_len} positions"
        )
    return lengths


def _check_tensor(x: object, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected '{name}' to be a tensor (got {type(x).__name__}); wrap it with torch.tensor")


def _real(value: object) -> int | float | None:
    """A real number (not a bool) as a Python ``int`` (an integer, exactly) or ``float``; else ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    return float(value)


def _check_fill_value(fill_value: object, dtype: torch.dtype) -> None:
    """``fill_value`` a number that ``dtype`` holds exactly (integers) or within range (floats)."""
    real = _real(fill_value)
    if dtype == torch.bool:
        ok = isinstance(fill_value, bool) or (real is not None and real in (0, 1))
    elif dtype.is_floating_point:
        ok = real is not None and (not math.isfinite(real) or abs(real) <= torch.finfo(dtype).max)
    elif dtype.is_complex:
        ok = isinstance(fill_value, numbers.Number) and not isinstance(fill_value, bool)
    else:
        info = torch.iinfo(dtype)
        ok = real is not None and math.isfinite(real) and real == int(real) and info.min <= int(real) <= info.max
    if not ok:
        raise ValueError(f"Expected 'fill_value' to be a value of x's dtype {dtype} (got {fill_value!r})")


def padding_mask(lengths: Sequence[int] | Tensor, max_len: int | None = None, device=None) -> Tensor:
    """Boolean ``[B, T]``, ``True`` at real tokens (the opposite of ``key_padding_mask``). A mask
    of more cells than the edge budget (:func:`gnn_transformer.topology.max_edges`) is refused
    with a ``ValueError`` before it is allocated."""
    lengths = _lengths_tensor(lengths, None, max_len, device)
    t = int(lengths.max()) if max_len is None and lengths.numel() else (max_len or 0)
    check_cells("padding_mask", (lengths.numel(), t))
    return _mask(lengths, t)


def _mask(lengths: Tensor, t: int) -> Tensor:
    """:func:`padding_mask` of checked ``lengths`` and ``t`` positions."""
    return torch.arange(t, device=lengths.device) < lengths.unsqueeze(1)  # [B, T]


def from_padded(x: Tensor, lengths: Sequence[int] | Tensor) -> Tensor:
    """Padded ``[B, T, ...]`` to node features ``[sum(lengths), ...]`` (padding dropped).

    Example:
        >>> x = torch.arange(6.).view(2, 3)
        >>> from_padded(x, [2, 1])
        tensor([0., 1., 3.])
    """
    _check_tensor(x)
    if x.dim() < 2:
        raise ValueError(f"Expected 'x' to be padded [B, T, ...] (got shape {list(x.shape)})")
    mask = _mask(_lengths_tensor(lengths, x.size(0), x.size(1), x.device), x.size(1))  # the size of x
    return x[mask]  # [N, ...], row-major: sequence after sequence


def to_padded(
    x: Tensor, lengths: Sequence[int] | Tensor, max_len: int | None = None, fill_value: float = 0.0
) -> Tensor:
    """Node features ``[sum(lengths), ...]`` to padded ``[B, T, ...]`` filled with ``fill_value``.

    Example:
        >>> to_padded(torch.tensor([0., 1., 3.]), [2, 1])
        tensor([[0., 1.],
                [3., 0.]])
    """
    _check_tensor(x)
    if x.dim() < 1:
        raise ValueError(f"Expected 'x' to be node features [N, ...] (got shape {list(x.shape)})")
    _check_fill_value(fill_value, x.dtype)
    lengths = _lengths_tensor(lengths, None, max_len, x.device)
    if int(lengths.sum()) != x.size(0):
        raise ValueError(f"Expected 'x' to have sum(lengths) = {int(lengths.sum())} rows (got {x.size(0)})")
    mask = padding_mask(lengths, max_len, x.device)  # [B, T]
    out = x.new_full((*mask.shape, *x.shape[1:]), fill_value)
    out[mask] = x
    return out
