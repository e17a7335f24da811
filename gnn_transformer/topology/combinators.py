"""Set algebra on token graphs, and graphs from any ``(i, j) -> bool`` rule.

``union(a, b)`` attends where either does (Longformer = window ∪ global), ``intersection(a, b)``
where both do (causal ∩ window = causal sliding window), ``difference(a, b)`` where ``a`` does and
``b`` does not. All operands must have the same ``sparse_size``; the result is sorted by target
and has no duplicated edge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths, check_keys, coalesce_edges, finalize


def shared_sizes(graphs: Sequence[Tensor], what: str) -> tuple[int, int]:
    """Common ``(num_src, num_dst)``: from the ``EdgeIndex`` operands, else ``max + 1``."""
    if len(graphs) == 0:
        raise ValueError(f"'{what}' needs at least one graph")
    sizes, high = set(), 0
    for g in graphs:
        if (
            not isinstance(g, Tensor)
            or g.dim() != 2
            or g.size(0) != 2
            or g.is_floating_point()
            or g.dtype == torch.bool
        ):
            raise ValueError(
                f"Expected each graph of '{what}' to be an integer edge_index [2, E] "
                f"(got {type(g).__name__} {list(getattr(g, 'shape', []))})"
            )
        if g.numel() and int(g.min()) < 0:
            raise ValueError(f"Expected the graphs of '{what}' to have non-negative node indices (got {int(g.min())})")
        if isinstance(g, EdgeIndex) and None not in g.sparse_size():
            sizes.add(tuple(g.sparse_size()))
        elif g.numel():
            high = max(high, int(g.max()) + 1)
    if len(sizes) > 1:
        raise ValueError(f"Expected the graphs of '{what}' to have the same sparse_size (got {sorted(sizes)})")
    if not sizes:
        check_keys(high, high)
        return high, high
    num_src, num_dst = sizes.pop()
    check_keys(num_src, num_dst)  # edge keys dst * num_src + src below
    if high > min(num_src, num_dst) and any(not isinstance(g, EdgeIndex) for g in graphs):
        for g in graphs:
            if g.numel() and (int(g[0].max()) >= num_src or int(g[1].max()) >= num_dst):
                raise ValueError(f"A graph of '{what}' has nodes outside sparse_size {(num_src, num_dst)}")
    return num_src, num_dst


def _keys(g: Tensor, num_src: int) -> Tensor:
    plain = g.as_tensor() if isinstance(g, EdgeIndex) else g
    return torch.unique(plain[1].long() * max(num_src, 1) + plain[0].long())  # sorted, unique


def _from_keys(key: Tensor, num_src: int, num_dst: int) -> EdgeIndex:
    s = max(num_src, 1)
    return EdgeIndex(torch.stack([key % s, key // s]), sparse_size=(num_src, num_dst), sort_order="col")


def union(*graphs: Tensor) -> EdgeIndex:
    """Edges present in any of ``graphs``.

    Example:
        >>> from gnn_transformer.topology import sliding_window
        >>> union(sliding_window(3, 0), sliding_window(3, 1)).tolist()
        [[0, 1, 0, 1, 2, 1, 2], [0, 0, 1, 1, 1, 2, 2]]
    """
    num_src, num_dst = shared_sizes(graphs, "union")
    plain = [g.as_tensor() if isinstance(g, EdgeIndex) else g for g in graphs]
    src = torch.cat([p[0] for p in plain])
    dst = torch.cat([p[1] for p in plain])
    return coalesce_edges(src, dst, num_src, num_dst)


def intersection(*graphs: Tensor) -> EdgeIndex:
    """Edges present in every one of ``graphs``.

    Example:
        >>> from gnn_transformer.topology import sliding_window, causal
        >>> intersection(causal(3), sliding_window(3, 1)).tolist()
        [[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]]
    """
    num_src, num_dst = shared_sizes(graphs, "intersection")
    key = _keys(graphs[0], num_src)
    for g in graphs[1:]:
        key = key[torch.isin(key, _keys(g, num_src))]
    return _from_keys(key, num_src, num_dst)


def difference(a: Tensor, b: Tensor) -> EdgeIndex:
    """Edges of ``a`` that are not in ``b``.

    Example:
        >>> from gnn_transformer.topology import causal, sliding_window
        >>> difference(causal(3), sliding_window(3, 0)).tolist()
        [[0, 0, 1], [1, 2, 2]]
    """
    num_src, num_dst = shared_sizes([a, b], "difference")
    key = _keys(a, num_src)
    return _from_keys(key[~torch.isin(key, _keys(b, num_src))], num_src, num_dst)


def from_predicate(
    n: Lengths,
    fn: Callable[..., bool],
    *,
    src_lengths: Lengths | None = None,
    with_length: bool = False,
    max_pairs: int = 1_000_000,
) -> EdgeIndex:
    """Brute-force graph of a rule: ``j -> i`` iff ``fn(i, j)`` (local positions in each sequence).

    Calls ``fn`` once per pair, so it is for small graphs: tests, and prototyping a new pattern
    before writing its vectorized builder.

    Args:
        n: query (target) lengths: an int or a list (a batch).
        fn: ``fn(i, j) -> bool``; with ``with_length``, ``fn(i, j, L)`` (``fn(i, j, L_q, L_k)``
            for a bipartite graph), for rules that depend on the sequence length.
        src_lengths: key (source) lengths for a bipartite (cross-attention) graph; default ``n``.
        with_length: pass the length(s) of the sequence to ``fn``.
        max_pairs: refuse graphs with more candidate pairs than this.

    Example:
        >>> from_predicate(3, lambda i, j: j <= i).tolist()
        [[0, 0, 1, 0, 1, 2], [0, 1, 1, 2, 2, 2]]
    """
    q_len = as_lengths(n)
    bipartite = src_lengths is not None
    k_len = as_lengths(src_lengths, "src_lengths") if src_lengths is not None else q_len
    if len(k_len) != len(q_len):
        raise ValueError(f"Expected 'src_lengths' to have {len(q_len)} entries (got {len(k_len)})")
    if not callable(fn):
        raise ValueError(f"Expected 'fn' to be callable (got {fn!r})")
    pairs = sum(a * b for a, b in zip(q_len, k_len))
    if pairs > max_pairs:
        raise ValueError(f"from_predicate is brute force: {pairs} pairs exceed 'max_pairs'={max_pairs}")
    src, dst = [], []
    q_off = k_off = 0
    for lq, lk in zip(q_len, k_len):
        extra = ((lq, lk) if bipartite else (lq,)) if with_length else ()
        for i in range(lq):
            for j in range(lk):
                if fn(i, j, *extra):
                    src.append(k_off + j)
                    dst.append(q_off + i)
        q_off += lq
        k_off += lk
    return finalize(torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long), k_off, q_off)
