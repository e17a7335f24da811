"""Per-head token graphs: one graph per query head, as ``(edge_index, edge_head)``.

A head is an edge type: edge ``j -> i`` with ``edge_head[e] = h`` exists for head ``h`` only. The
builders here return ``edge_index`` (an ``EdgeIndex`` with the graphs' ``sparse_size``) sorted by
``(head, target, source)`` and ``edge_head [E]`` (long), which
:func:`gnn_transformer.kernels.attend` and the layers take as ``edge_head=``; the kernels then run
``E`` edges, never ``H x`` the union. The dense twin is ``to_dense_mask(edge_index,
edge_head=edge_head, num_heads=H)``, ``[H, N, N]``.

- :func:`per_head`: stack any graphs, one per head.
- :func:`dilated_per_head`: Longformer's dilated windows with one dilation per head (Beltagy et
  al., 2020, arXiv:2004.05150, section 3.1: "different dilation configurations per head").
- :func:`streaming`: StreamingLLM's attention sinks plus a causal window (Xiao et al., 2023,
  arXiv:2309.17453).
- :func:`duo_attention`: DuoAttention's split of heads (Xiao et al., 2024, arXiv:2410.10819):
  retrieval heads attend causally to everything, streaming heads to sinks plus a window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths, check_bool, check_edges, check_int, local_positions, window_edges, wrap_sorted
from .basic import causal
from .combinators import shared_sizes
from .windows import dilated, dilated_edges


def per_head(graphs: Sequence[Tensor]) -> tuple[EdgeIndex, Tensor]:
    """One graph per head stacked into one per-head graph: head ``h`` attends along ``graphs[h]``.

    Args:
        graphs: ``H >= 1`` edge sets ``[2, E_h]`` on the same nodes (``EdgeIndex`` operands must
            share one ``sparse_size``; plain tensors take it from the others, or ``max + 1``).

    Returns:
        ``(edge_index [2, sum E_h], edge_head [sum E_h])``, sorted by ``(head, target)`` when each
        graph is sorted by target (every builder's output is).

    Example:
        >>> from gnn_transformer.topology import causal, sliding_window
        >>> edge_index, edge_head = per_head([causal(3), sliding_window(3, 0)])
        >>> edge_index.tolist(), edge_head.tolist()
        ([[0, 0, 1, 0, 1, 2, 0, 1, 2], [0, 1, 1, 2, 2, 2, 0, 1, 2]], [0, 0, 0, 0, 0, 0, 1, 1, 1])
    """
    if isinstance(graphs, Tensor) or not isinstance(graphs, Sequence) or len(graphs) == 0:
        raise ValueError(
            f"Expected 'graphs' to be a non-empty list of edge_index tensors, one per head "
            f"(got {type(graphs).__name__})"
        )
    num_src, num_dst = shared_sizes(graphs, "per_head")
    plains = [(g.as_tensor() if isinstance(g, EdgeIndex) else g).to(torch.long) for g in graphs]
    devices = {p.device for p in plains}
    if len(devices) > 1:
        raise ValueError(f"Expected the graphs of 'per_head' on one device (got {sorted(map(str, devices))})")
    edge_index = torch.cat(plains, dim=1)  # [2, E]
    counts = torch.tensor([p.size(1) for p in plains], device=edge_index.device)
    edge_head = torch.repeat_interleave(torch.arange(len(plains), device=edge_index.device), counts)  # [E]
    return EdgeIndex(edge_index, sparse_size=(num_src, num_dst)), edge_head


def dilated_per_head(
    n: Lengths, window: int, dilations: Sequence[int], *, causal: bool = False
) -> tuple[EdgeIndex, Tensor]:
    """Longformer's dilated sliding windows, one dilation per head: head ``h`` sees ``j`` with
    ``|i - j| = s * dilations[h]``, ``0 <= s <= window`` (``0 <= i - j`` when ``causal``), within
    each sequence. Longformer gives its lower heads no dilation (local context) and its upper heads
    larger ones (a longer reach at the same cost).

    Args:
        n: sequence length, or a list of lengths.
        window: steps ``w >= 0`` on each side.
        dilations: one dilation ``>= 1`` per head.
        causal: only look back.

    Example:
        >>> edge_index, edge_head = dilated_per_head(4, 1, [1, 2], causal=True)
        >>> edge_index.tolist()
        [[0, 0, 1, 1, 2, 2, 3, 0, 1, 0, 2, 1, 3], [0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 2, 3, 3]]
        >>> edge_head.tolist()
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    """
    lengths = as_lengths(n)
    check_int("window", window)
    check_bool("causal", causal)
    if isinstance(dilations, (str, bytes)) or not isinstance(dilations, Sequence) or len(dilations) == 0:
        raise ValueError(f"Expected 'dilations' to be a non-empty list of ints, one per head (got {dilations!r})")
    for d in dilations:
        check_int("dilations", d, 1)
    window = min(window, max(lengths, default=0))
    total = sum(dilated_edges(L, window, d, causal) for d in dilations for L in lengths)
    check_edges("dilated_per_head", total, n=lengths)
    return per_head([dilated(lengths, window, d, causal=causal) for d in dilations])


def streaming(n: Lengths, num_sinks: int, window: int) -> EdgeIndex:
    """StreamingLLM's causal graph: ``j -> i`` iff ``j <= i`` and (``j < num_sinks`` or
    ``i - j <= window``), within each sequence. The first tokens ("attention sinks") stay visible
    to every later token; the rest is a causal window of radius ``window`` (``window + 1`` keys with
    the token itself).

    Args:
        n: sequence length, or a list of lengths.
        num_sinks: sink tokens ``>= 0`` at the start of each sequence.
        window: radius ``>= 0`` of the causal window.

    Example:
        >>> streaming(5, 1, 1).tolist()
        [[0, 0, 1, 0, 1, 2, 0, 2, 3, 0, 3, 4], [0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]]
    """
    lengths = as_lengths(n)
    check_int("num_sinks", num_sinks)
    check_int("window", window)
    longest = max(lengths, default=0)
    num_sinks, window = min(num_sinks, longest), min(window, longest)

    def count(L: int) -> int:  # the causal window's edges, plus min(i - window, num_sinks) sinks per row
        t = max(L - 1 - window, 0)
        if t <= num_sinks:
            sink_edges = t * (t + 1) // 2
        else:
            sink_edges = num_sinks * (num_sinks + 1) // 2 + (t - num_sinks) * num_sinks
        return window_edges(L, window, causal=True) + sink_edges

    check_edges("streaming", sum(count(L) for L in lengths), n=lengths)
    pos, offset, _ = local_positions(lengths)  # [N] each
    start = (pos - window).clamp(min=0)  # first key of the window
    sinks = torch.minimum(start, torch.full_like(start, num_sinks))  # sinks before the window: 0..sinks-1
    count_per = sinks + (pos - start + 1)  # [N]
    total = int(count_per.sum())
    dst = torch.repeat_interleave(torch.arange(pos.numel()), count_per)  # [E]
    first = torch.repeat_interleave(count_per.cumsum(0) - count_per, count_per)
    rank = torch.arange(total) - first  # 0.. within the row
    s_d = sinks[dst]
    src_local = torch.where(rank < s_d, rank, start[dst] + rank - s_d)
    return wrap_sorted(offset[dst] + src_local, dst, pos.numel())


def streaming_predicate(i: int, j: int, *, num_sinks: int, window: int) -> bool:
    """Predicate twin of :func:`streaming`."""
    return j <= i and (j < num_sinks or i - j <= window)


def duo_attention(
    n: Lengths, streaming_heads: Sequence[int], num_heads: int, *, num_sinks: int, window: int
) -> tuple[EdgeIndex, Tensor]:
    """DuoAttention's per-head graph: the heads in ``streaming_heads`` attend to ``num_sinks`` sinks
    plus a causal window (:func:`streaming`), every other head ("retrieval heads") causally to all
    earlier tokens.

    Args:
        n: sequence length, or a list of lengths.
        streaming_heads: the query heads that stream (distinct, in ``[0, num_heads)``).
        num_heads: the number of query heads ``H``.
        num_sinks, window: as in :func:`streaming`.

    Example:
        >>> edge_index, edge_head = duo_attention(3, [1], 2, num_sinks=1, window=0)
        >>> edge_index.tolist()
        [[0, 0, 1, 0, 1, 2, 0, 0, 1, 0, 2], [0, 1, 1, 2, 2, 2, 0, 1, 1, 2, 2]]
        >>> edge_head.tolist()
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    """
    check_int("num_heads", num_heads, 1)
    if isinstance(streaming_heads, (str, bytes)) or not isinstance(streaming_heads, Sequence):
        raise ValueError(f"Expected 'streaming_heads' to be a list of head indices (got {streaming_heads!r})")
    for h in streaming_heads:
        check_int("streaming_heads", h, 0, num_heads - 1)
    if len(set(streaming_heads)) != len(streaming_heads):
        raise ValueError(f"Expected distinct 'streaming_heads' (got {list(streaming_heads)})")
    lengths = as_lengths(n)
    full_graph = causal(lengths) if len(streaming_heads) < num_heads else None
    local = streaming(lengths, num_sinks, window) if streaming_heads else None
    graphs = []
    for h in range(num_heads):
        graph = local if h in streaming_heads else full_graph
        assert graph is not None  # built above for the heads that have it
        graphs.append(graph)
    # each graph is within the budget; their copies, one per head, must be too
    check_edges("duo_attention", sum(int(g.size(1)) for g in graphs), n=lengths)
    return per_head(graphs)
