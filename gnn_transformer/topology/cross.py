"""Cross attention: a bipartite graph from encoder tokens (sources) to decoder tokens (targets).

Sources and targets are different node sets, so the graph has ``sparse_size = (N_enc, N_dec)``.
Sequence ``b`` of the decoder batch attends to sequence ``b`` of the encoder batch only.

Modes, for decoder length ``L_q`` and encoder length ``L_k``:
- ``"full"``: every decoder token sees every encoder token (the original Transformer).
- ``"window"``: decoder token ``i`` sees encoder tokens within ``window`` of its aligned position
  ``c(i) = floor((2i + 1) L_k / (2 L_q))`` (local cross attention, e.g. for speech or aligned
  translation).
- ``"monotonic"``: decoder token ``i`` sees the encoder prefix read so far,
  ``j < ceil((i + 1) L_k / L_q) + window`` (streaming, simultaneous translation; ``window`` is a
  lookahead).
"""

from __future__ import annotations

import torch
from torch_geometric import EdgeIndex

from ._common import INT64_MAX, Lengths, as_lengths, check_edges, check_int, expand_ranges, local_positions, wrap_sorted

MODES = ("full", "window", "monotonic")


def _edges(L_q: int, L_k: int, mode: str, window: int) -> int:
    """Upper bound of the edges of one pair of sequences (exact for ``"full"``)."""
    if mode == "window":
        return L_q * min(L_k, 2 * window + 1)
    if mode == "monotonic":  # sum_i ceil((i + 1) L_k / L_q) + w <= L_k (L_q + 1) / 2 + L_q (w + 1)
        return min(L_q * L_k, -(-L_k * (L_q + 1) // 2) + L_q * (window + 1))
    return L_q * L_k


def cross(n_q: Lengths, n_k: Lengths, *, mode: str = "full", window: int = 0) -> EdgeIndex:
    r"""Encoder -> decoder attention, ``j`` encoder (source), ``i`` decoder (target).

    Edges per pair of sequences: ``L_q L_k`` (full); at most ``L_q (2w + 1)`` (window);
    monotonic: :math:`\sum_i \min(L_k, \lceil (i+1) L_k / L_q \rceil + w)`.

    Args:
        n_q: decoder (query) length, or a list of lengths.
        n_k: encoder (key) length, or a list with one length per decoder sequence.
        mode: ``"full"``, ``"window"`` or ``"monotonic"``.
        window: radius (``"window"``) or lookahead (``"monotonic"``), ``>= 0`` (clamped to the
            encoder length: a larger one sees the same tokens).

    Example:
        >>> cross(2, 4, mode="monotonic").tolist()
        [[0, 1, 0, 1, 2, 3], [0, 0, 1, 1, 1, 1]]
    """
    q_len, k_len = as_lengths(n_q, "n_q"), as_lengths(n_k, "n_k")
    if len(q_len) != len(k_len):
        raise ValueError(f"Expected 'n_k' to have one length per sequence of 'n_q' ({len(q_len)}) (got {k_len})")
    if mode not in MODES:
        raise ValueError(f"Expected 'mode' in {MODES} (got {mode!r})")
    check_int("window", window)
    window = min(window, max(k_len, default=0))
    if 2 * max(q_len, default=0) * max(k_len, default=0) > INT64_MAX:  # (2i + 1) L_k below
        raise ValueError(
            f"Expected 2 * n_q * n_k <= 2**63 - 1 for int64 positions (got n_q={max(q_len)} and n_k={max(k_len)})"
        )
    check_edges("cross", sum(_edges(a, b, mode, window) for a, b in zip(q_len, k_len)), n_q=q_len, n_k=k_len)
    pos, _, lq = local_positions(q_len)  # [N_q]
    seq = torch.repeat_interleave(torch.arange(len(q_len)), torch.tensor(q_len, dtype=torch.long))
    k_t = torch.tensor(k_len, dtype=torch.long)
    lk = k_t[seq] if q_len else pos  # encoder length of each decoder token
    k_off = (torch.cumsum(k_t, 0) - k_t)[seq] if q_len else pos
    if mode == "full":
        lo, hi = torch.zeros_like(pos), lk - 1
    elif mode == "window":
        c = ((2 * pos + 1) * lk) // (2 * lq)
        lo, hi = (c - window).clamp(min=0), torch.minimum(c + window, lk - 1)
    else:
        read = -((-(pos + 1) * lk) // lq)  # ceil((i + 1) L_k / L_q)
        lo, hi = torch.zeros_like(pos), torch.minimum(read + window, lk) - 1
    dst, src = expand_ranges(lo, (hi - lo + 1).clamp(min=0))
    return wrap_sorted(k_off[dst] + src, dst, sum(k_len), sum(q_len))


def cross_predicate(i: int, j: int, n_q: int, n_k: int, *, mode: str = "full", window: int = 0) -> bool:
    """Predicate twin of :func:`cross` for one decoder sequence of ``n_q`` and encoder of ``n_k``."""
    if mode == "full":
        return True
    if mode == "window":
        return abs(j - ((2 * i + 1) * n_k) // (2 * n_q)) <= window
    return j < -((-(i + 1) * n_k) // n_q) + window
