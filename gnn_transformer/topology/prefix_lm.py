"""Prefix language model (UniLM, Dong et al., 2019; T5's "prefix LM", Raffel et al., 2020).

The first ``prefix`` tokens (the input) see each other bidirectionally; the rest (the target) is
generated causally and sees the whole prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths, check_edges, check_int, expand_ranges, local_positions, wrap_sorted


def prefix_lm(n: Lengths, prefix: int | Sequence[int]) -> EdgeIndex:
    r"""``j -> i`` iff ``j <= i`` or ``j < prefix``, within each sequence.

    Edges per sequence of length ``L`` with ``p = min(prefix, L)``: ``L (L + 1) / 2 + p (p - 1) / 2``.

    Args:
        n: sequence length, or a list of lengths.
        prefix: prefix length (clamped to the sequence), or one per sequence.

    Example:
        >>> prefix_lm(3, 2).tolist()
        [[0, 1, 0, 1, 0, 1, 2], [0, 0, 1, 1, 2, 2, 2]]
    """
    lengths = as_lengths(n)
    if isinstance(prefix, int) and not isinstance(prefix, bool):
        check_int("prefix", prefix)
        prefixes = [prefix] * len(lengths)
    else:
        prefixes = as_lengths(prefix, "prefix")
        if len(prefixes) != len(lengths):
            raise ValueError(f"Expected one 'prefix' per sequence ({len(lengths)}) (got {prefixes})")
    prefixes = [min(p, L) for p, L in zip(prefixes, lengths)]  # no int64 overflow below
    check_edges("prefix_lm", sum(L * (L + 1) // 2 + p * (p - 1) // 2 for p, L in zip(prefixes, lengths)), n=lengths)
    pos, offset, length = local_positions(lengths)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    p = torch.minimum(torch.tensor(prefixes, dtype=torch.long)[seq], length) if lengths else pos
    dst, src = expand_ranges(offset, torch.maximum(pos + 1, p))
    return wrap_sorted(src, dst, pos.numel())


def prefix_lm_predicate(i: int, j: int, *, prefix: int) -> bool:
    """Predicate twin of :func:`prefix_lm`."""
    return j <= i or j < prefix
